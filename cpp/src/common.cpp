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
    auto fail = [name](const char* what) {
        throw std::invalid_argument(std::string(name) + what);
    };
    if (batch.offsets == nullptr || batch.n_clouds < 0) fail(" is missing");
    if (batch.offsets[0] != 0) fail("[0] must be 0");
    for (int64_t b = 0; b < batch.n_clouds; ++b)
        if (batch.offsets[b] > batch.offsets[b + 1]) fail(" must be non-decreasing");
    if (batch.offsets[batch.n_clouds] != n) fail("[-1] must equal the number of points");
}

}  // namespace pwconv
