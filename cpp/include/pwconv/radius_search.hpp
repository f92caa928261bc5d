// Fixed-radius neighbour search (closed cube or ball) returning CSR, rows in ascending index order,
// and the two-pass protocol shared with the kernel map: gather (pairs found and counted per block
// of queries, under a pair budget), then emit into the caller's exactly-sized CSR arrays.
#ifndef PWCONV_RADIUS_SEARCH_HPP
#define PWCONV_RADIUS_SEARCH_HPP

#include <cstdint>
#include <vector>

#include "pwconv/common.hpp"
#include "pwconv/grid.hpp"
#include "pwconv/kdtree.hpp"

namespace pwconv {

enum class Metric : int { chebyshev = 0, euclidean = 1 };

/// Query points of a search.  xyz == nullptr means "the index's own points" (m = n_points and the
/// index's batch); otherwise xyz is (m, 3) row-major, packed into clouds by `batch`, whose cloud
/// count must equal the index's.  Not owned.
template <class T>
struct Queries {
    const T* xyz = nullptr;
    int64_t m = 0;
    Batch batch;
};

/// Pass-1 result of a search: every query's neighbours, kept per block of queries (in the order
/// the index visits them) until emit_* copies them into caller-allocated CSR arrays.  When the
/// number of pairs exceeds the pair budget the pairs are counted but not kept (complete = false),
/// so the caller can report the exact size of what was asked for without having allocated it.
struct PairBlocks {
    static constexpr int64_t kBlockSize = 256;  ///< queries per block (one thread each)
    int64_t n_queries = 0;
    int64_t n_pairs = 0;     ///< exact number of pairs, kept or not
    bool complete = true;    ///< false when n_pairs went over the budget: keys were dropped
    int cell_bits = 0;       ///< key = (point index << cell_bits) | kernel cell
    std::vector<int64_t> query_of;  ///< visit position -> query index (empty: identity)
    std::vector<int64_t> row_len;   ///< (n_queries,) pairs per visit position
    std::vector<std::vector<int64_t>> keys;  ///< per block, rows concatenated, each row ascending

    int64_t n_blocks() const { return (n_queries + kBlockSize - 1) / kBlockSize; }
    int64_t memory_bytes() const;
};

/// Pass 1 of a radius search: all pairs (q_i, p_j) with p_j within `radius` of q_i (closed), over
/// Index = Grid or KdTree.  Keeps at most about max_pairs pairs (see PairBlocks).
template <class Index, class T>
void radius_search_gather(const Index& index, const Queries<T>& queries, double radius,
                          Metric metric, int64_t max_pairs, PairBlocks& out, int threads);

/// CSR row splits (n_queries + 1,) of a gathered search.
void pair_splits(const PairBlocks& pairs, int64_t* splits);

/// Pass 2 of a radius search: index_e (n_pairs,) receives the caller's point indices, each row
/// ascending.  Requires pairs.complete and splits from pair_splits.
void radius_search_emit(const PairBlocks& pairs, const int64_t* splits, int64_t* index_e,
                        int threads);

}  // namespace pwconv

#endif  // PWCONV_RADIUS_SEARCH_HPP
