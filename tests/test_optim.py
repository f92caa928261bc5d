"""Optimisers, schedules, clipping and state save/load of pwconv_cy.optim.

Reference formulas are written out by hand in float64 below; the comparisons with torch.optim
run only where torch is importable."""

import math

import numpy as np
import pytest

from pwconv_cy.optim import (
    SGD,
    Adam,
    AdamW,
    clip_by_global_norm,
    cosine_with_warmup,
    exponential_decay,
    state_from_arrays,
    state_to_arrays,
)


def make_problem(rng, dtype=np.float64):
    params = {
        "weight": rng.standard_normal((3, 4)).astype(dtype),
        "bias": rng.standard_normal(4).astype(dtype),
    }
    grads_seq = [
        {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()} for _ in range(5)
    ]
    return params, grads_seq


def run(opt, params, grads_seq):
    state = opt.init(params)
    for grads in grads_seq:
        params, state = opt.update(params, grads, state)
    return params, state


# ---------------------------------------------------------------------------- hand-written refs


def ref_sgd(p, gs, lr, momentum=0.0, nesterov=False, wd=0.0):
    b = np.zeros_like(p)
    for g in gs:
        g = g + wd * p
        b = momentum * b + g
        d = g + momentum * b if nesterov else (b if momentum else g)
        p = p - lr * d
    return p


def ref_adam(p, gs, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(gs, start=1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


# ---------------------------------------------------------------------------- SGD


def test_sgd_single_step_is_p_minus_lr_g():
    p = {"w": np.array([1.0, -2.0, 3.0])}
    g = {"w": np.array([0.5, 0.25, -1.0])}
    opt = SGD(0.1)
    new, state = opt.update(p, g, opt.init(p))
    np.testing.assert_allclose(new["w"], [0.95, -2.025, 3.1], rtol=0, atol=1e-15)
    assert state == {"step": 1}


def test_sgd_momentum_two_steps_closed_form():
    p = {"w": np.array([1.0])}
    g1, g2 = np.array([1.0]), np.array([2.0])
    opt = SGD(0.1, momentum=0.9)
    s = opt.init(p)
    p1, s = opt.update(p, {"w": g1}, s)
    p2, s = opt.update(p1, {"w": g2}, s)
    # b1 = 1, b2 = 0.9 * 1 + 2 = 2.9; p = 1 - 0.1 * 1 - 0.1 * 2.9
    np.testing.assert_allclose(p1["w"], [0.9])
    np.testing.assert_allclose(p2["w"], [1 - 0.1 - 0.29])
    np.testing.assert_allclose(s["momentum_buffer"]["w"], [2.9])
    assert s["step"] == 2


def test_sgd_nesterov_two_steps_closed_form():
    p = {"w": np.array([1.0])}
    opt = SGD(0.1, momentum=0.9, nesterov=True)
    s = opt.init(p)
    p1, s = opt.update(p, {"w": np.array([1.0])}, s)
    p2, s = opt.update(p1, {"w": np.array([2.0])}, s)
    # step 1: b = 1, d = 1 + 0.9 = 1.9; step 2: b = 2.9, d = 2 + 0.9 * 2.9 = 4.61
    np.testing.assert_allclose(p1["w"], [1 - 0.19])
    np.testing.assert_allclose(p2["w"], [1 - 0.19 - 0.461])


def test_sgd_weight_decay_adds_l2_to_gradient():
    p = {"w": np.array([2.0])}
    opt = SGD(0.1, weight_decay=0.5)
    new, _ = opt.update(p, {"w": np.array([1.0])}, opt.init(p))
    np.testing.assert_allclose(new["w"], [2.0 - 0.1 * (1.0 + 0.5 * 2.0)])


@pytest.mark.parametrize(
    "momentum,nesterov,wd",
    [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 1e-2), (0.5, True, 0.0)],
)
def test_sgd_multi_step_matches_reference(rng, momentum, nesterov, wd):
    params, gs = make_problem(rng)
    out, state = run(SGD(0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd), params, gs)
    for k in params:
        expected = ref_sgd(params[k], [g[k] for g in gs], 0.05, momentum, nesterov, wd)
        np.testing.assert_allclose(out[k], expected, rtol=1e-13, atol=1e-14)
    assert state["step"] == len(gs)


def test_update_does_not_modify_inputs(rng):
    params, gs = make_problem(rng)
    saved = {k: v.copy() for k, v in params.items()}
    opt = SGD(0.1, momentum=0.9)
    state = opt.init(params)
    p1, s1 = opt.update(params, gs[0], state)
    buf = {k: v.copy() for k, v in s1["momentum_buffer"].items()}
    opt.update(p1, gs[1], s1)
    for k in params:
        np.testing.assert_array_equal(params[k], saved[k])
        np.testing.assert_array_equal(s1["momentum_buffer"][k], buf[k])
        assert not np.any(state["momentum_buffer"][k])


@pytest.mark.parametrize("opt", [SGD(0.1, momentum=0.9), Adam(1e-2), AdamW(1e-2)])
def test_float32_params_stay_float32(rng, opt):
    params, gs = make_problem(rng, np.float32)
    out, state = run(opt, params, gs)
    assert all(v.dtype == np.float32 for v in out.values())
    for slot, values in state.items():
        if slot != "step":
            assert all(v.dtype == np.float32 for v in values.values())


# ---------------------------------------------------------------------------- Adam / AdamW


def test_adam_first_step_is_lr_times_sign_after_bias_correction():
    # m_hat = g and v_hat = g^2 after bias correction, so the first step is lr * g / (|g| + eps)
    p = {"w": np.array([1.0, 1.0, 1.0])}
    g = {"w": np.array([3.0, -0.01, 100.0])}
    opt = Adam(0.1, eps=1e-8)
    new, state = opt.update(p, g, opt.init(p))
    expected = 1.0 - 0.1 * g["w"] / (np.abs(g["w"]) + 1e-8)
    np.testing.assert_allclose(new["w"], expected, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg"]["w"], 0.1 * g["w"])
    np.testing.assert_allclose(state["exp_avg_sq"]["w"], 0.001 * g["w"] ** 2)


def test_adam_bias_correction_two_steps_closed_form():
    p = {"w": np.array([0.0])}
    opt = Adam(1.0, betas=(0.5, 0.75), eps=0.0 + 1e-300)
    s = opt.init(p)
    p1, s = opt.update(p, {"w": np.array([2.0])}, s)
    p2, s = opt.update(p1, {"w": np.array([4.0])}, s)
    # m2 = 0.5*(0.5*2) + 0.5*4 = 2.5, v2 = 0.75*(0.25*4) + 0.25*16 = 4.75
    m_hat = 2.5 / (1 - 0.25)
    v_hat = 4.75 / (1 - 0.5625)
    np.testing.assert_allclose(p2["w"], [-1.0 - m_hat / math.sqrt(v_hat)], rtol=1e-12)


@pytest.mark.parametrize("cls,decoupled", [(Adam, False), (AdamW, True)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_multi_step_matches_reference(rng, cls, decoupled, wd):
    params, gs = make_problem(rng)
    out, state = run(cls(3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), params, gs)
    for k in params:
        expected = ref_adam(params[k], [g[k] for g in gs], 3e-3, 0.8, 0.99, 1e-6, wd, decoupled)
        np.testing.assert_allclose(out[k], expected, rtol=1e-12, atol=1e-15)
    assert state["step"] == len(gs)


def test_adamw_decay_is_decoupled_from_the_moments():
    # With a zero gradient Adam's L2 term enters the moments; AdamW only shrinks the parameter.
    p = {"w": np.array([2.0])}
    g = {"w": np.array([0.0])}
    adamw = AdamW(0.1, weight_decay=0.5)
    new, state = adamw.update(p, g, adamw.init(p))
    np.testing.assert_allclose(new["w"], [2.0 * (1 - 0.1 * 0.5)])
    assert state["exp_avg"]["w"][0] == 0.0
    adam = Adam(0.1, weight_decay=0.5)
    new_l2, state_l2 = adam.update(p, g, adam.init(p))
    np.testing.assert_allclose(state_l2["exp_avg"]["w"], [0.1 * 0.5 * 2.0])
    np.testing.assert_allclose(new_l2["w"], [2.0 - 0.1], rtol=1e-7)


def test_adamw_default_weight_decay_is_0_01():
    assert AdamW(1e-3).weight_decay == 0.01
    assert Adam(1e-3).weight_decay == 0.0


def test_schedule_drives_the_learning_rate_per_step():
    lrs = [0.1, 0.2, 0.3]
    opt = SGD(lambda step: lrs[step])
    p = {"w": np.array([0.0])}
    s = opt.init(p)
    for _ in lrs:
        p, s = opt.update(p, {"w": np.array([1.0])}, s)
    np.testing.assert_allclose(p["w"], [-0.6])


def test_paper_recipe_sgd_momentum_with_staircase_decay():
    opt = SGD(exponential_decay(0.001, 0.96, 100_000), momentum=0.9)
    p = {"w": np.array([1.0])}
    s = opt.init(p)
    s["step"] = 100_000  # resume at the first decay boundary
    new, s = opt.update(p, {"w": np.array([1.0])}, s)
    np.testing.assert_allclose(new["w"], [1.0 - 0.001 * 0.96])
    assert s["step"] == 100_001


# ---------------------------------------------------------------------------- convergence


def test_sgd_momentum_converges_on_a_quadratic():
    a = np.array([1.0, 10.0, 0.5])
    target = np.array([3.0, -1.0, 2.0])
    opt = SGD(0.05, momentum=0.9)
    p = {"x": np.zeros(3)}
    s = opt.init(p)
    for _ in range(500):
        p, s = opt.update(p, {"x": a * (p["x"] - target)}, s)
    np.testing.assert_allclose(p["x"], target, atol=1e-6)


@pytest.mark.parametrize(
    "opt", [Adam(0.05), AdamW(0.05, weight_decay=0.0), SGD(0.05, momentum=0.9, nesterov=True)]
)
def test_converges_on_a_quadratic(opt):
    a = np.array([1.0, 4.0])
    target = np.array([-2.0, 1.0])
    p = {"x": np.zeros(2)}
    s = opt.init(p)
    for _ in range(2000):
        p, s = opt.update(p, {"x": a * (p["x"] - target)}, s)
    np.testing.assert_allclose(p["x"], target, atol=1e-4)


def rosenbrock_grad(x):
    a, b = x
    return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


def test_adam_reaches_rosenbrock_minimum():
    opt = Adam(0.01)
    p = {"x": np.array([-1.5, 2.0])}
    s = opt.init(p)
    for _ in range(5000):
        p, s = opt.update(p, {"x": rosenbrock_grad(p["x"])}, s)
    assert np.max(np.abs(p["x"] - 1.0)) < 1e-3, p["x"]


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("step,k", [(0, 0), (99_999, 0), (100_000, 1), (250_000, 2)])
def test_staircase_exponential_decay_is_paper_schedule(step, k):
    schedule = exponential_decay(0.001, 0.96, 100_000)
    assert schedule(step) == 0.001 * 0.96**k


def test_continuous_exponential_decay():
    schedule = exponential_decay(0.001, 0.96, 100_000, staircase=False)
    assert math.isclose(schedule(50_000), 0.001 * 0.96**0.5, rel_tol=1e-15)


def test_cosine_with_warmup_endpoints():
    schedule = cosine_with_warmup(0.1, total_steps=1000, warmup_steps=100, final_lr=0.001)
    assert schedule(0) == 0.0
    assert math.isclose(schedule(50), 0.05)
    assert math.isclose(schedule(100), 0.1)
    assert math.isclose(schedule(550), 0.001 + 0.5 * (0.1 - 0.001))
    assert math.isclose(schedule(1000), 0.001)
    assert math.isclose(schedule(5000), 0.001)
    values = [schedule(s) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_without_warmup_starts_at_lr():
    schedule = cosine_with_warmup(0.1, total_steps=10)
    assert schedule(0) == 0.1
    assert math.isclose(schedule(10), 0.0, abs_tol=1e-18)


# ---------------------------------------------------------------------------- clipping


def test_clip_below_threshold_returns_gradients_unchanged():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    clipped, norm = clip_by_global_norm(grads, 10.0)
    assert norm == 5.0
    for k, g in grads.items():
        np.testing.assert_array_equal(clipped[k], g)


def test_clip_above_threshold_scales_to_max_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]], dtype=np.float32)}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-7)
    assert clipped["b"].dtype == np.float32
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in clipped.values()))
    assert math.isclose(total, 1.0, rel_tol=1e-7)
    np.testing.assert_array_equal(grads["a"], [3.0, 0.0])


# ---------------------------------------------------------------------------- state save/load


@pytest.mark.parametrize(
    "opt", [SGD(0.1), SGD(0.1, momentum=0.9, nesterov=True), Adam(1e-2), AdamW(1e-2)]
)
def test_state_round_trip_through_npz_gives_identical_updates(rng, tmp_path, opt):
    params, gs = make_problem(rng, np.float32)
    params["layer/with/slash"] = rng.standard_normal(2).astype(np.float32)
    gs = [dict(g, **{"layer/with/slash": rng.standard_normal(2).astype(np.float32)}) for g in gs]
    state = opt.init(params)
    for g in gs[:3]:
        params, state = opt.update(params, g, state)
    path = tmp_path / "state.npz"
    np.savez(path, **state_to_arrays(state))
    with np.load(path, allow_pickle=False) as data:
        loaded = state_from_arrays(data)
    assert loaded["step"] == state["step"] == 3
    assert set(loaded) == set(state)
    for slot in state:
        if slot != "step":
            assert set(loaded[slot]) == set(state[slot])
            for k in state[slot]:
                assert loaded[slot][k].dtype == state[slot][k].dtype
                np.testing.assert_array_equal(loaded[slot][k], state[slot][k])
    p_a, s_a = params, state
    p_b, s_b = params, loaded
    for g in gs[3:]:
        p_a, s_a = opt.update(p_a, g, s_a)
        p_b, s_b = opt.update(p_b, g, s_b)
    for k in params:
        assert p_a[k].tobytes() == p_b[k].tobytes()


def test_state_round_trip_keeps_empty_slots():
    opt = SGD(0.1, momentum=0.9)
    state = opt.init({})
    loaded = state_from_arrays(state_to_arrays(state))
    assert loaded == {"step": 0, "momentum_buffer": {}}
    assert opt.update({}, {}, loaded) == ({}, {"step": 1, "momentum_buffer": {}})


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_bad_lr_raises(cls, lr):
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0, got"):
        cls(lr)


def test_lr_of_wrong_type_raises():
    with pytest.raises(TypeError, match=r"lr must be a real number or a schedule.*got str"):
        SGD("0.1")


def test_negative_lr_from_schedule_raises_at_update():
    opt = SGD(lambda step: -1.0)
    p = {"w": np.zeros(1)}
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0, got -1.0 from the schedule"):
        opt.update(p, {"w": np.zeros(1)}, opt.init(p))


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, float("nan")])
def test_momentum_outside_unit_interval_raises(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got"):
        SGD(0.1, momentum=momentum)


@pytest.mark.parametrize("betas,which", [((1.0, 0.999), 0), ((0.9, -0.1), 1), ((0.9, 1.0), 1)])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_betas_outside_unit_interval_raise(cls, betas, which):
    with pytest.raises(ValueError, match=rf"betas\[{which}\] must be in \[0, 1\), got"):
        cls(1e-3, betas=betas)


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("nan")])
def test_nonpositive_eps_raises(eps):
    with pytest.raises(ValueError, match=r"eps must be finite and > 0, got"):
        Adam(1e-3, eps=eps)


def test_nesterov_without_momentum_raises():
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0, got momentum=0.0"):
        SGD(0.1, nesterov=True)


def test_negative_weight_decay_raises():
    with pytest.raises(ValueError, match=r"weight_decay must be finite and >= 0, got -0.1"):
        SGD(0.1, weight_decay=-0.1)


def test_grads_with_different_keys_raise():
    opt = SGD(0.1)
    p = {"weight": np.zeros(2), "bias": np.zeros(1)}
    with pytest.raises(ValueError, match=r"grads must have the keys of params.*missing \['bias'\]"):
        opt.update(p, {"weight": np.zeros(2)}, opt.init(p))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        opt.update(
            p, {"weight": np.zeros(2), "bias": np.zeros(1), "extra": np.zeros(1)}, opt.init(p)
        )


def test_grads_with_different_shape_raise():
    opt = Adam(0.1)
    p = {"weight": np.zeros((2, 3))}
    with pytest.raises(
        ValueError,
        match=r"grads\['weight'\] must have the shape of params\['weight'\] "
        r"\(2, 3\), got \(3, 2\)",
    ):
        opt.update(p, {"weight": np.zeros((3, 2))}, opt.init(p))


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match=r"decay_steps must be > 0, got 0"):
        exponential_decay(0.001, 0.96, 0)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, total_steps=10\], got 11"):
        cosine_with_warmup(0.1, 10, warmup_steps=11)
    with pytest.raises(ValueError, match=r"max_norm must be finite and >= 0, got -1.0"):
        clip_by_global_norm({"a": np.zeros(1)}, -1.0)


# ---------------------------------------------------------------------------- torch.optim


def _torch_run(torch, make_opt, params, gs):
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = make_opt(list(tparams.values()))
    for g in gs:
        topt.zero_grad()
        for k, tp in tparams.items():
            tp.grad = torch.tensor(g[k])
        topt.step()
    return {k: tp.detach().numpy() for k, tp in tparams.items()}


@pytest.mark.parametrize(
    "momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 1e-2)]
)
def test_sgd_matches_torch(rng, momentum, nesterov, wd):
    torch = pytest.importorskip("torch")
    params, gs = make_problem(rng)
    ours, _ = run(SGD(0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd), params, gs)
    theirs = _torch_run(
        torch,
        lambda ps: torch.optim.SGD(
            ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd
        ),
        params,
        gs,
    )
    for k in params:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,wd", [("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.01), ("AdamW", 0.1)])
def test_adam_matches_torch(rng, name, wd):
    torch = pytest.importorskip("torch")
    params, gs = make_problem(rng)
    cls = {"Adam": Adam, "AdamW": AdamW}[name]
    ours, _ = run(cls(3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), params, gs)
    theirs = _torch_run(
        torch,
        lambda ps: getattr(torch.optim, name)(
            ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, foreach=False
        ),
        params,
        gs,
    )
    for k in params:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-14)


# --- the fused C++ update and inplace=True ----------------------------------------------------

FUSED_CASES = [
    lambda: SGD(0.1),
    lambda: SGD(0.05, momentum=0.9, weight_decay=0.01),
    lambda: SGD(0.05, momentum=0.9, nesterov=True),
    lambda: Adam(1e-3),
    lambda: Adam(cosine_with_warmup(1e-2, 10, 2), weight_decay=0.1),
    lambda: AdamW(1e-2, weight_decay=0.05),
]


def big_problem(rng, dtype, n=70_001):
    """Sizes above the fused kernel's OpenMP threshold, and a tiny one."""
    params = {"w": rng.standard_normal((n,)).astype(dtype),
              "b": rng.standard_normal((2, 3)).astype(dtype)}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
                 for _ in range(4)]
    return params, grads_seq


@pytest.mark.parametrize("make_opt", FUSED_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_update_is_bit_identical_to_the_array_expressions(rng, monkeypatch, make_opt,
                                                                dtype):
    import pwconv_cy.optim as optim_module

    params, grads_seq = big_problem(rng, dtype)
    calls = []
    for name in ("sgd_update_", "adam_update_"):  # count the core calls: the fused path is taken
        real = getattr(optim_module._core, name)
        monkeypatch.setattr(optim_module._core, name,
                            lambda *a, _real=real: (calls.append(1), _real(*a)))
    fused, fused_state = run(make_opt(), params, grads_seq)
    assert len(calls) == len(params) * len(grads_seq)
    with monkeypatch.context() as m:
        m.setattr(optim_module, "_fused_operands", lambda *a: None)
        expr, expr_state = run(make_opt(), params, grads_seq)
    for k in params:
        assert fused[k].dtype == dtype
        np.testing.assert_array_equal(fused[k], expr[k])
    for slot in set(fused_state) - {"step"}:
        for k in params:
            np.testing.assert_array_equal(fused_state[slot][k], expr_state[slot][k])


@pytest.mark.parametrize("make_opt", FUSED_CASES)
def test_fused_update_same_for_one_and_two_threads(rng, make_opt):
    from threadpoolctl import threadpool_limits

    params, grads_seq = big_problem(rng, np.float32, n=300_000)
    with threadpool_limits(1, user_api="openmp"):
        one, _ = run(make_opt(), params, grads_seq)
    with threadpool_limits(2, user_api="openmp"):
        two, _ = run(make_opt(), params, grads_seq)
    for k in params:
        np.testing.assert_array_equal(one[k], two[k])


@pytest.mark.parametrize("make_opt", FUSED_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_inplace_update_overwrites_the_given_arrays_with_the_functional_result(rng, make_opt,
                                                                               layout):
    params, grads_seq = big_problem(rng, np.float64, n=1000)
    if layout == "strided":  # a non-contiguous parameter takes the array-expression path
        params["b"] = np.asfortranarray(rng.standard_normal((3, 5)))
        for g in grads_seq:
            g["b"] = rng.standard_normal((3, 5))
    expected, expected_state = run(make_opt(), params, grads_seq)

    opt = make_opt()
    live = {k: v.copy(order="K") for k, v in params.items()}
    state = opt.init(live)
    slots = {s: dict(state[s]) for s in state if s != "step"}
    for grads in grads_seq:
        new, state = opt.update(live, grads, state, inplace=True)
        for k, array in live.items():
            assert new[k] is array
        for s in slots:
            for k in live:
                assert state[s][k] is slots[s][k]
    assert state["step"] == len(grads_seq)
    for k in params:
        np.testing.assert_array_equal(live[k], expected[k])
        for s in slots:
            np.testing.assert_array_equal(state[s][k], expected_state[s][k])


@pytest.mark.parametrize("opt", [SGD(0.1, momentum=0.5), Adam(1e-3)])
def test_inplace_update_refuses_read_only_parameters(rng, opt):
    params, grads_seq = make_problem(rng)
    state = opt.init(params)
    params["bias"].flags.writeable = False
    before = params["weight"].copy()
    with pytest.raises(ValueError, match=r"inplace=True needs writeable arrays.*params\['bias'\]"):
        opt.update(params, grads_seq[0], state, inplace=True)
    np.testing.assert_array_equal(params["weight"], before)  # nothing was written
    new, _ = opt.update(params, grads_seq[0], state)  # the functional form still works
    assert new["bias"] is not params["bias"]
    with pytest.raises(TypeError, match="inplace must be True or False, got 'yes'"):
        opt.update(params, grads_seq[0], state, inplace="yes")
    assert "inplace : bool, default False" in type(opt).update.__doc__


def test_fused_update_casts_gradients_to_the_parameter_dtype(rng):
    params, grads_seq = make_problem(rng, np.float32)
    grads64 = [{k: g.astype(np.float64) for k, g in gs.items()} for gs in grads_seq]
    a, _ = run(Adam(1e-2), params, grads_seq)
    b, _ = run(Adam(1e-2), params, [{k: g.astype(np.float32) for k, g in gs.items()}
                                    for gs in grads64])
    c, _ = run(Adam(1e-2), params, grads64)
    for k in params:
        assert c[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])
