// Forward and backward kernels of pointwise convolution; see conv.hpp for the scheme.
#include "pwconv/conv.hpp"
#include "pwconv/binning.hpp"

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

namespace pwconv {

namespace {

constexpr int64_t kRowBlock = 64;      // rows per task of the gather kernels
constexpr int64_t kWeightBlock = 256;  // rows per partial sum of the weight gradient
constexpr double kWaveBytes = 64.0 * 1024 * 1024;  // partial sums held at once (weight gradient)

template <class CellT>
void check_map(const KernelMapView<CellT>& map) {
    require(map.m >= 0 && map.n >= 0, "kernel map sizes must be non-negative");
    require(map.kernel_size >= 1 && map.kernel_size % 2 == 1, "kernel_size must be odd and >= 1");
    require(map.splits != nullptr && map.splits[0] == 0, "kernel map splits must start at 0");
}

// Per-thread buffers of one block of rows: the weighted sums ("slots") of every non-empty
// (row, cell) pair, grouped by cell.
template <class F>
struct SlotBuffer {
    std::vector<int32_t> slot_of;   // (kRowBlock * n_cells) slot of (local row, cell) or -1
    std::vector<int32_t> slot_row;  // slot -> local row
    std::vector<int32_t> slot_cell; // slot -> cell
    std::vector<F> sums;            // (slots, channels)
    std::vector<int32_t> by_cell;   // slots ordered by cell, then by creation
    std::vector<int64_t> cell_begin;  // (n_cells + 1,) into by_cell
    std::vector<int64_t> row_slot_begin;  // (rows + 1,) slots are created row by row
    int64_t n_slots = 0;

    void reset(int64_t rows, int64_t n_cells) {
        if ((int64_t)slot_of.size() < rows * n_cells) slot_of.assign(rows * n_cells, -1);
        cell_begin.assign(n_cells + 1, 0);
        row_slot_begin.resize(rows + 1);
        n_slots = 0;
    }
};

// Channel loops with the count fixed at compile time for the common small sizes (the paper's
// layers have 3 and 9 channels): fully unrolled, accumulators kept in registers.  C = 0: runtime.
template <int C, class F>
inline void axpy(int64_t ch, F alpha, const F* x, F* y) {
    const int64_t n = C > 0 ? C : ch;
    for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

template <class Fn>
inline void dispatch_channels(int64_t ch, Fn&& fn) {
    switch (ch) {
        case 1: return fn(std::integral_constant<int, 1>());
        case 2: return fn(std::integral_constant<int, 2>());
        case 3: return fn(std::integral_constant<int, 3>());
        case 4: return fn(std::integral_constant<int, 4>());
        case 6: return fn(std::integral_constant<int, 6>());
        case 8: return fn(std::integral_constant<int, 8>());
        case 9: return fn(std::integral_constant<int, 9>());
        case 12: return fn(std::integral_constant<int, 12>());
        case 16: return fn(std::integral_constant<int, 16>());
        default: return fn(std::integral_constant<int, 0>());
    }
}

// Sums w(row, e, f) * src[col[e]] per (row, cell) for rows [r0, r1) into buf's slots, then groups
// the slots by cell.  Entries are visited in CSR order: the summation order is fixed.
// Entries of a kernel map: point index and cell of entry e.
template <class CellT>
struct MapEntries {
    const int64_t* index;
    const CellT* cell;
    int64_t col(int64_t e) const { return index[e]; }
    int64_t cell_of(int64_t e) const { return (int64_t)cell[e]; }
};

// Entries of a transposed map: packed ((row << bits) | cell) << count_bits | count keys.
struct PackedEntries {
    const int64_t* keys;
    int bits;
    int count_bits;
    int64_t col(int64_t e) const { return keys[e] >> (bits + count_bits); }
    int64_t cell_of(int64_t e) const {
        return (keys[e] >> count_bits) & ((int64_t(1) << bits) - 1);
    }
    int64_t count_mask() const { return (int64_t(1) << count_bits) - 1; }
};

template <int A, class F, class Entries, class Weight>
void gather_slots(int64_t r0, int64_t r1, const int64_t* splits, const Entries& entries,
                  int64_t n_cells, const F* src, int64_t ch, Weight weight,
                  SlotBuffer<F>& buf) {
    buf.reset(r1 - r0, n_cells);
    // A block has at most one slot per entry: size the buffers once, so that the entry loop has
    // no growth test.  Whether an entry opens a new slot is data-dependent (about one in two), so
    // the loop takes both cases without a branch: a row's possible new slots are zeroed before
    // the row, and an existing slot's row and cell are rewritten with the same values.
    const int64_t max_slots = splits[r1] - splits[r0];
    if ((int64_t)buf.slot_row.size() < max_slots) {
        buf.slot_row.resize(max_slots);
        buf.slot_cell.resize(max_slots);
        buf.sums.resize(max_slots * ch);
    }
    int32_t* slot_row = buf.slot_row.data();
    int32_t* slot_cell = buf.slot_cell.data();
    int64_t* cell_begin = buf.cell_begin.data();
    F* sums = buf.sums.data();
    int64_t n_slots = 0;
    for (int64_t r = r0; r < r1; ++r) {
        buf.row_slot_begin[r - r0] = n_slots;
        int32_t* slot_of = &buf.slot_of[(r - r0) * n_cells];
        std::fill(sums + n_slots * ch, sums + (n_slots + splits[r + 1] - splits[r]) * ch, F(0));
        for (int64_t e = splits[r]; e < splits[r + 1]; ++e) {
            const int64_t f = entries.cell_of(e);
            const int32_t old = slot_of[f];
            const bool opens = old < 0;
            const int32_t s = opens ? (int32_t)n_slots : old;
            slot_of[f] = s;
            slot_row[s] = (int32_t)(r - r0);
            slot_cell[s] = (int32_t)f;
            cell_begin[f + 1] += opens;
            n_slots += opens;
            axpy<A>(ch, weight(r, e, f), src + entries.col(e) * ch, sums + s * ch);
        }
    }
    buf.n_slots = n_slots;
    buf.row_slot_begin[r1 - r0] = buf.n_slots;
    // Reset the slot table for the next block, and group slots by cell (stable counting sort).
    for (int64_t s = 0; s < buf.n_slots; ++s)
        buf.slot_of[buf.slot_row[s] * n_cells + buf.slot_cell[s]] = -1;
    for (int64_t f = 0; f < n_cells; ++f) buf.cell_begin[f + 1] += buf.cell_begin[f];
    buf.by_cell.resize(buf.n_slots);
    std::vector<int64_t>& cursor = buf.cell_begin;  // advanced while filling, then restored
    for (int64_t s = 0; s < buf.n_slots; ++s) buf.by_cell[cursor[buf.slot_cell[s]]++] = (int32_t)s;
    for (int64_t f = n_cells; f > 0; --f) cursor[f] = cursor[f - 1];
    cursor[0] = 0;
}

// out rows [r0, r1) (zeroed here) += slot sums times the cell matrices M_f (a x b, row-major), or
// times the cell vectors M_f (b = a) when depthwise.  Cells in ascending order: fixed order.
template <class F>
void apply_cells(int64_t r0, int64_t r1, const SlotBuffer<F>& buf, int64_t n_cells, const F* M,
                 int64_t a, int64_t b, bool depthwise, F* out) {
    std::fill(out + r0 * b, out + r1 * b, F(0));
    for (int64_t f = 0; f < n_cells; ++f) {
        const F* Mf = depthwise ? M + f * a : M + f * a * b;
        for (int64_t k = buf.cell_begin[f]; k < buf.cell_begin[f + 1]; ++k) {
            const int32_t s = buf.by_cell[k];
            const F* sum = &buf.sums[s * a];
            F* o = out + (r0 + buf.slot_row[s]) * b;
            if (depthwise) {
                for (int64_t c = 0; c < a; ++c) o[c] += sum[c] * Mf[c];
            } else {
                for (int64_t ci = 0; ci < a; ++ci) {
                    const F v = sum[ci];
                    const F* row = Mf + ci * b;
                    for (int64_t co = 0; co < b; ++co) o[co] += v * row[co];
                }
            }
        }
    }
}

// Small weights (they stay in L1/L2): rows one at a time, each row's slots in creation order,
// the output row accumulated in registers (B output channels fixed at compile time when small).
template <int B, class F>
void apply_rows(int64_t r0, int64_t r1, const SlotBuffer<F>& buf, const F* M, int64_t a,
                int64_t b_runtime, bool depthwise, F* out) {
    const int64_t b = B > 0 ? B : b_runtime;
    constexpr int kAcc = B > 0 ? B : 1;
    for (int64_t r = r0; r < r1; ++r) {
        F* o = out + r * b;
        F acc[kAcc];
        F* dst = B > 0 ? acc : o;
        for (int64_t c = 0; c < b; ++c) dst[c] = F(0);
        for (int64_t s = buf.row_slot_begin[r - r0]; s < buf.row_slot_begin[r - r0 + 1]; ++s) {
            const F* sum = &buf.sums[s * a];
            const int64_t f = buf.slot_cell[s];
            if (depthwise) {
                const F* Mf = M + f * a;
                for (int64_t c = 0; c < b; ++c) dst[c] += sum[c] * Mf[c];
            } else {
                const F* Mf = M + f * a * b;
                for (int64_t ci = 0; ci < a; ++ci) axpy<B>(b, sum[ci], Mf + ci * b, dst);
            }
        }
        if (B > 0)
            for (int64_t c = 0; c < b; ++c) o[c] = acc[c];
    }
}

constexpr int64_t kSmallWeightBytes = 256 * 1024;

// Rows [r0, r1) of a gather kernel: the weighted sums of src's rows per (row, cell) into buf's
// slots, then, when out is given, out's rows = the slots times the cell matrices M (a x b) —
// row by row with M held in cache when it is small, else cell by cell.
template <class F, class Entries, class Weight>
void gather_apply_rows(int64_t r0, int64_t r1, const int64_t* splits, const Entries& entries,
                       int64_t n_cells, const F* src, int64_t a, Weight weight, const F* M,
                       int64_t b, bool depthwise, F* out, SlotBuffer<F>& buf) {
    dispatch_channels(a, [&](auto A) {
        gather_slots<decltype(A)::value>(r0, r1, splits, entries, n_cells, src, a, weight, buf);
    });
    if (!out) return;
    if ((double)n_cells * a * (depthwise ? 1 : b) * sizeof(F) <= kSmallWeightBytes) {
        dispatch_channels(b, [&](auto B) {
            apply_rows<decltype(B)::value>(r0, r1, buf, M, a, b, depthwise, out);
        });
    } else {
        apply_cells(r0, r1, buf, n_cells, M, a, b, depthwise, out);
    }
}

// Rows of a gather kernel, in blocks of kRowBlock.  schedule(dynamic): rows differ in size.
template <class F, class Entries, class Weight>
void gather_apply(int64_t rows, const int64_t* splits, const Entries& entries, int64_t n_cells,
                  const F* src, int64_t a, Weight weight, const F* M, int64_t b, bool depthwise,
                  F* out, int threads) {
    const int64_t n_blocks = (rows + kRowBlock - 1) / kRowBlock;
    RegionErrors errors;
#pragma omp parallel num_threads(threads)
    {
        SlotBuffer<F> buf;
#pragma omp for schedule(dynamic, 4)
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            errors.run([&] {
                const int64_t r0 = blk * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
                gather_apply_rows(r0, r1, splits, entries, n_cells, src, a, weight, M, b,
                                  depthwise, out, buf);
            });
        }
    }
    errors.rethrow();
}

// 1 / k for the small counts that dominate (a lookup instead of a division per entry); larger
// counts are divided.  Both give the correctly rounded reciprocal.
template <class F>
struct Reciprocals {
    static constexpr int kSize = 1024;
    F table[kSize];
    Reciprocals() {
        table[0] = F(0);
        for (int k = 1; k < kSize; ++k) table[k] = F(1) / (F)k;
    }
    F operator()(int32_t k) const { return k < kSize ? table[k] : F(1) / (F)k; }
};

template <class F, class CellT>
struct RowMeanWeight {  // forward map: entry of row r in cell f weighs 1 / n_r(f)
    const int32_t* counts;
    int64_t n_cells;
    const Reciprocals<F>* inv;
    F operator()(int64_t r, int64_t, int64_t f) const { return (*inv)(counts[r * n_cells + f]); }
};

template <class F>
struct TransposedMeanWeight {  // transposed map: entry (row i, cell f) weighs 1 / n_i(f)
    const int32_t* counts;
    PackedEntries entries;
    int64_t n_cells;
    const Reciprocals<F>* inv;
    F operator()(int64_t, int64_t e, int64_t f) const {
        // The count packed with the entry, unless saturated (or not packed: mask 0).
        const int64_t mask = entries.count_mask();
        const int64_t packed = entries.keys[e] & mask;
        return (*inv)(packed != mask ? (int32_t)packed
                                     : counts[entries.col(e) * n_cells + f]);
    }
};

constexpr int kCountBits = 16;

// The transposed key of entry e of row i (see transpose_kernel_map).
template <class CellT>
inline int64_t transposed_key(const KernelMapView<CellT>& map, int64_t i, int64_t e, int bits,
                              int count_bits) {
    const int64_t f = (int64_t)map.cell[e];
    int64_t key = ((i << bits) | f) << count_bits;
    if (count_bits > 0) {
        const int64_t cap = (int64_t(1) << count_bits) - 1;
        key |= std::min<int64_t>(map.counts[i * map.n_cells() + f], cap);
    }
    return key;
}

// The stable counting sort of transpose_kernel_map, one cloud at a time: the rows of cloud b
// refer only to the points of cloud b, so those points' entries are exactly the cloud's entries,
// at the same place (from splits[first row of b]), and the count array is cloud-sized.  Returns
// false, with the output incomplete, if some row refers to a point outside its cloud.
template <class CellT>
bool transpose_by_cloud(const KernelMapView<CellT>& map, const Batch& points,
                        const Batch& queries, int bits, int count_bits, int64_t* tsplits,
                        int64_t* tkeys, int threads) {
    bool outside = false;
#pragma omp parallel num_threads(threads) reduction(|| : outside)
    {
        std::vector<int64_t> cursor;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < points.n_clouds; ++b) {
            const int64_t p0 = points.offsets[b], p1 = points.offsets[b + 1];
            const int64_t r0 = queries.offsets[b], r1 = queries.offsets[b + 1];
            const int64_t e0 = map.splits[r0], e1 = map.splits[r1];
            cursor.assign(p1 - p0, 0);
            bool inside = true;
            for (int64_t e = e0; e < e1 && inside; ++e) {
                const int64_t j = map.index[e];
                inside = j >= p0 && j < p1;
                if (inside) ++cursor[j - p0];
            }
            if (!inside) {
                outside = true;
                continue;
            }
            int64_t running = e0;
            for (int64_t j = p0; j < p1; ++j) {
                const int64_t k = cursor[j - p0];
                tsplits[j] = cursor[j - p0] = running;
                running += k;
            }
            for (int64_t i = r0; i < r1; ++i)
                for (int64_t e = map.splits[i]; e < map.splits[i + 1]; ++e)
                    tkeys[cursor[map.index[e] - p0]++] =
                        transposed_key(map, i, e, bits, count_bits);
        }
    }
    return !outside;
}

}  // namespace

template <class CellT>
void transpose_kernel_map(const KernelMapView<CellT>& map, const Batch& points,
                          const Batch& queries, int count_bits, int64_t* tsplits, int64_t* tkeys,
                          int threads) {
    check_map(map);
    const int64_t n = map.n, m = map.m;
    const int64_t n_entries = map.splits[m];
    const int bits = kernel_cell_bits(map.kernel_size);
    require(count_bits >= 0 && count_bits <= kCountBits, "count_bits must be in [0, 16]");
    require(m == 0 || ((m - 1) >> (62 - bits - count_bits)) == 0,
            "too many rows to pack with their cells");
    require(points.n_clouds == queries.n_clouds,
            "transpose_kernel_map: points and queries must have the same number of clouds");
    if (points.n_clouds > 0) {
        check_batch(points, n, "offsets");
        check_batch(queries, m, "query_offsets");
    }
    threads = resolve_threads(threads);
    if (points.n_clouds >= std::max(2, threads)) {
        const bool ok = transpose_by_cloud(map, points, queries, bits, count_bits, tsplits,
                                           tkeys, threads);
        require(ok, "kernel map refers to a point outside the query's cloud");
        tsplits[n] = n_entries;
        return;
    }
    for (int64_t e = 0; e < n_entries; ++e)
        require(map.index[e] >= 0 && map.index[e] < n, "kernel map index out of range");
    // A stable counting sort by point, parallel over chunks of rows: chunk c writes its entries
    // for point j after those of chunks < c, so the result is the unique stable order (rows
    // ascending within a point) whatever the number of chunks or threads.
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({threads, 8, m}));
    std::vector<int64_t> chunk_count(chunks * (n + 1), 0);  // per chunk: entries per point
    auto row_of_chunk = [&](int64_t c) { return m * c / chunks; };
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static, 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t* count = &chunk_count[c * (n + 1)];
            for (int64_t e = map.splits[row_of_chunk(c)]; e < map.splits[row_of_chunk(c + 1)]; ++e)
                ++count[map.index[e]];
        }
        // Offsets: tsplits[j] = entries of points < j; chunk c starts after chunks < c.
#pragma omp single
        {
            int64_t running = 0;
            for (int64_t j = 0; j < n; ++j) {
                tsplits[j] = running;
                for (int64_t c = 0; c < chunks; ++c) {
                    const int64_t k = chunk_count[c * (n + 1) + j];
                    chunk_count[c * (n + 1) + j] = running;
                    running += k;
                }
            }
            tsplits[n] = running;
        }
#pragma omp for schedule(static, 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t* cursor = &chunk_count[c * (n + 1)];
            for (int64_t i = row_of_chunk(c); i < row_of_chunk(c + 1); ++i)
                for (int64_t e = map.splits[i]; e < map.splits[i + 1]; ++e) {
                    // One scattered write per entry: the row, its cell and count packed together.
                    tkeys[cursor[map.index[e]]++] = transposed_key(map, i, e, bits, count_bits);
                }
        }
    }
}

int transposed_count_bits(int64_t m, int kernel_size) {
    const int bits = kernel_cell_bits(kernel_size);
    return m == 0 || ((m - 1) >> (62 - bits - kCountBits)) == 0 ? kCountBits : 0;
}

template <class F, class CellT>
void conv_forward(const KernelMapView<CellT>& map, const F* x, int64_t c_in, const F* weight,
                  int64_t c_out, bool depthwise, F* y, int threads) {
    check_map(map);
    require(!depthwise || c_in == c_out, "depthwise convolution keeps the channel count");
    const int64_t n_cells = map.n_cells();
    const Reciprocals<F> inv;
    gather_apply(map.m, map.splits, MapEntries<CellT>{map.index, map.cell}, n_cells, x, c_in,
                 RowMeanWeight<F, CellT>{map.counts, n_cells, &inv}, weight, c_out, depthwise, y,
                 resolve_threads(threads));
}

template <class F, class CellT>
void conv_backward(const KernelMapView<CellT>& map, const int64_t* tsplits, const int64_t* tkeys,
                   int count_bits, const F* x, int64_t c_in, const F* grad_y, int64_t c_out,
                   const F* weight, bool depthwise, F* grad_x, F* grad_weight, int threads) {
    check_map(map);
    require(!depthwise || c_in == c_out, "depthwise convolution keeps the channel count");
    require(tsplits[map.n] == map.splits[map.m], "transposed map does not match the kernel map");
    require(count_bits >= 0 && count_bits <= kCountBits, "count_bits must be in [0, 16]");
    threads = resolve_threads(threads);
    const int64_t n_cells = map.n_cells();
    const int64_t w_size = depthwise ? n_cells * c_in : n_cells * c_in * c_out;
    const F* weight_t = weight;  // W_f^T, so that the input gradient is a row update
    std::vector<F> transposed;
    if (!depthwise && grad_x) {
        transposed.resize(w_size);
        for (int64_t f = 0; f < n_cells; ++f)
            for (int64_t ci = 0; ci < c_in; ++ci)
                for (int64_t co = 0; co < c_out; ++co)
                    transposed[(f * c_out + co) * c_in + ci] = weight[(f * c_in + ci) * c_out + co];
        weight_t = transposed.data();
    }
    const int64_t n_blocks = (map.n + kWeightBlock - 1) / kWeightBlock;
    // A task sums the weight gradient of `group` consecutive blocks, in block order, into its
    // own partial sum; tasks are summed wave by wave, in task order.  Group and wave lengths
    // depend only on the sizes, never on the thread count: a fixed summation order.  Groups keep
    // the partial sums few (at least kMinTasks tasks when there are enough blocks).
    constexpr int64_t kMinTasks = 64;
    const int64_t group = std::max<int64_t>(1, n_blocks / kMinTasks);
    const int64_t n_tasks = (n_blocks + group - 1) / group;
    const int64_t wave = std::max<int64_t>(
        1, std::min<int64_t>(n_tasks, (int64_t)(kWaveBytes / (double)(w_size * sizeof(F)))));
    std::unique_ptr<F[]> partial(new F[wave * w_size]);  // each task zeroes its own
    std::fill(grad_weight, grad_weight + w_size, F(0));
    const Reciprocals<F> inv;
    const PackedEntries entries{tkeys, kernel_cell_bits(map.kernel_size), count_bits};
    const TransposedMeanWeight<F> mean{map.counts, entries, n_cells, &inv};
    RegionErrors errors;
    for (int64_t first = 0; first < n_tasks; first += wave) {
        const int64_t count = std::min(wave, n_tasks - first);
#pragma omp parallel num_threads(threads)
        {
            SlotBuffer<F> buf;
#pragma omp for schedule(dynamic, 1)
            for (int64_t k = 0; k < count; ++k) {
                F* dw = &partial[k * w_size];
                std::fill(dw, dw + w_size, F(0));
                const int64_t b1 = std::min(n_blocks, (first + k + 1) * group);
                for (int64_t blk = (first + k) * group; blk < b1; ++blk) errors.run([&] {
                    const int64_t r0 = blk * kWeightBlock;
                    const int64_t r1 = std::min(map.n, r0 + kWeightBlock);
                    // The input gradient's rows, and the slot sums S_jf for the weight's.
                    gather_apply_rows(r0, r1, tsplits, entries, n_cells, grad_y, c_out, mean,
                                      weight_t, c_in, depthwise, grad_x, buf);
                    dispatch_channels(c_out, [&](auto B) {
                        // Cell by cell, each cell's slots in creation order (point by point): a
                        // fixed order.  A row of dW_f is accumulated in registers over the cell's
                        // slots and stored once.
                        constexpr int kB = decltype(B)::value;
                        constexpr int kAcc = kB > 0 ? kB : 1;
                        for (int64_t f = 0; f < n_cells; ++f) {
                            const int64_t s0 = buf.cell_begin[f], s1 = buf.cell_begin[f + 1];
                            if (s0 == s1) continue;
                            if (depthwise) {
                                F* d = dw + f * c_in;
                                for (int64_t t = s0; t < s1; ++t) {
                                    const int32_t s = buf.by_cell[t];
                                    const F* sum = &buf.sums[s * c_out];
                                    const F* xj = x + (r0 + buf.slot_row[s]) * c_in;
                                    for (int64_t c = 0; c < c_in; ++c) d[c] += xj[c] * sum[c];
                                }
                                continue;
                            }
                            for (int64_t ci = 0; ci < c_in; ++ci) {
                                F* d = dw + (f * c_in + ci) * c_out;
                                F acc[kAcc];
                                F* dst = kB > 0 ? acc : d;
                                if (kB > 0)
                                    for (int c = 0; c < kB; ++c) acc[c] = d[c];
                                for (int64_t t = s0; t < s1; ++t) {
                                    const int32_t s = buf.by_cell[t];
                                    const F xv = x[(r0 + buf.slot_row[s]) * c_in + ci];
                                    axpy<kB>(c_out, xv, &buf.sums[s * c_out], dst);
                                }
                                if (kB > 0)
                                    for (int c = 0; c < kB; ++c) d[c] = acc[c];
                            }
                        }
                    });
                });
            }
            // Fixed-order reduction of this wave, parallel over the weight's elements.
#pragma omp for schedule(static)
            for (int64_t w = 0; w < w_size; ++w) {
                F acc = grad_weight[w];
                for (int64_t k = 0; k < count; ++k) acc += partial[k * w_size + w];
                grad_weight[w] = acc;
            }
        }
        errors.rethrow();
    }
}

#define PWCONV_INSTANTIATE_CONV(F, C)                                                              \
    template void conv_forward<F, C>(const KernelMapView<C>&, const F*, int64_t, const F*,        \
                                     int64_t, bool, F*, int);                                      \
    template void conv_backward<F, C>(const KernelMapView<C>&, const int64_t*, const int64_t*,    \
                                      int, const F*, int64_t, const F*, int64_t, const F*, bool,  \
                                      F*, F*, int);

#define PWCONV_INSTANTIATE_CELL(C)                                                                 \
    template void transpose_kernel_map<C>(const KernelMapView<C>&, const Batch&, const Batch&,     \
                                          int, int64_t*, int64_t*, int);                           \
    PWCONV_INSTANTIATE_CONV(float, C)                                                              \
    PWCONV_INSTANTIATE_CONV(double, C)

PWCONV_INSTANTIATE_CELL(uint8_t)
PWCONV_INSTANTIATE_CELL(int16_t)
PWCONV_INSTANTIATE_CELL(int32_t)

}  // namespace pwconv
