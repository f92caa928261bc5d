// Forward and backward kernels of pointwise convolution; see conv.hpp for the scheme.
#include "pwconv/conv.hpp"
#include "pwconv/binning.hpp"
#include "simd_filter.hpp"  // PWCONV_X86_SIMD, PWCONV_AVX512

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

namespace pwconv {

namespace {

constexpr int64_t kRowBlock = 64;      // rows per task of the gather kernels
constexpr int64_t kWeightBlock = 256;  // rows per partial sum of the weight gradient
constexpr double kWaveBytes = 64.0 * 1024 * 1024;  // partial sums held at once (weight gradient)
// The backward by cloud (conv_backward_by_cloud): from this many clouds, each needing at most this
// much scratch (per thread).
constexpr int64_t kMinClouds = 16;
constexpr double kCloudScratchBytes = 32.0 * 1024 * 1024;

template <class CellT, class IndexT>
void check_map(const KernelMapView<CellT, IndexT>& map) {
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
    std::vector<int32_t> tally;  // (n_cells,) one row's entries per cell; zero between rows

    void reset(int64_t rows, int64_t n_cells) {
        if ((int64_t)slot_of.size() < rows * n_cells) slot_of.assign(rows * n_cells, -1);
        if ((int64_t)tally.size() < n_cells) tally.assign(n_cells, 0);
        cell_begin.assign(n_cells + 1, 0);
        row_slot_begin.resize(rows + 1);
        n_slots = 0;
    }

    // by_cell from slot_cell, with cell_begin[f + 1] holding the slots of cell f on entry: a
    // stable counting sort (by cell, then by slot); cell_begin becomes the offsets into by_cell.
    void group_by_cell(int64_t n_cells) {
        for (int64_t f = 0; f < n_cells; ++f) cell_begin[f + 1] += cell_begin[f];
        by_cell.resize(n_slots);
        std::vector<int64_t>& cursor = cell_begin;  // advanced while filling, then restored
        for (int64_t s = 0; s < n_slots; ++s) by_cell[cursor[slot_cell[s]]++] = (int32_t)s;
        for (int64_t f = n_cells; f > 0; --f) cursor[f] = cursor[f - 1];
        cursor[0] = 0;
    }
};

// Channel loops with the count fixed at compile time for the common small sizes (the paper's
// layers have 3 and 9 channels): fully unrolled, accumulators kept in registers.  C = 0: runtime.
template <int C, class F>
inline void axpy(int64_t ch, F alpha, const F* x, F* y) {
    if constexpr (C > 0) {
        // All loads before the stores: the compiler need not fear that y aliases x, and
        // vectorises (13% faster gathers than the scalar loop it emitted for y[c] += ...).
        F t[C];
        for (int c = 0; c < C; ++c) t[c] = y[c] + alpha * x[c];
        for (int c = 0; c < C; ++c) y[c] = t[c];
    } else {
        for (int64_t c = 0; c < ch; ++c) y[c] += alpha * x[c];
    }
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
template <class CellT, class IndexT>
struct MapEntries {
    const IndexT* index;
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
    int32_t* tally = buf.tally.data();
    int64_t n_slots = 0;
    for (int64_t r = r0; r < r1; ++r) {
        buf.row_slot_begin[r - r0] = n_slots;
        int32_t* slot_of = &buf.slot_of[(r - r0) * n_cells];
        std::fill(sums + n_slots * ch, sums + (n_slots + splits[r + 1] - splits[r]) * ch, F(0));
        if constexpr (Weight::kTally)
            for (int64_t e = splits[r]; e < splits[r + 1]; ++e) ++tally[entries.cell_of(e)];
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
            F w;
            if constexpr (Weight::kTally)
                w = weight(tally, f);
            else
                w = weight(r, e, f);
            axpy<A>(ch, w, src + entries.col(e) * ch, sums + s * ch);
        }
        if constexpr (Weight::kTally)
            for (int64_t e = splits[r]; e < splits[r + 1]; ++e) tally[entries.cell_of(e)] = 0;
    }
    buf.n_slots = n_slots;
    buf.row_slot_begin[r1 - r0] = buf.n_slots;
    // Reset the slot table for the next block, and group slots by cell.
    for (int64_t s = 0; s < buf.n_slots; ++s)
        buf.slot_of[buf.slot_row[s] * n_cells + buf.slot_cell[s]] = -1;
    buf.group_by_cell(n_cells);
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

#ifdef PWCONV_X86_SIMD
// Masks of the (up to) n_vec 16-float vectors covering `width` columns.
PWCONV_AVX512 void column_masks(int64_t width, int n_vec, __mmask16* mask) {
    for (int v = 0; v < n_vec; ++v) {
        const int64_t left = width - 16 * v;
        mask[v] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
}

// apply_rows for float and 16 outputs or more: a row's outputs in up to four vectors (chunks of
// 64 columns), its slots in creation order, each term a multiply then an add, as in the portable
// loop: bit-identical.
PWCONV_AVX512 void apply_rows_avx512(int64_t r0, int64_t r1, const SlotBuffer<float>& buf,
                                     const float* M, int64_t a, int64_t b, float* out) {
    for (int64_t c0 = 0; c0 < b; c0 += 64) {
        __mmask16 mask[4];
        column_masks(std::min<int64_t>(64, b - c0), 4, mask);
        for (int64_t r = r0; r < r1; ++r) {
            __m512 acc[4];
            for (int v = 0; v < 4; ++v) acc[v] = _mm512_setzero_ps();
            for (int64_t s = buf.row_slot_begin[r - r0]; s < buf.row_slot_begin[r - r0 + 1]; ++s) {
                const float* sum = &buf.sums[s * a];
                const float* Mf = M + buf.slot_cell[s] * a * b + c0;
                for (int64_t ci = 0; ci < a; ++ci) {
                    const __m512 v = _mm512_set1_ps(sum[ci]);
                    const float* w = Mf + ci * b;
                    for (int k = 0; k < 4; ++k)
                        if (mask[k])
                            acc[k] = _mm512_add_ps(
                                acc[k], _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask[k], w + 16 * k)));
                }
            }
            for (int k = 0; k < 4; ++k)
                if (mask[k]) _mm512_mask_storeu_ps(out + r * b + c0 + 16 * k, mask[k], acc[k]);
        }
    }
}

// apply_cells for float and 16 outputs or more: each cell's slots in tiles of eight output rows,
// the outputs in chunks of 32 columns, a row of W_f loaded once per tile.  Every output element
// still gets its terms cell by cell (ascending), then ci ascending, a multiply then an add, as in
// the portable loop: bit-identical.
PWCONV_AVX512 void apply_cells_avx512(int64_t r0, int64_t r1, const SlotBuffer<float>& buf,
                                      int64_t n_cells, const float* M, int64_t a, int64_t b,
                                      float* out) {
    constexpr int kTile = 8;
    std::fill(out + r0 * b, out + r1 * b, 0.0f);
    for (int64_t f = 0; f < n_cells; ++f) {
        const float* Mf = M + f * a * b;
        for (int64_t t0 = buf.cell_begin[f]; t0 < buf.cell_begin[f + 1]; t0 += kTile) {
            const int tile = (int)std::min<int64_t>(kTile, buf.cell_begin[f + 1] - t0);
            const float* sum[kTile];
            float* row[kTile];
            for (int k = 0; k < tile; ++k) {
                const int32_t s = buf.by_cell[t0 + k];
                sum[k] = &buf.sums[s * a];
                row[k] = out + (r0 + buf.slot_row[s]) * b;
            }
            for (int64_t c0 = 0; c0 < b; c0 += 32) {
                __mmask16 mask[2];
                column_masks(std::min<int64_t>(32, b - c0), 2, mask);
                __m512 acc[kTile][2];
                for (int k = 0; k < kTile; ++k)
                    if (k < tile)
                        for (int v = 0; v < 2; ++v)
                            acc[k][v] = _mm512_maskz_loadu_ps(mask[v], row[k] + c0 + 16 * v);
                for (int64_t ci = 0; ci < a; ++ci) {
                    const __m512 w0 = _mm512_maskz_loadu_ps(mask[0], Mf + ci * b + c0);
                    const __m512 w1 = _mm512_maskz_loadu_ps(mask[1], Mf + ci * b + c0 + 16);
                    for (int k = 0; k < kTile; ++k)
                        if (k < tile) {
                            const __m512 v = _mm512_set1_ps(sum[k][ci]);
                            acc[k][0] = _mm512_add_ps(acc[k][0], _mm512_mul_ps(v, w0));
                            acc[k][1] = _mm512_add_ps(acc[k][1], _mm512_mul_ps(v, w1));
                        }
                }
                for (int k = 0; k < kTile; ++k)
                    if (k < tile)
                        for (int v = 0; v < 2; ++v)
                            _mm512_mask_storeu_ps(row[k] + c0 + 16 * v, mask[v], acc[k][v]);
            }
        }
    }
}
// The AVX2 twins of the two loops above (CPUs without AVX-512): 8-float vectors, a row's outputs
// in chunks of 32 columns, tiles of four slots x 16 columns; the same operations in the same
// order, so the same bits.
PWCONV_AVX2 __m256i column_mask_avx2(int64_t left) {
    const int n = (int)std::max<int64_t>(0, std::min<int64_t>(8, left));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

PWCONV_AVX2 void apply_rows_avx2(int64_t r0, int64_t r1, const SlotBuffer<float>& buf,
                                 const float* M, int64_t a, int64_t b, float* out) {
    for (int64_t c0 = 0; c0 < b; c0 += 32) {
        __m256i mask[4];
        bool live[4];
        for (int k = 0; k < 4; ++k) {
            mask[k] = column_mask_avx2(b - c0 - 8 * k);
            live[k] = b - c0 - 8 * k > 0;
        }
        for (int64_t r = r0; r < r1; ++r) {
            __m256 acc[4];
            for (int k = 0; k < 4; ++k) acc[k] = _mm256_setzero_ps();
            for (int64_t s = buf.row_slot_begin[r - r0]; s < buf.row_slot_begin[r - r0 + 1]; ++s) {
                const float* sum = &buf.sums[s * a];
                const float* Mf = M + buf.slot_cell[s] * a * b + c0;
                for (int64_t ci = 0; ci < a; ++ci) {
                    const __m256 v = _mm256_set1_ps(sum[ci]);
                    const float* w = Mf + ci * b;
                    for (int k = 0; k < 4; ++k)
                        if (live[k])
                            acc[k] = _mm256_add_ps(
                                acc[k], _mm256_mul_ps(v, _mm256_maskload_ps(w + 8 * k, mask[k])));
                }
            }
            for (int k = 0; k < 4; ++k)
                if (live[k]) _mm256_maskstore_ps(out + r * b + c0 + 8 * k, mask[k], acc[k]);
        }
    }
}

PWCONV_AVX2 void apply_cells_avx2(int64_t r0, int64_t r1, const SlotBuffer<float>& buf,
                                  int64_t n_cells, const float* M, int64_t a, int64_t b,
                                  float* out) {
    constexpr int kTile = 4;
    std::fill(out + r0 * b, out + r1 * b, 0.0f);
    for (int64_t f = 0; f < n_cells; ++f) {
        const float* Mf = M + f * a * b;
        for (int64_t t0 = buf.cell_begin[f]; t0 < buf.cell_begin[f + 1]; t0 += kTile) {
            const int tile = (int)std::min<int64_t>(kTile, buf.cell_begin[f + 1] - t0);
            const float* sum[kTile];
            float* row[kTile];
            for (int k = 0; k < tile; ++k) {
                const int32_t s = buf.by_cell[t0 + k];
                sum[k] = &buf.sums[s * a];
                row[k] = out + (r0 + buf.slot_row[s]) * b;
            }
            for (int64_t c0 = 0; c0 < b; c0 += 16) {
                const __m256i m0 = column_mask_avx2(b - c0), m1 = column_mask_avx2(b - c0 - 8);
                __m256 acc[kTile][2];
                for (int k = 0; k < kTile; ++k)
                    if (k < tile) {
                        acc[k][0] = _mm256_maskload_ps(row[k] + c0, m0);
                        acc[k][1] = _mm256_maskload_ps(row[k] + c0 + 8, m1);
                    }
                for (int64_t ci = 0; ci < a; ++ci) {
                    const __m256 w0 = _mm256_maskload_ps(Mf + ci * b + c0, m0);
                    const __m256 w1 = _mm256_maskload_ps(Mf + ci * b + c0 + 8, m1);
                    for (int k = 0; k < kTile; ++k)
                        if (k < tile) {
                            const __m256 v = _mm256_set1_ps(sum[k][ci]);
                            acc[k][0] = _mm256_add_ps(acc[k][0], _mm256_mul_ps(v, w0));
                            acc[k][1] = _mm256_add_ps(acc[k][1], _mm256_mul_ps(v, w1));
                        }
                }
                for (int k = 0; k < kTile; ++k)
                    if (k < tile) {
                        _mm256_maskstore_ps(row[k] + c0, m0, acc[k][0]);
                        _mm256_maskstore_ps(row[k] + c0 + 8, m1, acc[k][1]);
                    }
            }
        }
    }
}
#endif  // PWCONV_X86_SIMD

// out rows [r0, r1) = buf's slots (rows r0.. of buf) times the cell matrices M (a x b): row by
// row with M held in cache when it is small, else cell by cell.
template <class F>
void apply_slots(int64_t r0, int64_t r1, const SlotBuffer<F>& buf, int64_t n_cells, const F* M,
                 int64_t a, int64_t b, bool depthwise, F* out) {
    const bool small = (double)n_cells * a * (depthwise ? 1 : b) * sizeof(F) <= kSmallWeightBytes;
#ifdef PWCONV_X86_SIMD
    // 16 outputs or more: the SIMD loops (fewer: the unrolled portable loops hold their own).
    const bool wide = b >= 16;
    if constexpr (std::is_same_v<F, float>) {
        const Loops loops = depthwise || !wide ? Loops::portable : loops_in_use();
        if (loops == Loops::avx512) {  // wide layers: AVX-512, same bits
            if (small)
                apply_rows_avx512(r0, r1, buf, M, a, b, out);
            else
                apply_cells_avx512(r0, r1, buf, n_cells, M, a, b, out);
            return;
        }
        if (loops == Loops::avx2) {  // or AVX2, same bits
            if (small)
                apply_rows_avx2(r0, r1, buf, M, a, b, out);
            else
                apply_cells_avx2(r0, r1, buf, n_cells, M, a, b, out);
            return;
        }
    }
#endif
    if (small) {
        // (16 outputs take the runtime loop: the 16-wide unrolled one was 1.4-1.7x slower)
        dispatch_channels(b == 16 ? 0 : b, [&](auto B) {
            apply_rows<decltype(B)::value>(r0, r1, buf, M, a, b, depthwise, out);
        });
    } else {
        apply_cells(r0, r1, buf, n_cells, M, a, b, depthwise, out);
    }
}

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
    if (out) apply_slots(r0, r1, buf, n_cells, M, a, b, depthwise, out);
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

// Forward map: an entry of row r in cell f weighs 1 / n_r(f), with n_r(f) tallied from the row's
// cells before its entries are summed (in L1; the map's counts are not read: a map may be made
// without them, and a row's cells cost less to read than its 27 counts).
template <class F>
struct RowMeanWeight {
    static constexpr bool kTally = true;
    const Reciprocals<F>* inv;
    F operator()(const int32_t* tally, int64_t f) const { return (*inv)(tally[f]); }
};

template <class F>
struct TransposedMeanWeight {  // transposed map: entry (row i, cell f) weighs 1 / n_i(f)
    static constexpr bool kTally = false;
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
template <class CellT, class IndexT>
inline int64_t transposed_key(const KernelMapView<CellT, IndexT>& map, int64_t i, int64_t e,
                              int bits, int count_bits) {
    const int64_t f = (int64_t)map.cell[e];
    int64_t key = ((i << bits) | f) << count_bits;
    if (count_bits > 0) {
        const int64_t cap = (int64_t(1) << count_bits) - 1;
        key |= std::min<int64_t>(map.counts[i * map.n_cells() + f], cap);
    }
    return key;
}

// The stable counting sort of one cloud: rows [r0, r1) refer only to points [p0, p1) (else false,
// with the output incomplete), so those points' entries are exactly the rows' entries, at the
// same place (from splits[r0]).  Writes tsplits[p0, p1) and those entries' keys.
template <class CellT, class IndexT>
bool transpose_cloud(const KernelMapView<CellT, IndexT>& map, int64_t p0, int64_t p1, int64_t r0,
                     int64_t r1, int bits, int count_bits, int64_t* tsplits, int64_t* tkeys,
                     std::vector<int64_t>& cursor) {
    const int64_t e0 = map.splits[r0], e1 = map.splits[r1];
    cursor.assign(p1 - p0, 0);
    bool inside = true;
    for (int64_t e = e0; e < e1 && inside; ++e) {
        const int64_t j = map.index[e];
        inside = j >= p0 && j < p1;
        if (inside) ++cursor[j - p0];
    }
    if (!inside) return false;
    int64_t running = e0;
    for (int64_t j = 0; j < p1 - p0; ++j) {
        const int64_t k = cursor[j];
        tsplits[p0 + j] = cursor[j] = running;
        running += k;
    }
    for (int64_t i = r0; i < r1; ++i)
        for (int64_t e = map.splits[i]; e < map.splits[i + 1]; ++e)
            tkeys[cursor[map.index[e] - p0]++] = transposed_key(map, i, e, bits, count_bits);
    return true;
}

// transpose_kernel_map one cloud at a time (in cache; the count array is cloud-sized).  Returns
// false if some row refers to a point outside its cloud.
template <class CellT, class IndexT>
bool transpose_by_cloud(const KernelMapView<CellT, IndexT>& map, const Batch& points,
                        const Batch& queries, int bits, int count_bits, int64_t* tsplits,
                        int64_t* tkeys, int threads) {
    bool outside = false;
#pragma omp parallel num_threads(threads) reduction(|| : outside)
    {
        std::vector<int64_t> cursor;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < points.n_clouds; ++b) {
            outside = outside ||
                      !transpose_cloud(map, points.offsets[b], points.offsets[b + 1],
                                       queries.offsets[b], queries.offsets[b + 1], bits,
                                       count_bits, tsplits, tkeys, cursor);
        }
    }
    return !outside;
}

}  // namespace

template <class CellT, class IndexT>
void transpose_kernel_map(const KernelMapView<CellT, IndexT>& map, const Batch& points,
                          const Batch& queries, int count_bits, int64_t* tsplits, int64_t* tkeys,
                          int threads) {
    check_map(map);
    const int64_t n = map.n, m = map.m;
    const int64_t n_entries = map.splits[m];
    const int bits = kernel_cell_bits(map.kernel_size);
    require(count_bits >= 0 && count_bits <= kCountBits, "count_bits must be in [0, 16]");
    require(map.counts != nullptr || map.splits[m] == 0, "transpose_kernel_map needs the counts");
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

template <class F, class CellT, class IndexT>
void conv_forward(const KernelMapView<CellT, IndexT>& map, const F* x, int64_t c_in,
                  const F* weight, int64_t c_out, bool depthwise, F* y, int threads) {
    check_map(map);
    require(!depthwise || c_in == c_out, "depthwise convolution keeps the channel count");
    const int64_t n_cells = map.n_cells();
    const Reciprocals<F> inv;
    gather_apply(map.m, map.splits, MapEntries<CellT, IndexT>{map.index, map.cell}, n_cells, x,
                 c_in, RowMeanWeight<F>{&inv}, weight, c_out, depthwise, y,
                 resolve_threads(threads));
}

namespace {

// What every block of a backward pass shares.
template <class F>
struct BackwardArgs {
    int64_t n_cells, c_in, c_out;
    const F* grad_y;
    const F* weight_t;  // W_f^T (c_out x c_in per cell), or the cell vectors when depthwise
    bool depthwise;
    const int32_t* counts;  // the map's
    const Reciprocals<F>* inv;
};

template <class F>
void weight_grad_from_slots(int64_t r0, const SlotBuffer<F>& buf, const BackwardArgs<F>& a,
                            const F* x, F* dw);

// Points [r0, r1) of a transposed map (tsplits over these points; keys of the query rows): their
// input-gradient rows into grad_x (when given) and their weight-gradient terms added to dw.
// x and grad_x are indexed like tsplits.
template <class F>
void backward_block(int64_t r0, int64_t r1, const int64_t* tsplits, const PackedEntries& entries,
                    const BackwardArgs<F>& a, const F* x, F* grad_x, F* dw, SlotBuffer<F>& buf) {
    const int64_t n_cells = a.n_cells, c_in = a.c_in, c_out = a.c_out;
    const TransposedMeanWeight<F> mean{a.counts, entries, n_cells, a.inv};
    // The input gradient's rows, and the slot sums S_jf for the weight's.
    gather_apply_rows(r0, r1, tsplits, entries, n_cells, a.grad_y, c_out, mean, a.weight_t, c_in,
                      a.depthwise, grad_x, buf);
    weight_grad_from_slots(r0, buf, a, x, dw);
}

#ifdef PWCONV_X86_SIMD
// Rows ci0 .. ci0 + Q - 1 of dW_f, columns co0 .. co0 + 15, over the slots [s0, s1) of cell f, as
// weight_grad_from_slots (float): each row one masked vector, the slots outer so that a slot's
// sums are loaded once.  Every element receives the same terms in the same order with the same operations
// (a multiply, then an add) as in the portable loop: bit-identical.  (float only: the float64
// kernels serve checks, not speed.)
template <int Q>
PWCONV_AVX512 void weight_grad_rows_avx512(int64_t r0, const SlotBuffer<float>& buf, int64_t s0,
                                           int64_t s1, int64_t c_in, int64_t c_out, int64_t ci0,
                                           int64_t co0, const float* x, float* d) {
    const int64_t width = std::min<int64_t>(16, c_out - co0);
    const __mmask16 m = (__mmask16)(width == 16 ? 0xFFFFu : (1u << width) - 1);
    d += co0;
    __m512 acc[Q];
    for (int q = 0; q < Q; ++q) acc[q] = _mm512_maskz_loadu_ps(m, d + q * c_out);
    for (int64_t t = s0; t < s1; ++t) {
        const int32_t s = buf.by_cell[t];
        const __m512 sum = _mm512_maskz_loadu_ps(m, &buf.sums[s * c_out + co0]);
        const float* xj = x + (r0 + buf.slot_row[s]) * c_in + ci0;
        for (int q = 0; q < Q; ++q)
            acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(_mm512_set1_ps(xj[q]), sum));
    }
    for (int q = 0; q < Q; ++q) _mm512_mask_storeu_ps(d + q * c_out, m, acc[q]);
}

// The blocks of the weight-gradient SIMD loops: for every cell with slots, dW_f's rows eight at a
// time (Q = min(8, rows left), a compile-time count) and its columns in strips of Width, calling
// rows(Q, s0, s1, ci, co, d) with d = dW_f's row ci.
template <int Width, class Rows>
void weight_grad_blocks(const SlotBuffer<float>& buf, int64_t n_cells, int64_t c_in,
                        int64_t c_out, float* dw, Rows&& rows) {
    for (int64_t f = 0; f < n_cells; ++f) {
        const int64_t s0 = buf.cell_begin[f], s1 = buf.cell_begin[f + 1];
        for (int64_t ci = 0; s0 < s1 && ci < c_in; ci += 8) {
            float* d = dw + (f * c_in + ci) * c_out;
            for (int64_t co = 0; co < c_out; co += Width) {
                using std::integral_constant;
                switch (std::min<int64_t>(8, c_in - ci)) {
                    case 8: rows(integral_constant<int, 8>(), s0, s1, ci, co, d); break;
                    case 7: rows(integral_constant<int, 7>(), s0, s1, ci, co, d); break;
                    case 6: rows(integral_constant<int, 6>(), s0, s1, ci, co, d); break;
                    case 5: rows(integral_constant<int, 5>(), s0, s1, ci, co, d); break;
                    case 4: rows(integral_constant<int, 4>(), s0, s1, ci, co, d); break;
                    case 3: rows(integral_constant<int, 3>(), s0, s1, ci, co, d); break;
                    case 2: rows(integral_constant<int, 2>(), s0, s1, ci, co, d); break;
                    default: rows(integral_constant<int, 1>(), s0, s1, ci, co, d);
                }
            }
        }
    }
}

void weight_grad_avx512(int64_t r0, const SlotBuffer<float>& buf, int64_t n_cells, int64_t c_in,
                        int64_t c_out, const float* x, float* dw) {
    weight_grad_blocks<16>(buf, n_cells, c_in, c_out, dw,
                           [&](auto Q, int64_t s0, int64_t s1, int64_t ci, int64_t co, float* d) {
                               weight_grad_rows_avx512<decltype(Q)::value>(r0, buf, s0, s1, c_in,
                                                                           c_out, ci, co, x, d);
                           });
}

// The AVX2 twin of weight_grad_rows_avx512: columns co0 .. co0 + 7.
template <int Q>
PWCONV_AVX2 void weight_grad_rows_avx2(int64_t r0, const SlotBuffer<float>& buf, int64_t s0,
                                       int64_t s1, int64_t c_in, int64_t c_out, int64_t ci0,
                                       int64_t co0, const float* x, float* d) {
    const __m256i m = column_mask_avx2(c_out - co0);
    d += co0;
    __m256 acc[Q];
    for (int q = 0; q < Q; ++q) acc[q] = _mm256_maskload_ps(d + q * c_out, m);
    for (int64_t t = s0; t < s1; ++t) {
        const int32_t s = buf.by_cell[t];
        const __m256 sum = _mm256_maskload_ps(&buf.sums[s * c_out + co0], m);
        const float* xj = x + (r0 + buf.slot_row[s]) * c_in + ci0;
        for (int q = 0; q < Q; ++q)
            acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(_mm256_set1_ps(xj[q]), sum));
    }
    for (int q = 0; q < Q; ++q) _mm256_maskstore_ps(d + q * c_out, m, acc[q]);
}

void weight_grad_avx2(int64_t r0, const SlotBuffer<float>& buf, int64_t n_cells, int64_t c_in,
                      int64_t c_out, const float* x, float* dw) {
    weight_grad_blocks<8>(buf, n_cells, c_in, c_out, dw,
                          [&](auto Q, int64_t s0, int64_t s1, int64_t ci, int64_t co, float* d) {
                              weight_grad_rows_avx2<decltype(Q)::value>(r0, buf, s0, s1, c_in,
                                                                        c_out, ci, co, x, d);
                          });
}
#endif  // PWCONV_X86_SIMD

// dW += the terms of buf's slots (rows r0.. of x: the slots' points).
template <class F>
void weight_grad_from_slots(int64_t r0, const SlotBuffer<F>& buf, const BackwardArgs<F>& a,
                            const F* x, F* dw) {
    const int64_t n_cells = a.n_cells, c_in = a.c_in, c_out = a.c_out;
#ifdef PWCONV_X86_SIMD
    if constexpr (std::is_same_v<F, float>) {
        const Loops loops = a.depthwise ? Loops::portable : loops_in_use();
        if (loops == Loops::avx512) return weight_grad_avx512(r0, buf, n_cells, c_in, c_out, x, dw);
        if (loops == Loops::avx2) return weight_grad_avx2(r0, buf, n_cells, c_in, c_out, x, dw);
    }
#endif
    dispatch_channels(c_out, [&](auto B) {
        // Cell by cell, each cell's slots in creation order (point by point): a fixed order.  A
        // row of dW_f is accumulated in registers over the cell's slots and stored once.
        constexpr int kB = decltype(B)::value;
        constexpr int kAcc = kB > 0 ? kB : 1;
        for (int64_t f = 0; f < n_cells; ++f) {
            const int64_t s0 = buf.cell_begin[f], s1 = buf.cell_begin[f + 1];
            if (s0 == s1) continue;
            if (a.depthwise) {
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
}

// Per-thread scratch of the backward's tasks.
template <class F>
struct BackwardScratch {
    SlotBuffer<F> slots;
    // conv_backward_by_cloud: one cloud's (point, cell) table, -1 between clouds, and its slots
    // in the order they open.
    std::vector<int32_t> slot_of, open_point, open_cell, tally;
    std::vector<F> open_sums;
    std::vector<int64_t> cursor;
};

// The slots of one cloud's points as the gather over the transposed map would leave them in
// `buf` (rows = the cloud's points p0..p1, local), from the rows [r0, r1) directly, without
// transposing the map: every entry (i, j, f) adds dy_i / n_i(f) to the slot of (j, f), rows
// ascending, so each slot receives the same terms in the same order as the gather's, and a
// point's slots open in the same order (of their first row).  The slots are then laid out point
// by point and grouped by cell as gather_slots does.  False if a row refers to a point outside
// [p0, p1) (buf is then incomplete; the scratch stays reusable).
template <int C, class F, class CellT, class IndexT>
bool scatter_cloud(const KernelMapView<CellT, IndexT>& map, int64_t p0, int64_t p1, int64_t r0,
                   int64_t r1, const F* grad_y, int64_t c_runtime, const Reciprocals<F>& inv,
                   BackwardScratch<F>& scratch) {
    const int64_t c = C > 0 ? C : c_runtime;
    const int64_t n_b = p1 - p0, n_cells = map.n_cells();
    const int64_t max_slots = map.splits[r1] - map.splits[r0];
    if ((int64_t)scratch.slot_of.size() < n_b * n_cells) scratch.slot_of.assign(n_b * n_cells, -1);
    if ((int64_t)scratch.tally.size() < n_cells) scratch.tally.assign(n_cells, 0);
    if ((int64_t)scratch.open_point.size() < max_slots) {
        scratch.open_point.resize(max_slots);
        scratch.open_cell.resize(max_slots);
    }
    if ((int64_t)scratch.open_sums.size() < (max_slots + 1) * c)
        scratch.open_sums.resize((max_slots + 1) * c);
    int32_t* slot_of = scratch.slot_of.data();
    int32_t* open_point = scratch.open_point.data();
    int32_t* open_cell = scratch.open_cell.data();
    int32_t* tally = scratch.tally.data();  // n_i(f) of the current row, as RowMeanWeight
    F* sums = scratch.open_sums.data();
    // Whether an entry opens a slot is data-dependent: taken without a branch, as in
    // gather_slots.  The next slot to open is kept zeroed.
    int64_t n_slots = 0;
    std::fill(sums, sums + c, F(0));
    bool inside = true;
    for (int64_t i = r0; i < r1 && inside; ++i) {
        const F* dy = grad_y + i * c;
        const int64_t e0 = map.splits[i], e1 = map.splits[i + 1];
        for (int64_t e = e0; e < e1; ++e) ++tally[(int64_t)map.cell[e]];
        for (int64_t e = e0; e < e1; ++e) {
            const int64_t j = map.index[e] - p0;
            if (j < 0 || j >= n_b) {
                inside = false;
                break;
            }
            const int64_t f = (int64_t)map.cell[e];
            const int32_t old = slot_of[j * n_cells + f];
            const bool opens = old < 0;
            const int32_t slot = opens ? (int32_t)n_slots : old;
            slot_of[j * n_cells + f] = slot;
            open_point[slot] = (int32_t)j;
            open_cell[slot] = (int32_t)f;
            n_slots += opens;
            std::fill(sums + n_slots * c, sums + (n_slots + 1) * c, F(0));
            axpy<C>(c, inv(tally[f]), dy, sums + slot * c);
        }
        for (int64_t e = e0; e < e1; ++e) tally[(int64_t)map.cell[e]] = 0;
    }
    for (int64_t slot = 0; slot < n_slots; ++slot)
        slot_of[open_point[slot] * n_cells + open_cell[slot]] = -1;
    if (!inside) return false;
    // Point by point (a stable counting sort of the slots by point).
    SlotBuffer<F>& buf = scratch.slots;
    std::vector<int64_t>& cursor = scratch.cursor;
    cursor.assign(n_b + 1, 0);
    for (int64_t slot = 0; slot < n_slots; ++slot) ++cursor[open_point[slot] + 1];
    for (int64_t j = 0; j < n_b; ++j) cursor[j + 1] += cursor[j];
    buf.row_slot_begin.assign(cursor.begin(), cursor.end());
    buf.slot_row.resize(n_slots);
    buf.slot_cell.resize(n_slots);
    buf.sums.resize(n_slots * c);
    buf.cell_begin.assign(n_cells + 1, 0);
    for (int64_t slot = 0; slot < n_slots; ++slot) {
        const int64_t t = cursor[open_point[slot]]++;
        buf.slot_row[t] = open_point[slot];
        buf.slot_cell[t] = open_cell[slot];
        ++buf.cell_begin[open_cell[slot] + 1];
        const F* from = sums + slot * c;
        F* to = &buf.sums[t * c];
        for (int64_t k = 0; k < c; ++k) to[k] = from[k];
    }
    buf.n_slots = n_slots;
    buf.group_by_cell(n_cells);  // point by point within a cell, as gather_slots leaves them
    return true;
}

// The weight gradient of n_tasks tasks: task(k, dw, scratch) adds its terms to dw (zeroed here)
// in a fixed order; the tasks' partial sums are added wave by wave, in task order.  Task and wave
// lengths depend only on the sizes, never on the thread count: a fixed summation order.
template <class F, class Task>
void reduce_tasks(int64_t n_tasks, int64_t w_size, int threads, F* grad_weight, Task&& task) {
    const int64_t wave = std::max<int64_t>(
        1, std::min<int64_t>(n_tasks, (int64_t)(kWaveBytes / (double)(w_size * sizeof(F)))));
    std::unique_ptr<F[]> partial(new F[wave * w_size]);  // each task zeroes its own
    std::fill(grad_weight, grad_weight + w_size, F(0));
    RegionErrors errors;
    for (int64_t first = 0; first < n_tasks; first += wave) {
        const int64_t count = std::min(wave, n_tasks - first);
#pragma omp parallel num_threads(threads)
        {
            BackwardScratch<F> scratch;
#pragma omp for schedule(dynamic, 1)
            for (int64_t k = 0; k < count; ++k) {
                F* dw = &partial[k * w_size];
                std::fill(dw, dw + w_size, F(0));
                errors.run([&] { task(first + k, dw, scratch); });
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

// What the tasks of one backward call share: the weights transposed for the input gradient's row
// updates (W_f^T, unless depthwise or unused), the reciprocals, the sizes.  Not copyable: args
// points into it.
template <class F>
struct BackwardCall {
    std::vector<F> weight_t;
    Reciprocals<F> inv;
    BackwardArgs<F> args;
    int64_t w_size;  // elements of the weight (gradient)

    template <class CellT, class IndexT>
    BackwardCall(const KernelMapView<CellT, IndexT>& map, int64_t c_in, int64_t c_out,
                 const F* grad_y, const F* weight, bool depthwise, bool with_grad_x) {
        const int64_t n_cells = map.n_cells();
        w_size = depthwise ? n_cells * c_in : n_cells * c_in * c_out;
        const F* w_t = weight;
        if (!depthwise && with_grad_x) {
            weight_t.resize(w_size);
            for (int64_t f = 0; f < n_cells; ++f)
                for (int64_t ci = 0; ci < c_in; ++ci)
                    for (int64_t co = 0; co < c_out; ++co)
                        weight_t[(f * c_out + co) * c_in + ci] =
                            weight[(f * c_in + ci) * c_out + co];
            w_t = weight_t.data();
        }
        args = BackwardArgs<F>{n_cells, c_in, c_out, grad_y, w_t, depthwise, map.counts, &inv};
    }
    BackwardCall(const BackwardCall&) = delete;
    BackwardCall& operator=(const BackwardCall&) = delete;
};

constexpr int64_t kMinTasks = 64;  // weight-gradient tasks, when there are enough blocks

// n_items (blocks or clouds) in tasks of `group` consecutive items: at least kMinTasks tasks when
// there are enough items, so that the partial sums stay few.
struct TaskGroups {
    int64_t group, n_tasks;
    explicit TaskGroups(int64_t n_items)
        : group(std::max<int64_t>(1, n_items / kMinTasks)),
          n_tasks((n_items + group - 1) / group) {}
};

// Whether conv_backward_by_cloud runs: enough clouds, none needing more than kCloudScratchBytes
// of scratch (its (point, cell) table and its slots).  Sizes only, never the thread count.
template <class F>
bool backward_by_cloud_applies(const int64_t* splits, const Batch& points, const Batch& queries,
                               int64_t n_cells, int64_t c_out) {
    if (points.n_clouds < kMinClouds || queries.n_clouds != points.n_clouds) return false;
    const double slot_bytes = 2.0 * (c_out * sizeof(F) + 2 * sizeof(int32_t));
    for (int64_t b = 0; b < queries.n_clouds; ++b) {
        const int64_t e0 = splits[queries.offsets[b]], e1 = splits[queries.offsets[b + 1]];
        const double entries = (double)(e1 - e0);
        const double table = (double)(points.offsets[b + 1] - points.offsets[b]) * n_cells * 4.0;
        if (entries * slot_bytes + table > kCloudScratchBytes) return false;
    }
    return true;
}

}  // namespace

template <class F, class CellT, class IndexT>
void conv_backward(const KernelMapView<CellT, IndexT>& map, const int64_t* tsplits,
                   const int64_t* tkeys, int count_bits, const F* x, int64_t c_in,
                   const F* grad_y, int64_t c_out, const F* weight, bool depthwise, F* grad_x,
                   F* grad_weight, int threads) {
    check_map(map);
    require(!depthwise || c_in == c_out, "depthwise convolution keeps the channel count");
    require(tsplits[map.n] == map.splits[map.m], "transposed map does not match the kernel map");
    require(count_bits >= 0 && count_bits <= kCountBits, "count_bits must be in [0, 16]");
    require(map.counts != nullptr || map.splits[map.m] == 0, "conv_backward needs the counts");
    const BackwardCall<F> call(map, c_in, c_out, grad_y, weight, depthwise, grad_x != nullptr);
    const PackedEntries entries{tkeys, kernel_cell_bits(map.kernel_size), count_bits};
    // A task covers consecutive blocks of points, in block order.
    const int64_t n_blocks = (map.n + kWeightBlock - 1) / kWeightBlock;
    const TaskGroups tasks(n_blocks);
    reduce_tasks(tasks.n_tasks, call.w_size, resolve_threads(threads), grad_weight,
                 [&](int64_t k, F* dw, BackwardScratch<F>& scratch) {
                     const int64_t b1 = std::min(n_blocks, (k + 1) * tasks.group);
                     for (int64_t blk = k * tasks.group; blk < b1; ++blk) {
                         const int64_t r0 = blk * kWeightBlock;
                         const int64_t r1 = std::min(map.n, r0 + kWeightBlock);
                         backward_block(r0, r1, tsplits, entries, call.args, x, grad_x, dw,
                                        scratch.slots);
                     }
                 });
}

template <class F, class CellT, class IndexT>
bool conv_backward_by_cloud(const KernelMapView<CellT, IndexT>& map, const Batch& points,
                            const Batch& queries, const F* x, int64_t c_in, const F* grad_y,
                            int64_t c_out, const F* weight, bool depthwise, F* grad_x,
                            F* grad_weight, int threads) {
    check_map(map);
    require(!depthwise || c_in == c_out, "depthwise convolution keeps the channel count");
    if (points.n_clouds > 0) {
        check_batch(points, map.n, "offsets");
        check_batch(queries, map.m, "query_offsets");
    }
    const int64_t n_cells = map.n_cells();
    if (!backward_by_cloud_applies<F>(map.splits, points, queries, n_cells, c_out)) return false;
    const BackwardCall<F> call(map, c_in, c_out, grad_y, weight, depthwise, grad_x != nullptr);
    // A task covers consecutive clouds, in cloud order.
    const int64_t n_clouds = points.n_clouds;
    const TaskGroups tasks(n_clouds);
    std::atomic<bool> outside{false};
    reduce_tasks(tasks.n_tasks, call.w_size, resolve_threads(threads), grad_weight,
                 [&](int64_t k, F* dw, BackwardScratch<F>& scratch) {
        const int64_t b1 = std::min(n_clouds, (k + 1) * tasks.group);
        for (int64_t b = k * tasks.group; b < b1; ++b) {
            const int64_t p0 = points.offsets[b], p1 = points.offsets[b + 1];
            bool inside = true;
            dispatch_channels(c_out, [&](auto C) {
                inside = scatter_cloud<decltype(C)::value>(map, p0, p1, queries.offsets[b],
                                                           queries.offsets[b + 1], grad_y, c_out,
                                                           call.inv, scratch);
            });
            if (!inside) {
                outside = true;
                return;
            }
            if (grad_x)
                apply_slots(0, p1 - p0, scratch.slots, n_cells, call.args.weight_t, c_out, c_in,
                            depthwise, grad_x + p0 * c_in);
            weight_grad_from_slots(0, scratch.slots, call.args, x + p0 * c_in, dw);
        }
    });
    require(!outside, "kernel map refers to a point outside the query's cloud");
    return true;
}

#define PWCONV_INSTANTIATE_CONV(F, C, I)                                                           \
    template void conv_forward<F, C, I>(const KernelMapView<C, I>&, const F*, int64_t, const F*,  \
                                        int64_t, bool, F*, int);                                   \
    template void conv_backward<F, C, I>(const KernelMapView<C, I>&, const int64_t*,              \
                                         const int64_t*, int, const F*, int64_t, const F*,         \
                                         int64_t, const F*, bool, F*, F*, int);                    \
    template bool conv_backward_by_cloud<F, C, I>(const KernelMapView<C, I>&, const Batch&,       \
                                                  const Batch&, const F*, int64_t, const F*,       \
                                                  int64_t, const F*, bool, F*, F*, int);

#define PWCONV_INSTANTIATE_MAP(C, I)                                                               \
    template void transpose_kernel_map<C, I>(const KernelMapView<C, I>&, const Batch&,             \
                                             const Batch&, int, int64_t*, int64_t*, int);          \
    PWCONV_INSTANTIATE_CONV(float, C, I)                                                           \
    PWCONV_INSTANTIATE_CONV(double, C, I)

// Cells of K^3 <= 256, <= 32767, more; point indices in 32 bits (maps of < 2^31 points) or 64.
PWCONV_INSTANTIATE_MAP(uint8_t, int32_t)
PWCONV_INSTANTIATE_MAP(int16_t, int32_t)
PWCONV_INSTANTIATE_MAP(int32_t, int32_t)
PWCONV_INSTANTIATE_MAP(uint8_t, int64_t)
PWCONV_INSTANTIATE_MAP(int16_t, int64_t)
PWCONV_INSTANTIATE_MAP(int32_t, int64_t)

}  // namespace pwconv
