#include "pwconv/kdtree.hpp"

#include <algorithm>

namespace pwconv {

namespace {

// Builds the subtree of internal range [begin, end) into `nodes`; returns its id.  `xyz` and
// `order` are permuted together.  Recursion depth is O(log n) (median splits).
int64_t build_node(std::vector<KdNode>& nodes, double* xyz, int64_t* order, int64_t begin,
                   int64_t end, int leaf_size, std::vector<int64_t>& perm,
                   std::vector<double>& scratch) {
    KdNode node;
    for (int a = 0; a < 3; ++a) node.lo[a] = node.hi[a] = xyz[3 * begin + a];
    for (int64_t p = begin + 1; p < end; ++p)
        for (int a = 0; a < 3; ++a) {
            node.lo[a] = std::min(node.lo[a], xyz[3 * p + a]);
            node.hi[a] = std::max(node.hi[a], xyz[3 * p + a]);
        }
    node.begin = begin;
    node.end = end;
    node.left = node.right = -1;
    const int64_t id = (int64_t)nodes.size();
    nodes.push_back(node);
    if (end - begin <= leaf_size) return id;

    int axis = 0;
    for (int a = 1; a < 3; ++a)
        if (node.hi[a] - node.lo[a] > node.hi[axis] - node.lo[axis]) axis = a;
    const int64_t mid = begin + (end - begin) / 2;
    // Median split through a permutation, ties broken by position (deterministic).
    perm.resize(end - begin);
    for (int64_t p = begin; p < end; ++p) perm[p - begin] = p;
    std::nth_element(perm.begin(), perm.begin() + (mid - begin), perm.end(),
                     [xyz, axis](int64_t p, int64_t q) {
                         const double u = xyz[3 * p + axis], v = xyz[3 * q + axis];
                         return u < v || (u == v && p < q);
                     });
    scratch.resize(4 * (end - begin));
    for (int64_t k = 0; k < end - begin; ++k) {
        const int64_t p = perm[k];
        for (int a = 0; a < 3; ++a) scratch[4 * k + a] = xyz[3 * p + a];
        scratch[4 * k + 3] = (double)order[p];  // exact: indices < 2^53
    }
    for (int64_t k = 0; k < end - begin; ++k) {
        for (int a = 0; a < 3; ++a) xyz[3 * (begin + k) + a] = scratch[4 * k + a];
        order[begin + k] = (int64_t)scratch[4 * k + 3];
    }
    const int64_t left = build_node(nodes, xyz, order, begin, mid, leaf_size, perm, scratch);
    const int64_t right = build_node(nodes, xyz, order, mid, end, leaf_size, perm, scratch);
    nodes[id].left = left;
    nodes[id].right = right;
    return id;
}

}  // namespace

int64_t KdTree::memory_bytes() const {
    return (int64_t)(sizeof(int64_t) * (cloud_offsets.size() + cloud_root.size() + order.size()) +
                     sizeof(double) * 3 * order.size() + sizeof(KdNode) * nodes.size());
}

template <class T>
void build_kdtree(KdTree& tree, const T* points, int64_t n, const Batch& batch, int leaf_size,
                  int threads) {
    check_batch(batch, n, "offsets");
    require(leaf_size >= 1, "leaf_size must be at least 1");
    threads = resolve_threads(threads);
    const int64_t n_clouds = batch.n_clouds;
    tree = KdTree();
    tree.n_points = n;
    tree.n_clouds = n_clouds;
    tree.leaf_size = leaf_size;
    tree.cloud_offsets.assign(batch.offsets, batch.offsets + n_clouds + 1);
    tree.cloud_root.assign(n_clouds, -1);
    tree.order.resize(n);
    std::vector<double> xyz(3 * n);  // interleaved while building, split into coord[] after
    for (int64_t i = 0; i < n; ++i) {
        tree.order[i] = i;
        for (int a = 0; a < 3; ++a) xyz[3 * i + a] = (double)points[3 * i + a];
    }
    std::vector<std::vector<KdNode>> cloud_nodes(n_clouds);
    RegionErrors errors;
    // schedule(dynamic): clouds may differ wildly in size.
#pragma omp parallel num_threads(threads)
    {
        std::vector<int64_t> perm;
        std::vector<double> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_clouds; ++b) errors.run([&] {
            const int64_t begin = batch.offsets[b], end = batch.offsets[b + 1];
            if (begin == end) return;
            cloud_nodes[b].reserve(2 * ((end - begin) / leaf_size + 1));
            build_node(cloud_nodes[b], xyz.data(), tree.order.data(), begin, end, leaf_size,
                       perm, scratch);
        });
    }
    errors.rethrow();
    for (int a = 0; a < 3; ++a) {
        tree.coord[a].resize(n);
        for (int64_t i = 0; i < n; ++i) tree.coord[a][i] = xyz[3 * i + a];
    }
    int64_t total = 0;
    for (int64_t b = 0; b < n_clouds; ++b) total += (int64_t)cloud_nodes[b].size();
    tree.nodes.reserve(total);
    for (int64_t b = 0; b < n_clouds; ++b) {
        if (cloud_nodes[b].empty()) continue;
        const int64_t base = (int64_t)tree.nodes.size();
        tree.cloud_root[b] = base;
        for (KdNode node : cloud_nodes[b]) {
            if (node.left >= 0) {
                node.left += base;
                node.right += base;
            }
            tree.nodes.push_back(node);
        }
        std::vector<KdNode>().swap(cloud_nodes[b]);
    }
}

template void build_kdtree<float>(KdTree&, const float*, int64_t, const Batch&, int, int);
template void build_kdtree<double>(KdTree&, const double*, int64_t, const Batch&, int, int);

}  // namespace pwconv
