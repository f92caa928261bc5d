// Count and fill passes of the radius search and the kernel map, for the grid and the kd-tree.
#include <algorithm>
#include <atomic>
#include <climits>
#include <memory>
#include <type_traits>
#include <cmath>
#include <vector>

#include "candidates.hpp"
#include "simd_filter.hpp"
#include "sort.hpp"
#include "pwconv/kernel_map.hpp"
#include "pwconv/radius_search.hpp"

namespace pwconv {

namespace {
// Whether the SIMD twins may run, and whether AVX-512 among them; read once per call.
std::atomic<bool> simd_requested{true};
std::atomic<bool> avx512_allowed{true};
}  // namespace

bool simd_available() {
#ifdef PWCONV_X86_SIMD
    static const bool available = __builtin_cpu_supports("avx512f");
    return available;
#else
    return false;
#endif
}

bool avx2_available() {
#ifdef PWCONV_X86_SIMD
    static const bool available = __builtin_cpu_supports("avx2");
    return available;
#else
    return false;
#endif
}

bool set_simd_enabled(bool enabled) { return simd_requested.exchange(enabled); }

bool set_avx512_allowed(bool allowed) { return avx512_allowed.exchange(allowed); }

bool simd_enabled() { return simd_requested.load() && avx512_allowed.load() && simd_available(); }

bool avx2_enabled() { return simd_requested.load() && avx2_available(); }

namespace {

using detail::KernelBounds;
using detail::QueryBox;

// Growable key buffer.  Its storage is never value-initialised (untouched capacity costs no
// memory), and it grows by at most `growth_cap` keys beyond what is asked, so that a search near
// its pair budget does not double its footprint.
struct KeyBuffer {
    std::unique_ptr<int64_t[]> data;
    int64_t capacity = 0;
    int64_t size = 0;
    int64_t growth_cap = INT64_MAX;

    int64_t* reserve(int64_t extra) {
        if (size + extra > capacity) {
            const int64_t want = size + extra;
            const int64_t cap = std::min(growth_cap, INT64_MAX - want);  // no overflow
            const int64_t grown = std::max(want, std::min(2 * capacity, want + cap));
            std::unique_ptr<int64_t[]> bigger(new int64_t[grown]);
            std::copy(data.get(), data.get() + size, bigger.get());
            data = std::move(bigger);
            capacity = grown;
        }
        return data.get();
    }
    void release() {
        data.reset();
        capacity = size = 0;
    }
};

template <class Index, class T>
int64_t check_queries(const Index& index, const Queries<T>& queries) {
    if (queries.xyz == nullptr) return index.n_points;
    check_batch(queries.batch, queries.m, "query_offsets");
    require(queries.batch.n_clouds == index.n_clouds,
            "query_offsets must describe as many clouds as offsets");
    return queries.m;
}

void check_radius(double radius) {
    require(radius > 0 && std::isfinite(radius), "radius must be positive and finite");
}

void check_spec(const KernelSpec& spec) {
    require(spec.voxel_size > 0 && std::isfinite(spec.voxel_size),
            "voxel_size must be positive and finite");
    require(spec.kernel_size >= 1 && spec.kernel_size % 2 == 1, "kernel_size must be odd and >= 1");
    require(spec.dilation >= 1, "dilation must be >= 1");
    require(std::isfinite(kernel_half_width(spec.voxel_size, spec.kernel_size, spec.dilation)),
            "the kernel's extent (dilation*(kernel_size-1)+1)*voxel_size must be finite");
}



// The candidate loops below are branch-free (the accept decisions are data-dependent and
// unpredictable) and read the index's coordinates as separate x, y, z arrays.

// Kernel index of coordinate v along one axis (start[0] <= v assumed checked separately).
inline int kernel_index(double v, const double* start, int kernel_size) {
    int k = 0;
    for (int j = 1; j < kernel_size; ++j) k += v >= start[j];
    return k;
}

// KC > 0 fixes the kernel size at compile time (unrolled loops for the common K = 1, 3, 5);
// KC = 0 reads it from the bounds.
template <int KC, class Index>
int64_t count_kernel_run(const Index& index, int64_t b, int64_t e, const KernelBounds& kb,
                         bool contiguous) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    const int K = KC > 0 ? KC : kb.kernel_size;
    int64_t count = 0;
    if (contiguous) {  // dilation 1: the K cells tile [start[0], end[K-1])
        const double x0 = kb.start[0][0], x1 = kb.end[0][K - 1];
        const double y0 = kb.start[1][0], y1 = kb.end[1][K - 1];
        const double z0 = kb.start[2][0], z1 = kb.end[2][K - 1];
        for (int64_t p = b; p < e; ++p)
            count += (X[p] >= x0) & (X[p] < x1) & (Y[p] >= y0) & (Y[p] < y1) & (Z[p] >= z0) &
                     (Z[p] < z1);
        return count;
    }
    const double *sx = kb.start[0].data(), *sy = kb.start[1].data(), *sz = kb.start[2].data();
    const double *ex = kb.end[0].data(), *ey = kb.end[1].data(), *ez = kb.end[2].data();
    for (int64_t p = b; p < e; ++p) {
        const int kx = kernel_index(X[p], sx, K), ky = kernel_index(Y[p], sy, K),
                  kz = kernel_index(Z[p], sz, K);
        count += (X[p] >= sx[0]) & (X[p] < ex[kx]) & (Y[p] >= sy[0]) & (Y[p] < ey[ky]) &
                 (Z[p] >= sz[0]) & (Z[p] < ez[kz]);
    }
    return count;
}

// Candidates of one kernel cell f (dilation > 1, grid): only that cell's box to test.
template <class Index>
void fill_cell_run(const Index& index, int64_t b, int64_t e, const KernelBounds& kb, int kx,
                   int ky, int kz, int cell_bits, KeyBuffer& out) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    const int64_t* order = index.order.data();
    const int K = kb.kernel_size;
    const double x0 = kb.start[0][kx], x1 = kb.end[0][kx];
    const double y0 = kb.start[1][ky], y1 = kb.end[1][ky];
    const double z0 = kb.start[2][kz], z1 = kb.end[2][kz];
    const int64_t f = ((int64_t)kz * K + ky) * K + kx;
    int64_t* keys = out.reserve(e - b);
    int64_t n = out.size;
    for (int64_t p = b; p < e; ++p) {
        keys[n] = (order[p] << cell_bits) | f;
        n += (X[p] >= x0) & (X[p] < x1) & (Y[p] >= y0) & (Y[p] < y1) & (Z[p] >= z0) &
             (Z[p] < z1);
    }
    out.size = n;
}

template <class Index>
int64_t count_cell_run(const Index& index, int64_t b, int64_t e, const KernelBounds& kb, int kx,
                       int ky, int kz) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    const double x0 = kb.start[0][kx], x1 = kb.end[0][kx];
    const double y0 = kb.start[1][ky], y1 = kb.end[1][ky];
    const double z0 = kb.start[2][kz], z1 = kb.end[2][kz];
    int64_t count = 0;
    for (int64_t p = b; p < e; ++p)
        count += (X[p] >= x0) & (X[p] < x1) & (Y[p] >= y0) & (Y[p] < y1) & (Z[p] >= z0) &
                 (Z[p] < z1);
    return count;
}

template <int KC, class Index>
void fill_kernel_run(const Index& index, int64_t b, int64_t e, const KernelBounds& kb,
                     int cell_bits, bool contiguous, KeyBuffer& out) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    const int64_t* order = index.order.data();
    const int K = KC > 0 ? KC : kb.kernel_size;
    const double *sx = kb.start[0].data(), *sy = kb.start[1].data(), *sz = kb.start[2].data();
    const double *ex = kb.end[0].data(), *ey = kb.end[1].data(), *ez = kb.end[2].data();
    int64_t* keys = out.reserve(e - b);
    int64_t n = out.size;
    if (contiguous) {  // dilation 1: the K cells tile [start[0], end[K-1]) on every axis
        const double x0 = sx[0], x1 = ex[K - 1], y0 = sy[0], y1 = ey[K - 1];
        const double z0 = sz[0], z1 = ez[K - 1];
        for (int64_t p = b; p < e; ++p) {
            const int kx = kernel_index(X[p], sx, K), ky = kernel_index(Y[p], sy, K),
                      kz = kernel_index(Z[p], sz, K);
            keys[n] = (order[p] << cell_bits) | (((int64_t)kz * K + ky) * K + kx);
            n += (X[p] >= x0) & (X[p] < x1) & (Y[p] >= y0) & (Y[p] < y1) & (Z[p] >= z0) &
                 (Z[p] < z1);
        }
        out.size = n;
        return;
    }
    for (int64_t p = b; p < e; ++p) {
        const int kx = kernel_index(X[p], sx, K), ky = kernel_index(Y[p], sy, K),
                  kz = kernel_index(Z[p], sz, K);
        const bool ok = (X[p] >= sx[0]) & (X[p] < ex[kx]) & (Y[p] >= sy[0]) & (Y[p] < ey[ky]) &
                        (Z[p] >= sz[0]) & (Z[p] < ez[kz]);
        keys[n] = (order[p] << cell_bits) | (((int64_t)kz * K + ky) * K + kx);
        n += ok;  // written always, kept only when accepted: no branch
    }
    out.size = n;
}

template <class Index>
int64_t count_radius_run(const Index& index, int64_t b, int64_t e, const double q[3],
                         double radius, Metric metric) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    int64_t count = 0;
    if (metric == Metric::chebyshev) {
        for (int64_t p = b; p < e; ++p)
            count += within_chebyshev(X[p], Y[p], Z[p], q[0], q[1], q[2], radius);
    } else {
        const double radius_sq = radius * radius;
        for (int64_t p = b; p < e; ++p)
            count += within_euclidean(X[p], Y[p], Z[p], q[0], q[1], q[2], radius_sq);
    }
    return count;
}

template <class Index>
void fill_radius_run(const Index& index, int64_t b, int64_t e, const double q[3], double radius,
                     Metric metric, KeyBuffer& out) {
    const double* X = index.coord[0].data();
    const double* Y = index.coord[1].data();
    const double* Z = index.coord[2].data();
    const int64_t* order = index.order.data();
    int64_t* keys = out.reserve(e - b);
    int64_t n = out.size;
    const double radius_sq = radius * radius;
    for (int64_t p = b; p < e; ++p) {
        keys[n] = order[p];
        n += metric == Metric::chebyshev
                 ? within_chebyshev(X[p], Y[p], Z[p], q[0], q[1], q[2], radius)
                 : within_euclidean(X[p], Y[p], Z[p], q[0], q[1], q[2], radius_sq);
    }
    out.size = n;
}

// Compact clouds (the grid has a dense cell table, e.g. the paper's 2,048-point clouds) with a
// kernel size known at compile time: the whole query in stack arrays, loops unrolled.  Returns the
// same keys as the generic path (every accepted candidate once; rows are sorted afterwards).
template <int KC, Loops LOOPS>
PWCONV_FILTER_INLINE void collect_compact_impl(const Grid& grid, const double q[3], int64_t cloud,
                                               const KernelSpec& spec,
                                               const detail::KernelDifferences& diff,
                                               int cell_bits, KeyBuffer& out) {
    const int s = spec.dilation;
    const double h = kernel_half_width(spec.voxel_size, KC, s);
    detail::KernelFilter<KC> kf;
    for (int a = 0; a < 3; ++a) kf.lo[a] = support_lower(q[a], h);
    for (int k = 0; k < KC; ++k) {
        kf.start_d[k] = diff.start[k];
        kf.end_d[k] = diff.end[k];
    }

    const int64_t nx = grid.cube_nx[cloud], ny = grid.dense_ny[cloud], nz = grid.dense_nz[cloud];
    const int64_t n_axis[3] = {nx, ny, nz};
    const double* origin = &grid.origin[3 * cloud];
    const int32_t* table = &grid.cube_start[grid.cube_base[cloud]];
    const int64_t base = grid.cloud_offsets[cloud];
    const double* X = grid.coord[0].data();
    const double* Y = grid.coord[1].data();
    const double* Z = grid.coord[2].data();
    const int64_t* order = grid.order.data();

    // Grid-cell range of each kernel cell per axis, clamped to the cloud's table (empty: c0 > c1).
    // An accepted x has fl(x - lo) in [D_start, D_end), so x lies within a few ulps of
    // [lo + D_start, lo + D_end): widened (candidate_lower / _upper), these bounds hold every
    // candidate.
    int64_t c0[3][KC], c1[3][KC];
    for (int a = 0; a < 3; ++a)
        for (int k = 0; k < KC; ++k) {
            const double lo = kf.lo[a], ds = kf.start_d[k], de = kf.end_d[k];
            const int64_t first = grid_coord(candidate_lower(lo, ds), origin[a], grid.cell_size,
                                             grid.inv_cell_size);
            const int64_t last = grid_coord(candidate_upper(lo, de), origin[a], grid.cell_size,
                                            grid.inv_cell_size);
            c0[a][k] = std::max<int64_t>(first, 0);
            c1[a][k] = ds < de ? std::min<int64_t>(last, n_axis[a] - 1) : -1;
        }

    // The x-range (grid cells [x_lo, x_hi)) searched in every grid row: with s = 1 the K cells
    // tile the support; dilated, from the first kernel column's grid cells to the last one's,
    // holes included (one range per row costs less than K short ones), each candidate binned
    // along x.
    int64_t x_lo = -1, x_hi = -1;
    for (int kx = 0; kx < KC; ++kx)
        if (c0[0][kx] <= c1[0][kx]) {
            if (x_lo < 0) x_lo = c0[0][kx];
            x_hi = c1[0][kx] + 1;
        }
    if (x_lo < 0) return;
    // Calls visit(cz, cy, tag) for each grid row of the query; tag = kz * K + ky, the kernel row
    // whose y and z bounds apply (0 with s = 1, where each candidate's ky, kz are told apart).
    auto for_each_grid_row = [&](auto&& visit) {
        if (s == 1) {
            for (int64_t cz = c0[2][0]; cz <= c1[2][KC - 1]; ++cz)
                for (int64_t cy = c0[1][0]; cy <= c1[1][KC - 1]; ++cy) visit(cz, cy, 0);
            return;
        }
        for (int kz = 0; kz < KC; ++kz)
            for (int64_t cz = c0[2][kz]; cz <= c1[2][kz]; ++cz)
                for (int ky = 0; ky < KC; ++ky)
                    for (int64_t cy = c0[1][ky]; cy <= c1[1][ky]; ++cy) visit(cz, cy, kz * KC + ky);
    };
    auto filter = [&](int64_t b, int64_t e, int64_t tag) {
        int64_t* keys = out.reserve(e - b + detail::kFilterSlack);
        out.size = s == 1 ? detail::filter_support<KC, LOOPS>(X, Y, Z, order, b, e, kf, cell_bits,
                                                              keys, out.size)
                          : detail::filter_row<KC, LOOPS>(X, Y, Z, order, b, e, kf,
                                                          (int)(tag % KC), (int)(tag / KC),
                                                          cell_bits, keys, out.size);
    };
#ifdef PWCONV_X86_SIMD
    if constexpr (LOOPS != Loops::portable) {
        // The rows' ranges in one pass without a branch per row (nonempty_ranges_*), then
        // the filters over the non-empty ones.  When the query spans more rows than the list
        // holds (a grid much finer than the voxel), the row-by-row loop below runs instead.
        detail::RowList list;
        bool fits = true;
        for_each_grid_row([&](int64_t cz, int64_t cy, int64_t tag) {
            if (list.n == detail::RowList::kCapacity) {
                fits = false;
                return;
            }
            const int64_t row = (cz * ny + cy) * nx;
            list.first[list.n] = row + x_lo;
            list.end[list.n] = row + x_hi;
            list.tag[list.n++] = tag;
        });
        if (fits) {
            int64_t b[detail::RowList::kCapacity], e[detail::RowList::kCapacity],
                tag[detail::RowList::kCapacity];
            const int m = LOOPS == Loops::avx512
                              ? detail::nonempty_ranges_avx512(table, list, base, b, e, tag)
                              : detail::nonempty_ranges_avx2(table, list, base, b, e, tag);
            for (int t = 0; t < m; ++t) filter(b[t], e[t], tag[t]);
            return;
        }
    }
#endif
    for_each_grid_row([&](int64_t cz, int64_t cy, int64_t tag) {
        const int32_t* row = table + (cz * ny + cy) * nx;
        const int64_t b = base + row[x_lo], e = base + row[x_hi];
        if (b < e) filter(b, e, tag);
    });
}

template <int KC>
void collect_compact_portable(const Grid& grid, const double q[3], int64_t cloud,
                              const KernelSpec& spec, const detail::KernelDifferences& diff,
                              int cell_bits, KeyBuffer& out) {
    collect_compact_impl<KC, Loops::portable>(grid, q, cloud, spec, diff, cell_bits, out);
}

#ifdef PWCONV_X86_SIMD
template <int KC>
__attribute__((target("avx512f"))) void collect_compact_avx512(
    const Grid& grid, const double q[3], int64_t cloud, const KernelSpec& spec,
    const detail::KernelDifferences& diff, int cell_bits, KeyBuffer& out) {
    collect_compact_impl<KC, Loops::avx512>(grid, q, cloud, spec, diff, cell_bits, out);
}

template <int KC>
__attribute__((target("avx2"))) void collect_compact_avx2(
    const Grid& grid, const double q[3], int64_t cloud, const KernelSpec& spec,
    const detail::KernelDifferences& diff, int cell_bits, KeyBuffer& out) {
    collect_compact_impl<KC, Loops::avx2>(grid, q, cloud, spec, diff, cell_bits, out);
}
#endif

template <int KC>
void collect_compact(const Grid& grid, const double q[3], int64_t cloud, const KernelSpec& spec,
                     const detail::KernelDifferences& diff, int cell_bits, Loops loops,
                     KeyBuffer& out) {
#ifdef PWCONV_X86_SIMD
    if (loops == Loops::avx512)
        return collect_compact_avx512<KC>(grid, q, cloud, spec, diff, cell_bits, out);
    if (loops == Loops::avx2)
        return collect_compact_avx2<KC>(grid, q, cloud, spec, diff, cell_bits, out);
#endif
    (void)loops;
    collect_compact_portable<KC>(grid, q, cloud, spec, diff, cell_bits, out);
}

// Search policies: how one query's pairs are collected (sorted keys appended to a buffer) or only
// counted (after the pair budget is exhausted).
struct KernelPolicy {
    KernelSpec spec;
    detail::KernelDifferences diff;
    int cell_bits = 0;
    Loops loops = Loops::portable;

    struct State {
        KernelBounds bounds;
    };

    void prepare(const double q[3], State& state, QueryBox& box) const {
        const double h = kernel_half_width(spec.voxel_size, spec.kernel_size, spec.dilation);
        double lo[3];
        for (int a = 0; a < 3; ++a) lo[a] = support_lower(q[a], h);
        state.bounds.compute(lo, diff);
        detail::kernel_box(box, state.bounds);
    }
    template <int KC, class Index, class Scratch>
    void collect_k(const Index& index, const double q[3], int64_t cloud, QueryBox& box,
                   Scratch& scratch, State& state, KeyBuffer& out) const {
        if constexpr (std::is_same<Index, Grid>::value && KC > 0) {
            if (index.cube_base[cloud] >= 0) {
                collect_compact<KC>(index, q, cloud, spec, diff, cell_bits, loops, out);
                return;
            }
        }
        prepare(q, state, box);
        if constexpr (std::is_same<Index, Grid>::value) {
            if (spec.dilation > 1) {  // cell by cell: the grid ranges of each kernel cell
                detail::kernel_cell_ranges(index, cloud, state.bounds, scratch);
                detail::for_each_tagged_run(
                    index, cloud, scratch, [&](int kz, int ky, int kx, int64_t b, int64_t e) {
                        fill_cell_run(index, b, e, state.bounds, kx, ky, kz, cell_bits, out);
                    });
                return;
            }
        }
        const bool contiguous = spec.dilation == 1;
        detail::for_each_candidate(index, cloud, box, scratch, [&](int64_t b, int64_t e) {
            fill_kernel_run<KC>(index, b, e, state.bounds, cell_bits, contiguous, out);
        });
    }
    template <class Index, class Scratch>
    void collect(const Index& index, const double q[3], int64_t cloud, QueryBox& box,
                 Scratch& scratch, State& state, KeyBuffer& out) const {
        switch (spec.kernel_size) {
            case 1: return collect_k<1>(index, q, cloud, box, scratch, state, out);
            case 3: return collect_k<3>(index, q, cloud, box, scratch, state, out);
            case 5: return collect_k<5>(index, q, cloud, box, scratch, state, out);
            default: return collect_k<0>(index, q, cloud, box, scratch, state, out);
        }
    }
    template <class Index, class Scratch>
    int64_t count(const Index& index, const double q[3], int64_t cloud, QueryBox& box,
                  Scratch& scratch, State& state) const {
        prepare(q, state, box);
        int64_t n = 0;
        if constexpr (std::is_same<Index, Grid>::value) {
            if (spec.dilation > 1) {
                detail::kernel_cell_ranges(index, cloud, state.bounds, scratch);
                detail::for_each_tagged_run(
                    index, cloud, scratch, [&](int kz, int ky, int kx, int64_t b, int64_t e) {
                        n += count_cell_run(index, b, e, state.bounds, kx, ky, kz);
                    });
                return n;
            }
        }
        const bool contiguous = spec.dilation == 1;
        detail::for_each_candidate(index, cloud, box, scratch, [&](int64_t b, int64_t e) {
            n += count_kernel_run<0>(index, b, e, state.bounds, contiguous);
        });
        return n;
    }
};

struct RadiusPolicy {
    double radius;
    Metric metric;

    struct State {};

    template <class Index, class Scratch>
    void collect(const Index& index, const double q[3], int64_t cloud, QueryBox& box,
                 Scratch& scratch, State&, KeyBuffer& out) const {
        detail::radius_box(box, q, radius);
        detail::for_each_candidate(index, cloud, box, scratch, [&](int64_t b, int64_t e) {
            fill_radius_run(index, b, e, q, radius, metric, out);
        });
    }
    template <class Index, class Scratch>
    int64_t count(const Index& index, const double q[3], int64_t cloud, QueryBox& box,
                  Scratch& scratch, State&) const {
        detail::radius_box(box, q, radius);
        int64_t n = 0;
        detail::for_each_candidate(index, cloud, box, scratch, [&](int64_t b, int64_t e) {
            n += count_radius_run(index, b, e, q, radius, metric);
        });
        return n;
    }
};

// Pass 1 for any policy.  Blocks of kBlockSize queries are handed to threads dynamically
// (neighbour counts vary a lot across a cloud); each block's rows are stored in visit order, so
// the kept pairs do not depend on the schedule.  Self queries are visited in the index's internal
// (spatial) order so that consecutive queries touch the same memory.  The running total is an
// integer atomic (no floating point): once it passes max_pairs, later blocks only count.
template <class Policy, class Index, class T>
void gather_pairs(const Index& index, const Queries<T>& queries, const Policy& policy,
                  int cell_bits, int64_t max_pairs, PairBlocks& out, int threads) {
    // Keys (point index << cell_bits | cell) are distinct within a row; 31-bit keys sort faster.
    const bool fit32 = (index.n_points >> (31 - std::min(cell_bits, 31))) == 0;
    const bool self = queries.xyz == nullptr;
    // The SIMD rank sorts of short rows (31-bit keys): the family the filters use.
    [[maybe_unused]] const Loops sort_loops =
        fit32 ? loops_in_use() : Loops::portable;  // (no SIMD build: unused)
    const int64_t m = check_queries(index, queries);
    const int64_t* offsets = self ? index.cloud_offsets.data() : queries.batch.offsets;
    const int64_t n_clouds = index.n_clouds;
    out = PairBlocks();
    out.n_queries = m;
    out.cell_bits = 0;
    if (self) out.query_of = index.order;
    out.row_len.assign(m, 0);
    const int64_t n_blocks = out.n_blocks();
    out.keys.resize(n_blocks);
    // Shared by the threads, each on its own cache line; a thread adds its pairs to `total` in
    // batches (kFlushPairs, and at the end of each block): an atomic add per row made the two
    // cores fight over one line and cost a sixth of the search.
    alignas(64) std::atomic<int64_t> total{0};
    alignas(64) std::atomic<bool> over{false};
    constexpr int64_t kFlushPairs = 4096;
    RegionErrors errors;
#pragma omp parallel num_threads(resolve_threads(threads))
    {
        QueryBox box;
        typename detail::ScratchOf<Index>::type scratch;
        typename Policy::State state;
        KeyBuffer buffer;
        RankScratch rank_scratch;
        int64_t known_total = 0;  // total after this thread's last flush
        int64_t pending = 0;      // this thread's pairs not yet added to total
        auto sort_row = [&](int64_t* keys, int64_t n) {
#ifdef PWCONV_X86_SIMD
            if (n >= 2 && n <= 64) {
                if (sort_loops == Loops::avx512)
                    return detail::sort_short_row_avx512(keys, n);
                if (sort_loops == Loops::avx2)
                    return detail::sort_short_row_avx2(keys, n);
            }
#endif
            sort_unique_keys(keys, n, fit32, rank_scratch);
        };
        // Adds pending to total; true when the budget is exceeded.
        auto flush = [&]() {
            known_total = total.fetch_add(pending) + pending;
            pending = 0;
            return known_total > max_pairs;
        };
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            errors.run([&] {
                const int64_t p0 = blk * PairBlocks::kBlockSize;
                const int64_t p1 = std::min(m, p0 + PairBlocks::kBlockSize);
                buffer.size = 0;
                for (int64_t p = p0; p < p1; ++p) {
                    double q[3];
                    if (self) {
                        for (int a = 0; a < 3; ++a) q[a] = index.coord[a][p];
                    } else {
                        for (int a = 0; a < 3; ++a) q[a] = (double)queries.xyz[3 * p + a];
                    }
                    const int64_t cloud =
                        (int64_t)(std::upper_bound(offsets, offsets + n_clouds + 1, p) - offsets) - 1;
                    int64_t n;
                    if (!over.load(std::memory_order_relaxed)) {
                        // Keep the row while the running total stays within the budget (checked
                        // at each flush and whenever this thread alone would pass it, so no
                        // thread holds much more than the budget); past it, only count.
                        buffer.growth_cap =
                            std::max<int64_t>(0, max_pairs - known_total - pending);
                        const int64_t row_begin = buffer.size;
                        policy.collect(index, q, cloud, box, scratch, state, buffer);
                        n = buffer.size - row_begin;
                        pending += n;
                        const bool exceeded =
                            (pending >= kFlushPairs || known_total + pending > max_pairs) &&
                            flush();
                        if (exceeded) {
                            over.store(true);
                            buffer.release();
                        } else {
                            sort_row(buffer.data.get() + row_begin, n);
                        }
                    } else {
                        n = policy.count(index, q, cloud, box, scratch, state);
                        pending += n;
                    }
                    out.row_len[p] = n;
                }
                if (flush()) over.store(true);
                if (!over.load()) out.keys[blk].assign(buffer.data.get(), buffer.data.get() + buffer.size);
            });
        }
    }
    errors.rethrow();
    out.n_pairs = total.load();
    out.complete = !over.load();
    if (!out.complete) std::vector<std::vector<int64_t>>().swap(out.keys);
}

// Calls row(i, keys, len) for every query i (in parallel over blocks).
template <class Row>
void for_each_row(const PairBlocks& pairs, int threads, Row&& row) {
    require(pairs.complete, "the search went over its pair budget: nothing to emit");
    const int64_t n_blocks = pairs.n_blocks();
#pragma omp parallel for schedule(dynamic, 4) num_threads(resolve_threads(threads))
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const int64_t p0 = blk * PairBlocks::kBlockSize;
        const int64_t p1 = std::min(pairs.n_queries, p0 + PairBlocks::kBlockSize);
        const int64_t* keys = pairs.keys[blk].data();
        if (interrupt_requested()) continue;  // skip the remaining blocks
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t i = pairs.query_of.empty() ? p : pairs.query_of[p];
            row(i, keys, pairs.row_len[p]);
            keys += pairs.row_len[p];
        }
    }
    if (interrupt_requested()) throw Interrupted();
}

}  // namespace

int64_t PairBlocks::memory_bytes() const {
    int64_t bytes = (int64_t)(sizeof(int64_t) * (query_of.size() + row_len.size()));
    for (const auto& k : keys) bytes += (int64_t)(sizeof(int64_t) * k.capacity());
    return bytes;
}

void pair_splits(const PairBlocks& pairs, int64_t* splits) {
    const int64_t m = pairs.n_queries;
    splits[0] = 0;
    if (pairs.query_of.empty()) {
        for (int64_t p = 0; p < m; ++p) splits[p + 1] = pairs.row_len[p];
    } else {
        for (int64_t p = 0; p < m; ++p) splits[pairs.query_of[p] + 1] = pairs.row_len[p];
    }
    for (int64_t i = 0; i < m; ++i) splits[i + 1] += splits[i];
}

template <class Index, class T>
void radius_search_gather(const Index& index, const Queries<T>& queries, double radius,
                          Metric metric, int64_t max_pairs, PairBlocks& out, int threads) {
    check_radius(radius);
    gather_pairs(index, queries, RadiusPolicy{radius, metric}, 0, max_pairs, out, threads);
}

void radius_search_emit(const PairBlocks& pairs, const int64_t* splits, int64_t* index_e,
                        int threads) {
    for_each_row(pairs, threads, [&](int64_t i, const int64_t* keys, int64_t len) {
        std::copy(keys, keys + len, index_e + splits[i]);
    });
}

template <class Index, class T>
void kernel_map_gather(const Index& index, const Queries<T>& queries, const KernelSpec& spec,
                       int64_t max_pairs, PairBlocks& out, int threads) {
    check_spec(spec);
    const int bits = kernel_cell_bits(spec.kernel_size);
    require(bits < 62 && (index.n_points >> (62 - bits)) == 0,
            "n_points * kernel_size**3 must fit in 62 bits");
    KernelPolicy policy;
    policy.spec = spec;
    policy.diff.compute(spec.voxel_size, spec.kernel_size, spec.dilation);
    policy.cell_bits = bits;
    policy.loops = loops_in_use();
    gather_pairs(index, queries, policy, bits, max_pairs, out, threads);
    out.cell_bits = bits;
}

template <class CellT, class IndexT>
void kernel_map_emit(const PairBlocks& pairs, const int64_t* splits, IndexT* index_e,
                     CellT* cell_e, int threads) {
    const int bits = pairs.cell_bits;
    const int64_t mask = (int64_t(1) << bits) - 1;
    for_each_row(pairs, threads, [&](int64_t i, const int64_t* keys, int64_t len) {
        IndexT* out_index = index_e + splits[i];
        CellT* out_cell = cell_e + splits[i];
        for (int64_t k = 0; k < len; ++k) {
            out_index[k] = (IndexT)(keys[k] >> bits);
            out_cell[k] = (CellT)(keys[k] & mask);
        }
    });
}

template <class CellT>
void kernel_map_counts(const int64_t* splits, const CellT* cell_e, int64_t m, int kernel_size,
                       int32_t* counts_mf, int threads) {
    require(m >= 0 && kernel_size >= 1, "kernel_map_counts: bad sizes");
    const int64_t n_cells = (int64_t)kernel_size * kernel_size * kernel_size;
#pragma omp parallel for schedule(static, 1024) num_threads(resolve_threads(threads))
    for (int64_t i = 0; i < m; ++i) {
        int32_t* counts = counts_mf + i * n_cells;
        std::fill(counts, counts + n_cells, 0);
        for (int64_t e = splits[i]; e < splits[i + 1]; ++e) ++counts[(int64_t)cell_e[e]];
    }
}

template void radius_search_gather<Grid, double>(const Grid&, const Queries<double>&, double,
                                                 Metric, int64_t, PairBlocks&, int);
template void radius_search_gather<KdTree, double>(const KdTree&, const Queries<double>&, double,
                                                   Metric, int64_t, PairBlocks&, int);
template void kernel_map_gather<Grid, double>(const Grid&, const Queries<double>&,
                                              const KernelSpec&, int64_t, PairBlocks&, int);
template void kernel_map_gather<KdTree, double>(const KdTree&, const Queries<double>&,
                                                const KernelSpec&, int64_t, PairBlocks&, int);
template void kernel_map_counts<uint8_t>(const int64_t*, const uint8_t*, int64_t, int, int32_t*,
                                         int);
template void kernel_map_counts<int16_t>(const int64_t*, const int16_t*, int64_t, int, int32_t*,
                                         int);
template void kernel_map_counts<int32_t>(const int64_t*, const int32_t*, int64_t, int, int32_t*,
                                         int);
#define PWCONV_INSTANTIATE_EMIT(C, I)                                                              \
    template void kernel_map_emit<C, I>(const PairBlocks&, const int64_t*, I*, C*, int);
PWCONV_INSTANTIATE_EMIT(uint8_t, int32_t)
PWCONV_INSTANTIATE_EMIT(int16_t, int32_t)
PWCONV_INSTANTIATE_EMIT(int32_t, int32_t)
PWCONV_INSTANTIATE_EMIT(uint8_t, int64_t)
PWCONV_INSTANTIATE_EMIT(int16_t, int64_t)
PWCONV_INSTANTIATE_EMIT(int32_t, int64_t)

}  // namespace pwconv
