// kd-tree over a packed batch of clouds: one balanced tree per cloud, tight node boxes,
// points stored in tree order.  Answers the same queries as the grid with identical results.
#ifndef PWCONV_KDTREE_HPP
#define PWCONV_KDTREE_HPP

#include <cstdint>
#include <vector>

#include "pwconv/common.hpp"

namespace pwconv {

struct KdNode {
    double lo[3], hi[3];  ///< tight bounding box of the node's points
    int64_t begin, end;   ///< internal point range
    int64_t left, right;  ///< child node ids, -1 for a leaf
};

/// A kd-tree index.  Built by build_kdtree; read-only afterwards.
struct KdTree {
    int64_t n_points = 0;
    int64_t n_clouds = 0;
    int leaf_size = 16;
    std::vector<int64_t> cloud_offsets;  ///< (n_clouds + 1,)
    std::vector<int64_t> cloud_root;     ///< (n_clouds,) root node id, -1 for an empty cloud
    std::vector<int64_t> order;          ///< (n_points,) internal position -> caller's index
    std::vector<double> coord[3];        ///< x, y, z (n_points,) each, float64, internal order
    std::vector<KdNode> nodes;

    int64_t memory_bytes() const;
};

/// Builds one tree per cloud of points (n, 3) (float or double), split at the median of the
/// widest axis until at most leaf_size (>= 1) points remain.
template <class T>
void build_kdtree(KdTree& tree, const T* points, int64_t n, const Batch& batch, int leaf_size,
                  int threads);

}  // namespace pwconv

#endif  // PWCONV_KDTREE_HPP
