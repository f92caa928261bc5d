#include "pwconv/common.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pwconv {

bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

int default_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int resolve_threads(int requested) { return requested > 0 ? requested : default_threads(); }

void check_batch(const Batch& batch, int64_t n, const char* name) {
    const std::string arg(name);
    require(batch.offsets != nullptr && batch.n_clouds >= 0, arg + " is missing");
    require(batch.offsets[0] == 0, arg + "[0] must be 0");
    for (int64_t b = 0; b < batch.n_clouds; ++b)
        require(batch.offsets[b] <= batch.offsets[b + 1], arg + " must be non-decreasing");
    require(batch.offsets[batch.n_clouds] == n, arg + "[-1] must equal the number of points");
}

}  // namespace pwconv
