// Common definitions of the pwconv C++ core: sizes, thread counts, precondition checks.
#ifndef PWCONV_COMMON_HPP
#define PWCONV_COMMON_HPP

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pwconv {

/// Packed batch of clouds: offsets[0] = 0 <= offsets[1] <= ... <= offsets[n_clouds] = n_points.
struct Batch {
    const int64_t* offsets = nullptr;  ///< (n_clouds + 1,) row splits, not owned
    int64_t n_clouds = 0;
};

/// Number of threads an OpenMP region should use: `requested` when > 0, else the OpenMP default
/// (omp_get_max_threads, which honours OMP_NUM_THREADS and omp_set_num_threads).
int resolve_threads(int requested);

/// True when the core was compiled with OpenMP.
bool openmp_enabled();

/// The OpenMP default thread count (1 without OpenMP).
int default_threads();

/// Throws std::invalid_argument unless offsets is a valid row-split array ending at n.
void check_batch(const Batch& batch, int64_t n, const char* name);

/// Throws std::invalid_argument with `what` when cond is false.  Takes a C string so that a
/// check inside a loop builds no message unless it fails.
inline void require(bool cond, const char* what) {
    if (!cond) throw std::invalid_argument(what);
}

}  // namespace pwconv

#endif  // PWCONV_COMMON_HPP
