// Uniform spatial grid over a packed batch of clouds: occupied cells only, points in cell order.
//
// Cell coordinates are floor((x - origin) / cell_size) per axis, with the origin at each cloud's
// lower corner, saturated to +-2^62.  They are kept as three int64 values per cell (never packed
// into one 64-bit key, so 40+ bits per axis are fine).  Grid rows (cloud, cz, cy) are found through
// a dense per-cloud (z, y) table when the cloud's extent in rows is at most a few times its number
// of points, and through a hash table otherwise (outliers, huge extents).  Memory is O(n_points)
// whatever the bounding box.
#ifndef PWCONV_GRID_HPP
#define PWCONV_GRID_HPP

#include <cstdint>
#include <vector>

#include "pwconv/common.hpp"

namespace pwconv {

/// A grid index.  Built by build_grid; read-only afterwards (safe to query from many threads).
struct Grid {
    double cell_size = 1.0;
    double inv_cell_size = 1.0;  ///< inverse_cell_size(cell_size)
    int64_t n_points = 0;
    int64_t n_clouds = 0;
    std::vector<int64_t> cloud_offsets;  ///< (n_clouds + 1,) copy of the caller's offsets
    std::vector<double> origin;          ///< (n_clouds, 3) lower corner of each cloud
    std::vector<int64_t> order;          ///< (n_points,) internal position -> caller's index
    std::vector<double> coord[3];        ///< x, y, z (n_points,) each, float64, internal order
    std::vector<int64_t> cell_x;         ///< (n_cells,) x cell coordinate of each cell
    std::vector<int64_t> cell_begin;     ///< (n_cells + 1,) first internal point of each cell
    std::vector<int64_t> row_key;        ///< (n_rows, 3) cloud, cz, cy of each row
    std::vector<int64_t> row_cell_begin; ///< (n_rows + 1,) first cell of each row
    std::vector<int64_t> cloud_row_begin; ///< (n_clouds + 1,) first row of each cloud
    std::vector<int64_t> table;          ///< open-addressing hash of row keys -> row id (-1 empty)
    uint64_t table_mask = 0;
    std::vector<int64_t> dense_base;     ///< (n_clouds,) start in dense_rows, -1: hashed cloud
    std::vector<int64_t> dense_ny;       ///< (n_clouds,) y extent of the dense table
    std::vector<int64_t> dense_nz;       ///< (n_clouds,) z extent of the dense table
    std::vector<int32_t> dense_rows;     ///< row id - cloud_row_begin, or -1 for an empty row
    // Compact clouds (cells in the bounding box <= a few times the points) also get a dense
    // (z, y, x) prefix table: the points of cells x0..x1 of a row are then one range, two loads.
    std::vector<int64_t> cube_base;      ///< (n_clouds,) start in cube_start, -1: not compact
    std::vector<int64_t> cube_nx;        ///< (n_clouds,) x extent (y, z extents: dense_ny/nz)
    std::vector<int32_t> cube_start;     ///< first local point of each cell, + end sentinel

    int64_t n_cells() const { return (int64_t)cell_x.size(); }
    int64_t n_rows() const { return (int64_t)row_cell_begin.size() - 1; }
    /// Bytes held by the index.
    int64_t memory_bytes() const;
    /// Row id of (cloud, cz, cy), or -1 when that row holds no point.
    int64_t find_row(int64_t cloud, int64_t cz, int64_t cy) const {
        const int64_t base = dense_base[cloud];
        if (base < 0) return find_row_hashed(cloud, cz, cy);
        if (cz < 0 || cy < 0 || cz >= dense_nz[cloud] || cy >= dense_ny[cloud]) return -1;
        const int32_t local = dense_rows[base + cz * dense_ny[cloud] + cy];
        return local < 0 ? -1 : cloud_row_begin[cloud] + local;
    }
    int64_t find_row_hashed(int64_t cloud, int64_t cz, int64_t cy) const;
};

/// Grid cell coordinate floor((x - origin) * inv_cell_size), saturated to [-2^62, 2^62].
/// Monotone in x, which is all the queries rely on (the grid is only a candidate filter; SPEC §1's
/// binning is done exactly by binning.hpp).  inv_cell_size = 1 / cell_size, or 0 when that
/// overflows, in which case the division is used.
inline int64_t grid_coord(double x, double origin, double cell_size, double inv_cell_size) {
    constexpr double kLimit = 4611686018427387904.0;  // 2^62
    const double t = inv_cell_size != 0 ? (x - origin) * inv_cell_size : (x - origin) / cell_size;
    if (!(t < kLimit)) return int64_t(1) << 62;
    if (!(t > -kLimit)) return -(int64_t(1) << 62);
    const int64_t c = (int64_t)t;  // truncation; fix up to floor below
    return c - (int64_t)((double)c > t);
}

/// 1 / cell_size, or 0 when that is not finite.
inline double inverse_cell_size(double cell_size) {
    const double inv = 1.0 / cell_size;
    return inv - inv == 0 ? inv : 0.0;
}

/// Builds a grid over points (n, 3) row-major, packed into clouds by `batch`.
/// T is float or double; coordinates are converted to float64.  cell_size > 0 and finite;
/// coordinates must be finite (the Python layer checks).  Uses up to `threads` OpenMP threads.
template <class T>
void build_grid(Grid& grid, const T* points, int64_t n, const Batch& batch, double cell_size,
                int threads);

}  // namespace pwconv

#endif  // PWCONV_GRID_HPP
