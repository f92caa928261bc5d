// Internal: candidate enumeration shared by the radius search and the kernel map.
//
// A query is described by per-axis lists of closed coordinate intervals (one for a radius search,
// up to K for a dilated kernel: only the kernel cells, not the holes between them).  The bounds are
// widened by a few ulps so that every point the exact predicate (binning.hpp) can accept is
// enumerated; the predicate then decides.  Grid and kd-tree therefore return identical sets.
#ifndef PWCONV_CANDIDATES_HPP
#define PWCONV_CANDIDATES_HPP

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pwconv/binning.hpp"
#include "pwconv/grid.hpp"
#include "pwconv/kdtree.hpp"

namespace pwconv {
namespace detail {

/// Relative widening of candidate bounds: 2^-48 of the magnitudes involved, far above the
/// rounding error of the predicate (a few ulps), far below any cell.
constexpr double kBoundSlack = 3.552713678800501e-15;

/// Per-axis sorted, disjoint closed intervals.
struct QueryBox {
    int count[3] = {0, 0, 0};
    std::vector<double> lo[3], hi[3];

    void clear() {
        for (int a = 0; a < 3; ++a) {
            count[a] = 0;
            lo[a].clear();
            hi[a].clear();
        }
    }
    /// Appends [a, b] on `axis`; intervals must come in ascending order; overlaps are merged.
    void add(int axis, double a, double b) {
        if (count[axis] > 0 && a <= hi[axis].back()) {
            hi[axis].back() = std::max(hi[axis].back(), b);
            return;
        }
        lo[axis].push_back(a);
        hi[axis].push_back(b);
        ++count[axis];
    }
};

/// Box of a closed radius-r cube/ball around q.
inline void radius_box(QueryBox& box, const double q[3], double radius) {
    box.clear();
    for (int a = 0; a < 3; ++a) {
        const double slack = (std::fabs(q[a]) + radius) * kBoundSlack;
        box.add(a, (q[a] - radius) - slack, (q[a] + radius) + slack);
    }
}

/// Per-query exact kernel bounds (binning.hpp): x lies in kernel cell k along axis a iff
/// start[a][k] <= x < end[a][k].
struct KernelBounds {
    int kernel_size = 0;
    std::vector<double> start[3], end[3];

    void compute(const double lo[3], double voxel_size, int kernel_size_, int dilation) {
        kernel_size = kernel_size_;
        for (int a = 0; a < 3; ++a) {
            start[a].resize(kernel_size);
            end[a].resize(kernel_size);
            kernel_axis_bounds(lo[a], voxel_size, kernel_size, dilation, start[a].data(),
                               end[a].data());
        }
    }
};

/// Box of the K^3 kernel cells (holes excluded) from exact bounds.
inline void kernel_box(QueryBox& box, const KernelBounds& bounds) {
    box.clear();
    for (int a = 0; a < 3; ++a)
        for (int k = 0; k < bounds.kernel_size; ++k)
            if (bounds.start[a][k] < bounds.end[a][k])
                box.add(a, bounds.start[a][k], bounds.end[a][k]);
}

/// Cell-coordinate ranges of the box's intervals on one axis, merged; returns the number of
/// cells covered (as double: saturated coordinates can span 2^63).
inline double cell_ranges(const QueryBox& box, int axis, double origin, double cell_size,
                          double inv_cell_size, std::vector<int64_t>& first,
                          std::vector<int64_t>& last) {
    first.clear();
    last.clear();
    double total = 0;
    for (int k = 0; k < box.count[axis]; ++k) {
        const int64_t c0 = grid_coord(box.lo[axis][k], origin, cell_size, inv_cell_size);
        const int64_t c1 = grid_coord(box.hi[axis][k], origin, cell_size, inv_cell_size);
        if (!first.empty() && c0 <= last.back() + 1) {
            if (c1 > last.back()) {
                total += (double)c1 - (double)last.back();
                last.back() = c1;
            }
            continue;
        }
        first.push_back(c0);
        last.push_back(c1);
        total += (double)c1 - (double)c0 + 1.0;
    }
    return total;
}

inline bool in_ranges(int64_t c, const std::vector<int64_t>& first,
                      const std::vector<int64_t>& last) {
    for (size_t k = 0; k < first.size(); ++k)
        if (c >= first[k] && c <= last[k]) return true;
    return false;
}

/// Scratch space of one thread for grid enumeration.  Consecutive queries (in spatial order)
/// usually cover the same grid rows, so the rows of the previous query are kept.
struct GridScratch {
    std::vector<int64_t> first[3], last[3];
    int64_t cached_cloud = -1;
    std::vector<int64_t> cached_first[2], cached_last[2];  // y and z ranges of the cached rows
    std::vector<int64_t> rows;

    bool rows_cached(int64_t cloud) const {
        return cloud == cached_cloud && first[1] == cached_first[0] &&
               last[1] == cached_last[0] && first[2] == cached_first[1] &&
               last[2] == cached_last[1];
    }
    void remember(int64_t cloud) {
        cached_cloud = cloud;
        cached_first[0] = first[1];
        cached_last[0] = last[1];
        cached_first[1] = first[2];
        cached_last[1] = last[2];
    }
};

/// Calls fn(begin, end) for runs of internal point positions of cloud `cloud` that may lie in box.
template <class Fn>
void for_each_candidate(const Grid& grid, int64_t cloud, const QueryBox& box, GridScratch& s,
                        Fn&& fn) {
    const double* origin = &grid.origin[3 * cloud];
    const double g = grid.cell_size;
    double n_cells[3];
    for (int a = 0; a < 3; ++a) n_cells[a] = cell_ranges(box, a, origin[a], g, grid.inv_cell_size, s.first[a], s.last[a]);

    const int64_t cube = grid.cube_base[cloud];
    if (cube >= 0) {  // compact cloud: each x-range of a row is one point range
        const int64_t nx = grid.cube_nx[cloud], ny = grid.dense_ny[cloud], nz = grid.dense_nz[cloud];
        const int32_t* table = &grid.cube_start[cube];
        const int64_t point_base = grid.cloud_offsets[cloud];
        for (size_t kz = 0; kz < s.first[2].size(); ++kz) {
            const int64_t z0 = std::max<int64_t>(s.first[2][kz], 0);
            const int64_t z1 = std::min<int64_t>(s.last[2][kz], nz - 1);
            for (int64_t cz = z0; cz <= z1; ++cz)
                for (size_t ky = 0; ky < s.first[1].size(); ++ky) {
                    const int64_t y0 = std::max<int64_t>(s.first[1][ky], 0);
                    const int64_t y1 = std::min<int64_t>(s.last[1][ky], ny - 1);
                    for (int64_t cy = y0; cy <= y1; ++cy) {
                        const int32_t* row = table + (cz * ny + cy) * nx;
                        for (size_t kx = 0; kx < s.first[0].size(); ++kx) {
                            const int64_t x0 = std::max<int64_t>(s.first[0][kx], 0);
                            const int64_t x1 = std::min<int64_t>(s.last[0][kx], nx - 1);
                            if (x0 > x1) continue;
                            const int64_t b = row[x0], e = row[x1 + 1];
                            if (e > b) fn(point_base + b, point_base + e);
                        }
                    }
                }
        }
        return;
    }

    auto visit_row = [&](int64_t r) {
        const int64_t cb = grid.row_cell_begin[r], ce = grid.row_cell_begin[r + 1];
        int64_t c = cb;
        for (size_t k = 0; k < s.first[0].size() && c < ce; ++k) {
            while (c < ce && grid.cell_x[c] < s.first[0][k]) ++c;
            const int64_t run_first = c;
            while (c < ce && grid.cell_x[c] <= s.last[0][k]) ++c;
            if (c > run_first) fn(grid.cell_begin[run_first], grid.cell_begin[c]);
        }
    };

    if (!s.rows_cached(cloud)) {
        s.rows.clear();
        const int64_t row_begin = grid.cloud_row_begin[cloud];
        const int64_t row_end = grid.cloud_row_begin[cloud + 1];
        if (n_cells[1] * n_cells[2] > (double)(row_end - row_begin)) {
            // The box spans more grid rows than the cloud has: walk the cloud's rows instead.
            // This bounds the work by the cloud's size whatever the ratio of box to cell.
            for (int64_t r = row_begin; r < row_end; ++r) {
                const int64_t* key = &grid.row_key[3 * r];
                if (in_ranges(key[1], s.first[2], s.last[2]) &&
                    in_ranges(key[2], s.first[1], s.last[1]))
                    s.rows.push_back(r);
            }
        } else {
            for (size_t kz = 0; kz < s.first[2].size(); ++kz)
                for (int64_t cz = s.first[2][kz];; ++cz) {
                    for (size_t ky = 0; ky < s.first[1].size(); ++ky)
                        for (int64_t cy = s.first[1][ky];; ++cy) {
                            const int64_t r = grid.find_row(cloud, cz, cy);
                            if (r >= 0) s.rows.push_back(r);
                            if (cy == s.last[1][ky]) break;
                        }
                    if (cz == s.last[2][kz]) break;
                }
        }
        s.remember(cloud);
    }
    for (const int64_t r : s.rows) visit_row(r);
}

inline bool axis_overlaps(const QueryBox& box, int axis, double node_lo, double node_hi) {
    for (int k = 0; k < box.count[axis]; ++k)
        if (box.lo[axis][k] <= node_hi && box.hi[axis][k] >= node_lo) return true;
    return false;
}

/// Scratch space of one thread for kd-tree traversal.
struct KdScratch {
    std::vector<int64_t> stack;
};

template <class Fn>
void for_each_candidate(const KdTree& tree, int64_t cloud, const QueryBox& box, KdScratch& s,
                        Fn&& fn) {
    const int64_t root = tree.cloud_root[cloud];
    if (root < 0) return;
    s.stack.clear();
    s.stack.push_back(root);
    while (!s.stack.empty()) {
        const KdNode& node = tree.nodes[s.stack.back()];
        s.stack.pop_back();
        if (!axis_overlaps(box, 0, node.lo[0], node.hi[0]) ||
            !axis_overlaps(box, 1, node.lo[1], node.hi[1]) ||
            !axis_overlaps(box, 2, node.lo[2], node.hi[2]))
            continue;
        if (node.left < 0) {
            fn(node.begin, node.end);
        } else {
            s.stack.push_back(node.right);
            s.stack.push_back(node.left);
        }
    }
}

template <class Index>
struct ScratchOf;
template <>
struct ScratchOf<Grid> {
    using type = GridScratch;
};
template <>
struct ScratchOf<KdTree> {
    using type = KdScratch;
};

}  // namespace detail
}  // namespace pwconv

#endif  // PWCONV_CANDIDATES_HPP
