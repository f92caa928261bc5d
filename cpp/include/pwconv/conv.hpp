// Pointwise convolution (SPEC §1): forward, and the exact adjoint (input and weight gradients),
// dense (weight K^3 x c_in x c_out) and depthwise (weight K^3 x c), over a kernel map.
//
// Both passes have the same shape: for every output row, average the source rows of each non-empty
// kernel cell into a small per-block buffer ("slots"), then apply the cell's matrix.  The backward
// runs that gather over the *transposed* kernel map (for every point j, the (i, f) pairs with j in
// Omega_i(f)), so no atomics, and takes the weight gradient from the same slots, reduced from
// fixed-size blocks of points in a fixed order.  Batches of many clouds skip the transposed map:
// a task fills its clouds' slots from the rows directly, in the gather's order (in cache, one
// cloud at a time).  Results are bit-identical for every thread count.
#ifndef PWCONV_CONV_HPP
#define PWCONV_CONV_HPP

#include <cstdint>

#include "pwconv/common.hpp"

namespace pwconv {

/// A kernel map as produced by kernel_map_emit (not owned).
/// splits (m + 1,), index (E,) point indices in [0, n), cell (E,) flat cells in [0, K^3),
/// counts (m, K^3) with counts[i, f] = number of entries of row i in cell f: needed by
/// transpose_kernel_map and conv_backward only (null elsewhere is fine: conv_forward and
/// conv_backward_by_cloud tally each row's cells as they go).
template <class CellT, class IndexT = int64_t>
struct KernelMapView {
    int64_t m = 0;  ///< rows (query points)
    int64_t n = 0;  ///< points the indices refer to
    int kernel_size = 3;
    const int64_t* splits = nullptr;
    const IndexT* index = nullptr;  ///< int32_t (maps of fewer than 2^31 points) or int64_t
    const CellT* cell = nullptr;
    const int32_t* counts = nullptr;

    int64_t n_cells() const { return (int64_t)kernel_size * kernel_size * kernel_size; }
};

/// The transposed kernel map: for every point j, the rows i (ascending) with j in Omega_i(f),
/// packed with the cell and, when count_bits > 0, with the count n_i(f) (saturated at
/// 2^count_bits - 1, which then means "look it up in map.counts"):
/// tkeys[e] = (((i << bits) | f) << count_bits) | min(n_i(f), 2^count_bits - 1), with
/// bits = ceil(log2(K^3)).  The counts let the backward read each entry's weight in order instead
/// of looking it up row by row.  tsplits (n + 1,), tkeys (E,), caller-allocated.  `points` and
/// `queries` are the batches the map was built for (n_clouds = 0: not known); with many clouds,
/// where rows of a cloud refer to points of that cloud only (checked), the transposition runs
/// cloud by cloud, in cache.  The result is the same either way.
template <class CellT, class IndexT>
void transpose_kernel_map(const KernelMapView<CellT, IndexT>& map, const Batch& points,
                          const Batch& queries, int count_bits, int64_t* tsplits, int64_t* tkeys,
                          int threads);

/// The count_bits transpose_kernel_map uses for m rows of kernel size K: 16, or 0 when the rows
/// would not fit in the keys with them.
int transposed_count_bits(int64_t m, int kernel_size);

/// Forward: y (m, c_out) = sum_f mean_{Omega_i(f)} x · W_f.  x (n, c_in), weight (K^3, c_in, c_out)
/// (K^3 x c when depthwise, then c_out = c_in = c).  F is float or double.
template <class F, class CellT, class IndexT>
void conv_forward(const KernelMapView<CellT, IndexT>& map, const F* x, int64_t c_in,
                  const F* weight, int64_t c_out, bool depthwise, F* y, int threads);

/// Both gradients from one gather over the transposed map (tsplits, tkeys from
/// transpose_kernel_map of the same map with count_bits): the slot sums S_{j,f} = sum_{i: j in
/// Omega_i(f)} dy_i / n_i(f) give the input gradient dx_j = sum_f S_{j,f} W_f^T (n, c_in) and the
/// weight gradient dW_f = sum_j x_j^T S_{j,f} (shaped like the weight; the same as
/// sum_i (mean_{Omega_i(f)} x)^T dy_i).  grad_x may be null (weight gradient only).  dW is reduced
/// from fixed blocks of points in a fixed order (independent of the thread count).
template <class F, class CellT, class IndexT>
void conv_backward(const KernelMapView<CellT, IndexT>& map, const int64_t* tsplits,
                   const int64_t* tkeys, int count_bits, const F* x, int64_t c_in,
                   const F* grad_y, int64_t c_out, const F* weight, bool depthwise, F* grad_x,
                   F* grad_weight, int threads);

/// The same gradients for a batch of many clouds, without a transposed map: one cloud at a
/// time, every entry (i, j, f) of the cloud's rows adds dy_i / n_i(f) to the slot of (j, f) in a
/// cloud-sized table (rows ascending, so each slot receives the gather's terms in the gather's
/// order), and the slots, regrouped by point, give dx and dW as in conv_backward.  Runs, and
/// returns true, for at least 16 clouds each needing at most 32 MiB of scratch (`points` and
/// `queries`: the map's batches), a choice that depends on the sizes only; returns false,
/// computing nothing, otherwise (then use conv_backward).  The input gradient equals
/// conv_backward's bit for bit; the weight gradient is reduced from groups of clouds instead of
/// blocks of points (in a fixed order too, the same for every thread count).  Throws if a row
/// refers to a point outside its cloud.
template <class F, class CellT, class IndexT>
bool conv_backward_by_cloud(const KernelMapView<CellT, IndexT>& map, const Batch& points,
                            const Batch& queries, const F* x, int64_t c_in, const F* grad_y,
                            int64_t c_out, const F* weight, bool depthwise, F* grad_x,
                            F* grad_weight, int threads);

}  // namespace pwconv

#endif  // PWCONV_CONV_HPP
