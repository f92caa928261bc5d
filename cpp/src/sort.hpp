// Internal: stable ordering of points by grid cell (z slowest, then y, then x).
#ifndef PWCONV_SORT_HPP
#define PWCONV_SORT_HPP

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pwconv {

inline int bits_for(uint64_t max_value) {
    int bits = 0;
    while (bits < 64 && (max_value >> bits) != 0) ++bits;
    return bits;
}

/// LSD radix sort of (key, value) pairs, 11-bit digits, stable; only the passes that `key_bits`
/// needs.  keys/values are permuted in place; tmp buffers are resized as needed.
inline void radix_sort_pairs(std::vector<uint64_t>& keys, std::vector<int64_t>& values, int key_bits,
                             std::vector<uint64_t>& tmp_keys, std::vector<int64_t>& tmp_values) {
    constexpr int kDigitBits = 11;
    constexpr size_t kBuckets = size_t(1) << kDigitBits;
    const size_t n = keys.size();
    tmp_keys.resize(n);
    tmp_values.resize(n);
    std::vector<size_t> count(kBuckets);
    for (int shift = 0; shift < key_bits; shift += kDigitBits) {
        std::fill(count.begin(), count.end(), 0);
        for (size_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
        size_t sum = 0;
        for (size_t d = 0; d < kBuckets; ++d) {
            const size_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; ++i) {
            const size_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
            tmp_keys[dst] = keys[i];
            tmp_values[dst] = values[i];
        }
        keys.swap(tmp_keys);
        values.swap(tmp_values);
    }
}

/// Writes into order[0 .. end-begin) the indices begin..end-1 stably sorted by the non-negative
/// cell coordinates coords[3*i + (0,1,2)] = (cx, cy, cz), z the primary key.  Packs the three
/// coordinates into one 64-bit radix key when they fit, and falls back to a comparison sort on
/// the full 3 x 64-bit keys when they do not.
inline void sort_by_cell(const int64_t* coords, int64_t begin, int64_t end, int64_t* order) {
    const int64_t count = end - begin;
    uint64_t max_c[3] = {0, 0, 0};
    for (int64_t i = begin; i < end; ++i)
        for (int a = 0; a < 3; ++a) max_c[a] = std::max(max_c[a], (uint64_t)coords[3 * i + a]);
    const int bx = bits_for(max_c[0]), by = bits_for(max_c[1]), bz = bits_for(max_c[2]);
    if (bx + by + bz <= 64) {
        std::vector<uint64_t> keys(count), tmp_keys;
        std::vector<int64_t> values(count), tmp_values;
        for (int64_t i = 0; i < count; ++i) {
            const int64_t* c = &coords[3 * (begin + i)];
            uint64_t key = (uint64_t)c[0];
            if (by) key |= (uint64_t)c[1] << bx;
            if (bz) key |= (uint64_t)c[2] << (bx + by);
            keys[i] = key;
            values[i] = begin + i;
        }
        radix_sort_pairs(keys, values, bx + by + bz, tmp_keys, tmp_values);
        std::copy(values.begin(), values.end(), order);
    } else {
        for (int64_t i = 0; i < count; ++i) order[i] = begin + i;
        std::stable_sort(order, order + count, [coords](int64_t p, int64_t q) {
            const int64_t* a = &coords[3 * p];
            const int64_t* b = &coords[3 * q];
            if (a[2] != b[2]) return a[2] < b[2];
            if (a[1] != b[1]) return a[1] < b[1];
            return a[0] < b[0];
        });
    }
}

}  // namespace pwconv

#endif  // PWCONV_SORT_HPP

namespace pwconv {

/// Scratch of sort_unique_keys (one per thread).
struct RankScratch {
    std::vector<int32_t> keys, out;
};

/// Sorts n distinct keys ascending.  Short rows whose keys fit in 31 bits (`fit32`) are sorted by
/// rank (each key's position is the number of smaller keys): branch-free and vectorisable, 2-3x
/// faster than insertion sort on the 8-128 keys of a neighbour row, where comparison sorts
/// mispredict a branch per key.  Longer rows use insertion sort or std::sort.
inline void sort_unique_keys(int64_t* keys, int64_t n, bool fit32, RankScratch& s) {
    if (n <= 1) return;
    if (fit32 && n <= 128) {
        s.keys.resize(n);
        s.out.resize(n);
        int32_t* k32 = s.keys.data();
        int32_t* out = s.out.data();
        for (int64_t i = 0; i < n; ++i) k32[i] = (int32_t)keys[i];
        for (int64_t i = 0; i < n; ++i) {
            const int32_t v = k32[i];
            int32_t rank = 0;
            for (int64_t j = 0; j < n; ++j) rank += k32[j] < v;
            out[rank] = v;
        }
        for (int64_t i = 0; i < n; ++i) keys[i] = out[i];
    } else if (n <= 64) {
        for (int64_t a = 1; a < n; ++a) {
            const int64_t value = keys[a];
            int64_t b = a;
            while (b > 0 && value < keys[b - 1]) {
                keys[b] = keys[b - 1];
                --b;
            }
            keys[b] = value;
        }
    } else {
        std::sort(keys, keys + n);
    }
}

}  // namespace pwconv
