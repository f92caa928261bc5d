#include "pwconv/common.hpp"

#include <csignal>

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

namespace {
std::atomic<int> g_interrupt{0};  // lock-free, hence usable from a signal handler
static_assert(std::atomic<int>::is_always_lock_free, "the interrupt flag must be lock-free");

extern "C" void pwconv_on_sigint(int) { g_interrupt.store(1, std::memory_order_relaxed); }
}  // namespace

bool interrupt_requested() { return g_interrupt.load(std::memory_order_relaxed) != 0; }
void request_interrupt() { g_interrupt.store(1, std::memory_order_relaxed); }
void clear_interrupt() { g_interrupt.store(0, std::memory_order_relaxed); }

#if defined(_WIN32)
SigintScope::SigintScope() {
    previous_ = reinterpret_cast<void*>(std::signal(SIGINT, pwconv_on_sigint));
}
SigintScope::~SigintScope() {
    std::signal(SIGINT, reinterpret_cast<void (*)(int)>(previous_));
}
#else
// sigaction keeps the previous handler's flags (CPython installs its own with SA_ONSTACK).
SigintScope::SigintScope() {
    auto* saved = new struct sigaction();
    struct sigaction action = {};
    action.sa_handler = pwconv_on_sigint;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, saved);
    previous_ = saved;
}
SigintScope::~SigintScope() {
    auto* saved = static_cast<struct sigaction*>(previous_);
    sigaction(SIGINT, saved, nullptr);
    delete saved;
}
#endif

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
