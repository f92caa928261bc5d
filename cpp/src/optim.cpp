// Fused optimiser updates; see optim.hpp for the arithmetic contract.
#include "pwconv/optim.hpp"

#include <cmath>

#include "pwconv/common.hpp"

namespace pwconv {

template <class F>
void sgd_update(F* param, const F* grad, F* momentum_buffer, int64_t n, const SgdStep& step,
                int threads) {
    require(n >= 0, "sgd_update: n must be >= 0");
    require(n == 0 || (param && grad), "sgd_update: param and grad must not be null");
    require(n == 0 || step.momentum == 0.0 || momentum_buffer,
            "sgd_update: momentum > 0 needs a momentum buffer");
    const F lr = static_cast<F>(step.lr);
    const F mu = static_cast<F>(step.momentum);
    const F wd = static_cast<F>(step.weight_decay);
    const bool decay = step.weight_decay != 0.0, use_momentum = step.momentum > 0.0;
    const bool nesterov = step.nesterov;
    const int nt = resolve_threads(threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        F g = grad[i];
        if (decay) g = g + wd * param[i];
        F d = g;
        if (use_momentum) {
            const F b = mu * momentum_buffer[i] + g;
            momentum_buffer[i] = b;
            d = nesterov ? g + mu * b : b;
        }
        param[i] = param[i] - lr * d;
    }
}

template <class F>
void adam_update(F* param, const F* grad, F* exp_avg, F* exp_avg_sq, int64_t n,
                 const AdamStep& step, int threads) {
    require(n >= 0, "adam_update: n must be >= 0");
    require(n == 0 || (param && grad && exp_avg && exp_avg_sq),
            "adam_update: arrays must not be null");
    const F beta1 = static_cast<F>(step.beta1), one_minus_beta1 = static_cast<F>(1.0 - step.beta1);
    const F beta2 = static_cast<F>(step.beta2), one_minus_beta2 = static_cast<F>(1.0 - step.beta2);
    const F bc2 = static_cast<F>(step.bias_correction2_sqrt);
    const F eps = static_cast<F>(step.eps);
    const F step_size = static_cast<F>(step.step_size);
    const F wd = static_cast<F>(step.weight_decay);
    const F decay_factor = static_cast<F>(step.decay_factor);
    const bool l2 = step.weight_decay != 0.0 && !step.decoupled;
    const bool decoupled = step.weight_decay != 0.0 && step.decoupled;
    const int nt = resolve_threads(threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        F p = param[i];
        F g = grad[i];
        if (decoupled) p = p * decay_factor;
        if (l2) g = g + wd * p;
        const F m = beta1 * exp_avg[i] + one_minus_beta1 * g;
        const F v = beta2 * exp_avg_sq[i] + one_minus_beta2 * (g * g);
        const F denom = std::sqrt(v) / bc2 + eps;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = p - step_size * (m / denom);
    }
}

template void sgd_update<float>(float*, const float*, float*, int64_t, const SgdStep&, int);
template void sgd_update<double>(double*, const double*, double*, int64_t, const SgdStep&, int);
template void adam_update<float>(float*, const float*, float*, float*, int64_t, const AdamStep&,
                                 int);
template void adam_update<double>(double*, const double*, double*, double*, int64_t,
                                  const AdamStep&, int);

}  // namespace pwconv
