// The kernel map of SPEC §1: for every query point its neighbours in the K^3 kernel cells
// (holes excluded, centre included), the cell of each neighbour and the per-cell counts.
#ifndef PWCONV_KERNEL_MAP_HPP
#define PWCONV_KERNEL_MAP_HPP

#include <cstdint>

#include "pwconv/binning.hpp"
#include "pwconv/radius_search.hpp"

namespace pwconv {

/// Geometry of a kernel: cell edge v > 0 (coordinate units), odd K >= 1, dilation s >= 1.
struct KernelSpec {
    double voxel_size = 1.0;
    int kernel_size = 3;
    int dilation = 1;
};

/// Pass 1: the kernel map's pairs, gathered per block (see PairBlocks), at most ~max_pairs kept.
template <class Index, class T>
void kernel_map_gather(const Index& index, const Queries<T>& queries, const KernelSpec& spec,
                       int64_t max_pairs, PairBlocks& out, int threads);

/// Pass 2: index_e (E,) caller's point indices, rows ascending; cell_e (E,) the flat kernel cell
/// f = (kz*K + ky)*K + kx of each pair.  CellT is uint8_t, int16_t or int32_t and must hold
/// K^3 - 1; IndexT is int64_t, or int32_t when the points number fewer than 2^31.  splits from
/// pair_splits; pairs.complete required.
template <class CellT, class IndexT>
void kernel_map_emit(const PairBlocks& pairs, const int64_t* splits, IndexT* index_e,
                     CellT* cell_e, int threads);

/// counts_mf (m, K^3) = |Omega_i(f)| of a kernel map (splits (m + 1,), cell_e (E,)), row by row.
/// Maps are emitted without them (the convolution kernels tally each row's cells themselves);
/// this gives them to whoever asks.
template <class CellT>
void kernel_map_counts(const int64_t* splits, const CellT* cell_e, int64_t m, int kernel_size,
                       int32_t* counts_mf, int threads);

}  // namespace pwconv

#endif  // PWCONV_KERNEL_MAP_HPP
