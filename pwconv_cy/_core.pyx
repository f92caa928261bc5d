# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
# distutils: language = c++
"""Thin bindings of the C++ core.  Inputs arrive validated and canonical (see _validation.py);
this module only translates arrays to pointers, releases the GIL and maps C++ exceptions."""
import signal
import threading

import numpy as np

from cython.operator cimport dereference as deref
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint64_t
from libcpp.memory cimport unique_ptr, make_unique

# The declarations come from _core.pxd (cimported implicitly).

COMPILER = PWCONV_COMPILER_STR
OPENMP_VERSION = PWCONV_OPENMP_VERSION_STR
NATIVE_BUILD = bool(PWCONV_NATIVE_BUILD_INT)

cdef extern from *:
    """
    static const char* PWCONV_COMPILER_STR = PWCONV_COMPILER;
    static const char* PWCONV_OPENMP_VERSION_STR = PWCONV_OPENMP_VERSION;
    static const int PWCONV_NATIVE_BUILD_INT = PWCONV_NATIVE_BUILD;
    static const char* PWCONV_INTERRUPTED_STR = pwconv::Interrupted::kMessage;
    """
    const char* PWCONV_COMPILER_STR
    const char* PWCONV_OPENMP_VERSION_STR
    const int PWCONV_NATIVE_BUILD_INT
    const char* PWCONV_INTERRUPTED_STR


def has_openmp():
    """True when the compiled core uses OpenMP."""
    return bool(openmp_enabled())


def omp_default_threads():
    """The OpenMP default thread count (honours OMP_NUM_THREADS and threadpoolctl)."""
    return default_threads()


def fingerprint_(const uint8_t[::1] data, int threads):
    """A 64-bit fingerprint of the bytes (see fingerprint in common.hpp): int."""
    cdef int64_t n = data.shape[0]
    cdef uint64_t h
    with nogil:
        h = fingerprint(&data[0] if n else NULL, n, threads)
    return h

def simd_state():
    """(available, enabled) of the AVX-512 loops (kernel map filters, operator)."""
    return bool(simd_available()), bool(simd_enabled())


def set_simd(cbool enabled):
    """Lets the SIMD loops run where available (True) or forces the portable ones (False);
    returns the previous request."""
    return bool(set_simd_enabled(enabled))


def avx2_state():
    """(available, enabled) of the AVX2 loops (kernel-map filters and the operator's wide layers,
    where AVX-512 is missing or not allowed)."""
    return bool(avx2_available()), bool(avx2_enabled())


def set_avx512(cbool allowed):
    """With SIMD on, allow AVX-512 (True, the default) or keep to the AVX2 loops (False: tests
    and comparisons); returns the previous setting."""
    return bool(set_avx512_allowed(allowed))


cdef class interruptible:
    """Context manager around a long call of the core: Ctrl-C stops it between blocks of work
    and raises KeyboardInterrupt.  On the main thread, while Python's default SIGINT handler is in
    place, a C-level handler is swapped in for the duration of the call (the GIL is released, so
    Python's own handler could not run until the call returned).  Elsewhere the call runs as is."""
    cdef unique_ptr[SigintScope] _scope
    cdef bint _owner

    def __enter__(self):
        self._owner = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self._owner:
            clear_interrupt()
            self._scope.reset(new SigintScope())
        return self

    def __exit__(self, exc_type, exc, tb):
        self._scope.reset()
        stopped = exc_type is RuntimeError and str(exc) == INTERRUPTED_MESSAGE
        if self._owner and interrupt_requested():
            clear_interrupt()
            stopped = True  # Ctrl-C during the call, even if it finished its last block
        if stopped:
            raise KeyboardInterrupt from None
        return False


INTERRUPTED_MESSAGE = PWCONV_INTERRUPTED_STR.decode()


def _request_interrupt():
    """Testing hook: requests an interrupt as Ctrl-C would."""
    request_interrupt()


def _clear_interrupt():
    """Testing hook: clears a requested interrupt."""
    clear_interrupt()


cdef inline Batch _batch(const int64_t[::1] offsets):
    cdef Batch batch
    batch.offsets = &offsets[0]
    batch.n_clouds = offsets.shape[0] - 1
    return batch


cdef inline Queries[double] _queries(const double[:, ::1] queries,
                                     const int64_t[::1] query_offsets):
    cdef Queries[double] q
    q.xyz = NULL
    q.m = 0
    if queries is not None:
        q.m = queries.shape[0]
        # A valid pointer even for m == 0 (the core never dereferences it then).
        q.xyz = &queries[0, 0] if q.m > 0 else <const double*>&query_offsets[0]
        q.batch = _batch(query_offsets)
    return q


cdef class SearchIndex:
    """A built grid or kd-tree over a packed batch of clouds (see neighbors.NeighborIndex)."""
    cdef unique_ptr[Grid] _grid
    cdef unique_ptr[KdTree] _tree
    cdef readonly str method
    cdef readonly int64_t n_points
    cdef readonly int64_t n_clouds

    def __init__(self, points, const int64_t[::1] offsets, double cell_size, str method,
                 int leaf_size, int threads):
        cdef Batch batch = _batch(offsets)
        cdef const float[:, ::1] p32
        cdef const double[:, ::1] p64
        cdef int64_t n = points.shape[0]
        cdef double dummy = 0
        self.method = method
        self.n_points = n
        self.n_clouds = batch.n_clouds
        if method == "grid":
            self._grid = make_unique[Grid]()
        else:
            self._tree = make_unique[KdTree]()
        if points.dtype == np.float32:
            p32 = points
            with interruptible():
                with nogil:
                    if self._grid:
                        build_grid[float](deref(self._grid), &p32[0, 0] if n else <float*>&dummy, n,
                                          batch, cell_size, threads)
                    else:
                        build_kdtree[float](deref(self._tree), &p32[0, 0] if n else <float*>&dummy,
                                            n, batch, leaf_size, threads)
        else:
            p64 = points
            with interruptible():
                with nogil:
                    if self._grid:
                        build_grid[double](deref(self._grid), &p64[0, 0] if n else &dummy, n, batch,
                                           cell_size, threads)
                    else:
                        build_kdtree[double](deref(self._tree), &p64[0, 0] if n else &dummy, n,
                                             batch, leaf_size, threads)

    @property
    def memory_bytes(self):
        return deref(self._grid).memory_bytes() if self._grid else deref(self._tree).memory_bytes()

    @property
    def n_cells(self):
        return deref(self._grid).n_cells() if self._grid else 0

    def radius_gather(self, const double[:, ::1] queries, const int64_t[::1] query_offsets,
                      double radius, int metric, int64_t max_pairs, int threads):
        """Pass 1 of a radius search; returns a Pairs handle (n_pairs, complete)."""
        cdef Queries[double] q = _queries(queries, query_offsets)
        cdef Metric met = Metric.chebyshev if metric == 0 else Metric.euclidean
        cdef Pairs pairs = Pairs()
        with interruptible():
            with nogil:
                if self._grid:
                    radius_search_gather[Grid, double](deref(self._grid), q, radius, met, max_pairs,
                                                       pairs._blocks, threads)
                else:
                    radius_search_gather[KdTree, double](deref(self._tree), q, radius, met,
                                                         max_pairs, pairs._blocks, threads)
        return pairs

    def kernel_gather(self, const double[:, ::1] queries, const int64_t[::1] query_offsets,
                      double voxel_size, int kernel_size, int dilation, int64_t max_pairs,
                      int threads):
        """Pass 1 of a kernel map; returns a Pairs handle (n_pairs, complete)."""
        cdef Queries[double] q = _queries(queries, query_offsets)
        cdef KernelSpec spec
        spec.voxel_size = voxel_size
        spec.kernel_size = kernel_size
        spec.dilation = dilation
        cdef Pairs pairs = Pairs()
        with interruptible():
            with nogil:
                if self._grid:
                    kernel_map_gather[Grid, double](deref(self._grid), q, spec, max_pairs,
                                                    pairs._blocks, threads)
                else:
                    kernel_map_gather[KdTree, double](deref(self._tree), q, spec, max_pairs,
                                                      pairs._blocks, threads)
        return pairs


cdef class Pairs:
    """Gathered neighbour pairs (pass 1), emitted into exactly-sized NumPy arrays (pass 2)."""
    cdef PairBlocks _blocks

    @property
    def n_pairs(self):
        return self._blocks.n_pairs

    @property
    def complete(self):
        return self._blocks.complete

    @property
    def memory_bytes(self):
        return self._blocks.memory_bytes()

    def splits(self):
        splits = np.empty(self._blocks.n_queries + 1, dtype=np.int64)
        cdef int64_t[::1] s = splits
        with nogil:
            pair_splits(self._blocks, &s[0])
        return splits

    def emit_radius(self, const int64_t[::1] splits, int threads):
        cdef int64_t total = splits[splits.shape[0] - 1]
        index = np.empty(total, dtype=np.int64)
        cdef int64_t[::1] idx = index
        cdef int64_t dummy = 0
        cdef int64_t* out = &idx[0] if total else &dummy
        with interruptible():
            with nogil:
                radius_search_emit(self._blocks, &splits[0], out, threads)
        return index

    def emit_kernel(self, const int64_t[::1] splits, cell_dtype, index_dtype, int threads):
        """(index, cell): index of index_dtype (int32 for maps of fewer than 2**31 points, or
        int64), cell of cell_dtype.  The counts are not made (kernel_map_counts_)."""
        cdef int64_t total = splits[splits.shape[0] - 1]
        index = np.empty(total, dtype=index_dtype)
        cell = np.empty(total, dtype=cell_dtype)
        _emit_kernel(self, splits, index, cell, threads)
        return index, cell


# --- Pointwise convolution -------------------------------------------------------------------

ctypedef fused real_t:
    float
    double

ctypedef fused cell_t:
    uint8_t
    int16_t
    int32_t


ctypedef fused index_t:
    int32_t
    int64_t


def _emit_kernel(Pairs pairs, const int64_t[::1] splits, index_t[::1] index, cell_t[::1] cell,
                 int threads):
    """kernel_map_emit into index (int32 or int64) and cell (uint8, int16 or int32)."""
    cdef int64_t total = index.shape[0]
    cdef index_t dummy_i = 0
    cdef cell_t dummy_c = 0
    with interruptible():
        with nogil:
            kernel_map_emit(pairs._blocks, &splits[0], &index[0] if total else &dummy_i,
                            &cell[0] if total else &dummy_c, threads)


cdef inline KernelMapView[cell_t, index_t] _map_view(const int64_t[::1] splits,
                                                     const index_t[::1] index,
                                                     const cell_t[::1] cell,
                                                     const int32_t[:, ::1] counts,
                                                     int64_t n_points, int kernel_size):
    cdef KernelMapView[cell_t, index_t] view
    view.m = splits.shape[0] - 1
    view.n = n_points
    view.kernel_size = kernel_size
    view.splits = &splits[0]
    view.index = &index[0] if index.shape[0] else NULL
    view.cell = &cell[0] if cell.shape[0] else NULL
    view.counts = &counts[0, 0] if counts is not None and counts.shape[0] else NULL
    return view


def kernel_map_counts_(const int64_t[::1] splits, const cell_t[::1] cell, int kernel_size,
                       int threads):
    """counts (m, K^3) int32 of a kernel map: counts[i, f] = entries of row i in cell f."""
    cdef int64_t m = splits.shape[0] - 1
    counts = np.empty((m, kernel_size ** 3), dtype=np.int32)
    cdef int32_t[:, ::1] cnt = counts
    if m and splits[m]:
        with nogil:
            kernel_map_counts(&splits[0], &cell[0], m, kernel_size, &cnt[0, 0], threads)
    elif m:
        counts.fill(0)
    return counts


def transpose_map(const int64_t[::1] splits, const index_t[::1] index, const cell_t[::1] cell,
                  const int32_t[:, ::1] counts, int64_t n_points, int kernel_size,
                  const int64_t[::1] offsets, const int64_t[::1] query_offsets, bint with_counts,
                  int threads):
    """Transposed kernel map: (tsplits (n+1,), tkeys (E,), count_bits) with
    tkeys = ((row << bits | cell) << count_bits) | min(count, 2**count_bits - 1); count_bits 0
    unless with_counts.  offsets and query_offsets: the map's batches (or None)."""
    cdef KernelMapView[cell_t, index_t] view = _map_view(splits, index, cell, counts, n_points,
                                                         kernel_size)
    cdef int64_t n_entries = index.shape[0]
    cdef int count_bits = 0
    if with_counts:
        count_bits = transposed_count_bits(splits.shape[0] - 1, kernel_size)
    cdef Batch points, queries
    if offsets is not None and query_offsets is not None:
        points = _batch(offsets)
        queries = _batch(query_offsets)
    tsplits = np.empty(n_points + 1, dtype=np.int64)
    tkeys = np.empty(n_entries, dtype=np.int64)
    cdef int64_t[::1] ts = tsplits
    cdef int64_t[::1] tk = tkeys
    with interruptible():
        with nogil:
            transpose_kernel_map(view, points, queries, count_bits, &ts[0],
                                 &tk[0] if n_entries else NULL, threads)
    return tsplits, tkeys, count_bits


def conv_forward_(const int64_t[::1] splits, const index_t[::1] index, const cell_t[::1] cell,
                  int kernel_size, const real_t[:, ::1] x, const real_t[::1] weight,
                  int64_t c_out, bint depthwise, real_t[:, ::1] y, int threads):
    """y (m, c_out) = pointwise convolution of x (n, c_in) with the flattened weight (the map's
    counts are not needed: each row's are tallied)."""
    cdef const int32_t[:, ::1] no_counts = None
    cdef KernelMapView[cell_t, index_t] view = _map_view(splits, index, cell, no_counts,
                                                         x.shape[0], kernel_size)
    with interruptible():
        with nogil:
            conv_forward(view, &x[0, 0] if x.shape[0] else NULL, x.shape[1], &weight[0], c_out,
                         depthwise, &y[0, 0] if y.shape[0] else NULL, threads)


def conv_backward_(const int64_t[::1] splits, const index_t[::1] index, const cell_t[::1] cell,
                   const int32_t[:, ::1] counts, int kernel_size, const int64_t[::1] tsplits,
                   const int64_t[::1] tkeys, int count_bits,
                   const real_t[:, ::1] x, const real_t[:, ::1] grad_y,
                   const real_t[::1] weight, bint depthwise, real_t[:, ::1] grad_x,
                   real_t[::1] grad_weight, int threads):
    """grad_x (n, c_in) (or None: not computed) and grad_weight (flattened like the weight) from
    x (n, c_in) and grad_y (m, c_out), over the transposed map (keys with count_bits)."""
    cdef KernelMapView[cell_t, index_t] view = _map_view(splits, index, cell, counts, x.shape[0],
                                                kernel_size)
    cdef real_t* gx = NULL
    if grad_x is not None and grad_x.shape[0]:
        gx = &grad_x[0, 0]
    with interruptible():
        with nogil:
            conv_backward(view, &tsplits[0], &tkeys[0] if tkeys.shape[0] else NULL, count_bits,
                          &x[0, 0] if x.shape[0] else NULL, x.shape[1],
                          &grad_y[0, 0] if grad_y.shape[0] else NULL, grad_y.shape[1],
                          &weight[0], depthwise, gx, &grad_weight[0], threads)


def conv_backward_by_cloud_(const int64_t[::1] splits, const index_t[::1] index,
                            const cell_t[::1] cell, int kernel_size,
                            const int64_t[::1] offsets, const int64_t[::1] query_offsets,
                            const real_t[:, ::1] x, const real_t[:, ::1] grad_y,
                            const real_t[::1] weight, bint depthwise, real_t[:, ::1] grad_x,
                            real_t[::1] grad_weight, int threads):
    """As conv_backward_, collecting the sums cloud by cloud straight from the map, without a
    transposed map or the map's counts (offsets, query_offsets: the map's batches).  Returns
    False, computing nothing, where that path does not apply (fewer than 16 clouds, or a cloud
    too large): then call conv_backward_."""
    cdef const int32_t[:, ::1] no_counts = None
    cdef KernelMapView[cell_t, index_t] view = _map_view(splits, index, cell, no_counts,
                                                         x.shape[0], kernel_size)
    cdef Batch points = _batch(offsets)
    cdef Batch queries = _batch(query_offsets)
    cdef real_t* gx = NULL
    if grad_x is not None and grad_x.shape[0]:
        gx = &grad_x[0, 0]
    cdef cbool done
    with interruptible():
        with nogil:
            done = conv_backward_by_cloud(view, points, queries,
                                          &x[0, 0] if x.shape[0] else NULL, x.shape[1],
                                          &grad_y[0, 0] if grad_y.shape[0] else NULL,
                                          grad_y.shape[1], &weight[0], depthwise, gx,
                                          &grad_weight[0], threads)
    return done


# --- Optimiser updates ------------------------------------------------------------------------

def sgd_update_(real_t[::1] param, const real_t[::1] grad, real_t[::1] momentum_buffer,
                double lr, double momentum, double weight_decay, bint nesterov, int threads):
    """In place: one SGD step on flat param (n,) and momentum_buffer (n,) (or None)."""
    cdef SgdStep step
    step.lr = lr
    step.momentum = momentum
    step.weight_decay = weight_decay
    step.nesterov = nesterov
    cdef int64_t n = param.shape[0]
    cdef real_t* buf = &momentum_buffer[0] if momentum_buffer is not None and n else NULL
    with nogil:
        sgd_update(&param[0] if n else NULL, &grad[0] if n else NULL, buf, n, step, threads)


def adam_update_(real_t[::1] param, const real_t[::1] grad, real_t[::1] exp_avg,
                 real_t[::1] exp_avg_sq, double step_size, double bias_correction2_sqrt,
                 double beta1, double beta2, double eps, double weight_decay,
                 double decay_factor, bint decoupled, int threads):
    """In place: one Adam/AdamW step on flat param, exp_avg, exp_avg_sq (n,)."""
    cdef AdamStep step
    step.step_size = step_size
    step.bias_correction2_sqrt = bias_correction2_sqrt
    step.beta1 = beta1
    step.beta2 = beta2
    step.eps = eps
    step.weight_decay = weight_decay
    step.decay_factor = decay_factor
    step.decoupled = decoupled
    cdef int64_t n = param.shape[0]
    with nogil:
        adam_update(&param[0] if n else NULL, &grad[0] if n else NULL,
                    &exp_avg[0] if n else NULL, &exp_avg_sq[0] if n else NULL, n, step, threads)
