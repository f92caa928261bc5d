"""The dense layers, activations, dropout, reshaping and loss of pwconv_cy.nn (the paper's
classifier head): gradients by central finite differences in float64, statistics of
alpha-dropout, the sort order of SortFlatten, the loss against a direct NumPy formula, and one
``pytest.raises(..., match=...)`` per error message."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pwconv_cy import nn

EPS = 1e-6


def numeric_grad(f, x, eps=EPS):
    """Central differences of the scalar f() w.r.t. every entry of x (modified in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def assert_close(a, b, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def check_layer_grads(layer, x, *, forward=None, rng):
    """Loss = sum(forward(x) * r); compare d_x and every parameter gradient with finite differences."""
    forward = forward or layer.forward
    r = rng.standard_normal(forward(x).shape)

    def loss():
        return float(np.sum(forward(x) * r))

    loss()
    d_x, grads = layer.backward(r)
    assert grads is layer.grads
    assert set(grads) == set(layer.params)
    assert_close(d_x, numeric_grad(loss, x))
    for name, p in layer.params.items():
        assert grads[name].shape == p.shape
        assert_close(grads[name], numeric_grad(loss, p))


# -- Linear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
def test_linear_gradients_match_finite_differences(bias, shape):
    rng = np.random.default_rng(0)
    layer = nn.Linear(4, 3, bias=bias, dtype=np.float64, rng=1)
    if bias:
        layer.params["bias"][:] = rng.standard_normal(3)
    x = rng.standard_normal(shape)
    check_layer_grads(layer, x, rng=rng)


def test_linear_init_is_glorot_uniform_with_zero_bias():
    layer = nn.Linear(300, 200, rng=0)
    w = layer.params["weight"]
    limit = math.sqrt(6 / 500)
    assert w.shape == (300, 200) and w.dtype == np.float32
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    assert abs(w.var() - limit**2 / 3) < 0.05 * limit**2 / 3
    assert np.array_equal(layer.params["bias"], np.zeros(200, np.float32))
    assert layer.n_params == 300 * 200 + 200
    assert np.array_equal(nn.Linear(300, 200, rng=0).params["weight"], w)
    assert "Linear(300 -> 200" in repr(layer)


def test_linear_grads_are_overwritten_not_accumulated():
    layer = nn.Linear(3, 2, dtype=np.float64, rng=0)
    x = np.ones((4, 3))
    layer.forward(x)
    layer.backward(np.ones((4, 2)))
    first = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(np.ones((4, 2)))
    for k, value in first.items():
        assert_close(layer.grads[k], value)


def test_linear_float32_forward_keeps_dtype():
    layer = nn.Linear(3, 2, rng=0)
    y = layer(np.ones((4, 3), np.float32))
    assert y.dtype == np.float32 and y.shape == (4, 2)


def test_linear_errors():
    layer = nn.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 3\)"):
        layer.forward(np.ones((4, 5), np.float32))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        nn.Linear(3, 2).backward(np.ones((4, 2)))
    layer.forward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have the output's shape"):
        layer.backward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="c_in must be a positive integer"):
        nn.Linear(0, 2)
    with pytest.raises(TypeError, match="bias must be True or False"):
        nn.Linear(3, 2, bias=1)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        nn.Linear(3, 2, dtype=np.int32)


# -- activations -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [nn.SELU, nn.ReLU])
def test_activation_gradients_match_finite_differences(cls):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_layer_grads(cls(), x, rng=rng)


def test_selu_values_match_the_formula():
    x = np.linspace(-5, 5, 101)
    y = nn.SELU().forward(x)
    a, s = 1.6732632423543772, 1.0507009873554805
    assert_close(y, np.where(x > 0, s * x, s * a * (np.exp(x) - 1)), rtol=1e-12, atol=1e-14)
    assert nn.SELU().forward(x.astype(np.float32)).dtype == np.float32


def test_relu_values():
    x = np.array([-2.0, 0.0, 3.0])
    assert np.array_equal(nn.ReLU().forward(x), [0.0, 0.0, 3.0])


# -- dropout -----------------------------------------------------------------------------------


def test_alpha_dropout_gradient_with_fixed_mask_matches_finite_differences():
    rng = np.random.default_rng(3)
    layer = nn.AlphaDropout(0.5, rng=0)
    x = rng.standard_normal((6, 7))
    mask = rng.random(x.shape) >= 0.5
    check_layer_grads(layer, x, forward=lambda x: layer.forward(x, mask=mask), rng=rng)
    assert np.array_equal(layer.mask, mask)


def test_alpha_dropout_uses_its_seeded_mask_in_backward():
    layer = nn.AlphaDropout(0.3, rng=5)
    x = np.random.default_rng(0).standard_normal((50, 40))
    y = layer.forward(x)
    keep = layer.mask
    assert 0.6 < keep.mean() < 0.8
    a = ((1 - 0.3) * (1 + 0.3 * layer.alpha_prime**2)) ** -0.5
    b = -a * layer.alpha_prime * 0.3
    assert_close(y, np.where(keep, a * x + b, a * layer.alpha_prime + b), rtol=1e-12)
    d_x, _ = layer.backward(np.ones_like(x))
    assert_close(d_x, np.where(keep, a, 0.0))
    y2 = nn.AlphaDropout(0.3, rng=5).forward(x)
    assert np.array_equal(y, y2)  # same seed, same mask


def test_alpha_dropout_preserves_zero_mean_and_unit_variance():
    x = np.random.default_rng(7).standard_normal(1_000_000)
    y = nn.AlphaDropout(0.5, rng=1).forward(x)
    assert abs(y.mean()) < 0.01
    assert abs(y.var() - 1.0) < 0.01


def test_alpha_dropout_and_dropout_are_identity_in_eval_mode():
    x = np.random.default_rng(0).standard_normal((4, 5))
    for cls in (nn.AlphaDropout, nn.Dropout):
        layer = cls(0.5, rng=0).eval()
        assert not layer.training
        assert np.array_equal(layer.forward(x), x)
        d_x, grads = layer.backward(np.full_like(x, 2.0))
        assert np.array_equal(d_x, np.full_like(x, 2.0)) and grads == {}
        assert layer.train() is layer and layer.training


def test_dropout_gradient_and_inverted_scaling():
    rng = np.random.default_rng(4)
    layer = nn.Dropout(0.25, rng=0)
    x = rng.standard_normal((5, 6))
    mask = rng.random(x.shape) >= 0.25
    check_layer_grads(layer, x, forward=lambda x: layer.forward(x, mask=mask), rng=rng)
    assert_close(layer.forward(x, mask=mask), np.where(mask, x / 0.75, 0.0))
    big = np.ones(1_000_000)
    assert abs(nn.Dropout(0.25, rng=1).forward(big).mean() - 1.0) < 0.01


def test_dropout_errors():
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
        nn.AlphaDropout(1.0)
    with pytest.raises(TypeError, match="rate must be a number"):
        nn.Dropout("0.5")
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        nn.Dropout(0.5).forward(np.ones((2, 3)), mask=np.ones((3, 2), bool))


# -- Concat ------------------------------------------------------------------------------------


def test_concat_forward_and_backward_split():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((2, 3, c)) for c in (9, 9, 9, 9)]
    layer = nn.Concat()
    y = layer.forward(xs)
    assert y.shape == (2, 3, 36) and layer.n_params == 0
    assert np.array_equal(y, np.concatenate(xs, axis=-1))
    g = rng.standard_normal(y.shape)
    dxs, grads = layer.backward(g)
    assert grads == {} and len(dxs) == 4
    for k, d in enumerate(dxs):
        assert np.array_equal(d, g[..., 9 * k : 9 * (k + 1)])


def test_concat_gradient_matches_finite_differences_on_axis_0():
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((2, 3)), rng.standard_normal((4, 3))]
    layer = nn.Concat(axis=0)
    r = rng.standard_normal((6, 3))

    def loss():
        return float(np.sum(layer.forward(xs) * r))

    loss()
    dxs, _ = layer.backward(r)
    for x, d in zip(xs, dxs):
        assert_close(d, numeric_grad(loss, x))


def test_concat_errors():
    with pytest.raises(ValueError, match="expects a non-empty list of arrays"):
        nn.Concat().forward([])


# -- SortFlatten -------------------------------------------------------------------------------


def test_sort_flatten_permutation_matches_lexsort_and_backward_inverts():
    rng = np.random.default_rng(8)
    B, n, c = 3, 20, 4
    points = rng.integers(0, 3, size=(B, n, 3)).astype(np.float64)  # many ties on x and y
    feats = rng.standard_normal((B, n, c))
    layer = nn.SortFlatten()
    y = layer.forward(points, feats)
    assert y.shape == (B, n * c)
    for b in range(B):
        p = points[b]
        perm = np.lexsort((p[:, 2], p[:, 1], p[:, 0]))
        assert np.array_equal(layer.permutation[b], perm)
        assert np.array_equal(y[b], feats[b, perm].reshape(-1))
        s = p[perm]
        keys = s[:, 0] * 100 + s[:, 1] * 10 + s[:, 2]
        assert np.all(np.diff(keys) >= 0)  # x primary, then y, then z
    d_feats, grads = layer.backward(y)
    assert grads == {}
    assert np.array_equal(d_feats, feats)  # backward of the forward output is the inverse


def test_sort_flatten_gradient_matches_finite_differences():
    rng = np.random.default_rng(9)
    points = rng.standard_normal((2, 6, 3))
    feats = rng.standard_normal((2, 6, 3))
    layer = nn.SortFlatten()
    check_layer_grads(layer, feats, forward=lambda f: layer.forward(points, f), rng=rng)


def test_sort_flatten_errors():
    layer = nn.SortFlatten()
    with pytest.raises(ValueError, match=r"points must have shape \(B, n, 3\)"):
        layer.forward(np.ones((5, 3)), np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"feats must have shape \(B, n, c\)"):
        layer.forward(np.ones((2, 5, 3)), np.ones((2, 4, 2)))


# -- SoftmaxCrossEntropy -----------------------------------------------------------------------


def reference_loss(logits, labels, weights=None, ignore=None):
    z = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = np.ones(len(y), bool) if ignore is None else y != ignore
    z, y = z[keep], y[keep]
    logp = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    nll = -logp[np.arange(len(y)), y]
    w = np.ones(len(y)) if weights is None else np.asarray(weights)[y]
    return np.sum(w * nll) / np.sum(w)


@pytest.mark.parametrize("shape", [(7,), (2, 5)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [None, 2, -100])
def test_softmax_cross_entropy_matches_numpy_and_finite_differences(shape, weighted, ignore):
    rng = np.random.default_rng(10)
    C = 4
    logits = rng.standard_normal(shape + (C,)) * 3
    labels = rng.integers(0, C, size=shape)
    if ignore == -100:
        labels.flat[0] = -100
    weights = np.array([0.5, 2.0, 1.0, 3.0]) if weighted else None
    loss_fn = nn.SoftmaxCrossEntropy(class_weights=weights, ignore_index=ignore)
    loss = loss_fn.forward(logits, labels)
    assert np.ndim(loss) == 0
    assert_close(loss, reference_loss(logits, labels, weights, ignore), rtol=1e-12)
    d = loss_fn.backward()
    assert d.shape == logits.shape
    assert_close(d, numeric_grad(lambda: float(loss_fn.forward(logits, labels)), logits))
    if ignore is not None:
        assert np.all(d[labels == ignore] == 0)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]], dtype=np.float32)
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, np.array([0, 0]))
    assert loss.dtype == np.float32 and np.isfinite(loss)
    assert_close(loss, 1e4 / 2, rtol=1e-6)
    assert np.all(np.isfinite(loss_fn.backward()))


def test_softmax_cross_entropy_all_ignored_gives_zero():
    loss_fn = nn.SoftmaxCrossEntropy(ignore_index=0)
    assert loss_fn.forward(np.ones((3, 2)), np.zeros(3, np.int64)) == 0.0
    assert np.all(loss_fn.backward() == 0.0)


def test_softmax_cross_entropy_errors():
    loss_fn = nn.SoftmaxCrossEntropy()
    logits = np.zeros((4, 5))
    with pytest.raises(ValueError, match=r"label 7 is out of range: labels must be in \[0, 4\]"):
        loss_fn.forward(logits, np.array([0, 7, 1, 2]))
    with pytest.raises(ValueError, match=r"label -1 is out of range.*or equal ignore_index 9"):
        nn.SoftmaxCrossEntropy(ignore_index=9).forward(logits, np.array([9, -1, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        loss_fn.forward(logits, np.zeros((4, 1), np.int64))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\) or \(B, n, C\)"):
        loss_fn.forward(np.zeros(5), np.zeros((), np.int64))
    with pytest.raises(TypeError, match="labels must be integers, got dtype float64"):
        loss_fn.forward(logits, np.zeros(4))
    with pytest.raises(TypeError, match="logits must be float32 or float64"):
        loss_fn.forward(np.zeros((4, 5), np.int64), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="class_weights has 3 entries but logits have 5 classes"):
        nn.SoftmaxCrossEntropy(class_weights=[1.0, 1.0, 1.0]).forward(logits, np.zeros(4, int))
    with pytest.raises(ValueError, match="class_weights must be one-dimensional"):
        nn.SoftmaxCrossEntropy(class_weights=np.ones((2, 2)))
    with pytest.raises(ValueError, match="class_weights must be non-negative"):
        nn.SoftmaxCrossEntropy(class_weights=[1.0, -1.0])
    with pytest.raises(TypeError, match="ignore_index must be an integer or None"):
        nn.SoftmaxCrossEntropy(ignore_index=1.5)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        nn.SoftmaxCrossEntropy().backward()


# -- composite, bookkeeping --------------------------------------------------------------------


def test_linear_selu_linear_cross_entropy_end_to_end_gradients():
    rng = np.random.default_rng(11)
    l1 = nn.Linear(6, 5, dtype=np.float64, rng=0)
    act = nn.SELU()
    l2 = nn.Linear(5, 3, dtype=np.float64, rng=1)
    loss_fn = nn.SoftmaxCrossEntropy(class_weights=[1.0, 2.0, 0.5])
    l1.params["bias"][:] = rng.standard_normal(5) * 0.1
    x = rng.standard_normal((8, 6))
    labels = rng.integers(0, 3, size=8)

    def loss():
        return float(loss_fn.forward(l2.forward(act.forward(l1.forward(x))), labels))

    loss()
    d, _ = l2.backward(loss_fn.backward())
    d, _ = act.backward(d)
    d_x, _ = l1.backward(d)
    assert_close(d_x, numeric_grad(loss, x))
    for layer in (l1, l2):
        for name, p in layer.params.items():
            assert_close(layer.grads[name], numeric_grad(loss, p))


def test_param_count_and_summary():
    layers = [
        nn.PointwiseConv(3, 9, 0.1),
        nn.Concat(),
        nn.SortFlatten(),
        nn.Linear(64 * 36, 512),
        nn.SELU(),
        nn.AlphaDropout(0.5),
        nn.Linear(512, 40),
    ]
    expected = 27 * 3 * 9 + (64 * 36 * 512 + 512) + (512 * 40 + 40)
    assert nn.param_count(layers) == expected
    layers[3].forward(np.zeros((2, 64 * 36), np.float32))
    text = nn.summary(layers)
    lines = text.splitlines()
    assert lines[0].split() == ["#", "layer", "output", "params"]
    assert "Linear(2304 -> 512" in text and "(2, 512)" in text
    assert "(..., 9)" in text and "(..., 40)" in text
    assert f"{64 * 36 * 512 + 512:,}" in text
    assert lines[-1] == f"total parameters: {expected:,}"
