// CUDA kernels of pwconv, compiled at run time by NVRTC through cupy.RawModule (see _backend.py).
//
// Neighbour search and the kernel map of SPEC §1, and the forward/backward of pointwise
// convolution over it.  The binning arithmetic is the C++ core's own (pwconv/binning.hpp, shared
// host/device code), so CPU and GPU produce the same kernel map bit for bit.  NVRTC is given
// --fmad=false: no multiply-add is contracted anywhere in this file, so the search predicates
// evaluate exactly as on the CPU (built with -ffp-contract=off).  The operator's sums are formed
// in a fixed order -- products rounded, then added, in the "by cell" kernels; with explicit FMAs
// (one rounding, mul_add) in the "rows" and "entries" kernels -- so results are bit-identical
// from run to run and within rounding of the CPU's.  No floating-point atomics, except in the one
// opt-in non-deterministic kernel (conv_entries_scatter, PWCONV_CUDA_DETERMINISTIC=0).
//
// No standard headers (NVRTC without jitify has none): sizes are `long long` (int64 in Python),
// counts and cells `int`.  Every kernel is launched from Python with exactly these argument
// types (numpy scalars); a mismatch would be silent, so keep _backend.py's NAME_EXPRESSIONS and
// the launch sites in _search.py / _conv.py in step with the signatures below.
//
// Layout of the search structures (built in _search.py): the points of a packed batch sorted by
// (cloud, cz, cy, cx) grid cell (cell edge `cell_size`, origin at each cloud's lower corner);
// the occupied cells in that order with the first sorted point of each (cell_start, n_cells + 1
// entries) and their coordinates cell_x/y/z; the first cell of each cloud (cloud_cell_begin,
// n_clouds + 1 entries).  A query finds the cells of a grid row (cz, cy) with a binary search
// over its cloud's cells; memory is O(points) whatever the bounding box.

#include "pwconv/binning.hpp"

namespace pwconv_cuda {

typedef long long i64;

/// Largest kernel size the search kernels support (per-thread bound arrays).
#define PWCONV_CUDA_MAX_K 15

/// Rows up to this length are sorted by the thread that filled them (insertion sort); longer
/// rows are sorted afterwards by one global sort (see _search.py).
#define PWCONV_CUDA_SHORT_ROW 64

/// Register budget of the search kernels: compiled for PWCONV_CUDA_SEARCH_MIN_BLOCKS resident
/// blocks of 128 threads per multiprocessor when defined (an NVRTC -D option, for tuning), else
/// as the compiler chooses.
#ifdef PWCONV_CUDA_SEARCH_MIN_BLOCKS
#define PWCONV_CUDA_SEARCH_BOUNDS __launch_bounds__(128, PWCONV_CUDA_SEARCH_MIN_BLOCKS)
#else
#define PWCONV_CUDA_SEARCH_BOUNDS
#endif

/// kernel_map_tiled's resident blocks of 256 threads per multiprocessor (its register budget).
/// Its shared memory allows 2 for the paper's clouds of 2,048 points with the cells in it (80
/// KiB or more a block); without a minimum, ptxas (CUDA 13.0, sm_90) gave it 64 registers and
/// 244 bytes of spills, with 2: 128 registers (118 with K = 3 compiled in), no spills.
#ifndef PWCONV_CUDA_TILE_MIN_BLOCKS
#define PWCONV_CUDA_TILE_MIN_BLOCKS 2
#endif

/// Grid cell coordinate floor((x - origin) * inv_cell_size), saturated to [-2^62, 2^62]; as
/// pwconv::grid_coord (grid.hpp).  Monotone in x: a candidate filter only.
__device__ __forceinline__ i64 grid_coord(double x, double origin, double cell_size,
                                          double inv_cell_size) {
    const double limit = 4611686018427387904.0;  // 2^62
    const double t = inv_cell_size != 0 ? (x - origin) * inv_cell_size : (x - origin) / cell_size;
    if (!(t < limit)) return (i64)1 << 62;
    if (!(t > -limit)) return -((i64)1 << 62);
    const i64 c = (i64)t;  // truncation; fixed up to floor below
    return c - (i64)((double)c > t);
}

/// The segment of a CSR-style split array holding position i (the cloud of a packed row, the row
/// of a map entry): the largest s in [0, n_segments) with starts[s] <= i (empty segments skipped).
__device__ __forceinline__ i64 segment_of(const i64* starts, i64 n_segments, i64 i) {
    i64 lo = 0, hi = n_segments;
    while (hi - lo > 1) {
        const i64 mid = lo + (hi - lo) / 2;
        if (starts[mid] <= i)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/// The grid as the kernels read it (pointers into CuPy arrays, see the file comment).
struct GridView {
    const double* x;  // (n,) sorted coordinates
    const double* y;
    const double* z;
    const i64* order;             // (n,) sorted position p -> caller's point: order[p - point_base]
    // (or, with order32 set: point_base + order32[p - point_base], kernel_map_tiled's copy)
    const i64* cell_start;        // (n_cells + 1,)
    const i64* cell_x;            // (n_cells,)
    const i64* cell_y;
    const i64* cell_z;
    const i64* cloud_cell_begin;  // (n_clouds + 1,)
    const double* origin;         // (n_clouds, 3)
    double cell_size, inv_cell_size;
    i64 cmax[3];                  // largest cell coordinate of any point, per axis
    // Grid rows (cloud, cz, cy) found by hashing (table_bits > 0; see build_row_table), else by
    // binary search over the cloud's cells (cell keys too wide to pack).
    const i64* row_cell_begin;    // (n_rows + 1,) first cell of each row
    const unsigned long long* table_keys;  // (2^table_bits,) row key, or ~0: empty slot
    const i64* table_rows;        // (2^table_bits,) the row of the slot's key
    int table_bits;
    // table_slots != 0 (PWCONV_CUDA_ROW_SLOTS=1): table_keys holds (2^table_bits, 2) pairs, the
    // row key and the row's cells (first << 32 | end), one 16-byte load per probe where the
    // split layout takes the key, the row, then its first and end cells (table_rows unused).
    int table_slots;
    // x, y, z and order of sorted point p are at x[p - point_base] (0; kernel_map_tiled: its
    // cloud's first sorted point, x / y / z then in shared memory, and order too with the
    // rows), cell c's x coordinate and first
    // point at cell_x[c - cell_base] and cell_start[c - cell_base] (0, or its cloud's first
    // cell: kernel_map_tiled with the cells in shared memory too).  The binary search over cells
    // (no row table) reads cell_y / cell_z: only ever with cell_base 0.
    i64 point_base;
    i64 cell_base;
    const unsigned* order32;
    __device__ __forceinline__ i64 cx(i64 c) const { return cell_x[c - cell_base]; }
    /// The caller's index of sorted point p.
    __device__ __forceinline__ i64 point(i64 p) const {
        return order32 ? point_base + (i64)order32[p - point_base] : order[p - point_base];
    }
    __device__ __forceinline__ i64 start(i64 c) const { return cell_start[c - cell_base]; }
};

/// Where the search reads the sorted points' coordinates, the cells' x and first point and the
/// row table: the grid's own arrays (bases 0), or kernel_map_tiled's copies of one cloud's in
/// shared memory (with tile_row_bits, a table of the cloud's rows alone, as (key, cells) pairs).
struct TileView {
    const double* x;
    const double* y;
    const double* z;
    const i64* order;  // order[p - point_base]: the grid's (offset)
    i64 point_base;
    const i64* cell_x;
    const i64* cell_start;
    i64 cell_base;
    const unsigned long long* table_keys;
    int table_bits;
    int table_slots;
    // kernel_map_tiled with the rows: its cloud's order in shared memory, as offsets from its
    // first point (a cloud's points are sorted positions [p0, p0 + n) and caller indices
    // [p0, p0 + n) alike: the batch is packed by cloud), else null
    const unsigned* order32;
};

#define PWCONV_CUDA_EMPTY_SLOT 0xFFFFFFFFFFFFFFFFull

/// Checks the address of a 16-byte vector load (a no-op here; the host emulation fails on a
/// misaligned one, which a GPU would fault on).
#ifndef PWCONV_CUDA_CHECK_ALIGNED
#define PWCONV_CUDA_CHECK_ALIGNED(p) ((void)0)
#endif

/// Row key (cloud * (cmax_z + 1) + cz) * (cmax_y + 1) + cy (fits 63 bits when a table is built).
__device__ __forceinline__ unsigned long long row_key(i64 cloud, i64 cz, i64 cy, i64 cmax_y,
                                                      i64 cmax_z) {
    return (unsigned long long)((cloud * (cmax_z + 1) + cz) * (cmax_y + 1) + cy);
}

/// Slot h of the pairs layout (table_slots): its key and the row's cells (first << 32 | end).
__device__ __forceinline__ void load_slot(const unsigned long long* slots, unsigned long long h,
                                          unsigned long long& key, unsigned long long& cells) {
    PWCONV_CUDA_CHECK_ALIGNED(slots + 2 * h);
    const ulonglong2 kv = *reinterpret_cast<const ulonglong2*>(slots + 2 * h);
    key = kv.x;
    cells = kv.y;
}

/// Home slot of a row key: multiplicative hashing, the top table_bits bits.
__device__ __forceinline__ unsigned long long row_slot(unsigned long long key, int table_bits) {
    return (key * 0x9E3779B97F4A7C15ull) >> (64 - table_bits);
}

/// First cell in [b, e) of one grid row whose cx is not below cx.  A few linear steps first: a
/// query's x ranges ascend and each search starts at the previous range's first cell, so the
/// answer is mostly a few occupied cells away (rows of a surface hold few cells); a binary
/// search finishes the rest.
__device__ __forceinline__ i64 lower_bound_x(const GridView& g, i64 b, i64 e, i64 cx) {
    for (int step = 0; step < 4; ++step) {
        if (b == e || g.cx(b) >= cx) return b;
        ++b;
    }
    while (b < e) {
        const i64 mid = b + (e - b) / 2;
        if (g.cx(mid) < cx)
            b = mid + 1;
        else
            e = mid;
    }
    return b;
}

/// First cell in [b, e) not ordered before (cz, cy, cx).
__device__ __forceinline__ i64 lower_bound_cell(const GridView& g, i64 b, i64 e, i64 cz, i64 cy,
                                                i64 cx) {
    while (b < e) {
        const i64 mid = b + (e - b) / 2;
        const i64 mz = g.cell_z[mid], my = g.cell_y[mid], mx = g.cx(mid);
        const bool before = mz < cz || (mz == cz && (my < cy || (my == cy && mx < cx)));
        if (before)
            b = mid + 1;
        else
            e = mid;
    }
    return b;
}

/// Closed grid-cell ranges along one axis, each tagged with the kernel index it serves (-1: any).
template <int N>
struct AxisRanges {
    i64 first[N], last[N];
    int tag[N];
    int count;
};

/// Adds [grid_coord(a), grid_coord(b)] clamped to [0, cmax], if not empty.
template <int N>
__device__ __forceinline__ void add_range(AxisRanges<N>& r, double a, double b, double origin,
                                          const GridView& g, i64 cmax, int tag) {
    i64 c0 = grid_coord(a, origin, g.cell_size, g.inv_cell_size);
    i64 c1 = grid_coord(b, origin, g.cell_size, g.inv_cell_size);
    if (c0 < 0) c0 = 0;
    if (c1 > cmax) c1 = cmax;
    if (c0 > c1) return;
    r.first[r.count] = c0;
    r.last[r.count] = c1;
    r.tag[r.count] = tag;
    ++r.count;
}

/// Dilation > 1: when the grid-cell ranges of consecutive kernel cells touch or overlap (s = 2
/// on a grid of the voxel's edge: cells c, c+1 | c+2, c+3 | c+4, c+5), one run over their hull,
/// tagged -2, visits the same cells with one search per grid row instead of K, each candidate's
/// kernel cell along that axis told by the thresholds (KernelVisit).  Any superset of the
/// candidates gives the same map (the classification alone decides); with gaps between the
/// ranges (s >= 3) merging would test more points, so the ranges stay apart.
template <int N>
__device__ __forceinline__ void merge_touching_ranges(AxisRanges<N>& r) {
    if (r.count < 2) return;
    for (int k = 0; k + 1 < r.count; ++k)
        if (r.first[k + 1] > r.last[k] + 1) return;
    r.last[0] = r.last[r.count - 1];
    r.tag[0] = -2;
    r.count = 1;
}

/// Grid rows looked up side by side by for_each_run (an NVRTC -D option, for tuning; 1: one
/// after the other).  A query visits up to dozens of grid rows, each found through three
/// dependent loads (hash slot, the slot's row, the row's cells); with the batch's loads issued
/// together, a thread waits for each of the three once per batch instead of once per row.  But
/// the batch's arrays cost registers: on the H200 (2026-11-27, benchmarks/gpu_search_tuning.py)
/// the paper workload's four maps took 5.4 ms one row at a time against 6.4-6.5 ms four at a
/// time and 8.6 ms eight at a time (the 1M-point sphere's map 3.2-3.5 against 3.9-4.0 ms).
#ifndef PWCONV_CUDA_ROW_BATCH
#define PWCONV_CUDA_ROW_BATCH 1
#endif

/// The x ranges' runs of one grid row whose cells are [lo, hi) (ascending x): visit(tz, ty,
/// tag_x, begin, end) per run of sorted point positions.
template <int N, class Visit>
__device__ __forceinline__ void visit_row(const GridView& g, i64 lo, const i64 hi,
                                          const AxisRanges<N>& rx, int tz, int ty, Visit& visit) {
    for (int kx = 0; kx < rx.count; ++kx) {
        const i64 c0 = lower_bound_x(g, lo, hi, rx.first[kx]);
        lo = c0;  // ranges ascend, but may share a cell: not past c1
        i64 c1 = c0;
        while (c1 < hi && g.cx(c1) <= rx.last[kx]) ++c1;
        if (c1 > c0) visit(tz, ty, rx.tag[kx], g.start(c0), g.start(c1));
    }
}

/// Calls visit(tag_z, tag_y, tag_x, begin, end) for the runs of sorted point positions of cloud
/// `cloud` lying in the grid cells of the ranges rz x ry x rx.  Deterministic order: grid rows
/// (cz, cy) ascending within each (z range, y range) pair, x ranges ascending within a row --
/// the same whatever PWCONV_CUDA_ROW_BATCH.
template <int N, class Visit>
__device__ __forceinline__ void for_each_run(const GridView& g, i64 cloud, const AxisRanges<N>& rx,
                                             const AxisRanges<N>& ry, const AxisRanges<N>& rz,
                                             Visit& visit) {
    const i64 cb = g.cloud_cell_begin[cloud], ce = g.cloud_cell_begin[cloud + 1];
    if (cb == ce) return;
    if (g.table_bits > 0) {  // hash probes for a batch of grid rows, then short searches in each
        constexpr int B = PWCONV_CUDA_ROW_BATCH;
        const unsigned long long mask = (1ull << g.table_bits) - 1ull;
        // every loop over the batch is unrolled, so its arrays stay in registers
        i64 bz[B], by[B];
        int btz[B], bty[B];
        int kz = 0, ky = 0;
        i64 cz = rz.count > 0 ? rz.first[0] : 0, cy = ry.count > 0 ? ry.first[0] : 0;
        bool more = rz.count > 0 && ry.count > 0;
        while (more) {
            int nb = 0;
#pragma unroll
            for (int i = 0; i < B; ++i) {  // the next grid rows, in the nested loops' order
                if (!more) continue;
                bz[i] = cz;
                by[i] = cy;
                btz[i] = rz.tag[kz];
                bty[i] = ry.tag[ky];
                nb = i + 1;
                if (++cy > ry.last[ky]) {  // next y range, then next z cell, then next z range
                    if (++ky == ry.count) {
                        ky = 0;
                        if (++cz > rz.last[kz]) {
                            if (++kz == rz.count) more = false;
                            else cz = rz.first[kz];
                        }
                    }
                    cy = ry.first[ky];
                }
            }
            unsigned long long key[B], slot[B], found[B], cells[B];
            i64 row[B], lo[B], hi[B];
#pragma unroll
            for (int i = 0; i < B; ++i) {  // the home slots' keys: independent loads
                row[i] = -1;
                if (i < nb) {
                    key[i] = row_key(cloud, bz[i], by[i], g.cmax[1], g.cmax[2]);
                    slot[i] = row_slot(key[i], g.table_bits);
                    if (g.table_slots)
                        load_slot(g.table_keys, slot[i], found[i], cells[i]);
                    else
                        found[i] = g.table_keys[slot[i]];
                }
            }
#pragma unroll
            for (int i = 0; i < B; ++i) {
                if (i >= nb) continue;
                // a collision (rare at load <= 1/2): probe on, one slot after the other
                for (unsigned long long h = slot[i];;) {
                    if (found[i] == key[i]) {
                        if (g.table_slots) {  // the row's cells came with the key
                            row[i] = 0;
                            lo[i] = (i64)(cells[i] >> 32);
                            hi[i] = (i64)(cells[i] & 0xFFFFFFFFull);
                        } else {
                            row[i] = g.table_rows[h];
                        }
                        break;
                    }
                    if (found[i] == PWCONV_CUDA_EMPTY_SLOT) break;
                    h = (h + 1) & mask;
                    if (g.table_slots)
                        load_slot(g.table_keys, h, found[i], cells[i]);
                    else
                        found[i] = g.table_keys[h];
                }
            }
#pragma unroll
            for (int i = 0; i < B; ++i)  // the rows' cells: independent loads
                if (row[i] >= 0 && !g.table_slots) {
                    lo[i] = g.row_cell_begin[row[i]];
                    hi[i] = g.row_cell_begin[row[i] + 1];
                }
#pragma unroll
            for (int i = 0; i < B; ++i)
                if (row[i] >= 0) visit_row(g, lo[i], hi[i], rx, btz[i], bty[i], visit);
        }
        return;
    }
    for (int kz = 0; kz < rz.count; ++kz)
        for (i64 cz = rz.first[kz]; cz <= rz.last[kz]; ++cz)
            for (int ky = 0; ky < ry.count; ++ky)
                for (i64 cy = ry.first[ky]; cy <= ry.last[ky]; ++cy) {
                    i64 lo = cb;  // x ranges ascend: each search starts where the last one did
                    for (int kx = 0; kx < rx.count; ++kx) {
                        const i64 c0 = lower_bound_cell(g, lo, ce, cz, cy, rx.first[kx]);
                        lo = c0;
                        i64 c1 = c0;
                        while (c1 < ce && g.cell_z[c1] == cz && g.cell_y[c1] == cy &&
                               g.cx(c1) <= rx.last[kx])
                            ++c1;
                        if (c1 > c0)
                            visit(rz.tag[kz], ry.tag[ky], rx.tag[kx], g.start(c0),
                                  g.start(c1));
                    }
                }
}

/// Sorts keys[0, len) ascending (insertion sort: rows of a few tens).
__device__ __forceinline__ void sort_short(i64* keys, i64 len) {
    for (i64 a = 1; a < len; ++a) {
        const i64 k = keys[a];
        i64 b = a - 1;
        while (b >= 0 && keys[b] > k) {
            keys[b + 1] = keys[b];
            --b;
        }
        keys[b + 1] = k;
    }
}

/// Collects one query's accepted candidates: counts them, or writes their keys into its row
/// (never more than the row's length; a mismatch is reported through *status).
struct RowSink {
    i64* keys;  // the row's first key (fill), or null (count)
    i64 capacity;
    i64 n;
    __device__ __forceinline__ void push(i64 key) {
        if (keys != 0 && n < capacity) keys[n] = key;
        ++n;
    }
};

/// A one-pass search thread's sink (kernel_map_once, kernel_map_tiled, radius_once): its row's
/// keys in `buffer` (PWCONV_CUDA_SHORT_ROW keys), at most short_row of them kept.
__device__ __forceinline__ RowSink buffered_sink(i64* buffer, i64 short_row) {
    RowSink sink;
    sink.keys = buffer;
    sink.capacity = short_row < PWCONV_CUDA_SHORT_ROW ? short_row : PWCONV_CUDA_SHORT_ROW;
    sink.n = 0;
    return sink;
}

/// Classifies one query's candidates as the CPU does on compact clouds: d = fl(x - lo) per axis
/// (lo: the support's lower corner) against the kernel's query-independent thresholds sd (cell
/// starts) and ed (cell ends), from kernel_axis_differences; t = fl(d / v) >= c iff d >= D_c, so
/// this is SPEC §1's partition exactly, with no per-query threshold search.
struct KernelVisit {
    const GridView* g;
    const double* sd;  // (K,) start thresholds, the same on every axis
    const double* ed;  // (K,) end thresholds
    double lo[3];
    int K;
    int cell_bits;
    RowSink* sink;
    __device__ __forceinline__ void operator()(int tz, int ty, int tx, i64 b, i64 e) const {
        const double* X = g->x;
        const double* Y = g->y;
        const double* Z = g->z;
        const i64 pb = g->point_base;
        if (tx == -2) {  // dilation > 1, the row's x ranges merged into one run (see
                         // merge_touching_ranges): the exact box along y and z, the kernel cell
                         // along x by binning.hpp's axis_cell_index (none: a hole)
            const double y0 = sd[ty], y1 = ed[ty], z0 = sd[tz], z1 = ed[tz];
            const i64 fzy = ((i64)tz * K + ty) * K;
            for (i64 p = b; p < e; ++p) {
                const double dy = Y[p - pb] - lo[1], dz = Z[p - pb] - lo[2];
                if (!(dy >= y0 && dy < y1 && dz >= z0 && dz < z1)) continue;
                const double dx = X[p - pb] - lo[0];
                const int kx = pwconv::axis_cell_index(dx, sd, K);
                if (dx >= sd[0] && dx < ed[kx])
                    sink->push((g->point(p) << cell_bits) | (fzy + kx));
            }
            return;
        }
        if (tx < 0) {  // dilation 1: the K cells tile the support; tell the cells apart per axis
            const double first = sd[0], last = ed[K - 1];
            for (i64 p = b; p < e; ++p) {
                const double dx = X[p - pb] - lo[0], dy = Y[p - pb] - lo[1],
                             dz = Z[p - pb] - lo[2];
                if (pwconv::support_contains(dx, dy, dz, first, last))
                    sink->push((g->point(p) << cell_bits) |
                               (i64)pwconv::support_cell(dx, dy, dz, sd, K));
            }
            return;
        }
        // dilation > 1: the run serves kernel cell (tz, ty, tx) only; test its exact box
        const double x0 = sd[tx], x1 = ed[tx], y0 = sd[ty], y1 = ed[ty], z0 = sd[tz], z1 = ed[tz];
        const i64 f = ((i64)tz * K + ty) * K + tx;
        for (i64 p = b; p < e; ++p) {
            const double dx = X[p - pb] - lo[0], dy = Y[p - pb] - lo[1], dz = Z[p - pb] - lo[2];
            if (dx >= x0 && dx < x1 && dy >= y0 && dy < y1 && dz >= z0 && dz < z1)
                sink->push((g->point(p) << cell_bits) | f);
        }
    }
};

struct RadiusVisit {
    const GridView* g;
    double qx, qy, qz, radius, radius_sq;
    int euclidean;
    RowSink* sink;
    __device__ __forceinline__ void operator()(int, int, int, i64 b, i64 e) const {
        const i64 pb = g->point_base;
        for (i64 p = b; p < e; ++p) {
            const double x = g->x[p - pb], y = g->y[p - pb], z = g->z[p - pb];
            const bool ok = euclidean
                                ? pwconv::within_euclidean(x, y, z, qx, qy, qz, radius_sq)
                                : pwconv::within_chebyshev(x, y, z, qx, qy, qz, radius);
            if (ok) sink->push(g->point(p));
        }
    }
};

__device__ __forceinline__ i64 global_thread() {
    return (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
}

}  // namespace pwconv_cuda

// ============================================================================================
// Grid construction
// ============================================================================================

namespace pwconv_cuda {

/// Per-axis minima of (m0, m1, m2) over a block of 256 threads (every thread calls it): the
/// three results in low[a][0] on return.  Minima are exact: any order gives the same bits.
__device__ __forceinline__ void block_min3(double (&low)[3][256], double m0, double m1,
                                           double m2) {
    const int t = threadIdx.x;
    low[0][t] = m0;
    low[1][t] = m1;
    low[2][t] = m2;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half)
            for (int a = 0; a < 3; ++a)
                low[a][t] = low[a][t + half] < low[a][t] ? low[a][t + half] : low[a][t];
        __syncthreads();
    }
}

/// Larger than any finite coordinate: the minimum of no points.
constexpr double NO_POINT = 1.7976931348623157e308;

}  // namespace pwconv_cuda

/// origin (n_clouds, 3) = per-axis minimum of each cloud's points (0 for an empty cloud).
/// Blocks of 256 threads, (cloud, chunk) = (blockIdx.x, blockIdx.y): block (c, k) takes points
/// [offsets[c] + k * chunk, ...) up to chunk of them.  One chunk per cloud (gridDim.y == 1): the
/// block writes origin; several (a long cloud: one block reading a million points took most of
/// a millisecond): partial[(c * gridDim.y + k) * 3 + a] gets each chunk's minima (NO_POINT for
/// none) and cloud_lower_corner_merge makes origin from them.
extern "C" __global__ void cloud_lower_corner(const double* points, const long long* offsets,
                                              long long chunk, double* partial,
                                              double* origin) {
    using namespace pwconv_cuda;
    __shared__ double low[3][256];
    const i64 c = blockIdx.x;
    const i64 e = offsets[c + 1];
    const i64 b = offsets[c] + (i64)blockIdx.y * chunk;
    const i64 stop = b + chunk < e ? b + chunk : e;
    double m0 = NO_POINT, m1 = NO_POINT, m2 = NO_POINT;
    for (i64 p = b + threadIdx.x; p < stop; p += blockDim.x) {
        const double x = points[3 * p], y = points[3 * p + 1], z = points[3 * p + 2];
        m0 = x < m0 ? x : m0;
        m1 = y < m1 ? y : m1;
        m2 = z < m2 ? z : m2;
    }
    block_min3(low, m0, m1, m2);
    if (threadIdx.x >= 3) return;
    if (gridDim.y == 1)
        origin[3 * c + threadIdx.x] = e > b ? low[threadIdx.x][0] : 0.0;
    else
        partial[(c * gridDim.y + blockIdx.y) * 3 + threadIdx.x] = low[threadIdx.x][0];
}

/// origin[c] from the n_chunks partial minima of cloud c (cloud_lower_corner's, several chunks
/// a cloud): one block of 256 threads per cloud; 0 for an empty cloud.
extern "C" __global__ void cloud_lower_corner_merge(const long long* offsets, long long n_chunks,
                                                    const double* partial, double* origin) {
    using namespace pwconv_cuda;
    __shared__ double low[3][256];
    const i64 c = blockIdx.x;
    const double* mine = partial + c * n_chunks * 3;
    double m[3] = {NO_POINT, NO_POINT, NO_POINT};
    for (i64 k = threadIdx.x; k < n_chunks; k += blockDim.x)
        for (int a = 0; a < 3; ++a) m[a] = mine[3 * k + a] < m[a] ? mine[3 * k + a] : m[a];
    block_min3(low, m[0], m[1], m[2]);
    if (threadIdx.x < 3)
        origin[3 * c + threadIdx.x] = offsets[c + 1] > offsets[c] ? low[threadIdx.x][0] : 0.0;
}

/// For every point p: its cloud and grid cell (cx, cy, cz) relative to its cloud's origin, as
/// three columns cell_xyz[a * n + p]; cmax (3,), zeroed by the caller, gets each axis' largest
/// cell coordinate (integer atomics: order-free).  Coordinates are >= 0: the origin is the
/// cloud's minimum.  The maxima are taken per block in shared memory first: one global atomic
/// per axis and block, not per point (every thread hitting the same three words serialised
/// them: 0.59 ms for 262k points on an H200).
extern "C" __global__ void grid_cell_coords(const double* points, long long n,
                                            const long long* offsets, long long n_clouds,
                                            const double* origin, double cell_size,
                                            double inv_cell_size, long long* cloud,
                                            long long* cell_xyz, long long* cmax) {
    using namespace pwconv_cuda;
    __shared__ long long block_max[3];
    if (threadIdx.x < 3) block_max[threadIdx.x] = 0;
    __syncthreads();
    const i64 p = global_thread();
    if (p < n) {
        const i64 c = segment_of(offsets, n_clouds, p);
        cloud[p] = c;
        for (int a = 0; a < 3; ++a) {
            const i64 cell =
                grid_coord(points[3 * p + a], origin[3 * c + a], cell_size, inv_cell_size);
            cell_xyz[a * n + p] = cell;
            atomicMax(block_max + a, (long long)cell);
        }
    }
    __syncthreads();
    if (threadIdx.x < 3) atomicMax(cmax + threadIdx.x, block_max[threadIdx.x]);
}

/// key[p] = ((cloud * rz + cz) * ry + cy) * rx + cx: the cell's place in (cloud, cz, cy, cx)
/// order, when it fits 63 bits (the caller checks); into key32 instead (not null) when it fits
/// 32 bits: the same order, half the radix sort's passes.
extern "C" __global__ void grid_cell_keys(long long n, const long long* cloud,
                                          const long long* cell_xyz, long long rx, long long ry,
                                          long long rz, long long* key, unsigned int* key32) {
    const long long p = pwconv_cuda::global_thread();
    if (p >= n) return;
    const long long k =
        ((cloud[p] * rz + cell_xyz[2 * n + p]) * ry + cell_xyz[n + p]) * rx + cell_xyz[p];
    if (key32)
        key32[p] = (unsigned int)k;
    else
        key[p] = k;
}

/// Sorted position i (order: sorted position -> point): the point's coordinates as three
/// columns, and new_cell[i] = 1 where a cell starts (i == 0, or (cloud, cell) differs from the
/// previous point's); or, with starts (not null; new_cell unused), starts[i] = new cell | new
/// grid row (cloud, cz, cy) << 32, whose inclusive scan numbers both (grid_cells_scanned).
extern "C" __global__ void grid_sorted_points(long long n, const long long* order,
                                              const double* points, const long long* cloud,
                                              const long long* cell_xyz, double* x, double* y,
                                              double* z, int* new_cell, long long* starts) {
    const long long i = pwconv_cuda::global_thread();
    if (i >= n) return;
    const long long o = order[i];
    x[i] = points[3 * o];
    y[i] = points[3 * o + 1];
    z[i] = points[3 * o + 2];
    int row = 1, cell = 1;
    if (i > 0) {
        const long long q = order[i - 1];
        row = cloud[o] != cloud[q] || cell_xyz[2 * n + o] != cell_xyz[2 * n + q] ||
              cell_xyz[n + o] != cell_xyz[n + q];
        cell = row || cell_xyz[o] != cell_xyz[q];
    }
    if (starts)
        starts[i] = (long long)cell | ((long long)row << 32);
    else
        new_cell[i] = cell;
}

/// The grid's cells, rows and clouds from the sorted points (PWCONV_CUDA_GRID_BUILD=scan): one
/// thread per sorted position i, `scanned` the inclusive scan of grid_sorted_points' starts
/// (low 32 bits: cells so far, high: rows so far; fewer than 2^32 points).  A point that starts
/// cell c writes cell_start[c], the cell's coordinates and cloud, and where it starts row r,
/// row_cell_begin[r] = c; where its cloud differs from the previous point's, cloud_cell_begin
/// gets c for that cloud and the empty ones before it.  The last point writes the ends
/// (cell_start[n_cells] = n, row_cell_begin[n_rows] = n_cells) and the empty clouds after it.
/// Same arrays as grid_cells + the searches over new_cell / new_row, without their host
/// synchronisations.
extern "C" __global__ void grid_cells_scanned(long long n, long long n_clouds,
                                              const long long* order, const long long* cloud,
                                              const long long* cell_xyz, const long long* starts,
                                              const long long* scanned, long long* cell_start,
                                              long long* cell_x, long long* cell_y,
                                              long long* cell_z, long long* cell_cloud,
                                              long long* row_cell_begin,
                                              long long* cloud_cell_begin) {
    const long long i = pwconv_cuda::global_thread();
    if (i >= n) return;
    const long long o = order[i];
    const long long mine = cloud[o];
    if (i == n - 1) {
        const long long n_cells = scanned[i] & 0xFFFFFFFFll, n_rows = scanned[i] >> 32;
        cell_start[n_cells] = n;
        row_cell_begin[n_rows] = n_cells;
        for (long long k = mine + 1; k <= n_clouds; ++k) cloud_cell_begin[k] = n_cells;
    }
    if (!(starts[i] & 1)) return;
    const long long c = (scanned[i] & 0xFFFFFFFFll) - 1;
    cell_start[c] = i;
    cell_x[c] = cell_xyz[o];
    cell_y[c] = cell_xyz[n + o];
    cell_z[c] = cell_xyz[2 * n + o];
    cell_cloud[c] = mine;
    if (starts[i] >> 32) row_cell_begin[(scanned[i] >> 32) - 1] = c;
    const long long before = i == 0 ? -1 : cloud[order[i - 1]];
    for (long long k = before + 1; k <= mine; ++k) cloud_cell_begin[k] = c;
}

/// Cell c (first sorted point first[c]): cell_start[c], its coordinates and cloud, and
/// new_row[c] = 1 where a grid row (cloud, cz, cy) starts; cell_start[n_cells] = n.
extern "C" __global__ void grid_cells(long long n_cells, long long n, const long long* first,
                                      const long long* order, const long long* cloud,
                                      const long long* cell_xyz, long long* cell_start,
                                      long long* cell_x, long long* cell_y, long long* cell_z,
                                      long long* cell_cloud, int* new_row) {
    const long long c = pwconv_cuda::global_thread();
    if (c > n_cells) return;
    if (c == n_cells) {
        cell_start[c] = n;
        return;
    }
    const long long p = first[c], o = order[p];
    cell_start[c] = p;
    cell_x[c] = cell_xyz[o];
    cell_y[c] = cell_xyz[n + o];
    cell_z[c] = cell_xyz[2 * n + o];
    cell_cloud[c] = cloud[o];
    int start = 1;
    if (c > 0) {
        const long long q = order[first[c - 1]];
        start = cloud[o] != cloud[q] || cell_xyz[2 * n + o] != cell_xyz[2 * n + q] ||
                cell_xyz[n + o] != cell_xyz[n + q];
    }
    new_row[c] = start;
}

namespace pwconv_cuda {

/// Claims a free slot of an open-addressing table of 2^bits slots, `step` words apart (1: keys
/// alone, 2: (key, value) pairs), for a key not in it yet: linear probing from the key's home
/// slot, each slot taken by an integer compare-and-swap.  Where colliding keys land depends on
/// the schedule; the slot a probe finds a key in (for_each_run) does not matter.
__device__ __forceinline__ unsigned long long claim_slot(unsigned long long* table, int step,
                                                         int bits, unsigned long long key) {
    const unsigned long long mask = (1ull << bits) - 1ull;
    for (unsigned long long h = row_slot(key, bits);; h = (h + 1) & mask)
        if (atomicCAS(table + step * h, PWCONV_CUDA_EMPTY_SLOT, key) == PWCONV_CUDA_EMPTY_SLOT)
            return h;
}

/// A row's cells [first, end) as the pairs layout stores them (first << 32 | end; < 2^32 cells).
__device__ __forceinline__ unsigned long long row_cells(i64 first, i64 end) {
    return ((unsigned long long)first << 32) | (unsigned long long)end;
}

}  // namespace pwconv_cuda

/// Inserts every grid row r (its first cell row_cell_begin[r]; cell_cloud / cell_z / cell_y of
/// that cell give its key) into the open-addressing table (2^table_bits slots, keys preset to
/// ~0), the row in table_rows, or with `slots` the row's cells beside its key (the pairs layout
/// of GridView::table_slots).  Slots are claimed with an integer compare-and-swap, so where a
/// colliding key lands depends on the schedule; the row a probe finds for a key (for_each_run)
/// does not.
extern "C" __global__ void build_row_table(long long n_rows, const long long* row_cell_begin,
                                           const long long* cell_cloud, const long long* cell_z,
                                           const long long* cell_y, long long cmax_y,
                                           long long cmax_z, int table_bits, int slots,
                                           unsigned long long* table_keys,
                                           long long* table_rows) {
    using namespace pwconv_cuda;
    const i64 r = global_thread();
    if (r >= n_rows) return;
    const i64 c = row_cell_begin[r];
    const unsigned long long key = row_key(cell_cloud[c], cell_z[c], cell_y[c], cmax_y, cmax_z);
    const unsigned long long h = claim_slot(table_keys, slots ? 2 : 1, table_bits, key);
    if (slots)  // the row's cells beside its key (fewer than 2^32 cells: the caller)
        table_keys[2 * h + 1] = row_cells(c, row_cell_begin[r + 1]);
    else
        table_rows[h] = r;
}

// ============================================================================================
// Kernel map (SPEC §1): count pass, scan (in Python), fill pass
// ============================================================================================

/// The search kernels' leading arguments (kernel maps and radius search): the queries and the
/// grid.  Spelled once, with the kernel maps' and the radius search's own arguments after them,
/// so the kernels and their search functions cannot drift apart.
#define PWCONV_CUDA_SEARCH_HEAD_PARAMS                                                            \
    long long m, const long long *qrow, const double *qx, const double *qy, const double *qz,   \
        const long long *query_offsets, long long n_clouds, /* grid */ const double *gx,        \
        const double *gy, const double *gz, const long long *gorder,                           \
        const long long *cell_start, const long long *cell_x, const long long *cell_y,         \
        const long long *cell_z, const long long *cloud_cell_begin, const double *origin,      \
        double cell_size, double inv_cell_size, long long cmax_x, long long cmax_y,            \
        long long cmax_z, const long long *row_cell_begin,                                     \
        const unsigned long long *table_keys, const long long *table_rows, int table_bits,     \
        int table_slots
#define PWCONV_CUDA_SEARCH_HEAD_ARGS                                                              \
    m, qrow, qx, qy, qz, query_offsets, n_clouds, gx, gy, gz, gorder, cell_start, cell_x,       \
        cell_y, cell_z, cloud_cell_begin, origin, cell_size, inv_cell_size, cmax_x, cmax_y,     \
        cmax_z, row_cell_begin, table_keys, table_rows, table_bits, table_slots

/// The kernel-map kernels' arguments (kernel_map_pass, kernel_map_once, kernel_map_tiled): the
/// head, then the kernel (axis_d (n_maps, 2K): kernel_axis_differences' start_d then end_d of
/// each map's dilation, from kernel_axis_diffs).
#define PWCONV_CUDA_KERNEL_MAP_PARAMS                                                             \
    PWCONV_CUDA_SEARCH_HEAD_PARAMS, double voxel_size, int kernel_size, const int *dilations,    \
        int cell_bits, const double *axis_d_all
#define PWCONV_CUDA_KERNEL_MAP_ARGS                                                               \
    PWCONV_CUDA_SEARCH_HEAD_ARGS, voxel_size, kernel_size, dilations, cell_bits, axis_d_all

namespace pwconv_cuda {

/// Searches query t (< m) of map d: every accepted neighbour's key (index << cell_bits) | cell
/// goes to sink, in a fixed order.  Returns the query's row in the maps' CSR (d * m + qrow[t]).
/// KC: the kernel size at compile time (0: runtime, up to PWCONV_CUDA_MAX_K).  The sorted
/// points' coordinates and the cells' x and first point are read where `tile` says.
template <int KC>
__device__ __forceinline__ i64 kernel_map_search(PWCONV_CUDA_KERNEL_MAP_PARAMS,
                                                 const TileView& tile, i64 t, int d,
                                                 RowSink& sink) {
    constexpr int KMAX = KC > 0 ? KC : PWCONV_CUDA_MAX_K;
    const int K = KC > 0 ? KC : kernel_size;
    const GridView g{tile.x,     tile.y,        tile.z,     tile.order, tile.cell_start,
                     tile.cell_x, cell_y,       cell_z,     cloud_cell_begin, origin,
                     cell_size,  inv_cell_size, {cmax_x, cmax_y, cmax_z},
                     row_cell_begin, tile.table_keys, table_rows, tile.table_bits,
                     tile.table_slots, tile.point_base, tile.cell_base, tile.order32};
    const int dilation = dilations[d];
    const double* axis_d = axis_d_all + (i64)d * 2 * K;
    const i64 row = qrow[t] + (i64)d * m;  // the row in the maps' CSR
    const double q[3] = {qx[t], qy[t], qz[t]};
    const i64 cloud = segment_of(query_offsets, n_clouds, qrow[t]);

    // The support's lower corner per axis; the kernel's thresholds come in axis_d, made once per
    // map (kernel_axis_diffs).  Grid-cell ranges: one box for dilation 1, each kernel cell's own
    // cells otherwise.  An accepted x has fl(x - lo) in [D_start, D_end), so x lies within a few
    // ulps of [lo + D_start, lo + D_end): widened by the bound slack (as the CPU's compact
    // path: candidate_lower / _upper), these ranges hold every candidate; the classification
    // alone decides.
    const double h = pwconv::kernel_half_width(voxel_size, K, dilation);
    const double* sd = axis_d;
    const double* ed = axis_d + K;
    double lo[3];
    AxisRanges<KMAX> r[3];
    for (int a = 0; a < 3; ++a) {
        lo[a] = pwconv::support_lower(q[a], h);
        r[a].count = 0;
        const double o = g.origin[3 * cloud + a];
        for (int k = 0; k < (dilation == 1 ? 1 : K); ++k) {
            const double ds = dilation == 1 ? sd[0] : sd[k], de = dilation == 1 ? ed[K - 1] : ed[k];
            if (!(ds < de)) continue;
            add_range(r[a], pwconv::candidate_lower(lo[a], ds), pwconv::candidate_upper(lo[a], de),
                      o, g, g.cmax[a], dilation == 1 ? -1 : k);
        }
    }
    if (dilation > 1) merge_touching_ranges(r[0]);  // x only: y and z name the grid rows

    KernelVisit visit{&g, sd, ed, {lo[0], lo[1], lo[2]}, K, cell_bits, &sink};
    for_each_run(g, cloud, r[0], r[1], r[2], visit);
    return row;
}

/// Inclusive sum of v over the lanes of a full warp up to this one (shuffles only).
__device__ __forceinline__ i64 warp_inclusive_sum(i64 v, int lane) {
    for (int offset = 1; offset < 32; offset <<= 1) {
        const i64 other = __shfl_sync(0xffffffffu, v, lane >= offset ? lane - offset : lane);
        if (lane >= offset) v += other;
    }
    return v;
}

}  // namespace pwconv_cuda

/// Count and fill passes of a kernel map (count -> scan -> fill).  One thread per query and
/// map.  Several maps of the same queries (same voxel size and kernel size, dilations[d] for map
/// d = blockIdx.y) are made by one launch, as one CSR of n_maps * m rows, map d's rows at d * m:
/// the maps' threads share the device (one wave of latency-bound threads instead of several)
/// and their scan one host synchronisation.  Thread t handles query row qrow[t] at (qx[t], qy[t],
/// qz[t]) (for the points themselves: the sorted grid order, which keeps neighbouring threads on
/// neighbouring cells); its cloud is found in query_offsets.
/// FILL = 0: row_len[d * m + row] = number of neighbours.  FILL = 1: writes the keys
/// (index << cell_bits) | cell of the row at keys[splits[d * m + row]...], sorted ascending when
/// the row has at most short_row entries; *status = 1 if a row's count differs from its length.
/// With only_missing, FILL = 1 writes only the rows with row_at[row] < 0: those kernel_map_once
/// did not keep (longer than its buffer), the others being in place already.
template <int KC, int FILL>
__global__ void PWCONV_CUDA_SEARCH_BOUNDS kernel_map_pass(PWCONV_CUDA_KERNEL_MAP_PARAMS,
                                                          long long* row_len,
                                                          const long long* splits,
                                                          long long* keys, long long short_row,
                                                          int* status,
                                                          const long long* __restrict__ row_at,
                                                          int only_missing) {
    using namespace pwconv_cuda;
    const i64 t = global_thread();
    if (t >= m) return;
    const int d = blockIdx.y;  // the map
    const i64 row = qrow[t] + (i64)d * m;
    if (FILL && only_missing && row_at[row] >= 0) return;
    RowSink sink;
    i64 base = 0, len = 0;
    if (FILL) {
        base = splits[row];
        len = splits[row + 1] - base;
        sink.keys = keys + base;
        sink.capacity = len;
    } else {
        sink.keys = 0;
        sink.capacity = 0;
    }
    sink.n = 0;
    const TileView grid_arrays{gx, gy, gz, gorder, 0, cell_x, cell_start, 0, table_keys,
                               table_bits, table_slots, 0};
    kernel_map_search<KC>(PWCONV_CUDA_KERNEL_MAP_ARGS, grid_arrays, t, d, sink);

    if (!FILL) {
        row_len[row] = sink.n;
        return;
    }
    if (sink.n != len) {
        *status = 1;
        return;
    }
    if (len <= short_row) sort_short(keys + base, len);
}

namespace pwconv_cuda {

/// The one-pass kernels' output (kernel_map_once, kernel_map_tiled), called by every lane of a
/// warp together: row (-1 for lanes without a query) and its keys buffered in sink.  The warp
/// reserves room for its buffered rows in `scratch` with one integer atomicAdd on *cursor and
/// writes them there, unsorted; row_len[row] = the row's length (always: the count pass's
/// output), row_at[row] = where its keys start in scratch, or -1 when they are not there: the
/// row is longer than the buffer, or scratch (capacity keys) is full (*status = 1).
__device__ __forceinline__ void emit_once_row(i64 row, const RowSink& sink, int lane,
                                              long long* row_len, long long* row_at,
                                              long long* scratch, long long capacity,
                                              unsigned long long* cursor, int* status) {
    const i64 need = (row >= 0 && sink.n <= sink.capacity) ? sink.n : 0;
    const i64 end = warp_inclusive_sum(need, lane);  // this lane's rows end at base + end
    const i64 total = __shfl_sync(0xffffffffu, end, 31);
    unsigned long long base = 0;
    if (lane == 31 && total > 0) base = atomicAdd(cursor, (unsigned long long)total);
    base = __shfl_sync(0xffffffffu, base, 31);
    if (row < 0) return;
    row_len[row] = sink.n;
    const bool fits = base + (unsigned long long)total <= (unsigned long long)capacity;
    if (sink.n > sink.capacity || (need > 0 && !fits)) {
        row_at[row] = -1;
        if (need > 0) *status = 1;
        return;
    }
    const i64 at = (i64)base + end - need;
    row_at[row] = at;
    for (i64 i = 0; i < need; ++i) scratch[at + i] = sink.keys[i];
}

}  // namespace pwconv_cuda

/// The kernel map in one search pass (same threads and rows as kernel_map_pass): each thread
/// keeps its row's keys (at most short_row <= PWCONV_CUDA_SHORT_ROW) in a local buffer while it
/// searches, then emit_once_row puts them in `scratch`.  Where a row lands depends on the
/// schedule; the map sort_rows_by_rank makes from scratch does not (it sorts each row's distinct
/// keys).  Saves the count pass's second search of every query; a caller that gets -1 rows
/// falls back to the fill pass, row_len serving as the count.
template <int KC>
__global__ void PWCONV_CUDA_SEARCH_BOUNDS kernel_map_once(PWCONV_CUDA_KERNEL_MAP_PARAMS,
                                                          long long* row_len, long long* row_at,
                                                          long long* scratch,
                                                          long long capacity,
                                                          unsigned long long* cursor,
                                                          long long short_row, int* status) {
    using namespace pwconv_cuda;
    const i64 t = global_thread();
    const int d = blockIdx.y;  // the map
    const int lane = threadIdx.x % 32;  // blocks are whole warps: every lane reaches the shuffles
    i64 buffer[PWCONV_CUDA_SHORT_ROW];
    RowSink sink = buffered_sink(buffer, short_row);
    i64 row = -1;
    const TileView grid_arrays{gx, gy, gz, gorder, 0, cell_x, cell_start, 0, table_keys,
                               table_bits, table_slots, 0};
    if (t < m) row = kernel_map_search<KC>(PWCONV_CUDA_KERNEL_MAP_ARGS, grid_arrays, t, d, sink);
    emit_once_row(row, sink, lane, row_len, row_at, scratch, capacity, cursor, status);
}

/// Dynamic shared memory (the host emulation defines its own).
#ifndef PWCONV_CUDA_DYNAMIC_SHARED
#define PWCONV_CUDA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

/// kernel_map_once with blocks_per_cloud blocks per (cloud, map) (opt-in, PWCONV_CUDA_MAP_TILES):
/// a block first copies its cloud's sorted coordinates to shared memory (3 * tile_points
/// doubles of dynamic shared memory, tile_points >= the cloud's points) and, with tile_cells,
/// its cells' x and first point (2 * tile_points + 1 more 64-bit values; cells <= points), then
/// its threads search its run of tile_queries of the cloud's queries [query_offsets[c],
/// query_offsets[c + 1]) (run blockIdx.x % blocks_per_cloud) a block's width at a time, reading
/// every candidate's coordinates (and the cells) there instead of from global memory: the
/// candidates are most of a search's loads, each thread's at its own address.  With
/// tile_row_bits > 0 (and tile_cells), the points' order (tile_points 32-bit offsets from the
/// cloud's first point, from a 64-bit word) and the cloud's grid rows [cloud_row_begin[c],
/// cloud_row_begin[c + 1]) in a hash table of their own go after the cells (2^tile_row_bits
/// (key, cells) pairs, the layout of GridView::table_slots, from an even 64-bit word): every
/// load of the search but the query's own then reads shared memory.  Needs the grid's row table
/// (the binary search over cells reads cell coordinates this kernel does not copy).
/// Same keys, same output as kernel_map_once.
template <int KC>
__global__ void __launch_bounds__(256, PWCONV_CUDA_TILE_MIN_BLOCKS)
    kernel_map_tiled(PWCONV_CUDA_KERNEL_MAP_PARAMS, long long* row_len, long long* row_at,
                     long long* scratch, long long capacity, unsigned long long* cursor,
                     long long short_row, int* status, long long tile_points,
                     long long blocks_per_cloud, long long tile_queries, int tile_cells,
                     const long long* cloud_row_begin, int tile_row_bits) {
    using namespace pwconv_cuda;
    PWCONV_CUDA_DYNAMIC_SHARED(double, tile);
    const i64 c = blockIdx.x / blocks_per_cloud;  // the cloud
    const i64 part = blockIdx.x % blocks_per_cloud;  // which run of its queries
    const int d = blockIdx.y;  // the map
    const int lane = threadIdx.x % 32;
    const i64 cb = cloud_cell_begin[c], ce = cloud_cell_begin[c + 1];
    const i64 pb = cell_start[cb];
    const i64 n_c = cell_start[ce] - pb;  // the cloud's points
    TileView view{tile,   tile + tile_points, tile + 2 * tile_points, gorder + pb, pb,
                  cell_x, cell_start,         0,                      table_keys, table_bits,
                  table_slots, 0};
    for (i64 i = threadIdx.x; i < n_c; i += blockDim.x) {
        tile[i] = gx[pb + i];
        tile[tile_points + i] = gy[pb + i];
        tile[2 * tile_points + i] = gz[pb + i];
    }
    if (tile_cells) {  // after the coordinates: cell x (ce - cb), then first points (one more)
        i64* tile_cx = reinterpret_cast<i64*>(tile + 3 * tile_points);
        i64* tile_start = tile_cx + tile_points;
        for (i64 i = threadIdx.x; i <= ce - cb; i += blockDim.x) {
            if (i < ce - cb) tile_cx[i] = cell_x[cb + i];
            tile_start[i] = cell_start[cb + i];
        }
        view.cell_x = tile_cx;
        view.cell_start = tile_start;
        view.cell_base = cb;
    }
    if (tile_row_bits > 0) {  // after the cells: the points' order, then (16-byte aligned) the
                              // cloud's rows as pairs
        unsigned* tile_order = reinterpret_cast<unsigned*>(tile + 5 * tile_points + 1);
        for (i64 i = threadIdx.x; i < n_c; i += blockDim.x)
            tile_order[i] = (unsigned)(gorder[pb + i] - pb);
        view.order32 = tile_order;
        unsigned long long* table = reinterpret_cast<unsigned long long*>(tile) +
                                    ((5 * tile_points + 1 + (tile_points + 1) / 2 + 1) & ~1ll);
        for (i64 i = threadIdx.x; i < (2ll << tile_row_bits); i += blockDim.x)
            table[i] = PWCONV_CUDA_EMPTY_SLOT;
        __syncthreads();
        for (i64 r = cloud_row_begin[c] + threadIdx.x; r < cloud_row_begin[c + 1];
             r += blockDim.x) {
            const i64 f = row_cell_begin[r];
            const unsigned long long key = row_key(c, cell_z[f], cell_y[f], cmax_y, cmax_z);
            const unsigned long long h = claim_slot(table, 2, tile_row_bits, key);
            table[2 * h + 1] = row_cells(f, row_cell_begin[r + 1]);
        }
        view.table_keys = table;
        view.table_bits = tile_row_bits;
        view.table_slots = 1;
    }
    __syncthreads();
    const i64 q_end = query_offsets[c + 1];
    const i64 q0 = query_offsets[c] + part * tile_queries;
    const i64 q1 = q0 + tile_queries < q_end ? q0 + tile_queries : q_end;
    i64 buffer[PWCONV_CUDA_SHORT_ROW];
    for (i64 first = q0; first < q1; first += blockDim.x) {  // the same trip count for all lanes
        const i64 t = first + threadIdx.x;
        RowSink sink = buffered_sink(buffer, short_row);
        i64 row = -1;
        if (t < q1) row = kernel_map_search<KC>(PWCONV_CUDA_KERNEL_MAP_ARGS, view, t, d, sink);
        emit_once_row(row, sink, lane, row_len, row_at, scratch, capacity, cursor, status);
    }
}

/// out = in with every row of at most short_row entries sorted ascending (keys distinct within a
/// row, as a map's (index << bits | cell) keys are): `lanes` threads per row (32: a warp; 4, 8
/// or 16: several rows per warp, fewer idle lanes on short rows), each lane placing its keys
/// at their rank (the number of smaller keys in the row), all lanes reading the row's keys at one
/// address: len^2 / lanes comparisons per lane, so the callers pass _backend.SHORT_ROW, and
/// longer rows are copied as they are (the caller sorts them).  Replaces the fill thread's own
/// insertion sort, which moved keys in global memory one place at a time.
/// Row r's keys are read from in[in_at[r]...] when gathered (kernel_map_once's scratch, rows in
/// any order; a row with in_at[r] < 0 is not there and is left alone: the fill pass writes it),
/// else from in[splits[r]...]; they go to out[splits[r]...].
/// With count_cells (kernel maps; cell_mask: the key's cell bits, 0 for K = 1), the same pass
/// over the row also counts the row's keys in each key's cell: counts[b + rank] = n_i(f) of the
/// sorted entry, which the operator's weights 1 / n_i(f) are made from (rows longer than
/// short_row: left to the caller).
extern "C" __global__ void sort_rows_by_rank(long long m, const long long* __restrict__ splits,
                                             const long long* __restrict__ in,
                                             const long long* __restrict__ in_at, int gathered,
                                             long long* __restrict__ out, long long short_row,
                                             long long cell_mask, int count_cells,
                                             int* __restrict__ counts, int lanes) {
    const long long t = pwconv_cuda::global_thread();  // lanes need not divide the block
    const long long row = t / lanes;
    const int lane = (int)(t % lanes);
    if (row >= m) return;
    const long long b = splits[row], len = splits[row + 1] - b;
    if (gathered && in_at[row] < 0) return;
    const long long* row_in = in + (gathered ? in_at[row] : b);
    if (len > short_row) {
        for (long long i = lane; i < len; i += lanes) out[b + i] = row_in[i];
        return;
    }
    for (long long i = lane; i < len; i += lanes) {
        const long long key = row_in[i];
        const long long key_cell = key & cell_mask;
        long long rank = 0;
        int same_cell = 0;
        for (long long j = 0; j < len; ++j) {
            const long long other = row_in[j];
            rank += other < key;
            same_cell += (other & cell_mask) == key_cell;
        }
        out[b + rank] = key;
        if (count_cells) counts[b + rank] = same_cell;
    }
}

/// For each map d < n_maps, axis_d[d * 2K + (0, K)] and [d * 2K + (K, 2K)]: binning.hpp's
/// kernel_axis_differences (start_d, end_d) of dilation dilations[d], the same on every axis
/// and for every query.  One thread per map.
extern "C" __global__ void kernel_axis_diffs(double voxel_size, int kernel_size, long long n_maps,
                                             const int* dilations, double* axis_d) {
    const long long d = pwconv_cuda::global_thread();
    if (d >= n_maps) return;
    double* out = axis_d + d * 2 * kernel_size;
    pwconv::kernel_axis_differences(voxel_size, kernel_size, dilations[d], out, out + kernel_size);
}

/// The radius search kernels' arguments: the head, then the radius and the metric.
#define PWCONV_CUDA_RADIUS_PARAMS PWCONV_CUDA_SEARCH_HEAD_PARAMS, double radius, int euclidean
#define PWCONV_CUDA_RADIUS_ARGS PWCONV_CUDA_SEARCH_HEAD_ARGS, radius, euclidean

namespace pwconv_cuda {

/// Searches radius query t (< m): every neighbour's index goes to sink, in a fixed order (the
/// closed cube or ball of binning.hpp's predicates).  Returns the query's row, qrow[t].
__device__ __forceinline__ i64 radius_search(PWCONV_CUDA_RADIUS_PARAMS, i64 t, RowSink& sink) {
    const GridView g{gx,         gy,         gz,     gorder,    cell_start,
                     cell_x,     cell_y,     cell_z, cloud_cell_begin, origin,
                     cell_size,  inv_cell_size, {cmax_x, cmax_y, cmax_z},
                     row_cell_begin, table_keys, table_rows, table_bits, table_slots, 0, 0,
                     0};
    const i64 row = qrow[t];
    const double q[3] = {qx[t], qy[t], qz[t]};
    const i64 cloud = segment_of(query_offsets, n_clouds, row);

    AxisRanges<1> r[3];
    for (int a = 0; a < 3; ++a) {  // as detail::radius_box
        r[a].count = 0;
        const double slack = pwconv::radius_slack(q[a], radius);
        add_range(r[a], (q[a] - radius) - slack, (q[a] + radius) + slack, g.origin[3 * cloud + a],
                  g, g.cmax[a], -1);
    }
    RadiusVisit visit{&g, q[0], q[1], q[2], radius, radius * radius, euclidean, &sink};
    for_each_run(g, cloud, r[0], r[1], r[2], visit);
    return row;
}

}  // namespace pwconv_cuda

/// Count and fill passes of a radius search, as kernel_map_pass (one map; keys are the
/// neighbour indices), only_missing and row_at included (radius_once's rows).
template <int FILL>
__global__ void radius_pass(PWCONV_CUDA_RADIUS_PARAMS, long long* row_len,
                            const long long* splits, long long* keys, long long short_row,
                            int* status, const long long* __restrict__ row_at,
                            int only_missing) {
    using namespace pwconv_cuda;
    const i64 t = global_thread();
    if (t >= m) return;
    const i64 row = qrow[t];
    if (FILL && only_missing && row_at[row] >= 0) return;
    RowSink sink;
    i64 base = 0, len = 0;
    if (FILL) {
        base = splits[row];
        len = splits[row + 1] - base;
        sink.keys = keys + base;
        sink.capacity = len;
    } else {
        sink.keys = 0;
        sink.capacity = 0;
    }
    sink.n = 0;
    radius_search(PWCONV_CUDA_RADIUS_ARGS, t, sink);
    if (!FILL) {
        row_len[row] = sink.n;
        return;
    }
    if (sink.n != len) {
        *status = 1;
        return;
    }
    if (len <= short_row) sort_short(keys + base, len);
}

/// A radius search in one pass, as kernel_map_once: each thread keeps its row's neighbours (at
/// most short_row <= PWCONV_CUDA_SHORT_ROW) in a local buffer, then emit_once_row puts them in
/// scratch (row_at[row]; -1 for rows not kept, which the fill pass searches again).
extern "C" __global__ void PWCONV_CUDA_SEARCH_BOUNDS radius_once(
    PWCONV_CUDA_RADIUS_PARAMS, long long* row_len, long long* row_at, long long* scratch,
    long long capacity, unsigned long long* cursor, long long short_row, int* status) {
    using namespace pwconv_cuda;
    const i64 t = global_thread();
    const int lane = threadIdx.x % 32;  // blocks are whole warps: every lane reaches the shuffles
    i64 buffer[PWCONV_CUDA_SHORT_ROW];
    RowSink sink = buffered_sink(buffer, short_row);
    i64 row = -1;
    if (t < m) row = radius_search(PWCONV_CUDA_RADIUS_ARGS, t, sink);
    emit_once_row(row, sink, lane, row_len, row_at, scratch, capacity, cursor, status);
}

/// row_of[e] = the row of entry e of a CSR: one warp per row, its lanes writing consecutive
/// entries (one thread per row, writing 8 bytes ~150 bytes away from its neighbour's, took 61 us
/// for a 4.8M-entry map on an H200).
extern "C" __global__ void expand_rows(long long m, const long long* splits, long long* row_of) {
    const long long i = pwconv_cuda::global_thread() / 32;
    if (i >= m) return;
    for (long long e = splits[i] + threadIdx.x % 32; e < splits[i + 1]; e += 32) row_of[e] = i;
}

/// Splits the keys (index << cell_bits | cell) into index and cell, one thread per entry.
template <class CellT>
__global__ void split_kernel_keys(long long n_entries, const long long* keys, int cell_bits,
                                  long long* index, CellT* cell) {
    const long long e = pwconv_cuda::global_thread();
    if (e >= n_entries) return;
    const long long key = keys[e];
    index[e] = key >> cell_bits;
    cell[e] = (CellT)(key & (((long long)1 << cell_bits) - 1));
}

/// counts (m, n_cells): counts[i, f] = the number of entries of row i in cell f (one thread per
/// row, which zeroes and fills its own row: no atomics).  What KernelMap.counts computes on first
/// access; the operator tallies the cells itself.
template <class CellT>
__global__ void row_cell_counts(long long m, const long long* splits, const CellT* cell,
                                int n_cells, int* counts) {
    const long long i = pwconv_cuda::global_thread();
    if (i >= m) return;
    int* row = counts + i * (long long)n_cells;
    for (int f = 0; f < n_cells; ++f) row[f] = 0;
    for (long long e = splits[i]; e < splits[i + 1]; ++e) row[(int)cell[e]] += 1;
}

/// Reorders every row of a kernel map by (cell, index): a counting sort per row (one thread per
/// row, entries visited in index order, so each cell's run keeps ascending indices).  cursor
/// (m, n_cells) starts as the runs' offsets within their rows and is advanced here.
template <class CellT>
__global__ void order_rows_by_cell(long long m, const long long* splits, const long long* index,
                                   const CellT* cell, int n_cells, int* cursor, long long* col_out,
                                   int* cell_out) {
    const long long i = pwconv_cuda::global_thread();
    if (i >= m) return;
    int* row_cursor = cursor + i * (long long)n_cells;
    const long long base = splits[i];
    for (long long e = base; e < splits[i + 1]; ++e) {
        const int f = (int)cell[e];
        const long long pos = base + row_cursor[f]++;
        col_out[pos] = index[e];
        cell_out[pos] = f;
    }
}

// ============================================================================================
// Pointwise convolution over a kernel map whose rows are ordered by (cell, index) ("by cell":
// each Omega_i(f) is one run of entries).  The input gradient runs the same gather over the
// transposed map ordered by (cell, row).  Sums are formed as `s = s + w * v` (no FMA: --fmad=false)
// in entry order, then multiplied by the cell matrices in ascending cell order: a fixed order.
// ============================================================================================

/// out (rows, b) = sum over the runs (f, e0..e1) of each row of
/// (sum_e w_e * src[col[e]]) . M_f, with M (n_cells, a, b) row-major and w_e = 1 / counts[r, f]
/// where r = weight_row[e] when use_weight_row, else the row itself.
/// Block: 256 threads = 256 / group groups of `group` lanes (group a power of two <= 32); a group
/// handles one row and `group` output channels (grid.y tiles the outputs).  The cell mean is
/// shared through shared memory, `group` input channels at a time.
template <class F>
__global__ void conv_gather_dense(long long rows, const long long* splits, const long long* col,
                                  const int* cell, int use_weight_row,
                                  const long long* weight_row, const int* counts, int n_cells,
                                  const F* src, long long a, const F* M, long long b, F* out,
                                  int group) {
    __shared__ F tile[256];
    const int lane = threadIdx.x % group;
    const int g = threadIdx.x / group;
    const long long row = (long long)blockIdx.x * (blockDim.x / group) + g;
    if (row >= rows) return;  // the whole group leaves together
    const long long co = (long long)blockIdx.y * group + lane;
    const int warp_lane = threadIdx.x % 32;
    const unsigned mask = group == 32 ? 0xffffffffu
                                      : (((1u << group) - 1u) << ((warp_lane / group) * group));
    F* mean = tile + g * group;
    F acc = F(0);
    long long e = splits[row];
    const long long end = splits[row + 1];
    while (e < end) {
        const int f = cell[e];
        long long run_end = e + 1;
        while (run_end < end && cell[run_end] == f) ++run_end;
        const F w_run = use_weight_row ? F(0) : F(1) / (F)counts[row * n_cells + f];
        for (long long ci0 = 0; ci0 < a; ci0 += group) {
            const long long ci = ci0 + lane;
            if (ci < a) {
                F s = F(0);
                for (long long k = e; k < run_end; ++k) {
                    const F w = use_weight_row ? F(1) / (F)counts[weight_row[k] * n_cells + f]
                                               : w_run;
                    s = s + w * src[col[k] * a + ci];
                }
                mean[lane] = s;
            }
            __syncwarp(mask);
            if (co < b) {
                const long long width = a - ci0 < group ? a - ci0 : group;
                const F* Mf = M + ((long long)f * a + ci0) * b + co;
                for (long long t = 0; t < width; ++t) acc = acc + mean[t] * Mf[t * b];
            }
            __syncwarp(mask);
        }
        e = run_end;
    }
    if (co < b) out[row * b + co] = acc;
}

/// Depthwise: out (rows, c) = sum over the runs of (sum_e w_e * src[col[e], ch]) * M[f, ch].
/// One thread per (row, channel).
template <class F>
__global__ void conv_gather_depthwise(long long rows, const long long* splits,
                                      const long long* col, const int* cell, int use_weight_row,
                                      const long long* weight_row, const int* counts,
                                      int n_cells, const F* src, long long c, const F* M,
                                      F* out) {
    const long long t = pwconv_cuda::global_thread();
    if (t >= rows * c) return;
    const long long row = t / c, ch = t % c;
    F acc = F(0);
    long long e = splits[row];
    const long long end = splits[row + 1];
    while (e < end) {
        const int f = cell[e];
        const F w_run = use_weight_row ? F(0) : F(1) / (F)counts[row * n_cells + f];
        F s = F(0);
        for (; e < end && cell[e] == f; ++e) {
            const F w = use_weight_row ? F(1) / (F)counts[weight_row[e] * n_cells + f] : w_run;
            s = s + w * src[col[e] * c + ch];
        }
        acc = acc + s * M[(long long)f * c + ch];
    }
    out[row * c + ch] = acc;
}

/// Weight gradient, dense, pass 1: partial[blk, f, ci, co] = sum over the rows i of block blk
/// (rows_per_block rows, ascending) of mean_{Omega_i(f)}(x)[ci] * dy[i, co].
/// Grid (n_blocks, n_cells, n_ci_tiles * n_co_tiles); block ci_tile * co_tile threads (<= 256).
/// run_start (m, n_cells): offset of Omega_i(f)'s run in the by-cell row i.
template <class F>
__global__ void conv_weight_partial_dense(long long m, const long long* splits,
                                          const long long* col, const int* run_start,
                                          const int* counts, int n_cells, const F* x,
                                          long long c_in, const F* dy, long long c_out,
                                          long long rows_per_block, int ci_tile, int co_tile,
                                          long long n_co_tiles, F* partial) {
    __shared__ F mean[256];
    const long long blk = blockIdx.x;
    const int f = blockIdx.y;
    const long long ci0 = (long long)(blockIdx.z / n_co_tiles) * ci_tile;
    const long long co0 = (long long)(blockIdx.z % n_co_tiles) * co_tile;
    const int tid = threadIdx.x;
    const long long ci = ci0 + tid / co_tile, co = co0 + tid % co_tile;
    const bool valid = ci < c_in && co < c_out;
    const long long r0 = blk * rows_per_block;
    const long long r1 = r0 + rows_per_block < m ? r0 + rows_per_block : m;
    F acc = F(0);
    for (long long i = r0; i < r1; ++i) {
        const int n = counts[i * n_cells + f];
        if (n == 0) continue;  // uniform over the block
        if (tid < ci_tile && ci0 + tid < c_in) {
            const long long s0 = splits[i] + run_start[i * n_cells + f];
            const F w = F(1) / (F)n;
            F s = F(0);
            for (long long k = s0; k < s0 + n; ++k) s = s + w * x[col[k] * c_in + ci0 + tid];
            mean[tid] = s;
        }
        __syncthreads();
        if (valid) acc = acc + mean[tid / co_tile] * dy[i * c_out + co];
        __syncthreads();
    }
    if (valid) partial[((blk * n_cells + f) * c_in + ci) * c_out + co] = acc;
}

/// Weight gradient, depthwise, pass 1: partial[blk, f, ch] = sum over the rows i of block blk of
/// mean_{Omega_i(f)}(x)[ch] * dy[i, ch].  Grid (n_blocks, ceil(n_cells * c / 256)), 256 threads,
/// one (f, ch) per thread.
template <class F>
__global__ void conv_weight_partial_depthwise(long long m, const long long* splits,
                                              const long long* col, const int* run_start,
                                              const int* counts, int n_cells, const F* x,
                                              long long c, const F* dy, long long rows_per_block,
                                              F* partial) {
    const long long blk = blockIdx.x;
    const long long fc = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (fc >= (long long)n_cells * c) return;
    const long long f = fc / c, ch = fc % c;
    const long long r0 = blk * rows_per_block;
    const long long r1 = r0 + rows_per_block < m ? r0 + rows_per_block : m;
    F acc = F(0);
    for (long long i = r0; i < r1; ++i) {
        const int n = counts[i * n_cells + f];
        if (n == 0) continue;
        const long long s0 = splits[i] + run_start[i * n_cells + f];
        const F w = F(1) / (F)n;
        F s = F(0);
        for (long long k = s0; k < s0 + n; ++k) s = s + w * x[col[k] * c + ch];
        acc = acc + s * dy[i * c + ch];
    }
    partial[(blk * n_cells + f) * c + ch] = acc;
}

/// Weight gradient, pass 2: out[g, w] = the sum of group g's partials partial[b, w] in a fixed
/// order: slice s (of PWCONV_CUDA_SUM_SLICES) adds the group's partials b = b0 + s, b0 + s +
/// SLICES, ... in turn, then the slices' sums are added in slice order.  One group of all n_blocks
/// partials unless `grouped` (the "entries" scheme: group g = kernel cell g, its chunks' partials
/// b in [group_splits[g], group_splits[g + 1])).  Block (w / 32, g): 32 consecutive w (coalesced
/// reads) and the slices, blockDim.x = 32 * PWCONV_CUDA_SUM_SLICES.
#define PWCONV_CUDA_SUM_SLICES 8
template <class F>
__global__ void sum_partials(long long n_blocks, int grouped, const long long* group_splits,
                             long long size, const F* partial, F* out) {
    __shared__ F slice_sum[PWCONV_CUDA_SUM_SLICES][32];
    const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
    const long long g = blockIdx.y, w = (long long)blockIdx.x * 32 + lane;
    const long long b0 = grouped ? group_splits[g] : 0;
    const long long b1 = grouped ? group_splits[g + 1] : n_blocks;
    F acc = F(0);
    if (w < size)
        for (long long b = b0 + slice; b < b1; b += PWCONV_CUDA_SUM_SLICES)
            acc = acc + partial[b * size + w];
    slice_sum[slice][lane] = acc;
    __syncthreads();
    if (slice == 0 && w < size) {
        F total = slice_sum[0][lane];
        for (int k = 1; k < PWCONV_CUDA_SUM_SLICES; ++k) total = total + slice_sum[k][lane];
        out[g * size + w] = total;
    }
}

// ============================================================================================
// Operator, second scheme ("rows"): one group of lanes per row reads the row's entries in their
// map order (no by-cell reordering), lane = channel, and sums them per kernel cell in shared
// memory; the cell means then meet the cell matrices.  Sums are formed in entry order, products
// (FMAs, mul_add) in ascending (cell, channel) order: fixed, so results are bit-identical from
// run to run.  The input gradient runs the same kernel over the transposed map, whose entries
// carry their weight 1 / n_i(f) (weights_from_counts below, then one stable sort of the entries
// by point: no atomics).  Used for channel counts up to 32 and kernels whose per-cell sums fit the
// shared arrays (see _conv.rows_plan; its capacities mirror the defines below).
// ============================================================================================

namespace pwconv_cuda {

/// Shared per-block capacities of the "rows" kernels (static, under the 48 KiB of a block): the
/// per-cell sums (bytes), the per-cell tallies (ints), the weight-gradient accumulators (bytes).
#define PWCONV_CUDA_SUMS_BYTES 16384
#define PWCONV_CUDA_TALLY_CAP 1024
#define PWCONV_CUDA_ACC_BYTES 20480
/// Cell tallies of entry_cell_counts' block (one row per thread).
#define PWCONV_CUDA_WEIGHTS_TALLY_CAP 8192
/// Threads per block of the "rows" kernels at most (rows per block * lanes per row).
#define PWCONV_CUDA_ROW_THREADS 256

/// Lanes of the calling thread's group (`group` a power of two <= 32) within its warp.
__device__ __forceinline__ unsigned group_mask(int group) {
    const unsigned warp_lane = threadIdx.x % 32;
    return group == 32 ? 0xffffffffu : (((1u << group) - 1u) << ((warp_lane / group) * group));
}

/// a * b + c with one rounding (an explicit FMA, which --fmad=false leaves alone): the rows
/// kernels' products, one instruction each instead of a multiply and an add.
__device__ __forceinline__ float mul_add(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) {
    return __fma_rn(a, b, c);
}

/// sums[f * a + c] += w * v, in the order the caller calls it.
template <class F>
__device__ __forceinline__ void add_to_cell(F* sums, int f, int a, int lane, F v, int use_w,
                                            F w) {
    F* s = sums + f * a + lane;
    *s = use_w ? mul_add(w, v, *s) : *s + v;
}

/// The "rows" kernels' shared arrays (one set per block, whichever kernel declares them) and the
/// slices of the calling thread's group: `group` lanes per row, rows_per_block groups.
template <class F>
struct RowGroup {
    int lane, g;  // the lane within the row's group, the group within the block
    unsigned mask;
    F* sums_all;  // (rows_per_block, n_cells, a) per-cell sums or means
    int* tally_all;  // (rows_per_block, n_cells) entries per cell
    F* sums;  // this group's slices
    int* tally;
    i64* stage_j;
    int* stage_f;
    F* stage_w;
};

template <class F>
__device__ __forceinline__ RowGroup<F> row_group(int group, int n_cells, int a) {
    __shared__ F sums_all[PWCONV_CUDA_SUMS_BYTES / sizeof(F)];
    __shared__ int tally_all[PWCONV_CUDA_TALLY_CAP];
    __shared__ i64 stage_j[PWCONV_CUDA_ROW_THREADS];
    __shared__ int stage_f[PWCONV_CUDA_ROW_THREADS];
    __shared__ F stage_w[PWCONV_CUDA_ROW_THREADS];
    RowGroup<F> r;
    r.lane = threadIdx.x % group;
    r.g = threadIdx.x / group;
    r.mask = group_mask(group);
    r.sums_all = sums_all;
    r.tally_all = tally_all;
    r.sums = sums_all + r.g * n_cells * a;
    r.tally = tally_all + r.g * n_cells;
    r.stage_j = stage_j + r.g * group;
    r.stage_f = stage_f + r.g * group;
    r.stage_w = stage_w + r.g * group;
    return r;
}

/// Per-cell sums of the entries [e0, e1) of one row, run by the row's `group` lanes together
/// (lane = channel c < a): r.sums[f * a + c] = sum over the entries e of cell f, in entry order,
/// of w_e * src[col[e] * a + c] (w_e = entry_w[e] when use_w, else 1); r.tally[f] = their
/// number.  Without weights the sums are then turned into means (times 1 / tally[f]).
template <class F, class CellT>
__device__ __forceinline__ void row_cell_sums(i64 e0, i64 e1, const i64* __restrict__ col,
                                              const CellT* __restrict__ cell, int use_w,
                                              const F* __restrict__ entry_w, int n_cells,
                                              const F* __restrict__ src, int a, int group,
                                              const RowGroup<F>& r) {
    const int lane = r.lane;
    F* sums = r.sums;
    int* tally = r.tally;
    for (int k = lane; k < n_cells * a; k += group) sums[k] = F(0);
    for (int k = lane; k < n_cells; k += group) tally[k] = 0;
    __syncwarp(r.mask);
    for (i64 base = e0; base < e1; base += group) {
        const i64 e = base + lane;
        if (e < e1) {  // the group loads `group` entries at once, and tallies their cells
            const int f = (int)cell[e];
            r.stage_j[lane] = col[e] * a;
            r.stage_f[lane] = f;
            r.stage_w[lane] = use_w ? entry_w[e] : F(1);
            atomicAdd(tally + f, 1);  // an integer count: the same whatever the order
        }
        __syncwarp(r.mask);
        const int cnt = e1 - base < group ? (int)(e1 - base) : group;
        const i64* sj = r.stage_j;
        const int* sf = r.stage_f;
        const F* sw = r.stage_w;
        if (lane < a) {
            int t = 0;
            for (; t + 4 <= cnt; t += 4) {  // four independent loads in flight, added in order
                const F v0 = src[sj[t] + lane], v1 = src[sj[t + 1] + lane];
                const F v2 = src[sj[t + 2] + lane], v3 = src[sj[t + 3] + lane];
                add_to_cell(sums, sf[t], a, lane, v0, use_w, sw[t]);
                add_to_cell(sums, sf[t + 1], a, lane, v1, use_w, sw[t + 1]);
                add_to_cell(sums, sf[t + 2], a, lane, v2, use_w, sw[t + 2]);
                add_to_cell(sums, sf[t + 3], a, lane, v3, use_w, sw[t + 3]);
            }
            for (; t < cnt; ++t) add_to_cell(sums, sf[t], a, lane, src[sj[t] + lane], use_w, sw[t]);
        }
        __syncwarp(r.mask);
    }
    if (!use_w) {
        if (lane < a)
            for (int f = 0; f < n_cells; ++f) {
                const int n = tally[f];
                if (n) sums[f * a + lane] = sums[f * a + lane] * (F(1) / (F)n);
            }
        __syncwarp(r.mask);
    }
}

}  // namespace pwconv_cuda

/// out (rows, b) = sum over the cells f of row i, ascending, of mean_f . M_f (dense: M (n_cells,
/// a, b) row-major; depthwise, a == b: M (n_cells, a), channel by channel), where mean_f is the
/// cell's mean of src rows (use_w == 0: the forward, weights 1 / n_i(f) from the row's tally) or
/// the cell's entry_w-weighted sum (use_w == 1: the input gradient over the transposed map).
/// Block: rows_per_block groups of `group` lanes (group a power of two >= max(a, b), <= 32).
template <class F, class CellT>
__global__ void conv_rows(long long rows, const long long* __restrict__ splits,
                          const long long* __restrict__ col, const CellT* __restrict__ cell,
                          int use_w, const F* __restrict__ entry_w, int n_cells,
                          const F* __restrict__ src, int a, const F* __restrict__ M, int b,
                          int depthwise, int group, F* __restrict__ out) {
    using namespace pwconv_cuda;
    const RowGroup<F> r = row_group<F>(group, n_cells, a);
    const i64 row = (i64)blockIdx.x * (blockDim.x / group) + r.g;
    if (row >= rows) return;  // the whole group leaves together
    row_cell_sums(splits[row], splits[row + 1], col, cell, use_w, entry_w, n_cells, src, a, group,
                  r);
    const int lane = r.lane;
    const F* sums = r.sums;
    const int* tally = r.tally;
    if (lane >= b) return;
    F acc = F(0);
    for (int f = 0; f < n_cells; ++f) {
        if (tally[f] == 0) continue;
        const F* s = sums + f * a;
        if (depthwise) {
            acc = mul_add(s[lane], M[(i64)f * a + lane], acc);
        } else {
            const F* Mf = M + (i64)f * a * b + lane;
            for (int ci = 0; ci < a; ++ci) acc = mul_add(s[ci], Mf[(i64)ci * b], acc);
        }
    }
    out[row * b + lane] = acc;
}

namespace pwconv_cuda {

/// Input and output channels of a weight-gradient tile (conv_weight_rows, weight_grad_tiles,
/// conv_weight_cells).
#define PWCONV_CUDA_WGRAD_TILE 3

/// tile[i][o] += sv[i] * dv[o] for a TILE x TILE tile, one FMA each.
template <class F>
__device__ __forceinline__ void tile_outer_add(F (&tile)[PWCONV_CUDA_WGRAD_TILE]
                                                         [PWCONV_CUDA_WGRAD_TILE],
                                               const F* sv, const F* dv) {
#pragma unroll
    for (int i = 0; i < PWCONV_CUDA_WGRAD_TILE; ++i)
#pragma unroll
        for (int o = 0; o < PWCONV_CUDA_WGRAD_TILE; ++o)
            tile[i][o] = mul_add(sv[i], dv[o], tile[i][o]);
}

/// acc[(f * a + ci) * b + co] += sums[k][f * a + ci] * dy_rows[k * b + co] for the rows k <
/// n_rows whose cell f is not empty, in ascending k; one TILE x TILE tile of (ci, co) per thread
/// and step (blockDim.x threads).
template <class F>
__device__ __forceinline__ void weight_grad_tiles(const F* sums, const int* tally, const F* dy_rows,
                                                  int n_rows, int n_cells, int a, int b, F* acc) {
    constexpr int T = PWCONV_CUDA_WGRAD_TILE;
    const int ci_tiles = (a + T - 1) / T, co_tiles = (b + T - 1) / T;
    const int n_tiles = n_cells * ci_tiles * co_tiles;
    for (int t = threadIdx.x; t < n_tiles; t += blockDim.x) {
        const int f = t / (ci_tiles * co_tiles), rest = t % (ci_tiles * co_tiles);
        const int ci0 = (rest / co_tiles) * T, co0 = (rest % co_tiles) * T;
        F tile[T][T];
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int o = 0; o < T; ++o)
                tile[i][o] = ci0 + i < a && co0 + o < b ? acc[(f * a + ci0 + i) * b + co0 + o]
                                                        : F(0);
        for (int k = 0; k < n_rows; ++k) {
            if (tally[k * n_cells + f] == 0) continue;
            const F* s = sums + k * n_cells * a + f * a + ci0;
            const F* d = dy_rows + k * b + co0;
            F sv[T], dv[T];
#pragma unroll
            for (int i = 0; i < T; ++i) sv[i] = ci0 + i < a ? s[i] : F(0);
#pragma unroll
            for (int o = 0; o < T; ++o) dv[o] = co0 + o < b ? d[o] : F(0);
            tile_outer_add(tile, sv, dv);
        }
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int o = 0; o < T; ++o)
                if (ci0 + i < a && co0 + o < b) acc[(f * a + ci0 + i) * b + co0 + o] = tile[i][o];
    }
}

}  // namespace pwconv_cuda

/// Weight gradient, pass 1 of the "rows" scheme: partial[blk, w] = sum over the rows i of chunk
/// blk (rows_per_chunk rows, ascending) of mean_{Omega_i(f)}(x)[ci] * dy[i, co] for every weight
/// entry w = (f, ci, co) (dense) or (f, c) (depthwise, ci = co = c).  Each pass, the block's
/// groups form the cell means of consecutive rows; then each weight entry adds the pass's rows in
/// row order, its sum kept in shared memory between passes (n_w <= PWCONV_CUDA_ACC_BYTES /
/// sizeof(F)).  Dense: a thread takes a tile of PWCONV_CUDA_WGRAD_TILE^2 entries (one cell,
/// TILE input x TILE output channels) and reads each row's TILE means and TILE output gradients
/// once for the tile's TILE^2 products (not two reads per product); depthwise: one entry per
/// thread.  Either way every entry's sum is formed in the same order, so the tiling does not
/// change a bit.
template <class F, class CellT>
__global__ void conv_weight_rows(long long m, const long long* __restrict__ splits,
                                 const long long* __restrict__ col,
                                 const CellT* __restrict__ cell, int n_cells,
                                 const F* __restrict__ x, int a, const F* __restrict__ dy, int b,
                                 int depthwise, int group, long long rows_per_chunk,
                                 F* __restrict__ partial) {
    using namespace pwconv_cuda;
    __shared__ F dy_rows[PWCONV_CUDA_ROW_THREADS];
    __shared__ F acc_all[PWCONV_CUDA_ACC_BYTES / sizeof(F)];
    const RowGroup<F> r = row_group<F>(group, n_cells, a);
    const int rows_per_pass = blockDim.x / group;
    const int n_w = depthwise ? n_cells * a : n_cells * a * b;
    for (int w = threadIdx.x; w < n_w; w += blockDim.x) acc_all[w] = F(0);
    const i64 r0 = (i64)blockIdx.x * rows_per_chunk;
    const i64 r1 = r0 + rows_per_chunk < m ? r0 + rows_per_chunk : m;
    for (i64 pass = r0; pass < r1; pass += rows_per_pass) {
        const i64 row = pass + r.g;
        if (row < r1) {
            row_cell_sums(splits[row], splits[row + 1], col, cell, 0, (const F*)0, n_cells, x, a,
                          group, r);
            if (r.lane < b) dy_rows[r.g * b + r.lane] = dy[row * b + r.lane];
        }
        __syncthreads();  // the pass's means, tallies and output gradients are in place
        const int n_rows = r1 - pass < rows_per_pass ? (int)(r1 - pass) : rows_per_pass;
        if (depthwise) {
            for (int w = threadIdx.x; w < n_w; w += blockDim.x) {  // w = f * a + c
                const int f = w / a, c = w % a;
                F acc = acc_all[w];
                for (int k = 0; k < n_rows; ++k)
                    if (r.tally_all[k * n_cells + f] != 0)
                        acc = mul_add(r.sums_all[k * n_cells * a + w], dy_rows[k * b + c], acc);
                acc_all[w] = acc;
            }
        } else {
            weight_grad_tiles(r.sums_all, r.tally_all, dy_rows, n_rows, n_cells, a, b, acc_all);
        }
        __syncthreads();  // before the next pass overwrites the means
    }
    for (int w = threadIdx.x; w < n_w; w += blockDim.x)
        partial[(i64)blockIdx.x * n_w + w] = acc_all[w];
}

// ============================================================================================
// Operator, third scheme ("entries", the default up to 32 channels): every map entry carries its
// weight 1 / n_i(f) (weights_from_counts, from the n_i(f) the map's row sort counted), so a row's
// output is a sum over its entries in map order, one thread per output channel (conv_entries);
// the input gradient runs the same kernel over the transposed map (permute_entries after one
// stable sort by point); the weight gradient is conv_weight_rows', or reads the entries sorted by
// cell (conv_weight_cells, then sum_partials by cell).  Fixed orders, no atomics.
// ============================================================================================

namespace pwconv_cuda {

/// The "entries" kernels' thread layout: b lanes per row (b <= 32), 32 / b rows per warp.  Sets
/// the calling thread's row and output channel o; false for the lanes left over and past the
/// last row.
__device__ __forceinline__ bool entry_lane(i64 rows, int b, i64& row, int& o) {
    const int warp_lane = threadIdx.x % 32;
    const int rows_per_warp = 32 / b;
    const int sub = warp_lane / b;
    o = warp_lane % b;
    row = (global_thread() / 32) * rows_per_warp + sub;
    return sub < rows_per_warp && row < rows;
}

/// Entries per unrolled step of conv_entries' loop over a row: the loads of that many entries
/// (their points, then the points' features) can be in flight together.  An NVRTC -D option
/// for tuning (benchmarks/gpu_conv_tuning.py); the results do not depend on it.  On the H200
/// (2026-11-27, the variants alternated) the paper workload's 4 forward + 4 input-gradient calls
/// took 1.95 ms unrolled by 4 against 2.16 ms by 2 (by 1 and by 8, each timed once: see
/// benchmarks/RESULTS.md).
#ifndef PWCONV_CUDA_ENTRIES_UNROLL
#define PWCONV_CUDA_ENTRIES_UNROLL 4
#endif

/// sum over c < a of s[c] * m[c * stride], FMAs in ascending c.  The "entries" kernels pass
/// m = a column of a cell matrix stored (a, b) row-major (stride b): the b lanes of a row then
/// read b consecutive values per step, one cache line, where a matrix stored transposed (each
/// lane's column contiguous) made them read b values `a` apart (about a line per 32 bytes).
template <class F>
__device__ __forceinline__ F dot(const F* __restrict__ s, const F* __restrict__ m, int a,
                                 int stride) {
    F t = F(0);
#pragma unroll 9
    for (int c = 0; c < a; ++c) t = mul_add(s[c], m[c * stride], t);
    return t;
}

}  // namespace pwconv_cuda

/// out (rows, b), the "entries" scheme of the forward and of the input gradient: out[r, o] = the
/// sum over the entries e of row r, in order, of w[e] * (src[col[e], :] . M[cell[e], :, o])
/// (dense: M (n_cells, a, b) row-major, so a row's b lanes read consecutive values: W itself for
/// the forward, each cell's matrix transposed, W_f^T, for the input gradient), or of w[e] *
/// src[col[e], o] * M[cell[e], o] (depthwise, a == b).  w[e] = 1 / n_i(f) of the entry's row i
/// and cell f (weights_from_counts, in map order for the forward; the transposed map's weights
/// for the input gradient), so the sum is sum_f mean_f . M_f without per-cell tables: the
/// paper's sparse rows (7-18 entries in up to 27 cells) cost no per-cell zeroing, tallying or
/// scaling.  One
/// thread per (row, o): b lanes per row (b <= 32), 32 / b rows per warp, so a row's lanes read
/// each source value at one address.  No shared memory, no atomics, no barriers: each thread adds
/// its row's entries in map order, the same on every run.
template <class F, class CellT>
__global__ void conv_entries(long long rows, const long long* __restrict__ splits,
                             const long long* __restrict__ col, const CellT* __restrict__ cell,
                             const F* __restrict__ w, const F* __restrict__ src, int a,
                             const F* __restrict__ M, int b, int depthwise,
                             F* __restrict__ out) {
    using namespace pwconv_cuda;
    i64 row;
    int o;
    if (!entry_lane(rows, b, row, o)) return;
    const i64 e1 = splits[row + 1];
    F acc = F(0);
    if (depthwise) {
        for (i64 e = splits[row]; e < e1; ++e)
            acc = mul_add(w[e] * src[col[e] * a + o], M[(i64)cell[e] * a + o], acc);
    } else {
        const i64 ab = (i64)a * b;
        const F* Mo = M + o;
        constexpr int unroll = PWCONV_CUDA_ENTRIES_UNROLL;
#pragma unroll(unroll)
        for (i64 e = splits[row]; e < e1; ++e)
            acc = mul_add(w[e], dot(src + col[e] * a, Mo + (i64)cell[e] * ab, a, b), acc);
    }
    out[row * b + o] = acc;
}

namespace pwconv_cuda {

/// Channel o of map entry e's contribution to its point's input gradient: w[e] * (s . M[f, :, o])
/// (dense) or w[e] * s[o] * M[f, o] (depthwise), s = the entry's row of the output gradient.
template <class F, class CellT>
__device__ __forceinline__ F entry_contribution(i64 e, const CellT* __restrict__ cell,
                                                const F* __restrict__ w, const F* __restrict__ s,
                                                int a, const F* __restrict__ M, int b,
                                                int depthwise, int o) {
    const i64 f = (i64)cell[e];
    return depthwise ? w[e] * s[o] * M[f * a + o] : w[e] * dot(s, M + o + f * a * b, a, b);
}

}  // namespace pwconv_cuda

/// The input gradient's opt-in non-deterministic path (PWCONV_CUDA_DETERMINISTIC=0): out (n, b),
/// zeroed by the caller, gets for every map entry e of row r (point col[e], cell f, weight w[e] =
/// 1 / n_r(f)) and every o < b: out[col[e], o] += w[e] * (src[r, :] . M[f, :, o]) by a
/// floating-point atomic add, straight over the map: no transposed map to build.  src = the
/// output gradient; dense: M = W_f^T per cell (n_cells, a = c_out, b = c_in), as conv_entries'
/// input gradient; depthwise: M (n_cells, a), a == b.  The order of the additions, and so the
/// last bits, change from run to run.
template <class F, class CellT>
__global__ void conv_entries_scatter(long long rows, const long long* __restrict__ splits,
                                     const long long* __restrict__ col,
                                     const CellT* __restrict__ cell, const F* __restrict__ w,
                                     const F* __restrict__ src, int a, const F* __restrict__ M,
                                     int b, int depthwise, F* __restrict__ out) {
    using namespace pwconv_cuda;
    i64 row;
    int o;
    if (!entry_lane(rows, b, row, o)) return;
    const i64 e1 = splits[row + 1];
    const F* s = src + row * a;
    for (i64 e = splits[row]; e < e1; ++e)
        atomicAdd(out + col[e] * b + o, entry_contribution(e, cell, w, s, a, M, b, depthwise, o));
}

// --------------------------------------------------------------------------------------------
// The input gradient in 64-bit fixed point (opt-in, PWCONV_CUDA_INPUT_GRAD=fixed): straight over
// the map like conv_entries_scatter, but each contribution is rounded to a multiple of 2^-S_j
// (S_j: a power of two per point j, from a bound on its contributions) and added with integer
// atomics, whose sums do not depend on the order: bit-identical from run to run, no transposed
// map, no floating-point atomics.
// --------------------------------------------------------------------------------------------

namespace pwconv_cuda {

/// The float64 a bound's bits stand for.
__device__ __forceinline__ double bound_value(unsigned long long bits) {
    return __longlong_as_double((long long)bits);
}

/// False for a NaN or infinite bound (non-finite inputs): the point's gradient is then NaN.
__device__ __forceinline__ bool finite_bound(unsigned long long bits) {
    return bound_value(bits) <= 1.7976931348623157e308;
}

/// S such that count * bound * 2^S < 2^60 (bound, finite: the largest |contribution| to the
/// point), so that count contributions, each rounded, add up below 2^63; 0 when the bound is 0
/// or the point has no entries.  May be negative (huge values) or above 1023 (tiny ones): ldexp
/// scales by it exactly either way.
__device__ __forceinline__ int fixed_shift(unsigned long long bound_bits, int count) {
    const double total = bound_value(bound_bits) * (double)count;
    if (!(total > 0.0)) return 0;
    int e;
    frexp(total, &e);  // total < 2^e
    return 60 - e;
}

}  // namespace pwconv_cuda

/// Pass 1: bound[col[e]] = max over the entries e of the map of w[e] * (sum_c |src[r, c]|) *
/// wmax[0] (r: the entry's row; wmax: the largest |weight|), as float64 bits taken by an
/// integer atomicMax (non-negative doubles order as their bits; a NaN bound beats any number).
/// That bounds every output channel's contribution of the entry.  One thread per row; bound
/// (n,) zeroed by the caller.
template <class F>
__global__ void fixed_bounds(long long rows, const long long* __restrict__ splits,
                             const long long* __restrict__ col, const F* __restrict__ w,
                             const F* __restrict__ src, int a, const F* __restrict__ wmax,
                             unsigned long long* __restrict__ bound) {
    const long long r = pwconv_cuda::global_thread();
    if (r >= rows) return;
    double norm = 0.0;
    for (int c = 0; c < a; ++c) norm += fabs((double)src[r * a + c]);
    norm *= fabs((double)wmax[0]);
    for (long long e = splits[r]; e < splits[r + 1]; ++e)
        atomicMax(bound + col[e],
                  (unsigned long long)__double_as_longlong((double)w[e] * norm));
}

/// Pass 2: acc[col[e], o] += round(v * 2^S) for every entry e of row r and o < b, v = w[e] *
/// (src[r, :] . M[f, :, o]) as conv_entries_scatter forms it (F precision; depthwise: w[e] *
/// src[r, o] * M[f, o]) and S = fixed_shift of the entry's point (per_point: its entries), by
/// 64-bit integer atomics (two's complement: exact while the sums stay below 2^63, which S
/// ensures).  Points with a non-finite bound are skipped (their gradient is NaN, pass 3).
template <class F, class CellT>
__global__ void conv_entries_fixed(long long rows, const long long* __restrict__ splits,
                                   const long long* __restrict__ col,
                                   const CellT* __restrict__ cell, const F* __restrict__ w,
                                   const F* __restrict__ src, int a, const F* __restrict__ M,
                                   int b, int depthwise,
                                   const unsigned long long* __restrict__ bound,
                                   const int* __restrict__ per_point,
                                   unsigned long long* __restrict__ acc) {
    using namespace pwconv_cuda;
    i64 row;
    int o;
    if (!entry_lane(rows, b, row, o)) return;
    const i64 e1 = splits[row + 1];
    const F* s = src + row * a;
    for (i64 e = splits[row]; e < e1; ++e) {
        const i64 j = col[e];
        if (!finite_bound(bound[j])) continue;
        const int shift = fixed_shift(bound[j], per_point[j]);
        const F v = entry_contribution(e, cell, w, s, a, M, b, depthwise, o);
        const long long q = __double2ll_rn(ldexp((double)v, shift));
        atomicAdd(acc + j * b + o, (unsigned long long)q);
    }
}

/// Pass 3: out[j, o] = acc[j, o] * 2^-S_j in F (NaN where the point's bound is not finite).
template <class F>
__global__ void fixed_to_float(long long n, int b, const unsigned long long* __restrict__ acc,
                               const unsigned long long* __restrict__ bound,
                               const int* __restrict__ per_point, F* __restrict__ out) {
    const long long k = pwconv_cuda::global_thread();
    if (k >= n * b) return;
    using namespace pwconv_cuda;
    const long long j = k / b;
    if (!finite_bound(bound[j])) {
        out[k] = (F)bound_value(0x7FF8000000000000ull);  // NaN
        return;
    }
    out[k] = (F)ldexp((double)(long long)acc[k], -fixed_shift(bound[j], per_point[j]));
}

/// Weight gradient of the "entries" scheme, pass 1, over the map's entries ordered by cell (a
/// stable sort: map order within a cell; row, col, w are the sorted entries' rows, points and
/// weights 1 / n_i(f)).  Each cell's run [cell_splits[f], cell_splits[f + 1]) is cut into chunks
/// of `chunk` entries (a function of the sizes only, never of the device), numbered cell by cell
/// (chunk_splits[f] is cell f's first).
/// Block k takes chunk k and writes partial[k, :] = the sum over its entries e of w[e] *
/// x[col[e], ci] * dy[row[e], co] for every (ci, co) (dense: a * b values) or of w[e] *
/// x[col[e], c] * dy[row[e], c] (depthwise: a values).  Threads form groups of n_tiles, a thread
/// holding a TILE x TILE tile of (ci, co) (dense) or TILE channels (depthwise) in registers; group
/// g adds the chunk's entries g, g + G, g + 2G, ... in order, then the group sums are added in
/// group order.  Every sum has a fixed order: bit-identical from run to run.  Blocks past the
/// last chunk (the caller launches an upper bound) leave at once.  Needs n_tiles <= blockDim.x.
/// Pass 2 is sum_partials, grouped by cell.
template <class F>
__global__ void conv_weight_cells(int n_cells, const long long* __restrict__ cell_splits,
                                  const long long* __restrict__ chunk_splits, long long chunk,
                                  const long long* __restrict__ row,
                                  const long long* __restrict__ col, const F* __restrict__ w,
                                  const F* __restrict__ x, int a, const F* __restrict__ dy, int b,
                                  int depthwise, F* __restrict__ partial) {
    using namespace pwconv_cuda;
    constexpr int T = PWCONV_CUDA_WGRAD_TILE;
    __shared__ F group_sums[PWCONV_CUDA_ROW_THREADS * T * T];
    const i64 k = blockIdx.x;
    if (k >= chunk_splits[n_cells]) return;  // the whole block leaves together
    const i64 f = segment_of(chunk_splits, n_cells, k);
    const i64 e0 = cell_splits[f] + (k - chunk_splits[f]) * chunk;
    const i64 e1 = e0 + chunk < cell_splits[f + 1] ? e0 + chunk : cell_splits[f + 1];
    const int ci_tiles = (a + T - 1) / T, co_tiles = depthwise ? 1 : (b + T - 1) / T;
    const int n_tiles = ci_tiles * co_tiles;
    const int n_groups = blockDim.x / n_tiles;
    const int g = threadIdx.x / n_tiles, t = threadIdx.x % n_tiles;
    const int ci0 = (t / co_tiles) * T, co0 = (t % co_tiles) * T;
    F tile[T][T];
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int o = 0; o < T; ++o) tile[i][o] = F(0);
    if (g < n_groups) {
        for (i64 e = e0 + g; e < e1; e += n_groups) {
            const F we = w[e];
            const F* xs = x + col[e] * a;
            const F* ds = dy + row[e] * b;
            F sv[T];
#pragma unroll
            for (int i = 0; i < T; ++i) sv[i] = ci0 + i < a ? we * xs[ci0 + i] : F(0);
            if (depthwise) {
#pragma unroll
                for (int i = 0; i < T; ++i)
                    tile[i][0] = mul_add(sv[i], ci0 + i < a ? ds[ci0 + i] : F(0), tile[i][0]);
            } else {
                F dv[T];
#pragma unroll
                for (int o = 0; o < T; ++o) dv[o] = co0 + o < b ? ds[co0 + o] : F(0);
                tile_outer_add(tile, sv, dv);
            }
        }
        F* mine = group_sums + ((i64)g * n_tiles + t) * T * T;
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int o = 0; o < T; ++o) mine[i * T + o] = tile[i][o];
    }
    __syncthreads();
    const int n_vals = depthwise ? a : a * b;
    for (int v = threadIdx.x; v < n_vals; v += blockDim.x) {
        const int ci = depthwise ? v : v / b, co = depthwise ? 0 : v % b;
        const int slot = ((ci / T) * co_tiles + co / T) * T * T + (ci % T) * T + co % T;
        F sum = group_sums[slot];
        for (int gg = 1; gg < n_groups; ++gg)
            sum = sum + group_sums[(i64)gg * n_tiles * T * T + slot];
        partial[k * n_vals + v] = sum;
    }
}

/// per_point[col[e]] += 1 for every entry e (integer atomics: a count, order-free).
extern "C" __global__ void count_per_point(long long n_entries, const long long* col,
                                           int* per_point) {
    const long long e = pwconv_cuda::global_thread();
    if (e >= n_entries) return;
    atomicAdd(per_point + col[e], 1);
}

/// out[starts[j] + k] = e for the entries e naming point j (j = col[e]), k handed out by an
/// integer atomic cursor per point counting down from its number of entries (cursor: those
/// numbers, used up): each point's entries in its segment in a schedule-dependent order, which
/// the caller's sort of each segment then fixes (the transposed map by PWCONV_CUDA_TRANSPOSE=
/// rank).
extern "C" __global__ void scatter_by_point(long long n_entries, const long long* __restrict__ col,
                                            const long long* __restrict__ starts,
                                            int* __restrict__ cursor,
                                            long long* __restrict__ out) {
    const long long e = pwconv_cuda::global_thread();
    if (e >= n_entries) return;
    const long long j = col[e];
    out[starts[j] + atomicSub(cursor + j, 1) - 1] = e;
}

/// As scatter_by_point, each entry e of row r given as the key (r << bits) | e (bits: enough
/// for every entry number): the rows ride with the entries, so that sort_segments_into needs no
/// row of each entry (expand_rows) and no permutation pass after it (permute_entries).  A key's
/// order is its row's, then its entry's, as the entry numbers alone would give.  A warp per 32
/// consecutive rows (m rows, split by splits): their entries are contiguous and read 32 at a
/// time by the lanes together, each lane finding its entry's row by a binary search over the
/// rows' starts, one held by each lane (a thread per row would read a line per lane).
extern "C" __global__ void scatter_rows_by_point(long long m, const long long* __restrict__ splits,
                                                 const long long* __restrict__ col,
                                                 const long long* __restrict__ starts,
                                                 int* __restrict__ cursor, int bits,
                                                 long long* __restrict__ out) {
    const long long t = pwconv_cuda::global_thread();  // blockDim.x: a multiple of 32
    const long long r0 = t / 32 * 32;
    const int lane = (int)(t % 32);
    if (r0 >= m) return;  // the whole warp
    const long long last = r0 + 32 < m ? r0 + 32 : m;
    // lanes past the last row hold its end: never the start of an entry's row
    const long long start = splits[r0 + lane < last ? r0 + lane : last];
    const long long end = splits[last];
    for (long long base = __shfl_sync(0xffffffffu, start, 0); base < end; base += 32) {
        const long long e = base + lane;
        int row = 0;  // the last of the 32 rows starting at or before e
        for (int step = 16; step > 0; step >>= 1) {
            const long long s = __shfl_sync(0xffffffffu, start, row + step);
            if (s <= e) row += step;
        }
        if (e < end) {
            const long long j = col[e];
            out[starts[j] + atomicSub(cursor + j, 1) - 1] = ((r0 + row) << bits) | e;
        }
    }
}

namespace pwconv_cuda {

/// Sorts the distinct keys src[0, len) ascending into dst[0, len), by the calling warp (`lane`
/// its lane): sort_segments' one segment (see there); src is overwritten where the radix sort
/// runs.  The warp's stores are complete, and seen by all its lanes, on return.
__device__ __forceinline__ void sort_segment_warp(long long* src, long long* dst, long long len,
                                                  int lane, long long rank_max) {
    if (len <= rank_max) {
        for (long long i = lane; i < len; i += 32) {
            const long long key = src[i];
            long long rank = 0;
            for (long long j = 0; j < len; ++j) rank += src[j] < key;
            dst[rank] = key;
        }
        __syncwarp();
        return;
    }
    long long lo = src[0], hi = src[0];
    for (long long i = lane; i < len; i += 32) {
        lo = src[i] < lo ? src[i] : lo;
        hi = src[i] > hi ? src[i] : hi;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const long long other_lo = __shfl_sync(0xffffffffu, lo, lane ^ offset);
        const long long other_hi = __shfl_sync(0xffffffffu, hi, lane ^ offset);
        lo = other_lo < lo ? other_lo : lo;
        hi = other_hi > hi ? other_hi : hi;
    }
    const unsigned long long range = (unsigned long long)(hi - lo);
    int bits = 0;
    while (bits < 64 && (range >> bits) != 0) ++bits;
    // bits passes alternate between the two buffers: the last one must write dst
    long long* from = src;
    long long* to = dst;
    if (bits % 2 == 0) {
        for (long long i = lane; i < len; i += 32) dst[i] = src[i];
        __syncwarp();
        from = dst;
        to = src;
    }
    const unsigned below = (1u << lane) - 1u;
    long long zeros = 0;  // keys whose bit 0 is 0; each pass then counts the next bit's
    for (long long base = 0; base < len; base += 32) {
        const long long i = base + lane;
        const bool zero = i < len && (((unsigned long long)(from[i] - lo)) & 1u) == 0;
        zeros += __popc(__ballot_sync(0xffffffffu, zero));
    }
    for (int bit = 0; bit < bits; ++bit) {
        const bool count_next = bit + 1 < bits;
        long long zero_at = 0, one_at = zeros, next_zeros = 0;
        for (long long base = 0; base < len; base += 32) {
            const long long i = base + lane;
            const unsigned valid = len - base >= 32 ? 0xffffffffu
                                                    : (1u << (unsigned)(len - base)) - 1u;
            const long long key = i < len ? from[i] : lo;
            const unsigned long long key_bits = (unsigned long long)(key - lo);
            const bool zero = i < len && ((key_bits >> bit) & 1u) == 0;
            const unsigned zero_mask = __ballot_sync(0xffffffffu, zero);
            const unsigned one_mask = valid & ~zero_mask;
            if (count_next)
                next_zeros += __popc(__ballot_sync(
                    0xffffffffu, i < len && ((key_bits >> (bit + 1)) & 1u) == 0));
            if (zero) to[zero_at + __popc(zero_mask & below)] = key;
            else if (i < len) to[one_at + __popc(one_mask & below)] = key;
            zero_at += __popc(zero_mask);
            one_at += __popc(one_mask);
        }
        zeros = next_zeros;
        __syncwarp();  // this pass's stores seen by the next pass's loads
        long long* swap = from;
        from = to;
        to = swap;
    }
}

}  // namespace pwconv_cuda

/// Sorts every segment s of distinct keys, in[splits[s]...splits[s + 1]) (scatter_by_point's
/// entry numbers, in a schedule-dependent order), ascending into out[splits[s]...]: one warp
/// per segment.  A segment of at most rank_max keys is ranked (each key goes to the number of
/// its segment's keys below it: len^2 / 32 comparisons per lane); a longer one is radix sorted,
/// one bit at a time from the lowest, of key - min over the bits of max - min, each bit a
/// stable split of the segment into its 0s and 1s by __ballot_sync (the pass counts the next
/// bit's 0s too), between `in` (overwritten) and out: about bits * len / 32 loads per lane, two
/// ballots per 32 keys and bit.  A point named by thousands of rows (a dense
/// cluster under a wide kernel) then costs time linear in its entries, not quadratic.
extern "C" __global__ void sort_segments(long long n_segments,
                                         const long long* __restrict__ splits, long long* in,
                                         long long* out, long long rank_max) {
    const long long t = pwconv_cuda::global_thread();  // blockDim.x: a multiple of 32
    const long long segment = t / 32;
    const int lane = (int)(t % 32);
    if (segment >= n_segments) return;  // the whole warp: one segment per warp
    const long long b = splits[segment];
    pwconv_cuda::sort_segment_warp(in + b, out + b, splits[segment + 1] - b, lane, rank_max);
}

/// The transposed map in one pass after scatter_rows_by_point: every segment (point) s of keys
/// (r << bits) | e in in[splits[s]...) sorted as sort_segments sorts them (into rows, then
/// unpacked in place), and for each: rows[k] = r, cells[k] = cell[e], counts_out[k] = counts[e]
/// (n_i(f) of the entry, as the map holds it).  One warp per segment; `in` is overwritten.
template <class CellT>
__global__ void sort_segments_into(long long n_segments, const long long* __restrict__ splits,
                                   long long* in, long long* rows, long long rank_max, int bits,
                                   const CellT* __restrict__ cell,
                                   const int* __restrict__ counts, CellT* __restrict__ cells,
                                   int* __restrict__ counts_out) {
    const long long t = pwconv_cuda::global_thread();  // blockDim.x: a multiple of 32
    const long long segment = t / 32;
    const int lane = (int)(t % 32);
    if (segment >= n_segments) return;  // the whole warp: one segment per warp
    const long long b = splits[segment], len = splits[segment + 1] - b;
    pwconv_cuda::sort_segment_warp(in + b, rows + b, len, lane, rank_max);
    const long long mask = (1LL << bits) - 1;
    for (long long i = lane; i < len; i += 32) {  // each lane its own places: in place is safe
        const long long key = rows[b + i];
        const long long e = key & mask;
        rows[b + i] = key >> bits;
        cells[b + i] = cell[e];
        counts_out[b + i] = counts[e];
    }
}

/// counts[e] = n_i(f) for every entry e of row i in cell f (the row's entries in cell f): one
/// thread per row, its cell tally in shared memory (blockDim.x * n_cells <=
/// PWCONV_CUDA_WEIGHTS_TALLY_CAP); no atomics.  For the maps whose rows sort_rows_by_rank did not
/// count (rows longer than its short_row, or sorted by the fill threads).
template <class CellT>
__global__ void entry_cell_counts(long long m, const long long* __restrict__ splits,
                                  const CellT* __restrict__ cell, int n_cells,
                                  int* __restrict__ counts) {
    __shared__ int tally_all[PWCONV_CUDA_WEIGHTS_TALLY_CAP];
    const long long i = pwconv_cuda::global_thread();
    if (i >= m) return;
    int* tally = tally_all + threadIdx.x * n_cells;
    for (int f = 0; f < n_cells; ++f) tally[f] = 0;
    const long long e0 = splits[i], e1 = splits[i + 1];
    for (long long e = e0; e < e1; ++e) tally[(int)cell[e]] += 1;
    for (long long e = e0; e < e1; ++e) counts[e] = tally[(int)cell[e]];
}

namespace pwconv_cuda {

/// The weight 1 / n of an entry whose cell holds n of its row's entries, one rounding: F(1) /
/// F(n).  The one formula of weights_from_counts and of the kernels that form weights from the
/// counts themselves (entry_weight): the same bits either way.
template <class F>
__device__ __forceinline__ F weight_of_count(int n) {
    return F(1) / (F)n;
}

}  // namespace pwconv_cuda

/// w[e] = 1 / counts[e] (the entry's n_i(f)): weight_of_count.
template <class F>
__global__ void weights_from_counts(long long n_entries, const int* __restrict__ counts,
                                    F* __restrict__ w) {
    const long long e = pwconv_cuda::global_thread();
    if (e >= n_entries) return;
    w[e] = pwconv_cuda::weight_of_count<F>(counts[e]);
}

/// The map's entries in a new order (order: position -> map entry; the entries sorted stably by
/// point for the transposed map, by cell for the weight gradient): out_row[p] = row_of[order[p]],
/// out_cell[p] = cell[order[p]], out_w[p] = w[order[p]] when with_w, out_count[p] =
/// counts[order[p]] when with_count, and out_col[p] = col[order[p]] when with_col.  One thread
/// per entry, one kernel instead of four gathers.
template <class F, class CellT>
__global__ void permute_entries(long long n_entries, const long long* __restrict__ order,
                                const long long* __restrict__ row_of,
                                const long long* __restrict__ col,
                                const CellT* __restrict__ cell, const F* __restrict__ w,
                                const int* __restrict__ counts, int with_col, int with_w,
                                int with_count, long long* __restrict__ out_row,
                                long long* __restrict__ out_col, CellT* __restrict__ out_cell,
                                F* __restrict__ out_w, int* __restrict__ out_count) {
    const long long p = pwconv_cuda::global_thread();
    if (p >= n_entries) return;
    const long long e = order[p];
    out_row[p] = row_of[e];
    if (with_col) out_col[p] = col[e];
    out_cell[p] = cell[e];
    if (with_w) out_w[p] = w[e];
    if (with_count) out_count[p] = counts[e];
}

// ============================================================================================
// Operator, one thread per row (PWCONV_CUDA_ENTRIES_LOADS=thread, the default since 2026-11-28,
// and the opt-in PWCONV_CUDA_WEIGHT_GRAD=chunks).  conv_entries gives each output channel of a row its own lane:
// the row's lanes load every source value and every map entry at one address, and each load
// instruction of a warp serves its three rows' one value -- on the H200 the paper layers' forward
// took about as many L1 passes as a model of one pass per distinct row and value predicts
// (0.28 ms for 2.8M entries).  Here one thread forms all outputs of its row: the source rows come
// in 16-byte vector loads (rows padded to 16 bytes by the caller), the cell matrices from shared
// memory, the same products and sums in the same order as conv_entries (bit-identical results).
// The weight gradient's conv_weight_chunks sorts each chunk of rows' entries by cell in shared
// memory (a stable counting sort), then each thread of a (cell, input channel) adds its cell's
// entries' products with the chunk's output gradients, held in shared memory, in registers.
// ============================================================================================

/// Bytes of conv_entries_thread's shared copy of the cell matrices (_conv.THREAD_MATS_BYTES).
#define PWCONV_CUDA_THREAD_MATS_BYTES 32768
/// conv_entries_tile's row-length classes: rows of 63 entries and more share the longest class
/// (benchmarks/sort_lanes_model.py's TILE_BUCKETS models the same).
#define PWCONV_CUDA_TILE_BUCKETS 64
/// conv_weight_chunks: rows per chunk (their output gradients staged in shared memory, at most
/// 32 channels) and kernel cells at most (_conv.CHUNK_ROWS, _conv.CHUNK_MAX_CELLS); map entries
/// sorted by cell at a time (a multiple of 32; an NVRTC -D option: the tests sort a few at a time).
#define PWCONV_CUDA_CHUNK_ROWS 64
#define PWCONV_CUDA_CHUNK_MAX_CELLS 64
#ifndef PWCONV_CUDA_CHUNK_ENTRIES
#define PWCONV_CUDA_CHUNK_ENTRIES 1024
#endif

namespace pwconv_cuda {

/// The 16-byte vector of F (V values) and its load from a 16-byte aligned address.
template <class F>
struct Vec16;
template <>
struct Vec16<float> {
    static constexpr int V = 4;
    static __device__ __forceinline__ void load(const float* __restrict__ p, float* v) {
        PWCONV_CUDA_CHECK_ALIGNED(p);
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    }
};
template <>
struct Vec16<double> {
    static constexpr int V = 2;
    static __device__ __forceinline__ void load(const double* __restrict__ p, double* v) {
        PWCONV_CUDA_CHECK_ALIGNED(p);
        const double2 q = *reinterpret_cast<const double2*>(p);
        v[0] = q.x;
        v[1] = q.y;
    }
};

/// The weight 1 / n_i(f) of entry e: w[e] (weights_from_counts'), or with `counts` computed from
/// the entry's n_i(f) by the same weight_of_count (the same bits), so that the kernels below
/// need no weight array of their own.
template <class F>
__device__ __forceinline__ F entry_weight(const void* __restrict__ weight, int counts, i64 e) {
    return counts ? weight_of_count<F>(static_cast<const int*>(weight)[e])
                  : static_cast<const F*>(weight)[e];
}

}  // namespace pwconv_cuda

/// out (n, lda) = src (n, a) C-contiguous, each row padded with lda - a zeros: the 16-byte
/// aligned rows conv_entries_thread loads as vectors, in one pass (a zero fill and a strided
/// copy made two).
template <class F>
__global__ void pad_rows(long long n, int a, int lda, const F* __restrict__ src,
                         F* __restrict__ out) {
    const long long t = pwconv_cuda::global_thread();
    if (t >= n * lda) return;
    const long long r = t / lda;
    const int c = (int)(t - r * lda);
    out[t] = c < a ? src[r * a + c] : F(0);
}

namespace pwconv_cuda {

/// conv_entries_tile's row order: ints for rows_per_block rows, rounded up to 16 bytes (the
/// source rows after it stay 16-byte aligned; _conv.tile_plan counts the same).
__device__ __forceinline__ i64 tile_order_len(i64 rows_per_block) {
    return (rows_per_block + 3) / 4 * 4;
}

/// conv_entries_tile's length class of a row of len entries: 0 for the longest (len >=
/// PWCONV_CUDA_TILE_BUCKETS - 1), counting up as rows get shorter.
__device__ __forceinline__ int length_class(i64 len) {
    return PWCONV_CUDA_TILE_BUCKETS - 1 - (int)(len < PWCONV_CUDA_TILE_BUCKETS - 1
                                                    ? len : PWCONV_CUDA_TILE_BUCKETS - 1);
}

/// out[row, :b] of the one-thread-per-row kernels (conv_entries_thread, conv_entries_tile): the
/// entries [e0, e1) of the row, each source row at source(col[e]) (16-byte aligned, Vec16 loads),
/// its cell's matrix in mats (cell_size values a cell).  Per entry: t_o = sum over c ascending
/// of src_c * M[cell, c, o] (FMAs), then acc_o = w * t_o + acc_o -- conv_entries' order, so the
/// same bits whichever kernel calls it and wherever the source rows are.
template <class F, class CellT, int BM, class Source>
__device__ __forceinline__ void thread_row(i64 row, i64 e0, i64 e1,
                                           const long long* __restrict__ col,
                                           const CellT* __restrict__ cell,
                                           const void* __restrict__ weight, int weight_is_count,
                                           const Source& source, int a, const F* mats,
                                           int cell_size, int b, int depthwise,
                                           F* __restrict__ out) {
    constexpr int V = Vec16<F>::V;
    F acc[BM];
#pragma unroll
    for (int o = 0; o < BM; ++o) acc[o] = F(0);
    for (i64 e = e0; e < e1; ++e) {
        const F we = entry_weight<F>(weight, weight_is_count, e);
        const F* s = source(col[e]);
        const F* m = mats + (int)cell[e] * cell_size;
        if (depthwise) {  // acc_c = (w * src_c) * M[cell, c] + acc_c
#pragma unroll
            for (int c0 = 0; c0 < BM; c0 += V) {
                if (c0 >= a) break;
                F v[V];
                Vec16<F>::load(s + c0, v);
#pragma unroll
                for (int u = 0; u < V; ++u)
                    if (c0 + u < a) acc[c0 + u] = mul_add(we * v[u], m[c0 + u], acc[c0 + u]);
            }
            continue;
        }
        F t[BM];
#pragma unroll
        for (int o = 0; o < BM; ++o) t[o] = F(0);
        for (int c0 = 0; c0 < a; c0 += V) {
            F v[V];
            Vec16<F>::load(s + c0, v);
#pragma unroll
            for (int u = 0; u < V; ++u) {
                if (c0 + u >= a) break;
                const F* mc = m + (c0 + u) * b;
#pragma unroll
                for (int o = 0; o < BM; ++o)
                    if (o < b) t[o] = mul_add(v[u], mc[o], t[o]);
            }
        }
#pragma unroll
        for (int o = 0; o < BM; ++o) acc[o] = mul_add(we, t[o], acc[o]);
    }
    F* __restrict__ y = out + row * b;
#pragma unroll
    for (int o = 0; o < BM; ++o)
        if (o < b) y[o] = acc[o];
}

/// The one-thread-per-row kernels' cell matrices into shared memory: M as it is ((n_cells, a, b)
/// dense, (n_cells, a) depthwise), or with `transposed` (dense) M read as the weight (n_cells,
/// b, a): the input gradient's W_f^T, without a transposed copy made first.  The same values.
template <class F>
__device__ __forceinline__ void load_mats(F* mats, const F* __restrict__ M, int n_cells,
                                          int cell_size, int a, int b, int transposed) {
    for (int i = threadIdx.x; i < n_cells * cell_size; i += blockDim.x) {
        if (!transposed) {
            mats[i] = M[i];
            continue;
        }
        const int f = i / cell_size, r = i - f * cell_size, p = r / b, q = r - p * b;
        mats[i] = M[f * cell_size + q * a + p];
    }
}

/// Source row j of the one-thread-per-row kernels: src + j * lda in global memory.
template <class F>
struct GlobalRows {
    const F* src;
    int lda;
    __device__ __forceinline__ const F* operator()(i64 j) const { return src + j * lda; }
};

/// Source row j of conv_entries_tile: in the block's shared copy of its cloud's rows [first,
/// first + n), else (an index outside the cloud, which no map of this library holds) in global
/// memory.
template <class F>
struct TileRows {
    const F* tile;
    const F* src;
    i64 first, n;
    int lda;
    __device__ __forceinline__ const F* operator()(i64 j) const {
        const i64 local = j - first;
        return (local >= 0 && local < n) ? tile + local * lda : src + j * lda;
    }
};

}  // namespace pwconv_cuda

/// out (rows, b), as conv_entries (same arguments, but the weights: weight_is_count, see
/// entry_weight): one thread per row, all b <= BM outputs in registers (thread_row); src rows
/// `lda` values apart, lda a multiple of Vec16<F>::V and src 16-byte aligned (a padded copy
/// where a is not); M (n_cells, a, b) dense or (n_cells, a) depthwise, or (m_transposed) the
/// weight (n_cells, b, a) whose transpose is M, copied to shared memory (load_mats; n_cells *
/// a * b * sizeof(F) <= PWCONV_CUDA_THREAD_MATS_BYTES).
template <class F, class CellT, int BM>
__global__ void __launch_bounds__(256, sizeof(F) * BM <= 64 ? 4 : 2)
    conv_entries_thread(long long rows, const long long* __restrict__ splits,
                        const long long* __restrict__ col, const CellT* __restrict__ cell,
                        const void* __restrict__ weight, int weight_is_count,
                        const F* __restrict__ src, int a, int lda, const F* __restrict__ M,
                        int m_transposed, int n_cells, int b, int depthwise,
                        F* __restrict__ out) {
    using namespace pwconv_cuda;
    __shared__ F mats[PWCONV_CUDA_THREAD_MATS_BYTES / sizeof(F)];
    const int cell_size = depthwise ? a : a * b;
    load_mats(mats, M, n_cells, cell_size, a, b, m_transposed);
    __syncthreads();
    const i64 row = global_thread();
    if (row >= rows) return;
    thread_row<F, CellT, BM>(row, splits[row], splits[row + 1], col, cell, weight,
                             weight_is_count, GlobalRows<F>{src, lda}, a, mats, cell_size, b,
                             depthwise, out);
}

/// conv_entries_thread with each cloud's source rows in shared memory too (opt-in,
/// PWCONV_CUDA_ENTRIES_LOADS=tile): blocks_per_cloud blocks per cloud c, block `part` taking
/// the rows [row_offsets[c] + part * rows_per_block, ...) of the cloud (up to rows_per_block,
/// a block's width at a time), each first copying the cloud's source rows [src_offsets[c],
/// src_offsets[c + 1]) (lda values each) and the cell matrices to dynamic shared memory:
/// n_cells * cell_size values rounded up to 16 bytes, then the rows (the caller sizes it for
/// the largest cloud: _conv.tile_plan).  A
/// map's neighbours are in the query's cloud (SPEC §2), so every source row of an entry is then
/// read from shared memory, where 32 threads' rows at 32 places cost a few passes instead of a
/// line each.  With by_length, the block takes its rows longest first (order: a counting sort
/// of their lengths, PWCONV_CUDA_TILE_BUCKETS classes, in shared memory after the matrices):
/// a warp's 32 threads then take rows of about one length, where the map's consecutive rows
/// vary (3-11 entries at s = 4) and a warp issues as many steps as its longest row has entries
/// (1.5-2x the rows' mean on the paper's maps: benchmarks/RESULTS.md).  Rows of one class are
/// placed by shared-memory atomics, in any order: a row's sum is the same whichever thread
/// forms it.  The same products in the same order as conv_entries_thread: the same bits.
template <class F, class CellT, int BM>
__global__ void __launch_bounds__(512, sizeof(F) * BM <= 64 ? 2 : 1)
    conv_entries_tile(const long long* __restrict__ splits, const long long* __restrict__ col,
                      const CellT* __restrict__ cell, const void* __restrict__ weight,
                      int weight_is_count, const F* __restrict__ src, int a, int lda,
                      const F* __restrict__ M, int m_transposed, int n_cells, int b,
                      int depthwise,
                      const long long* __restrict__ row_offsets,
                      const long long* __restrict__ src_offsets, long long blocks_per_cloud,
                      long long rows_per_block, int by_length, F* __restrict__ out) {
    using namespace pwconv_cuda;
    constexpr int NB = PWCONV_CUDA_TILE_BUCKETS;
    PWCONV_CUDA_DYNAMIC_SHARED(double, shared);  // double: 8-byte (and 16-byte) alignment
    __shared__ int bucket[NB];
    F* mats = reinterpret_cast<F*>(shared);
    const int cell_size = depthwise ? a : a * b;
    const int mats_len = n_cells * cell_size;
    const int mats_padded = (mats_len + Vec16<F>::V - 1) / Vec16<F>::V * Vec16<F>::V;
    int* order = reinterpret_cast<int*>(mats + mats_padded);
    F* tile = reinterpret_cast<F*>(order + (by_length ? tile_order_len(rows_per_block) : 0));
    const i64 c = blockIdx.x / blocks_per_cloud, part = blockIdx.x % blocks_per_cloud;
    const i64 first = src_offsets[c], n_src = src_offsets[c + 1] - first;
    const i64 r_end = row_offsets[c + 1];
    const i64 r0 = row_offsets[c] + part * rows_per_block;
    const i64 r1 = r0 + rows_per_block < r_end ? r0 + rows_per_block : r_end;
    const int n_rows = r1 > r0 ? (int)(r1 - r0) : 0;
    load_mats(mats, M, n_cells, cell_size, a, b, m_transposed);
    for (i64 i = threadIdx.x; i < n_src * lda; i += blockDim.x) tile[i] = src[first * lda + i];
    for (int i = threadIdx.x; i < NB; i += blockDim.x) bucket[i] = 0;
    __syncthreads();
    if (by_length) {  // uniform across the block: its barriers are reached by every thread
        for (int i = threadIdx.x; i < n_rows; i += blockDim.x)
            atomicAdd(bucket + length_class(splits[r0 + i + 1] - splits[r0 + i]), 1);
        __syncthreads();
        if (threadIdx.x == 0) {  // the classes' starts, longest class first
            int start = 0;
            for (int k = 0; k < NB; ++k) {
                const int n = bucket[k];
                bucket[k] = start;
                start += n;
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n_rows; i += blockDim.x)
            order[atomicAdd(bucket + length_class(splits[r0 + i + 1] - splits[r0 + i]), 1)] = i;
        __syncthreads();
    }
    const TileRows<F> source{tile, src, first, n_src, lda};
    for (int k = threadIdx.x; k < n_rows; k += blockDim.x) {
        const i64 row = r0 + (by_length ? order[k] : k);
        thread_row<F, CellT, BM>(row, splits[row], splits[row + 1], col, cell, weight,
                                 weight_is_count, source, a, mats, cell_size, b, depthwise, out);
    }
}

/// Weight gradient, pass 1 of PWCONV_CUDA_WEIGHT_GRAD=chunks: partial[blk, :] = block blk's share
/// of dW, over the chunks of PWCONV_CUDA_CHUNK_ROWS rows [blk * chunks_per_block, ...) in order.
/// Thread p of the first n_cells * a * n_tiles is (cell f, input channel ci, output tile): it adds
/// w_e * x[col_e, ci] * dy[row_e, co] for co in its tile (BM outputs from co0; depthwise: co = ci)
/// over the entries e of cell f, in map order, in registers.  For that, each chunk's entries are
/// sorted by cell in shared memory PWCONV_CUDA_CHUNK_ENTRIES at a time, stably (each warp tile of
/// 32 entries ranks its lanes by __match_any_sync, the tiles' counts are scanned per cell in tile
/// order), and the chunk's output-gradient rows wait in shared memory.  Every sum has a fixed
/// order (bit-identical runs); pass 2 is sum_partials.  Needs blockDim.x a multiple of 32,
/// n_cells <= PWCONV_CUDA_CHUNK_MAX_CELLS, b <= 32.
template <class F, class CellT, int BM>
__global__ void __launch_bounds__(1024)
    conv_weight_chunks(long long m, const long long* __restrict__ splits,
                       const long long* __restrict__ col, const CellT* __restrict__ cell,
                       const void* __restrict__ weight, int weight_is_count, int n_cells,
                       const F* __restrict__ x, int a,
                       const F* __restrict__ dy, int b, int depthwise, long long chunks_per_block,
                       F* __restrict__ partial) {
    using namespace pwconv_cuda;
    constexpr int R = PWCONV_CUDA_CHUNK_ROWS;
    constexpr int CAP = PWCONV_CUDA_CHUNK_ENTRIES;
    __shared__ i64 s_splits[R + 1];
    __shared__ F s_dy[R * 32];
    __shared__ i64 s_col[CAP];
    __shared__ F s_w[CAP];
    __shared__ unsigned short s_row[CAP];
    __shared__ unsigned char s_rank[CAP];
    __shared__ int tile_at[(CAP / 32) * PWCONV_CUDA_CHUNK_MAX_CELLS];
    __shared__ int cell_start[PWCONV_CUDA_CHUNK_MAX_CELLS + 1];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
    const int n_tiles_co = depthwise ? 1 : (b + BM - 1) / BM;
    const int n_pairs = n_cells * a * n_tiles_co;
    const bool owner = tid < n_pairs;
    const int f = owner ? tid / (a * n_tiles_co) : 0;
    const int ci = owner ? (tid / n_tiles_co) % a : 0;
    const int co0 = depthwise ? ci : (tid % n_tiles_co) * BM;
    F acc[BM];
#pragma unroll
    for (int o = 0; o < BM; ++o) acc[o] = F(0);
    const i64 n_chunks = (m + R - 1) / R;
    const i64 k0 = (i64)blockIdx.x * chunks_per_block;
    const i64 k1 = k0 + chunks_per_block < n_chunks ? k0 + chunks_per_block : n_chunks;
    for (i64 k = k0; k < k1; ++k) {
        const i64 r0 = k * R;
        const int nr = (int)(m - r0 < R ? m - r0 : R);
        for (int i = tid; i <= nr; i += blockDim.x) s_splits[i] = splits[r0 + i];
        for (int i = tid; i < nr * b; i += blockDim.x) s_dy[i] = dy[r0 * b + i];
        __syncthreads();  // the chunk's splits and output gradients are in place
        const i64 e_end = s_splits[nr];
        for (i64 p0 = s_splits[0]; p0 < e_end; p0 += CAP) {
            const int n_e = (int)(e_end - p0 < CAP ? e_end - p0 : CAP);
            const int n_tiles = (n_e + 31) / 32;
            for (int i = tid; i < n_tiles * n_cells; i += blockDim.x) tile_at[i] = 0;
            __syncthreads();
            for (int t = warp; t < n_tiles; t += n_warps) {  // each tile's cells, ranked
                const int i = t * 32 + lane;
                const int fe = i < n_e ? (int)cell[p0 + i] : -1;
                const unsigned peers = __match_any_sync(0xffffffffu, fe);
                const int rank = __popc(peers & ((1u << lane) - 1u));
                if (fe >= 0) {
                    s_rank[i] = (unsigned char)rank;
                    if (rank == 0) tile_at[t * n_cells + fe] = __popc(peers);
                }
            }
            __syncthreads();
            if (tid < n_cells) {  // cell tid's tiles: counts -> offsets within the cell
                int run = 0;
                for (int t = 0; t < n_tiles; ++t) {
                    const int c = tile_at[t * n_cells + tid];
                    tile_at[t * n_cells + tid] = run;
                    run += c;
                }
                cell_start[tid + 1] = run;
            }
            __syncthreads();
            if (tid == 0) {
                cell_start[0] = 0;
                for (int c = 0; c < n_cells; ++c) cell_start[c + 1] += cell_start[c];
            }
            __syncthreads();
            for (int i = tid; i < n_e; i += blockDim.x) {  // into place, stable within a cell
                const i64 e = p0 + i;
                const int fe = (int)cell[e];
                const int at = cell_start[fe] + tile_at[(i / 32) * n_cells + fe] + s_rank[i];
                s_col[at] = col[e];
                s_w[at] = entry_weight<F>(weight, weight_is_count, e);
                s_row[at] = (unsigned short)segment_of(s_splits, nr, e);
            }
            __syncthreads();
            if (owner) {  // unrolled: several entries' source loads in flight at once
#pragma unroll 4
                for (int j = cell_start[f]; j < cell_start[f + 1]; ++j) {
                    const F v = s_w[j] * x[s_col[j] * a + ci];
                    const F* d = s_dy + (int)s_row[j] * b + co0;
#pragma unroll
                    for (int o = 0; o < BM; ++o)
                        if (depthwise ? o == 0 : co0 + o < b) acc[o] = mul_add(v, d[o], acc[o]);
                }
            }
            __syncthreads();  // before the next piece (or chunk) overwrites the shared arrays
        }
    }
    if (!owner) return;
    const i64 n_w = depthwise ? (i64)n_cells * a : (i64)n_cells * a * b;
    F* out = partial + (i64)blockIdx.x * n_w;
    if (depthwise) {
        out[f * a + ci] = acc[0];
        return;
    }
#pragma unroll
    for (int o = 0; o < BM; ++o)
        if (co0 + o < b) out[((i64)f * a + ci) * b + co0 + o] = acc[o];
}

/// Weight pairs (input, output channel) a warp of conv_weight_warps holds per cell at most: 32
/// lanes, PWCONV_CUDA_WARP_PAIRS / 32 pairs each (_conv.WARP_PAIRS: keep in step).
#define PWCONV_CUDA_WARP_PAIRS 128

/// The weight gradient's partial sums by warps (PWCONV_CUDA_WEIGHT_GRAD=warps, opt-in): warp run
/// k (block x, warp) takes rows [k * rows_per_run, (k + 1) * rows_per_run) in order and adds,
/// entry by entry in map order, w_e * x[col_e, ci] * dy[row, co] to its own sum of every weight
/// entry (cell f_e, ci, co) in shared memory: n_cells * P values a warp, P = a * b pairs (dense)
/// or a (depthwise, ci = co), lane l owning the pairs p = l, l + 32, ... < P, so the warp's
/// updates of an entry hit P distinct consecutive words (no bank conflicts) and no two threads
/// share a sum (no atomics).  A row's entries' columns, cells and weights are loaded by its lanes
/// together, 32 at a time, and handed round by __shfl_sync, four entries' source loads issued
/// before their products are added (in entry order).  Every sum has a fixed order: the
/// results are bit-identical from run to run.  partial[k * n_cells * P ...]: run k's sums, which
/// sum_partials adds in run order.  Dynamic shared memory: blockDim.x / 32 * n_cells * P values.
template <class F, class CellT>
__global__ void conv_weight_warps(long long m, const long long* __restrict__ splits,
                                  const long long* __restrict__ col,
                                  const CellT* __restrict__ cell,
                                  const void* __restrict__ weight, int weight_is_count,
                                  int n_cells, const F* __restrict__ x, int a,
                                  const F* __restrict__ dy, int b, int depthwise,
                                  long long rows_per_run, long long n_runs,
                                  F* __restrict__ partial) {
    using namespace pwconv_cuda;
    constexpr int PER_LANE = PWCONV_CUDA_WARP_PAIRS / 32;
    PWCONV_CUDA_DYNAMIC_SHARED(double, warp_sums);  // double: aligned for F = double too
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n_pairs = depthwise ? a : a * b;
    const int n_w = n_cells * n_pairs;
    F* acc = reinterpret_cast<F*>(warp_sums) + (i64)warp * n_w;
    const i64 run = (i64)blockIdx.x * (blockDim.x / 32) + warp;
    if (run >= n_runs) return;  // the whole warp
    for (int w = lane; w < n_w; w += 32) acc[w] = F(0);
    int ci[PER_LANE], co[PER_LANE];
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int p = lane + 32 * k;
        ci[k] = p < n_pairs ? (depthwise ? p : p / b) : 0;
        co[k] = p < n_pairs ? (depthwise ? p : p % b) : 0;
    }
    __syncwarp();
    const i64 r0 = run * rows_per_run;
    const i64 r1 = r0 + rows_per_run < m ? r0 + rows_per_run : m;
    for (i64 row = r0; row < r1; ++row) {
        F dv[PER_LANE];
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k)
            dv[k] = lane + 32 * k < n_pairs ? dy[row * b + co[k]] : F(0);
        const i64 e1 = splits[row + 1];
        for (i64 base = splits[row]; base < e1; base += 32) {
            const int n_e = (int)(e1 - base < 32 ? e1 - base : 32);
            i64 my_j = 0;
            int my_f = 0;
            F my_w = F(0);
            if (lane < n_e) {
                my_j = col[base + lane] * a;
                my_f = (int)cell[base + lane] * n_pairs;
                my_w = entry_weight<F>(weight, weight_is_count, base + lane);
            }
            int t = 0;
            for (; t + 4 <= n_e; t += 4) {  // four entries' source loads in flight at once
                i64 j[4];
                int f[4];
                F v[4][PER_LANE];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    j[u] = __shfl_sync(0xffffffffu, my_j, t + u);
                    f[u] = __shfl_sync(0xffffffffu, my_f, t + u);
                    const F w = __shfl_sync(0xffffffffu, my_w, t + u);
#pragma unroll
                    for (int k = 0; k < PER_LANE; ++k)
                        v[u][k] = lane + 32 * k < n_pairs ? w * x[j[u] + ci[k]] : F(0);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)  // added in entry order
#pragma unroll
                    for (int k = 0; k < PER_LANE; ++k)
                        if (lane + 32 * k < n_pairs) {
                            F* sum = acc + f[u] + lane + 32 * k;
                            *sum = mul_add(v[u][k], dv[k], *sum);
                        }
            }
            for (; t < n_e; ++t) {
                const i64 j = __shfl_sync(0xffffffffu, my_j, t);
                const int f = __shfl_sync(0xffffffffu, my_f, t);
                const F w = __shfl_sync(0xffffffffu, my_w, t);
#pragma unroll
                for (int k = 0; k < PER_LANE; ++k)
                    if (lane + 32 * k < n_pairs) {
                        F* sum = acc + f + lane + 32 * k;
                        *sum = mul_add(w * x[j + ci[k]], dv[k], *sum);
                    }
            }
        }
    }
    __syncwarp();
    for (int w = lane; w < n_w; w += 32) partial[run * n_w + w] = acc[w];
}

// ============================================================================================
// Fingerprint of a batch of coordinates, for checking that a kernel map was built for them
// ============================================================================================

/// out[0] += sum_p bits_p * (2p + 1), out[1] += sum_p mix(bits_p) * (p + 0x632BE59BD9B4E019),
/// out[2] += the number of NaN or infinite values, over the n_values coordinates (bits_p: the
/// float64 bit pattern of value p, so float32 and float64 copies of the same values agree).
/// Sums modulo 2^64 do not depend on the order of the additions: the integer atomics that
/// combine the blocks leave the result deterministic.  out (3,) is zeroed by the caller.
template <class T>
__global__ void points_digest(long long n_values, const T* __restrict__ values,
                              unsigned long long* out) {
    typedef unsigned long long u64;
    __shared__ u64 part[3][256];
    const int t = threadIdx.x;
    u64 s1 = 0, s2 = 0, bad = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = pwconv_cuda::global_thread(); p < n_values; p += stride) {
        const double v = (double)values[p];
        const u64 bits = (u64)__double_as_longlong(v);
        const u64 mixed = (bits ^ (bits >> 29)) * 0x9E3779B97F4A7C15ull;
        s1 += bits * (2ull * (u64)p + 1ull);
        s2 += mixed * ((u64)p + 0x632BE59BD9B4E019ull);
        bad += (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
    }
    part[0][t] = s1;
    part[1][t] = s2;
    part[2][t] = bad;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half)
            for (int k = 0; k < 3; ++k) part[k][t] += part[k][t + half];
        __syncthreads();
    }
    if (t < 3) atomicAdd(out + t, part[t][0]);
}
