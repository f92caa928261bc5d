// Shared host/device arithmetic of SPEC §1: support test, kernel cell, hole test, flat index.
//
// This header is included by the C++ core *and* compiled by NVRTC for the CUDA kernels, so it uses
// no standard headers and only plain arithmetic.  Every implementation (grid, kd-tree, CPU, GPU)
// classifies neighbours through these functions, which is what makes all of them produce the same
// kernel map bit for bit.  The arithmetic must not be contracted into fused multiply-adds: the C++
// build passes -ffp-contract=off and NVRTC is given --fmad=false.
//
// The rule (per axis a): lo = p_i[a] - h;  t = (x - lo) / v;  x is in the support iff
// 0 <= t <= span (span = s*(K-1)+1); its cell is c = min(span-1, floor(t)); holes are c % s != 0.
// t is a monotone non-decreasing function of x (a rounded subtraction, then a rounded division by
// v > 0), so every condition on t is a condition "x >= B" for an exact double threshold B (or,
// on the CPU's compact clouds, "x - lo >= D" for a threshold D of the kernel alone).  The kernels
// compute those thresholds (kernel_axis_differences, kernel_axis_bounds_from) and then classify
// candidates with comparisons only — the same partition of the doubles as evaluating the rule per
// candidate.
#ifndef PWCONV_BINNING_HPP
#define PWCONV_BINNING_HPP

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PWCONV_HD __host__ __device__ __forceinline__
#else
#define PWCONV_HD inline
#endif

namespace pwconv {

/// Number of unit cells spanned by the kernel support along one axis: s*(K-1)+1.
PWCONV_HD long long kernel_span(int kernel_size, int dilation) {
    return (long long)dilation * (long long)(kernel_size - 1) + 1;
}

/// Bits of the flat kernel cell index f < K^3 in the packed keys (point << bits | f).
PWCONV_HD int kernel_cell_bits(int kernel_size) {
    const long long n_cells = (long long)kernel_size * kernel_size * kernel_size;
    int bits = 0;
    while ((1LL << bits) < n_cells) ++bits;
    return bits;
}

/// Half-width h = (s*(K-1)+1) * v / 2 of the closed support cube, in coordinate units.
PWCONV_HD double kernel_half_width(double voxel_size, int kernel_size, int dilation) {
    return (double)kernel_span(kernel_size, dilation) * voxel_size / 2.0;
}

/// Per-axis lower corner of the support cube of a query at coordinate p: p - h (evaluated first).
PWCONV_HD double support_lower(double p, double half_width) { return p - half_width; }

// --- Doubles as ordered integers (for exact threshold search) --------------------------------

PWCONV_HD long long ordered_from_double(double x) {
    union {
        double d;
        long long i;
    } u;
    u.d = x;
    return u.i >= 0 ? u.i : -(u.i & 0x7fffffffffffffffLL);
}

PWCONV_HD double double_from_ordered(long long o) {
    union {
        double d;
        long long i;
    } u;
    u.i = o >= 0 ? o : ((-o) | (long long)0x8000000000000000ULL);
    return u.d;
}

/// Smallest double x (-inf..+inf) with pred(x) true, for a monotone pred (false ... true) that is
/// true at +inf and false at -inf; guess is a nearby starting point.  Exponential search from
/// the guess, then bisection over the ordered doubles: a handful of pred calls in practice.
template <class Pred>
PWCONV_HD double first_true(const Pred& pred, double guess) {
    const long long ord_max = 0x7ff0000000000000LL;  // +inf
    const long long ord_min = -ord_max;               // -inf
    long long o = ordered_from_double(guess);
    // Fast path: the answer is almost always the guess or a neighbour of it; the three predicate
    // evaluations are independent, so their divisions overlap.
    if (o > ord_min + 1 && o < ord_max - 1) {
        const bool below = pred(double_from_ordered(o - 1));
        const bool at = pred(double_from_ordered(o));
        const bool above = pred(double_from_ordered(o + 1));
        if (!below && at) return double_from_ordered(o);
        if (!at && above) return double_from_ordered(o + 1);
    }
    if (o < ord_min) o = ord_min;
    if (o > ord_max) o = ord_max;
    long long lo_o, hi_o;  // pred(lo_o) false, pred(hi_o) true
    long long step = 1;
    if (pred(double_from_ordered(o))) {
        hi_o = o;
        while (true) {
            lo_o = hi_o - step;
            if (lo_o <= ord_min) {
                lo_o = ord_min;
                break;
            }
            if (!pred(double_from_ordered(lo_o))) break;
            hi_o = lo_o;
            step *= 2;
        }
    } else {
        lo_o = o;
        while (true) {
            hi_o = lo_o + step;
            if (hi_o >= ord_max) {
                hi_o = ord_max;
                break;
            }
            if (pred(double_from_ordered(hi_o))) break;
            lo_o = hi_o;
            step *= 2;
        }
    }
    while (hi_o - lo_o > 1) {
        const long long mid = lo_o + (hi_o - lo_o) / 2;
        if (pred(double_from_ordered(mid)))
            hi_o = mid;
        else
            lo_o = mid;
    }
    return double_from_ordered(hi_o);
}

// The bounds of the kernel cells, in two stages.  t = fl(fl(x - lo) / v) is a non-decreasing
// function of the difference d = fl(x - lo), so "t >= c" holds iff d >= D_c, the smallest double
// with fl(D_c / v) >= c.  D_c depends on v, K and s only (found with divisions, once per kernel),
// and a query's threshold on x, the smallest x with fl(x - lo) >= D_c, is found with
// subtractions.  The CPU and the GPU compute the first stage once per map.

struct QuotientAtLeast {  // fl(d / v) >= c
    double v, c;
    PWCONV_HD bool operator()(double d) const { return d / v >= c; }
};

struct QuotientAbove {  // fl(d / v) > c
    double v, c;
    PWCONV_HD bool operator()(double d) const { return d / v > c; }
};

struct DifferenceAtLeast {  // fl(x - lo) >= d
    double lo, d;
    PWCONV_HD bool operator()(double x) const { return x - lo >= d; }
};

/// Query-independent stage: start_d[k], end_d[k] are the smallest differences x - lo that reach
/// kernel cell k's start and end (arrays of K doubles).
PWCONV_HD void kernel_axis_differences(double voxel_size, int kernel_size, int dilation,
                                       double* start_d, double* end_d) {
    const double span = (double)kernel_span(kernel_size, dilation);
    for (int k = 0; k < kernel_size; ++k) {
        const double c0 = (double)k * (double)dilation;  // first unit cell of kernel cell k
        start_d[k] = first_true(QuotientAtLeast{voxel_size, c0}, c0 * voxel_size);
        // the last cell absorbs the closed upper face: c = min(span - 1, floor(t))
        end_d[k] = k + 1 < kernel_size
                       ? first_true(QuotientAtLeast{voxel_size, c0 + 1.0}, (c0 + 1.0) * voxel_size)
                       : first_true(QuotientAbove{voxel_size, span}, span * voxel_size);
    }
}

/// Per-query stage: the exact per-axis bounds of the K kernel cells of a support starting at lo,
/// from kernel_axis_differences' output (see axis_kernel_index).
/// start and end may be start_d and end_d themselves (converted in place).
PWCONV_HD void kernel_axis_bounds_from(double lo, const double* start_d, const double* end_d,
                                       int kernel_size, int dilation, double* start, double* end) {
    for (int k = 0; k < kernel_size; ++k) {
        start[k] = k > 0 && dilation == 1
                       ? end[k - 1]  // the same threshold, t >= k
                       : first_true(DifferenceAtLeast{lo, start_d[k]}, lo + start_d[k]);
        end[k] = first_true(DifferenceAtLeast{lo, end_d[k]}, lo + end_d[k]);
    }
}

/// Along one axis, the kernel index of a difference d = fl(x - lo) from the support's lower
/// corner: the number of cell starts start_d[1..K) (kernel_axis_differences) at or below d.  Its
/// cell is then k = that index iff start_d[0] <= d < end_d[k] (dilation 1: end_d[k] is the next
/// start, so only the support's ends matter; dilated, d can also fall in a hole).
PWCONV_HD int axis_cell_index(double d, const double* start_d, int kernel_size) {
    int k = 0;
    for (int j = 1; j < kernel_size; ++j) k += d >= start_d[j];
    return k;
}

/// Dilation 1, where the K kernel cells tile the support [first, last) = [start_d[0],
/// end_d[K - 1]): whether a candidate's differences lie in it on all three axes (no branch).
PWCONV_HD bool support_contains(double dx, double dy, double dz, double first, double last) {
    return (dx >= first) & (dx < last) & (dy >= first) & (dy < last) & (dz >= first) &
           (dz < last);
}

/// Dilation 1: the flat kernel cell (kz*K + ky)*K + kx of a candidate inside the support.
PWCONV_HD int support_cell(double dx, double dy, double dz, const double* start_d,
                           int kernel_size) {
    const int kx = axis_cell_index(dx, start_d, kernel_size);
    const int ky = axis_cell_index(dy, start_d, kernel_size);
    const int kz = axis_cell_index(dz, start_d, kernel_size);
    return (kz * kernel_size + ky) * kernel_size + kx;
}

// --- Candidate bounds: filters only, the exact predicates above decide ------------------------

/// |x| (no math header: the CUDA kernels include this file under NVRTC).
PWCONV_HD double magnitude(double x) { return x < 0 ? -x : x; }

/// Widening of candidate bounds: 2^-48 of the magnitudes involved, far above the rounding error of
/// a predicate (a few ulps), far below any cell.
PWCONV_HD double bound_slack(double magnitudes) { return magnitudes * 3.552713678800501e-15; }

/// Bounds on x that hold every candidate with fl(x - lo) in [d_start, d_end): such an x lies
/// within a few ulps of [lo + d_start, lo + d_end).
PWCONV_HD double candidate_lower(double lo, double d_start) {
    return (lo + d_start) - bound_slack(magnitude(lo) + magnitude(d_start));
}
PWCONV_HD double candidate_upper(double lo, double d_end) {
    return (lo + d_end) + bound_slack(magnitude(lo) + magnitude(d_end));
}

/// The widening of the closed interval [q - r, q + r] of a radius search along one axis.
PWCONV_HD double radius_slack(double q, double radius) {
    return bound_slack(magnitude(q) + radius);
}

/// Closed Chebyshev-ball test |p - q|_inf <= r, with d = p - q per axis in float64.
PWCONV_HD bool within_chebyshev(double px, double py, double pz, double qx, double qy, double qz,
                                double radius) {
    const double dx = px - qx, dy = py - qy, dz = pz - qz;
    return dx <= radius && -dx <= radius && dy <= radius && -dy <= radius && dz <= radius &&
           -dz <= radius;
}

/// Closed Euclidean-ball test (dx*dx + dy*dy) + dz*dz <= r*r, left to right, no FMA.
PWCONV_HD bool within_euclidean(double px, double py, double pz, double qx, double qy, double qz,
                                double radius_sq) {
    const double dx = px - qx, dy = py - qy, dz = pz - qz;
    const double d_sq = dx * dx + dy * dy + dz * dz;
    return d_sq <= radius_sq;
}

}  // namespace pwconv

#endif  // PWCONV_BINNING_HPP
