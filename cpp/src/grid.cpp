#include "pwconv/grid.hpp"

#include <algorithm>
#include <cmath>

#include "sort.hpp"

namespace pwconv {

namespace {

uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

uint64_t row_hash(int64_t cloud, int64_t cz, int64_t cy) {
    return mix64((uint64_t)cloud * 0x9e3779b97f4a7c15ULL ^ mix64((uint64_t)cz) * 3 ^
                 mix64((uint64_t)cy + 0x632be59bd9b4e019ULL));
}

}  // namespace

int64_t Grid::memory_bytes() const {
    return (int64_t)(sizeof(int64_t) * (cloud_offsets.size() + order.size() + cell_x.size() +
                                        cell_begin.size() + row_key.size() +
                                        row_cell_begin.size() + cloud_row_begin.size() +
                                        table.size() + dense_base.size() + dense_ny.size() +
                                        dense_nz.size() + cube_base.size() + cube_nx.size()) +
                     sizeof(int32_t) * cube_start.size() +
                     sizeof(int32_t) * dense_rows.size() +
                     sizeof(double) * (origin.size() + 3 * order.size()));
}

int64_t Grid::find_row_hashed(int64_t cloud, int64_t cz, int64_t cy) const {
    if (table.empty()) return -1;
    uint64_t slot = row_hash(cloud, cz, cy) & table_mask;
    while (true) {
        const int64_t r = table[slot];
        if (r < 0) return -1;
        const int64_t* key = &row_key[3 * r];
        if (key[0] == cloud && key[1] == cz && key[2] == cy) return r;
        slot = (slot + 1) & table_mask;
    }
}

template <class T>
void build_grid(Grid& grid, const T* points, int64_t n, const Batch& batch, double cell_size,
                int threads) {
    check_batch(batch, n, "offsets");
    require(cell_size > 0 && std::isfinite(cell_size), "cell_size must be positive and finite");
    threads = resolve_threads(threads);
    const int64_t n_clouds = batch.n_clouds;
    grid = Grid();
    grid.cell_size = cell_size;
    grid.inv_cell_size = inverse_cell_size(cell_size);
    grid.n_points = n;
    grid.n_clouds = n_clouds;
    grid.cloud_offsets.assign(batch.offsets, batch.offsets + n_clouds + 1);
    grid.origin.assign(3 * n_clouds, 0.0);
    grid.order.resize(n);
    for (int a = 0; a < 3; ++a) grid.coord[a].resize(n);
    std::vector<int64_t> coords(3 * n);  // cell coordinates, caller's order

    // Per cloud: lower corner, cell coordinates, then a stable sort of the points by (cz, cy, cx).
    // schedule(dynamic): clouds may differ wildly in size.
    RegionErrors errors;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < n_clouds; ++b) errors.run([&] {
        const int64_t begin = batch.offsets[b], end = batch.offsets[b + 1];
        if (begin == end) return;
        double lo[3] = {(double)points[3 * begin], (double)points[3 * begin + 1],
                        (double)points[3 * begin + 2]};
        for (int64_t i = begin + 1; i < end; ++i)
            for (int a = 0; a < 3; ++a) lo[a] = std::min(lo[a], (double)points[3 * i + a]);
        for (int a = 0; a < 3; ++a) grid.origin[3 * b + a] = lo[a];
        for (int64_t i = begin; i < end; ++i)
            for (int a = 0; a < 3; ++a)
                coords[3 * i + a] = grid_coord((double)points[3 * i + a], lo[a], cell_size,
                                              grid.inv_cell_size);
        sort_by_cell(coords.data(), begin, end, grid.order.data() + begin);
    });
    errors.rethrow();

    // Gather coordinates into internal order (parallel, contiguous writes).
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < n; ++p) {
        const int64_t i = grid.order[p];
        for (int a = 0; a < 3; ++a) grid.coord[a][p] = (double)points[3 * i + a];
    }

    // Cells and rows: one serial scan over the sorted points.
    grid.cell_begin.reserve(n / 2 + 2);
    grid.row_cell_begin.reserve(n / 4 + 2);
    grid.cloud_row_begin.resize(n_clouds + 1);
    for (int64_t b = 0; b < n_clouds; ++b) {
        const int64_t begin = batch.offsets[b], end = batch.offsets[b + 1];
        grid.cloud_row_begin[b] = (int64_t)grid.row_key.size() / 3;
        for (int64_t p = begin; p < end; ++p) {
            const int64_t* c = &coords[3 * grid.order[p]];
            const int64_t* prev = p > begin ? &coords[3 * grid.order[p - 1]] : nullptr;
            const bool new_row = !prev || prev[2] != c[2] || prev[1] != c[1];
            if (new_row) {
                grid.row_cell_begin.push_back((int64_t)grid.cell_x.size());
                grid.row_key.push_back(b);
                grid.row_key.push_back(c[2]);
                grid.row_key.push_back(c[1]);
            }
            if (new_row || prev[0] != c[0]) {
                grid.cell_begin.push_back(p);
                grid.cell_x.push_back(c[0]);
            }
        }
    }
    grid.cell_begin.push_back(n);
    grid.cloud_row_begin[n_clouds] = (int64_t)grid.row_key.size() / 3;
    grid.row_cell_begin.push_back((int64_t)grid.cell_x.size());

    // Row lookup: a dense (z, y) table per cloud when its extent is small compared with its size
    // (one load per lookup), else the hash table.  Either way memory stays O(n_points).
    grid.dense_base.assign(n_clouds, -1);
    grid.dense_ny.assign(n_clouds, 0);
    grid.dense_nz.assign(n_clouds, 0);
    int64_t n_hashed_rows = 0;
    for (int64_t b = 0; b < n_clouds; ++b) {
        const int64_t r0 = grid.cloud_row_begin[b], r1 = grid.cloud_row_begin[b + 1];
        if (r0 == r1) continue;
        int64_t max_y = 0;
        for (int64_t r = r0; r < r1; ++r) max_y = std::max(max_y, grid.row_key[3 * r + 2]);
        const int64_t max_z = grid.row_key[3 * (r1 - 1) + 1];  // rows are sorted by z first
        const double area = ((double)max_z + 1.0) * ((double)max_y + 1.0);
        const int64_t cloud_n = batch.offsets[b + 1] - batch.offsets[b];
        if (area <= 4.0 * (double)cloud_n + 256.0 && r1 - r0 < (int64_t(1) << 31)) {
            grid.dense_base[b] = (int64_t)grid.dense_rows.size();
            grid.dense_nz[b] = max_z + 1;
            grid.dense_ny[b] = max_y + 1;
            grid.dense_rows.resize(grid.dense_rows.size() + (size_t)area, -1);
            int32_t* table = &grid.dense_rows[grid.dense_base[b]];
            for (int64_t r = r0; r < r1; ++r)
                table[grid.row_key[3 * r + 1] * (max_y + 1) + grid.row_key[3 * r + 2]] =
                    (int32_t)(r - r0);
        } else {
            n_hashed_rows += r1 - r0;
        }
    }
    grid.cube_base.assign(n_clouds, -1);
    grid.cube_nx.assign(n_clouds, 0);
    for (int64_t b = 0; b < n_clouds; ++b) {
        if (grid.dense_base[b] < 0) continue;
        const int64_t r0 = grid.cloud_row_begin[b], r1 = grid.cloud_row_begin[b + 1];
        int64_t max_x = 0;
        for (int64_t c = grid.row_cell_begin[r0]; c < grid.row_cell_begin[r1]; ++c)
            max_x = std::max(max_x, grid.cell_x[c]);
        const int64_t nx = max_x + 1, ny = grid.dense_ny[b], nz = grid.dense_nz[b];
        const int64_t cloud_n = batch.offsets[b + 1] - batch.offsets[b];
        const double volume = (double)nx * (double)ny * (double)nz;
        if (!(volume <= 8.0 * (double)cloud_n + 4096.0) || cloud_n >= (int64_t(1) << 31)) continue;
        grid.cube_base[b] = (int64_t)grid.cube_start.size();
        grid.cube_nx[b] = nx;
        grid.cube_start.resize(grid.cube_start.size() + (size_t)volume + 1);
        int32_t* table = &grid.cube_start[grid.cube_base[b]];
        // Cells are sorted by (z, y, x), i.e. by linear index: fill each run of empty cells with
        // the start of the next occupied cell.
        int64_t next_linear = 0;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t cz = grid.row_key[3 * r + 1], cy = grid.row_key[3 * r + 2];
            for (int64_t c = grid.row_cell_begin[r]; c < grid.row_cell_begin[r + 1]; ++c) {
                const int64_t linear = (cz * ny + cy) * nx + grid.cell_x[c];
                const int32_t local = (int32_t)(grid.cell_begin[c] - batch.offsets[b]);
                for (; next_linear <= linear; ++next_linear) table[next_linear] = local;
            }
        }
        for (; next_linear <= (int64_t)volume; ++next_linear) table[next_linear] = (int32_t)cloud_n;
    }
    // Hash table of the other clouds' rows, load factor <= 1/2.
    if (n_hashed_rows == 0) return;
    uint64_t capacity = 16;
    while (capacity < (uint64_t)(2 * n_hashed_rows)) capacity <<= 1;
    grid.table.assign(capacity, -1);
    grid.table_mask = capacity - 1;
    for (int64_t b = 0; b < n_clouds; ++b) {
        if (grid.dense_base[b] >= 0) continue;
        for (int64_t r = grid.cloud_row_begin[b]; r < grid.cloud_row_begin[b + 1]; ++r) {
            const int64_t* key = &grid.row_key[3 * r];
            uint64_t slot = row_hash(key[0], key[1], key[2]) & grid.table_mask;
            while (grid.table[slot] >= 0) slot = (slot + 1) & grid.table_mask;
            grid.table[slot] = r;
        }
    }
}

template void build_grid<float>(Grid&, const float*, int64_t, const Batch&, double, int);
template void build_grid<double>(Grid&, const double*, int64_t, const Batch&, double, int);

}  // namespace pwconv
