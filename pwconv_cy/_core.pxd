# Declarations of the C++ core (cpp/include/pwconv).  Translation only: no logic here.
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint64_t
from libcpp cimport bool as cbool


cdef extern from "pwconv/common.hpp" namespace "pwconv" nogil:
    cdef cppclass Batch:
        const int64_t* offsets
        int64_t n_clouds

    cbool openmp_enabled()
    int default_threads()
    cbool simd_available()
    cbool simd_enabled()
    cbool set_simd_enabled(cbool enabled)
    cbool set_avx512_allowed(cbool allowed)
    cbool avx2_available()
    cbool avx2_enabled()
    uint64_t fingerprint(const void* data, int64_t nbytes, int threads) except +

    cbool interrupt_requested()
    void request_interrupt()
    void clear_interrupt()
    cdef cppclass SigintScope:
        SigintScope() except +


cdef extern from "pwconv/grid.hpp" namespace "pwconv" nogil:
    cdef cppclass Grid:
        double cell_size
        int64_t n_points
        int64_t n_clouds
        int64_t n_cells()
        int64_t n_rows()
        int64_t memory_bytes()

    void build_grid[T](Grid& grid, const T* points, int64_t n, const Batch& batch,
                       double cell_size, int threads) except +


cdef extern from "pwconv/kdtree.hpp" namespace "pwconv" nogil:
    cdef cppclass KdTree:
        int64_t n_points
        int64_t n_clouds
        int leaf_size
        int64_t memory_bytes()

    void build_kdtree[T](KdTree& tree, const T* points, int64_t n, const Batch& batch,
                         int leaf_size, int threads) except +


cdef extern from "pwconv/radius_search.hpp" namespace "pwconv" nogil:
    cdef enum class Metric "pwconv::Metric":
        chebyshev "pwconv::Metric::chebyshev"
        euclidean "pwconv::Metric::euclidean"

    cdef cppclass Queries[T]:
        const T* xyz
        int64_t m
        Batch batch

    cdef cppclass PairBlocks:
        int64_t n_queries
        int64_t n_pairs
        cbool complete
        int64_t memory_bytes()

    void radius_search_gather[I, T](const I& index, const Queries[T]& queries, double radius,
                                    Metric metric, int64_t max_pairs, PairBlocks& out,
                                    int threads) except +
    void pair_splits(const PairBlocks& pairs, int64_t* splits)
    void radius_search_emit(const PairBlocks& pairs, const int64_t* splits, int64_t* index_e,
                            int threads) except +


cdef extern from "pwconv/kernel_map.hpp" namespace "pwconv" nogil:
    cdef cppclass KernelSpec:
        double voxel_size
        int kernel_size
        int dilation

    void kernel_map_gather[I, T](const I& index, const Queries[T]& queries,
                                 const KernelSpec& spec, int64_t max_pairs, PairBlocks& out,
                                 int threads) except +
    void kernel_map_emit[C, I](const PairBlocks& pairs, const int64_t* splits, I* index_e,
                               C* cell_e, int threads) except +
    void kernel_map_counts[C](const int64_t* splits, const C* cell_e, int64_t m,
                              int kernel_size, int32_t* counts_mf, int threads) except +


cdef extern from "pwconv/conv.hpp" namespace "pwconv" nogil:
    cdef cppclass KernelMapView[C, I]:
        int64_t m
        int64_t n
        int kernel_size
        const int64_t* splits
        const I* index
        const C* cell
        const int32_t* counts

    void transpose_kernel_map[C, I](const KernelMapView[C, I]& map, const Batch& points,
                                    const Batch& queries, int count_bits, int64_t* tsplits,
                                    int64_t* tkeys, int threads) except +
    int transposed_count_bits(int64_t m, int kernel_size)
    void conv_forward[F, C, I](const KernelMapView[C, I]& map, const F* x, int64_t c_in,
                               const F* weight, int64_t c_out, cbool depthwise, F* y,
                               int threads) except +
    void conv_backward[F, C, I](const KernelMapView[C, I]& map, const int64_t* tsplits,
                                const int64_t* tkeys, int count_bits, const F* x,
                                int64_t c_in, const F* grad_y,
                                int64_t c_out, const F* weight, cbool depthwise, F* grad_x,
                                F* grad_weight, int threads) except +
    cbool conv_backward_by_cloud[F, C, I](const KernelMapView[C, I]& map, const Batch& points,
                                          const Batch& queries, const F* x, int64_t c_in,
                                          const F* grad_y, int64_t c_out, const F* weight,
                                          cbool depthwise, F* grad_x, F* grad_weight,
                                          int threads) except +


cdef extern from "pwconv/optim.hpp" namespace "pwconv" nogil:
    cdef cppclass SgdStep:
        double lr
        double momentum
        double weight_decay
        cbool nesterov

    cdef cppclass AdamStep:
        double step_size
        double bias_correction2_sqrt
        double beta1
        double beta2
        double eps
        double weight_decay
        double decay_factor
        cbool decoupled

    void sgd_update[F](F* param, const F* grad, F* momentum_buffer, int64_t n,
                       const SgdStep& step, int threads) except +
    void adam_update[F](F* param, const F* grad, F* exp_avg, F* exp_avg_sq, int64_t n,
                        const AdamStep& step, int threads) except +
