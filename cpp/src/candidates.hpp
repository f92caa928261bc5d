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
        const double slack = radius_slack(q[a], radius);
        box.add(a, (q[a] - radius) - slack, (q[a] + radius) + slack);
    }
}

/// The query-independent stage of the bounds (kernel_axis_differences), once per search.
struct KernelDifferences {
    int kernel_size = 0;
    int dilation = 1;
    std::vector<double> start, end;

    void compute(double voxel_size, int kernel_size_, int dilation_) {
        kernel_size = kernel_size_;
        dilation = dilation_;
        start.resize(kernel_size);
        end.resize(kernel_size);
        kernel_axis_differences(voxel_size, kernel_size, dilation, start.data(), end.data());
    }
};

/// Per-query exact kernel bounds (binning.hpp): x lies in kernel cell k along axis a iff
/// start[a][k] <= x < end[a][k].
struct KernelBounds {
    int kernel_size = 0;
    std::vector<double> start[3], end[3];

    void compute(const double lo[3], const KernelDifferences& diff) {
        kernel_size = diff.kernel_size;
        for (int a = 0; a < 3; ++a) {
            start[a].resize(kernel_size);
            end[a].resize(kernel_size);
            kernel_axis_bounds_from(lo[a], diff.start.data(), diff.end.data(), kernel_size,
                                    diff.dilation, start[a].data(), end[a].data());
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

/// Grid-cell ranges along one axis, each tagged with the kernel index it serves (-1: any).
struct AxisRanges {
    std::vector<int64_t> first, last;
    std::vector<int> tag;
    double n_cells = 0;  // cells covered, as double: saturated coordinates can span 2^63

    void clear() {
        first.clear();
        last.clear();
        tag.clear();
        n_cells = 0;
    }
    /// Appends [c0, c1]; untagged ranges (tag -1) that touch the previous one are merged.
    void add(int64_t c0, int64_t c1, int k) {
        if (k < 0 && !first.empty() && tag.back() < 0 && c0 <= last.back() + 1) {
            if (c1 > last.back()) {
                n_cells += (double)c1 - (double)last.back();
                last.back() = c1;
            }
            return;
        }
        first.push_back(c0);
        last.push_back(c1);
        tag.push_back(k);
        n_cells += (double)c1 - (double)c0 + 1.0;
    }
    bool operator==(const AxisRanges& o) const {
        return first == o.first && last == o.last && tag == o.tag;
    }
    bool contains(int64_t c) const {
        for (size_t k = 0; k < first.size(); ++k)
            if (c >= first[k] && c <= last[k]) return true;
        return false;
    }
};

/// Scratch space of one thread for grid enumeration.  Consecutive queries (in spatial order)
/// often cover the same grid rows, so the rows of the previous query are kept.
struct GridScratch {
    AxisRanges axis[3];
    int64_t cached_cloud = -1;
    AxisRanges cached_z, cached_y;
    std::vector<int64_t> rows;      // row ids, -1 for an empty row
    std::vector<int> row_tag_z, row_tag_y;
};

/// Untagged, merged cell ranges of a query box (radius search, dilation 1, kd-tree parity).
inline void box_ranges(const Grid& grid, int64_t cloud, const QueryBox& box, GridScratch& s) {
    const double* origin = &grid.origin[3 * cloud];
    for (int a = 0; a < 3; ++a) {
        s.axis[a].clear();
        for (int k = 0; k < box.count[a]; ++k)
            s.axis[a].add(grid_coord(box.lo[a][k], origin[a], grid.cell_size, grid.inv_cell_size),
                          grid_coord(box.hi[a][k], origin[a], grid.cell_size, grid.inv_cell_size),
                          -1);
    }
}

/// Cell ranges of each kernel cell separately, tagged with its kernel index (dilation > 1: the
/// candidates of a run then need no per-point classification).
inline void kernel_cell_ranges(const Grid& grid, int64_t cloud, const KernelBounds& bounds,
                               GridScratch& s) {
    const double* origin = &grid.origin[3 * cloud];
    for (int a = 0; a < 3; ++a) {
        s.axis[a].clear();
        for (int k = 0; k < bounds.kernel_size; ++k)
            if (bounds.start[a][k] < bounds.end[a][k])
                s.axis[a].add(
                    grid_coord(bounds.start[a][k], origin[a], grid.cell_size, grid.inv_cell_size),
                    grid_coord(bounds.end[a][k], origin[a], grid.cell_size, grid.inv_cell_size), k);
    }
}

/// Calls fn(tag_z, tag_y, tag_x, begin, end) for the internal point ranges of cloud `cloud` that
/// lie in the cells of s.axis[] (set by box_ranges or kernel_cell_ranges).
template <class Fn>
void for_each_tagged_run(const Grid& grid, int64_t cloud, GridScratch& s, Fn&& fn) {
    const AxisRanges &rx = s.axis[0], &ry = s.axis[1], &rz = s.axis[2];
    const int64_t cube = grid.cube_base[cloud];
    if (cube >= 0) {  // compact cloud: each x-range of a row is one point range (two loads)
        const int64_t nx = grid.cube_nx[cloud], ny = grid.dense_ny[cloud];
        const int64_t nz = grid.dense_nz[cloud];
        const int32_t* table = &grid.cube_start[cube];
        const int32_t* rows = &grid.dense_rows[grid.dense_base[cloud]];
        const int64_t base = grid.cloud_offsets[cloud];
        // Clamp the x-ranges to the table once; empty rows are skipped with one load.
        int64_t x0[64], x1[64];
        const size_t n_x = std::min<size_t>(rx.first.size(), 64);
        for (size_t kx = 0; kx < n_x; ++kx) {
            x0[kx] = std::max<int64_t>(rx.first[kx], 0);
            x1[kx] = std::min<int64_t>(rx.last[kx], nx - 1);
        }
        for (size_t kz = 0; kz < rz.first.size(); ++kz) {
            const int64_t z0 = std::max<int64_t>(rz.first[kz], 0);
            const int64_t z1 = std::min<int64_t>(rz.last[kz], nz - 1);
            for (int64_t cz = z0; cz <= z1; ++cz)
                for (size_t ky = 0; ky < ry.first.size(); ++ky) {
                    const int64_t y0 = std::max<int64_t>(ry.first[ky], 0);
                    const int64_t y1 = std::min<int64_t>(ry.last[ky], ny - 1);
                    for (int64_t cy = y0; cy <= y1; ++cy) {
                        if (rows[cz * ny + cy] < 0) continue;
                        const int32_t* row = table + (cz * ny + cy) * nx;
                        for (size_t kx = 0; kx < rx.first.size(); ++kx) {
                            const int64_t a0 = kx < n_x ? x0[kx] : std::max<int64_t>(rx.first[kx], 0);
                            const int64_t a1 =
                                kx < n_x ? x1[kx] : std::min<int64_t>(rx.last[kx], nx - 1);
                            if (a0 > a1) continue;
                            const int64_t b = row[a0], e = row[a1 + 1];
                            if (e > b) fn(rz.tag[kz], ry.tag[ky], rx.tag[kx], base + b, base + e);
                        }
                    }
                }
        }
        return;
    }

    if (!(cloud == s.cached_cloud && rz == s.cached_z && ry == s.cached_y)) {
        s.rows.clear();
        s.row_tag_z.clear();
        s.row_tag_y.clear();
        const int64_t row_begin = grid.cloud_row_begin[cloud];
        const int64_t row_end = grid.cloud_row_begin[cloud + 1];
        if (rz.n_cells * ry.n_cells > (double)(row_end - row_begin)) {
            // The ranges span more grid rows than the cloud has: walk the cloud's rows instead.
            // This bounds the work by the cloud's size whatever the ratio of box to cell.
            for (int64_t r = row_begin; r < row_end; ++r) {
                const int64_t cz = grid.row_key[3 * r + 1], cy = grid.row_key[3 * r + 2];
                for (size_t kz = 0; kz < rz.first.size(); ++kz) {
                    if (cz < rz.first[kz] || cz > rz.last[kz]) continue;
                    for (size_t ky = 0; ky < ry.first.size(); ++ky) {
                        if (cy < ry.first[ky] || cy > ry.last[ky]) continue;
                        s.rows.push_back(r);
                        s.row_tag_z.push_back(rz.tag[kz]);
                        s.row_tag_y.push_back(ry.tag[ky]);
                    }
                }
            }
        } else {
            for (size_t kz = 0; kz < rz.first.size(); ++kz)
                for (int64_t cz = rz.first[kz];; ++cz) {
                    for (size_t ky = 0; ky < ry.first.size(); ++ky)
                        for (int64_t cy = ry.first[ky];; ++cy) {
                            const int64_t r = grid.find_row(cloud, cz, cy);
                            if (r >= 0) {
                                s.rows.push_back(r);
                                s.row_tag_z.push_back(rz.tag[kz]);
                                s.row_tag_y.push_back(ry.tag[ky]);
                            }
                            if (cy == ry.last[ky]) break;
                        }
                    if (cz == rz.last[kz]) break;
                }
        }
        s.cached_cloud = cloud;
        s.cached_z = rz;
        s.cached_y = ry;
    }
    for (size_t q = 0; q < s.rows.size(); ++q) {
        const int64_t r = s.rows[q];
        const int64_t cb = grid.row_cell_begin[r], ce = grid.row_cell_begin[r + 1];
        int64_t c = cb;
        for (size_t kx = 0; kx < rx.first.size(); ++kx) {
            if (rx.tag[kx] >= 0) c = cb;  // tagged ranges may share cells: rescan from the start
            while (c < ce && grid.cell_x[c] < rx.first[kx]) ++c;
            const int64_t run_first = c;
            while (c < ce && grid.cell_x[c] <= rx.last[kx]) ++c;
            if (c > run_first)
                fn(s.row_tag_z[q], s.row_tag_y[q], rx.tag[kx], grid.cell_begin[run_first],
                   grid.cell_begin[c]);
        }
    }
}

/// Calls fn(begin, end) for runs of internal point positions of cloud `cloud` that may lie in box.
template <class Fn>
void for_each_candidate(const Grid& grid, int64_t cloud, const QueryBox& box, GridScratch& s,
                        Fn&& fn) {
    box_ranges(grid, cloud, box, s);
    for_each_tagged_run(grid, cloud, s, [&](int, int, int, int64_t b, int64_t e) { fn(b, e); });
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
