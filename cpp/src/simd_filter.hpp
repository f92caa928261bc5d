// Internal: the candidate filters of the kernel map's inner loops on compact clouds, in portable
// C++, AVX2 and AVX-512.
//
// A candidate coordinate x is binned through d = fl(x - lo), lo being the support's lower corner
// on that axis (SPEC §1's first operation), compared with the query-independent thresholds of
// kernel_axis_differences (binning.hpp): t = fl(d / v) >= c iff d >= D_c.  So no division and no
// per-query threshold search is needed, and the partition is exactly the rule's.
//
// The wheel stays portable (no -march flags): the AVX-512 and AVX2 twins carry their own target
// attributes and run only where the CPU reports AVX-512F (simd_enabled, common.hpp) or AVX2
// (avx2_enabled).  Both twins perform the
// same IEEE operations on the same float64 values and write the same keys in the same order, so
// results are identical whichever runs; the tests run each family (tests/checks.py simd_mode).
#ifndef PWCONV_SIMD_FILTER_HPP
#define PWCONV_SIMD_FILTER_HPP

#include <cstdint>

#include "pwconv/binning.hpp"
#include "pwconv/common.hpp"  // Loops

// PWCONV_NO_SIMD (a compile definition) builds the portable loops only, as on other platforms.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__CUDACC__) && \
    !defined(PWCONV_NO_SIMD)
#define PWCONV_X86_SIMD 1
#include <immintrin.h>
#endif

// Callers instantiate their loops once per family of Loops (common.hpp), each inside a function
// compiled for that family's instructions; the dispatchers below are forced inline so that the
// filters inline into those loops.
#if defined(__GNUC__)
#define PWCONV_FILTER_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define PWCONV_FILTER_INLINE __forceinline
#else
#define PWCONV_FILTER_INLINE inline
#endif

namespace pwconv {
namespace detail {

/// Keys may be written up to this many entries past the accepted ones (buffers reserve it).
constexpr int64_t kFilterSlack = 8;

/// One query's filter: the support's lower corner per axis and the thresholds D of its kernel
/// cells' starts and ends (kernel_axis_differences, the same on every axis).
template <int K>
struct KernelFilter {
    double lo[3];
    double start_d[K], end_d[K];
};

/// Dilation 1: the K cells tile the support, so one range covers them; each p in [b, e) inside
/// the support is appended as (order[p] << cell_bits) | f, its cell told apart per axis.
template <int K>
inline int64_t filter_support_scalar(const double* X, const double* Y, const double* Z,
                                     const int64_t* order, int64_t b, int64_t e,
                                     const KernelFilter<K>& kf, int cell_bits, int64_t* keys,
                                     int64_t n) {
    const double first = kf.start_d[0], last = kf.end_d[K - 1];
    for (int64_t p = b; p < e; ++p) {
        const double dx = X[p] - kf.lo[0], dy = Y[p] - kf.lo[1], dz = Z[p] - kf.lo[2];
        keys[n] = (order[p] << cell_bits) | support_cell(dx, dy, dz, kf.start_d, K);
        // written always, kept only when accepted: no branch
        n += support_contains(dx, dy, dz, first, last);
    }
    return n;
}

/// Dilated: the candidates of kernel row (ky, kz) in one grid row, from the first kernel column's
/// grid cells to the last one's (holes included), binned along x.  f_yz = (kz * K + ky) * K.
template <int K>
inline int64_t filter_row_scalar(const double* X, const double* Y, const double* Z,
                                 const int64_t* order, int64_t b, int64_t e,
                                 const KernelFilter<K>& kf, int ky, int kz, int cell_bits,
                                 int64_t* keys, int64_t n) {
    const double y0 = kf.start_d[ky], y1 = kf.end_d[ky], z0 = kf.start_d[kz], z1 = kf.end_d[kz];
    const int64_t f_yz = ((int64_t)kz * K + ky) * K;
    for (int64_t p = b; p < e; ++p) {
        const double dx = X[p] - kf.lo[0], dy = Y[p] - kf.lo[1], dz = Z[p] - kf.lo[2];
        const int kx = axis_cell_index(dx, kf.start_d, K);
        keys[n] = (order[p] << cell_bits) | (f_yz + kx);
        n += (dx >= kf.start_d[0]) & (dx < kf.end_d[kx]) & (dy >= y0) & (dy < y1) & (dz >= z0) &
             (dz < z1);
    }
    return n;
}

#ifdef PWCONV_X86_SIMD

// A function compiled for AVX-512F, called only where simd_enabled(); conv.cpp uses it too.
#define PWCONV_AVX512 __attribute__((target("avx512f"))) inline
// A function compiled for AVX2, called only where avx2_enabled() (conv.cpp).
#define PWCONV_AVX2 __attribute__((target("avx2"))) inline

// In [lo, hi): two independent compares (chains of masked compares are latency-bound).
PWCONV_AVX512 __mmask8 within_avx512(__m512d d, double lo, double hi) {
    return _mm512_cmp_pd_mask(d, _mm512_set1_pd(lo), _CMP_GE_OQ) &
           _mm512_cmp_pd_mask(d, _mm512_set1_pd(hi), _CMP_LT_OQ);
}

PWCONV_AVX512 __mmask8 live_lanes(int64_t p, int64_t e) {
    return e - p >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (e - p)) - 1);
}

// Appends the lanes of key selected by m at keys + n (8 lanes stored: kFilterSlack).
PWCONV_AVX512 int64_t append_avx512(__mmask8 m, __m512i key, int64_t* keys, int64_t n) {
    _mm512_storeu_si512((void*)(keys + n), _mm512_maskz_compress_epi64(m, key));
    return n + __builtin_popcount((unsigned)m);
}

template <int K>
PWCONV_AVX512 int64_t filter_support_avx512(const double* X, const double* Y, const double* Z,
                                            const int64_t* order, int64_t b, int64_t e,
                                            const KernelFilter<K>& kf, int cell_bits,
                                            int64_t* keys, int64_t n) {
    const double first = kf.start_d[0], last = kf.end_d[K - 1];
    const __m512d lo_x = _mm512_set1_pd(kf.lo[0]), lo_y = _mm512_set1_pd(kf.lo[1]),
                  lo_z = _mm512_set1_pd(kf.lo[2]);
    const __m512i step_x = _mm512_set1_epi64(1), step_y = _mm512_set1_epi64(K),
                  step_z = _mm512_set1_epi64(K * K);
    for (int64_t p = b; p < e; p += 8) {
        const __mmask8 live = live_lanes(p, e);
        const __m512d dx = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, X + p), lo_x);
        const __m512d dy = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, Y + p), lo_y);
        const __m512d dz = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, Z + p), lo_z);
        const __mmask8 m = live & within_avx512(dx, first, last) & within_avx512(dy, first, last) &
                           within_avx512(dz, first, last);
        __m512i f = _mm512_setzero_si512();
        for (int k = 1; k < K; ++k) {
            const __m512d start = _mm512_set1_pd(kf.start_d[k]);
            f = _mm512_mask_add_epi64(f, _mm512_cmp_pd_mask(dx, start, _CMP_GE_OQ), f, step_x);
            f = _mm512_mask_add_epi64(f, _mm512_cmp_pd_mask(dy, start, _CMP_GE_OQ), f, step_y);
            f = _mm512_mask_add_epi64(f, _mm512_cmp_pd_mask(dz, start, _CMP_GE_OQ), f, step_z);
        }
        const __m512i idx = _mm512_maskz_loadu_epi64(live, order + p);
        n = append_avx512(m, _mm512_or_si512(_mm512_slli_epi64(idx, cell_bits), f), keys, n);
    }
    return n;
}

template <int K>
PWCONV_AVX512 int64_t filter_row_avx512(const double* X, const double* Y, const double* Z,
                                        const int64_t* order, int64_t b, int64_t e,
                                        const KernelFilter<K>& kf, int ky, int kz, int cell_bits,
                                        int64_t* keys, int64_t n) {
    static_assert(K <= 8, "the kernel cells' ends are looked up in one 8-lane vector");
    const double y0 = kf.start_d[ky], y1 = kf.end_d[ky], z0 = kf.start_d[kz], z1 = kf.end_d[kz];
    const __m512d end_of = _mm512_maskz_loadu_pd((__mmask8)((1u << K) - 1), kf.end_d);
    const __m512d lo_x = _mm512_set1_pd(kf.lo[0]), lo_y = _mm512_set1_pd(kf.lo[1]),
                  lo_z = _mm512_set1_pd(kf.lo[2]), first = _mm512_set1_pd(kf.start_d[0]);
    const __m512i one = _mm512_set1_epi64(1),
                  f_yz = _mm512_set1_epi64(((int64_t)kz * K + ky) * K);
    for (int64_t p = b; p < e; p += 8) {
        const __mmask8 live = live_lanes(p, e);
        const __m512d dx = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, X + p), lo_x);
        const __m512d dy = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, Y + p), lo_y);
        const __m512d dz = _mm512_sub_pd(_mm512_maskz_loadu_pd(live, Z + p), lo_z);
        __m512i kx = _mm512_setzero_si512();
        for (int k = 1; k < K; ++k)
            kx = _mm512_mask_add_epi64(
                kx, _mm512_cmp_pd_mask(dx, _mm512_set1_pd(kf.start_d[k]), _CMP_GE_OQ), kx, one);
        const __mmask8 m = live & _mm512_cmp_pd_mask(dx, first, _CMP_GE_OQ) &
                           _mm512_cmp_pd_mask(dx, _mm512_permutexvar_pd(kx, end_of), _CMP_LT_OQ) &
                           within_avx512(dy, y0, y1) & within_avx512(dz, z0, z1);
        const __m512i idx = _mm512_maskz_loadu_epi64(live, order + p);
        const __m512i key = _mm512_or_si512(_mm512_slli_epi64(idx, cell_bits),
                                            _mm512_add_epi64(f_yz, kx));
        n = append_avx512(m, key, keys, n);
    }
    return n;
}

// --- AVX2 twins (4 lanes; the tail of a run goes through the scalar filters) ---------------

// Compaction of 4 64-bit lanes by a 4-bit mask: the 32-bit source lanes of each selected lane,
// packed to the front (AVX2 has no compress instruction).
alignas(32) inline constexpr int32_t kCompact4[16][8] = {
    {0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {2, 3, 0, 1, 4, 5, 6, 7},
    {0, 1, 2, 3, 4, 5, 6, 7}, {4, 5, 0, 1, 2, 3, 6, 7}, {0, 1, 4, 5, 2, 3, 6, 7},
    {2, 3, 4, 5, 0, 1, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {6, 7, 0, 1, 2, 3, 4, 5},
    {0, 1, 6, 7, 2, 3, 4, 5}, {2, 3, 6, 7, 0, 1, 4, 5}, {0, 1, 2, 3, 6, 7, 4, 5},
    {4, 5, 6, 7, 0, 1, 2, 3}, {0, 1, 4, 5, 6, 7, 2, 3}, {2, 3, 4, 5, 6, 7, 0, 1},
    {0, 1, 2, 3, 4, 5, 6, 7}};

// Appends the lanes of key selected by the 4-bit mask m at keys + n (4 lanes stored:
// kFilterSlack).
PWCONV_AVX2 int64_t append_avx2(int m, __m256i key, int64_t* keys, int64_t n) {
    const __m256i perm = _mm256_load_si256((const __m256i*)kCompact4[m]);
    _mm256_storeu_si256((__m256i*)(keys + n), _mm256_permutevar8x32_epi32(key, perm));
    return n + __builtin_popcount((unsigned)m);
}

// All-ones 64-bit lanes where lo <= d < hi.
PWCONV_AVX2 __m256d within_avx2(__m256d d, double lo, double hi) {
    return _mm256_and_pd(_mm256_cmp_pd(d, _mm256_set1_pd(lo), _CMP_GE_OQ),
                         _mm256_cmp_pd(d, _mm256_set1_pd(hi), _CMP_LT_OQ));
}

// step where the lane of mask is all ones, else 0.
PWCONV_AVX2 __m256i masked_step_avx2(__m256d mask, __m256i step) {
    return _mm256_and_si256(_mm256_castpd_si256(mask), step);
}

template <int K>
PWCONV_AVX2 int64_t filter_support_avx2(const double* X, const double* Y, const double* Z,
                                        const int64_t* order, int64_t b, int64_t e,
                                        const KernelFilter<K>& kf, int cell_bits, int64_t* keys,
                                        int64_t n) {
    const double first = kf.start_d[0], last = kf.end_d[K - 1];
    const __m256d lo_x = _mm256_set1_pd(kf.lo[0]), lo_y = _mm256_set1_pd(kf.lo[1]),
                  lo_z = _mm256_set1_pd(kf.lo[2]);
    const __m256i step_x = _mm256_set1_epi64x(1), step_y = _mm256_set1_epi64x(K),
                  step_z = _mm256_set1_epi64x(K * K);
    const __m128i shift = _mm_cvtsi32_si128(cell_bits);
    int64_t p = b;
    for (; p + 4 <= e; p += 4) {
        const __m256d dx = _mm256_sub_pd(_mm256_loadu_pd(X + p), lo_x);
        const __m256d dy = _mm256_sub_pd(_mm256_loadu_pd(Y + p), lo_y);
        const __m256d dz = _mm256_sub_pd(_mm256_loadu_pd(Z + p), lo_z);
        const int m = _mm256_movemask_pd(_mm256_and_pd(
            within_avx2(dx, first, last),
            _mm256_and_pd(within_avx2(dy, first, last), within_avx2(dz, first, last))));
        __m256i f = _mm256_setzero_si256();
        for (int k = 1; k < K; ++k) {
            const __m256d start = _mm256_set1_pd(kf.start_d[k]);
            f = _mm256_add_epi64(f, masked_step_avx2(_mm256_cmp_pd(dx, start, _CMP_GE_OQ), step_x));
            f = _mm256_add_epi64(f, masked_step_avx2(_mm256_cmp_pd(dy, start, _CMP_GE_OQ), step_y));
            f = _mm256_add_epi64(f, masked_step_avx2(_mm256_cmp_pd(dz, start, _CMP_GE_OQ), step_z));
        }
        const __m256i idx = _mm256_loadu_si256((const __m256i*)(order + p));
        n = append_avx2(m, _mm256_or_si256(_mm256_sll_epi64(idx, shift), f), keys, n);
    }
    return filter_support_scalar<K>(X, Y, Z, order, p, e, kf, cell_bits, keys, n);
}

template <int K>
PWCONV_AVX2 int64_t filter_row_avx2(const double* X, const double* Y, const double* Z,
                                    const int64_t* order, int64_t b, int64_t e,
                                    const KernelFilter<K>& kf, int ky, int kz, int cell_bits,
                                    int64_t* keys, int64_t n) {
    const double y0 = kf.start_d[ky], y1 = kf.end_d[ky], z0 = kf.start_d[kz], z1 = kf.end_d[kz];
    const __m256d lo_x = _mm256_set1_pd(kf.lo[0]), lo_y = _mm256_set1_pd(kf.lo[1]),
                  lo_z = _mm256_set1_pd(kf.lo[2]), first = _mm256_set1_pd(kf.start_d[0]);
    const __m256i one = _mm256_set1_epi64x(1),
                  f_yz = _mm256_set1_epi64x(((int64_t)kz * K + ky) * K);
    const __m128i shift = _mm_cvtsi32_si128(cell_bits);
    int64_t p = b;
    for (; p + 4 <= e; p += 4) {
        const __m256d dx = _mm256_sub_pd(_mm256_loadu_pd(X + p), lo_x);
        const __m256d dy = _mm256_sub_pd(_mm256_loadu_pd(Y + p), lo_y);
        const __m256d dz = _mm256_sub_pd(_mm256_loadu_pd(Z + p), lo_z);
        __m256i kx = _mm256_setzero_si256();
        for (int k = 1; k < K; ++k)
            kx = _mm256_add_epi64(
                kx, masked_step_avx2(_mm256_cmp_pd(dx, _mm256_set1_pd(kf.start_d[k]), _CMP_GE_OQ),
                                     one));
        const __m256d end_x = _mm256_i64gather_pd(kf.end_d, kx, 8);  // kx < K: in bounds
        const __m256d in_x = _mm256_and_pd(_mm256_cmp_pd(dx, first, _CMP_GE_OQ),
                                           _mm256_cmp_pd(dx, end_x, _CMP_LT_OQ));
        const int m = _mm256_movemask_pd(
            _mm256_and_pd(in_x, _mm256_and_pd(within_avx2(dy, y0, y1), within_avx2(dz, z0, z1))));
        const __m256i idx = _mm256_loadu_si256((const __m256i*)(order + p));
        const __m256i key =
            _mm256_or_si256(_mm256_sll_epi64(idx, shift), _mm256_add_epi64(f_yz, kx));
        n = append_avx2(m, key, keys, n);
    }
    return filter_row_scalar<K>(X, Y, Z, order, p, e, kf, ky, kz, cell_bits, keys, n);
}

/// One query's grid rows: per row, the table positions of its x-range's first and end cells, and
/// a tag (n entries, n <= kCapacity).
struct RowList {
    static constexpr int kCapacity = 128;
    int64_t first[kCapacity], end[kCapacity], tag[kCapacity];
    int n = 0;
};

// table[pos] of the live lanes, widened to 64 bits (0 in the others).
PWCONV_AVX512 __m512i gather_widened_avx512(const int32_t* table, __mmask8 live, __m512i pos) {
    return _mm512_cvtepi32_epi64(
        _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), live, pos, table, 4));
}

// The candidate ranges of the rows, found without a branch per row: table[first[i]] and
// table[end[i]] bound row i's x-range (cloud-local point positions); rows with no point in it
// are dropped.  Writes base + those bounds and the rows' tags, compacted; returns how many.
PWCONV_AVX512 int nonempty_ranges_avx512(const int32_t* table, const RowList& rows, int64_t base,
                                         int64_t* b_out, int64_t* e_out, int64_t* tag_out) {
    const __m512i base_v = _mm512_set1_epi64(base);
    int m = 0;
    for (int i = 0; i < rows.n; i += 8) {
        const __mmask8 live = live_lanes(i, rows.n);
        const __m512i fi = _mm512_maskz_loadu_epi64(live, rows.first + i);
        const __m512i ei = _mm512_maskz_loadu_epi64(live, rows.end + i);
        const __m512i b = gather_widened_avx512(table, live, fi);
        const __m512i e = gather_widened_avx512(table, live, ei);
        const __mmask8 keep = live & _mm512_cmpgt_epi64_mask(e, b);
        _mm512_mask_compressstoreu_epi64(b_out + m, keep, _mm512_add_epi64(b, base_v));
        _mm512_mask_compressstoreu_epi64(e_out + m, keep, _mm512_add_epi64(e, base_v));
        _mm512_mask_compressstoreu_epi64(tag_out + m, keep,
                                         _mm512_maskz_loadu_epi64(live, rows.tag + i));
        m += __builtin_popcount((unsigned)keep);
    }
    return m;
}

// AVX2 twin of nonempty_ranges_avx512: 4 rows at a time, the last rows one by one.
PWCONV_AVX2 int nonempty_ranges_avx2(const int32_t* table, const RowList& rows, int64_t base,
                                     int64_t* b_out, int64_t* e_out, int64_t* tag_out) {
    const __m256i base_v = _mm256_set1_epi64x(base);
    int m = 0, i = 0;
    for (; i + 4 <= rows.n; i += 4) {  // m + 4 <= i + 4 <= kCapacity: the stores stay inside
        const __m256i fi = _mm256_loadu_si256((const __m256i*)(rows.first + i));
        const __m256i ei = _mm256_loadu_si256((const __m256i*)(rows.end + i));
        const __m256i b = _mm256_cvtepi32_epi64(_mm256_i64gather_epi32(table, fi, 4));
        const __m256i e = _mm256_cvtepi32_epi64(_mm256_i64gather_epi32(table, ei, 4));
        const int keep = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(e, b)));
        const __m256i perm = _mm256_load_si256((const __m256i*)kCompact4[keep]);
        _mm256_storeu_si256((__m256i*)(b_out + m),
                            _mm256_permutevar8x32_epi32(_mm256_add_epi64(b, base_v), perm));
        _mm256_storeu_si256((__m256i*)(e_out + m),
                            _mm256_permutevar8x32_epi32(_mm256_add_epi64(e, base_v), perm));
        _mm256_storeu_si256(
            (__m256i*)(tag_out + m),
            _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(rows.tag + i)), perm));
        m += __builtin_popcount((unsigned)keep);
    }
    for (; i < rows.n; ++i) {
        const int64_t b = table[rows.first[i]], e = table[rows.end[i]];
        if (b < e) {
            b_out[m] = base + b;
            e_out[m] = base + e;
            tag_out[m++] = rows.tag[i];
        }
    }
    return m;
}

// Rank sort of a row of NV*16 or fewer distinct keys that fit in 31 bits (sort_unique_keys' fast
// case): each key's position is the number of smaller keys, counted 16 lanes at a time.
template <int NV>
PWCONV_AVX512 void rank_sort_avx512(int64_t* keys, int64_t n) {
    alignas(64) int32_t sorted[NV * 16];
    __m512i key[NV], rank[NV];
    __mmask16 live[NV];
    for (int c = 0; c < NV; ++c) {
        const int64_t left = n - 16 * c;  // > 0 for c < NV
        const __mmask8 lo = live_lanes(0, left), hi = live_lanes(8, left > 8 ? left : 8);
        const __m256i a = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(lo, keys + 16 * c));
        const __m256i b =
            _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(hi, keys + 16 * c + 8));
        key[c] = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        rank[c] = _mm512_setzero_si512();
        live[c] = (__mmask16)(lo | ((unsigned)hi << 8));
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t j = 0; j < n; ++j) {
        const __m512i kj = _mm512_set1_epi32((int32_t)keys[j]);
        for (int c = 0; c < NV; ++c)
            rank[c] = _mm512_mask_add_epi32(rank[c], _mm512_cmpgt_epi32_mask(key[c], kj), rank[c],
                                            one);
    }
    for (int c = 0; c < NV; ++c) _mm512_mask_i32scatter_epi32(sorted, live[c], rank[c], key[c], 4);
    for (int c = 0; c < NV; ++c) {
        const int64_t left = n - 16 * c;
        const __m512i s = _mm512_load_si512((const void*)(sorted + 16 * c));
        _mm512_mask_storeu_epi64(keys + 16 * c, live_lanes(0, left),
                                 _mm512_cvtepu32_epi64(_mm512_castsi512_si256(s)));
        if (left > 8)
            _mm512_mask_storeu_epi64(keys + 16 * c + 8, live_lanes(8, left),
                                     _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(s, 1)));
    }
}

/// sort_unique_keys for 2 <= n <= 64 keys that fit in 31 bits.
PWCONV_AVX512 void sort_short_row_avx512(int64_t* keys, int64_t n) {
    if (n <= 16) return rank_sort_avx512<1>(keys, n);
    if (n <= 32) return rank_sort_avx512<2>(keys, n);
    if (n <= 48) return rank_sort_avx512<3>(keys, n);
    return rank_sort_avx512<4>(keys, n);
}

// AVX2 twin of the rank sort: ranks counted 8 lanes at a time, the keys then placed by scalar
// stores (AVX2 has no scatter).
template <int NV>
PWCONV_AVX2 void rank_sort_avx2(int64_t* keys, int64_t n) {
    alignas(32) int32_t narrow[NV * 8] = {};
    alignas(32) int32_t rank[NV * 8];
    int32_t sorted[NV * 8];
    for (int64_t i = 0; i < n; ++i) narrow[i] = (int32_t)keys[i];
    __m256i key[NV], r[NV];
    for (int c = 0; c < NV; ++c) {
        key[c] = _mm256_load_si256((const __m256i*)(narrow + 8 * c));
        r[c] = _mm256_setzero_si256();
    }
    for (int64_t j = 0; j < n; ++j) {
        const __m256i kj = _mm256_set1_epi32(narrow[j]);
        for (int c = 0; c < NV; ++c)
            r[c] = _mm256_sub_epi32(r[c], _mm256_cmpgt_epi32(key[c], kj));  // true is -1
    }
    for (int c = 0; c < NV; ++c) _mm256_store_si256((__m256i*)(rank + 8 * c), r[c]);
    for (int64_t i = 0; i < n; ++i) sorted[rank[i]] = narrow[i];
    for (int64_t i = 0; i < n; ++i) keys[i] = sorted[i];
}

/// sort_unique_keys for 2 <= n <= 64 keys that fit in 31 bits, in AVX2.
PWCONV_AVX2 void sort_short_row_avx2(int64_t* keys, int64_t n) {
    if (n <= 16) return rank_sort_avx2<2>(keys, n);
    if (n <= 32) return rank_sort_avx2<4>(keys, n);
    return rank_sort_avx2<8>(keys, n);
}

#endif  // PWCONV_X86_SIMD

template <int K, Loops L>
PWCONV_FILTER_INLINE int64_t filter_support(const double* X, const double* Y, const double* Z,
                                            const int64_t* order, int64_t b, int64_t e,
                                            const KernelFilter<K>& kf, int cell_bits,
                                            int64_t* keys, int64_t n) {
#ifdef PWCONV_X86_SIMD
    if constexpr (L == Loops::avx512)
        return filter_support_avx512<K>(X, Y, Z, order, b, e, kf, cell_bits, keys, n);
    if constexpr (L == Loops::avx2)
        return filter_support_avx2<K>(X, Y, Z, order, b, e, kf, cell_bits, keys, n);
#endif
    return filter_support_scalar<K>(X, Y, Z, order, b, e, kf, cell_bits, keys, n);
}

template <int K, Loops L>
PWCONV_FILTER_INLINE int64_t filter_row(const double* X, const double* Y, const double* Z,
                                        const int64_t* order, int64_t b, int64_t e,
                                        const KernelFilter<K>& kf, int ky, int kz, int cell_bits,
                                        int64_t* keys, int64_t n) {
#ifdef PWCONV_X86_SIMD
    if constexpr (L == Loops::avx512 && K <= 8)
        return filter_row_avx512<K>(X, Y, Z, order, b, e, kf, ky, kz, cell_bits, keys, n);
    if constexpr (L == Loops::avx2)
        return filter_row_avx2<K>(X, Y, Z, order, b, e, kf, ky, kz, cell_bits, keys, n);
#endif
    return filter_row_scalar<K>(X, Y, Z, order, b, e, kf, ky, kz, cell_bits, keys, n);
}

}  // namespace detail
}  // namespace pwconv

#endif  // PWCONV_SIMD_FILTER_HPP
