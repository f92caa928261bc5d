#include "pwconv/common.hpp"

#include <csignal>
#include <algorithm>
#include <cstring>
#include <vector>

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

namespace {
// The rounds of xxHash64 (a public-domain design): four independent lanes over 8-byte words.
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL, kP2 = 0xC2B2AE3D27D4EB4FULL,
                   kP3 = 0x165667B19E3779F9ULL, kP4 = 0x85EBCA77C2B2AE63ULL,
                   kP5 = 0x27D4EB2F165667C5ULL;
constexpr int64_t kFingerprintChunk = int64_t(1) << 18;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t load64(const unsigned char* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
}
inline uint64_t mix_round(uint64_t acc, uint64_t w) { return rotl(acc + w * kP2, 31) * kP1; }
inline uint64_t merge(uint64_t h, uint64_t v) { return (h ^ mix_round(0, v)) * kP1 + kP4; }
inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    return h ^ (h >> 32);
}

uint64_t chunk_fingerprint(const unsigned char* p, int64_t n, uint64_t seed) {
    uint64_t v[4] = {seed + kP1 + kP2, seed + kP2, seed, seed - kP1};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int lane = 0; lane < 4; ++lane) v[lane] = mix_round(v[lane], load64(p + i + 8 * lane));
    uint64_t h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
    for (int lane = 0; lane < 4; ++lane) h = merge(h, v[lane]);
    h += (uint64_t)n;
    for (; i + 8 <= n; i += 8) h = rotl(h ^ mix_round(0, load64(p + i)), 27) * kP1 + kP4;
    for (; i < n; ++i) h = rotl(h ^ (p[i] * kP5), 11) * kP1;
    return avalanche(h);
}
}  // namespace

uint64_t fingerprint(const void* data, int64_t nbytes, int threads) {
    require(nbytes >= 0 && (data != nullptr || nbytes == 0), "fingerprint: bad buffer");
    const auto* bytes = static_cast<const unsigned char*>(data);
    const int64_t n_chunks = (nbytes + kFingerprintChunk - 1) / kFingerprintChunk;
    std::vector<uint64_t> chunk(n_chunks);
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads)) if (n_chunks > 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t begin = c * kFingerprintChunk;
        chunk[c] = chunk_fingerprint(bytes + begin, std::min(kFingerprintChunk, nbytes - begin),
                                     (uint64_t)c);
    }
    uint64_t h = kP5 + (uint64_t)nbytes;
    for (int64_t c = 0; c < n_chunks; ++c) h = merge(h, chunk[c]);
    return avalanche(h);
}

}  // namespace pwconv
