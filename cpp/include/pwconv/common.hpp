// Common definitions of the pwconv C++ core: sizes, thread counts, precondition checks.
#ifndef PWCONV_COMMON_HPP
#define PWCONV_COMMON_HPP

#include <atomic>
#include <cstdint>
#include <exception>
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

/// Whether the CPU can run the AVX-512 twins of the kernel map's candidate filters and of the
/// operator's loops.
bool simd_available();
/// Whether the SIMD twins run (default: whenever available).  Results are identical either way;
/// turning them off (tests, comparisons) selects the portable loops.  Returns the previous setting.
bool set_simd_enabled(bool enabled);
/// Whether the AVX-512 twins run: SIMD enabled, AVX-512 allowed (set_avx512_allowed) and available.
bool simd_enabled();
/// With SIMD enabled, whether AVX-512 may be used (default true); false leaves the AVX2 twins of
/// the kernel map's filters and the operator's loops (what CPUs without AVX-512 run).  Returns the
/// previous setting.
bool set_avx512_allowed(bool allowed);
/// Whether the CPU has AVX2, and whether the AVX2 twins run (SIMD enabled, AVX2 available).
bool avx2_available();
bool avx2_enabled();

/// The family of SIMD loops a call runs (read once per call): every family gives the same bits.
enum class Loops { portable, avx2, avx512 };
inline Loops loops_in_use() {
    return simd_enabled() ? Loops::avx512 : avx2_enabled() ? Loops::avx2 : Loops::portable;
}

/// Throws std::invalid_argument unless offsets is a valid row-split array ending at n.
void check_batch(const Batch& batch, int64_t n, const char* name);

/// A 64-bit fingerprint of nbytes of data: every byte counts, and where it is.  The data is cut
/// into fixed chunks hashed in parallel and combined in order, so the value does not depend on
/// the thread count (it does on the byte order of the machine).  Not cryptographic: it tells
/// whether a batch of points is the one a kernel map was built for.
uint64_t fingerprint(const void* data, int64_t nbytes, int threads);

/// Throws std::invalid_argument with `what` when cond is false.  Takes a C string so that a
/// check inside a loop builds no message unless it fails.
inline void require(bool cond, const char* what) {
    if (!cond) throw std::invalid_argument(what);
}

// --- Cooperative interruption ---------------------------------------------------------------
// A long call can be stopped between blocks of work: once an interrupt is requested (by the SIGINT
// handler of SigintScope, or by request_interrupt), the parallel loops skip their remaining blocks
// and the call throws Interrupted.  Outputs of an interrupted call are incomplete.

/// Thrown by a call that stopped because an interrupt was requested.
struct Interrupted : std::runtime_error {
    Interrupted() : std::runtime_error(kMessage) {}
    static constexpr const char* kMessage = "pwconv: interrupted";
};

/// Whether an interrupt has been requested (and not cleared).
bool interrupt_requested();
/// Requests an interrupt (async-signal-safe).
void request_interrupt();
/// Clears a request.
void clear_interrupt();

/// Installs, for its lifetime, a SIGINT handler that requests an interrupt, and restores the
/// previous handler afterwards.  Meant for the thread that receives Ctrl-C (Python's main thread);
/// scopes must not be nested or overlap in time.
class SigintScope {
  public:
    SigintScope();
    ~SigintScope();
    SigintScope(const SigintScope&) = delete;
    SigintScope& operator=(const SigintScope&) = delete;

  private:
    void* previous_;  // the saved handler (platform-specific)
};

/// Keeps exceptions (std::bad_alloc from a buffer that grows, say) from escaping an OpenMP
/// region, which would terminate the process: run() records the first one and makes the other
/// iterations return at once; rethrow() after the region raises it in the calling thread.  An
/// interrupt request also makes run() skip its body, and rethrow() then throws Interrupted.
class RegionErrors {
  public:
    template <class Body>
    void run(Body&& body) noexcept {
        if (failed_.load(std::memory_order_relaxed) || interrupt_requested()) return;
        try {
            body();
        } catch (...) {
#pragma omp critical(pwconv_region_errors)
            {
                if (!error_) error_ = std::current_exception();
            }
            failed_.store(true, std::memory_order_relaxed);
        }
    }
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
        if (interrupt_requested()) throw Interrupted();
    }

  private:
    std::atomic<bool> failed_{false};
    std::exception_ptr error_;
};

}  // namespace pwconv

#endif  // PWCONV_COMMON_HPP
