"""The layers of pwconv_cy.nn: parameters, initialisation, forward/backward protocol, gradients of
small composites by finite differences in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pwconv_cy
from pwconv_cy import nn, pointwise_conv
from pwconv_cy.neighbors import NeighborIndex

LAYERS = [nn.PointwiseConv, nn.SeparablePointwiseConv]


def expected_param_shapes(cls, c_in, c_out, k, bias):
    if cls is nn.PointwiseConv:
        shapes = {"weight": (k, k, k, c_in, c_out)}
    else:
        shapes = {"depthwise": (k, k, k, c_in), "pointwise": (c_in, c_out)}
    if bias:
        shapes["bias"] = (c_out,)
    return shapes


def sphere_batch(rng, sizes, dtype=np.float64):
    p = rng.standard_normal((sum(sizes), 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p.astype(dtype), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("c_in,c_out,k", [(3, 9, 3), (9, 9, 3), (1, 17, 5), (17, 1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_shapes_dtypes_and_counts(cls, c_in, c_out, k, bias):
    layer = cls(c_in, c_out, 0.1, kernel_size=k, bias=bias, dtype=np.float64, rng=0)
    shapes = expected_param_shapes(cls, c_in, c_out, k, bias)
    assert list(layer.params) == list(shapes)
    assert {name: p.shape for name, p in layer.params.items()} == shapes
    assert all(p.dtype == np.float64 for p in layer.params.values())
    if cls is nn.PointwiseConv:
        count = k**3 * c_in * c_out
    else:
        count = k**3 * c_in + c_in * c_out
    assert layer.n_params == count + (c_out if bias else 0)
    if bias:
        assert not layer.params["bias"].any()


def test_separable_has_fewer_parameters_than_dense_for_the_paper_layer():
    dense = nn.PointwiseConv(9, 9, 0.1)
    separable = nn.SeparablePointwiseConv(9, 9, 0.1)
    assert dense.n_params == 27 * 81
    assert separable.n_params == 27 * 9 + 81


@pytest.mark.parametrize("c_in,c_out,k", [(3, 9, 3), (9, 9, 3), (4, 16, 5)])
def test_pointwise_conv_glorot_uniform_bounds_and_spread(c_in, c_out, k):
    layer = nn.PointwiseConv(c_in, c_out, 0.1, kernel_size=k, rng=123)
    w = layer.params["weight"].astype(np.float64)
    limit = math.sqrt(6.0 / (k**3 * c_in + k**3 * c_out))
    assert np.abs(w).max() <= limit * (1 + 1e-6)
    assert np.abs(w).max() >= 0.95 * limit  # the samples fill the interval
    assert abs(w.mean()) <= 0.1 * limit
    assert w.var() == pytest.approx(limit**2 / 3, rel=0.15)  # variance of U(-a, a)


def test_separable_glorot_uniform_bounds():
    c_in, c_out, k = 16, 32, 3
    layer = nn.SeparablePointwiseConv(c_in, c_out, 0.1, kernel_size=k, rng=5)
    for name, fan_in, fan_out in (("depthwise", k**3, k**3), ("pointwise", c_in, c_out)):
        w = layer.params[name].astype(np.float64)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit * (1 + 1e-6), name
        assert np.abs(w).max() >= 0.9 * limit, name
        assert w.var() == pytest.approx(limit**2 / 3, rel=0.2), name


@pytest.mark.parametrize("cls", LAYERS)
def test_seeded_rng_gives_identical_parameters(cls):
    a = cls(4, 6, 0.1, bias=True, rng=42)
    b = cls(4, 6, 0.1, bias=True, rng=np.random.default_rng(42))
    c = cls(4, 6, 0.1, bias=True, rng=43)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params[next(iter(a.params))], c.params[next(iter(c.params))])


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_and_outputs_keep_the_layer_dtype(cls, dtype, rng):
    layer = cls(3, 5, 0.4, bias=True, dtype=dtype, rng=0)
    points, offsets = sphere_batch(rng, [30, 20], np.float32)
    y = layer.forward(points, points.astype(dtype), offsets=offsets)
    d_feats, grads = layer.backward(np.ones_like(y))
    assert y.dtype == d_feats.dtype == dtype
    assert all(g.dtype == dtype for g in grads.values())


# --- forward --------------------------------------------------------------------------------


def test_pointwise_conv_forward_equals_functional_plus_bias(rng):
    layer = nn.PointwiseConv(3, 5, 0.3, dilation=2, bias=True, dtype=np.float64, rng=1)
    layer.params["bias"] = rng.standard_normal(5)
    points, offsets = sphere_batch(rng, [40, 0, 25])
    x = rng.standard_normal((65, 3))
    y = layer.forward(points, x, offsets=offsets)
    ref = pointwise_conv(points, x, layer.params["weight"], 0.3, dilation=2, offsets=offsets)
    assert np.array_equal(y, ref + layer.params["bias"])


def test_separable_forward_equals_depthwise_then_linear_map(rng):
    layer = nn.SeparablePointwiseConv(4, 6, 0.3, dilation=3, bias=True, dtype=np.float64, rng=1)
    layer.params["bias"] = rng.standard_normal(6)
    points, offsets = sphere_batch(rng, [40, 25])
    x = rng.standard_normal((65, 4))
    y = layer.forward(points, x, offsets=offsets)
    z = pointwise_conv(
        points, x, layer.params["depthwise"], 0.3, dilation=3, offsets=offsets, depthwise=True
    )
    np.testing.assert_allclose(
        y, z @ layer.params["pointwise"] + layer.params["bias"], rtol=1e-13, atol=1e-15
    )


@pytest.mark.parametrize("cls", LAYERS)
def test_kernel_map_is_computed_once_and_reused_by_backward(cls, rng, monkeypatch):
    calls = []
    original = NeighborIndex.kernel_map

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NeighborIndex, "kernel_map", counting)
    layer = cls(3, 4, 0.3, dilation=2, dtype=np.float64, rng=0)
    points, offsets = sphere_batch(rng, [50, 30])
    y = layer.forward(points, points, offsets=offsets)
    assert len(calls) == 1
    km = layer.kernel_map
    assert isinstance(km, pwconv_cy.KernelMap) and km.dilation == 2 and km.kernel_size == 3
    layer.backward(np.ones_like(y))
    layer.backward(np.ones_like(y))
    assert len(calls) == 1


@pytest.mark.parametrize("cls", LAYERS)
def test_callers_kernel_map_is_used_and_checked(cls, rng):
    points, offsets = sphere_batch(rng, [50, 30])
    layer = cls(3, 4, 0.3, dilation=2, dtype=np.float64, rng=0)
    index = NeighborIndex(points, 0.3, offsets=offsets)
    km = index.kernel_map(3, 2)
    y = layer.forward(points, points, offsets=offsets, kernel_map=km)
    assert layer.kernel_map is km
    assert np.array_equal(
        y,
        cls(3, 4, 0.3, dilation=2, dtype=np.float64, rng=0).forward(
            points, points, offsets=offsets
        ),
    )
    with pytest.raises(ValueError, match="kernel_map was built for dilation=1"):
        layer.forward(points, points, offsets=offsets, kernel_map=index.kernel_map(3, 1))


@pytest.mark.parametrize("cls", LAYERS)
def test_layer_check_map(cls, rng, monkeypatch):
    """A caller's map is fingerprinted against the points by default (a map of moved points is
    refused); check_map=False trusts it (the models pass their own maps so), the sizes still
    checked; a map the layer computed itself is never fingerprinted, forward or backward."""
    from pwconv_cy import functional

    points, offsets = sphere_batch(rng, [50, 30])
    moved = points.copy()
    moved[3] += 0.05
    km_moved = NeighborIndex(moved, 0.3, offsets=offsets).kernel_map(3, 2)
    layer = cls(3, 4, 0.3, dilation=2, dtype=np.float64, rng=0)
    with pytest.raises(ValueError, match="kernel_map was built for other points"):
        layer.forward(points, points, offsets=offsets, kernel_map=km_moved)
    y = layer.forward(points, points, offsets=offsets, kernel_map=km_moved, check_map=False)
    layer.backward(np.ones_like(y))  # the same trust in backward
    with pytest.raises(ValueError, match="kernel_map was built for other points"):
        layer.forward(points[:70], points[:70], offsets=np.array([0, 50, 70]),
                      kernel_map=km_moved, check_map=False)
    with pytest.raises(TypeError, match="check_map must be True or False"):
        layer.forward(points, points, offsets=offsets, check_map="yes")
    seen = []
    original = functional.check_map_matches

    def spy(*args, same_points=None, **kwargs):
        seen.append(same_points is not None)
        return original(*args, same_points=same_points, **kwargs)

    monkeypatch.setattr(functional, "check_map_matches", spy)
    y = layer.forward(points, points, offsets=offsets)  # its own map
    layer.backward(np.ones_like(y))
    assert seen and not any(seen), seen


@pytest.mark.parametrize("cls", LAYERS)
def test_dense_input_gives_dense_output_and_gradient(cls, rng):
    layer = cls(3, 5, 0.4, bias=True, dtype=np.float64, rng=0)
    points = rng.random((2, 30, 3))
    y = layer.forward(points, points)
    assert y.shape == (2, 30, 5)
    d_feats, grads = layer.backward(rng.standard_normal((2, 30, 5)))
    assert d_feats.shape == (2, 30, 3)
    assert grads["bias"].shape == (5,)


@pytest.mark.parametrize("cls", LAYERS)
def test_queries_give_one_output_row_per_query(cls, rng):
    layer = cls(3, 5, 0.4, dtype=np.float64, rng=0)
    points, offsets = sphere_batch(rng, [30, 20])
    queries, q_offsets = sphere_batch(rng, [7, 4])
    y = layer.forward(points, points, offsets=offsets, queries=queries, query_offsets=q_offsets)
    assert y.shape == (11, 5)
    d_feats, _ = layer.backward(np.ones_like(y))
    assert d_feats.shape == (50, 3)


# --- gradients of composites by finite differences ------------------------------------------


def tanh_backward(y_tanh, grad):
    return grad * (1.0 - y_tanh**2)


class Composite:
    """layer1 -> tanh -> layer2 -> L = sum(y**2), on one packed batch (layer1 optionally from the
    points to a set of query points, on which layer2 then works)."""

    def __init__(self, first, second, points, offsets, queries=None, query_offsets=None):
        self.first, self.second = first, second
        self.points, self.offsets = points, offsets
        self.queries, self.query_offsets = queries, query_offsets

    def loss(self, x):
        h = np.tanh(
            self.first.forward(
                self.points,
                x,
                offsets=self.offsets,
                queries=self.queries,
                query_offsets=self.query_offsets,
            )
        )
        if self.queries is None:
            y = self.second.forward(self.points, h, offsets=self.offsets)
        else:
            y = self.second.forward(self.queries, h, offsets=self.query_offsets)
        self._h, self._y = h, y
        return float(np.sum(y * y))

    def gradients(self, x):
        self.loss(x)
        dh, grads2 = self.second.backward(2.0 * self._y)
        dx, grads1 = self.first.backward(tanh_backward(self._h, dh))
        return dx, grads1, grads2


def _fd_check(model: Composite, x, rng, n_dirs=3, eps=1e-5, rtol=1e-6):
    dx, grads1, grads2 = model.gradients(x)
    # copies: the next forward calls must not change what is checked
    grads1 = {k: v.copy() for k, v in grads1.items()}
    grads2 = {k: v.copy() for k, v in grads2.items()}
    checked = []
    for _ in range(n_dirs):
        d = rng.standard_normal(x.shape)
        fd = (model.loss(x + eps * d) - model.loss(x - eps * d)) / (2 * eps)
        assert np.sum(dx * d) == pytest.approx(fd, rel=rtol, abs=1e-9), "feats"
    for layer, grads, tag in ((model.first, grads1, "first"), (model.second, grads2, "second")):
        assert list(grads) == list(layer.params)
        for name, p in layer.params.items():
            assert grads[name].shape == p.shape
            base = p.copy()
            for _ in range(n_dirs):
                d = rng.standard_normal(p.shape)
                layer.params[name] = base + eps * d
                plus = model.loss(x)
                layer.params[name] = base - eps * d
                minus = model.loss(x)
                layer.params[name] = base
                fd = (plus - minus) / (2 * eps)
                assert np.sum(grads[name] * d) == pytest.approx(fd, rel=rtol, abs=1e-9), (
                    f"{tag}.{name}"
                )
            checked.append(f"{tag}.{name}")
    return checked


COMPOSITES = [
    ("conv-conv", nn.PointwiseConv, nn.PointwiseConv),
    ("separable-separable", nn.SeparablePointwiseConv, nn.SeparablePointwiseConv),
    ("conv-separable", nn.PointwiseConv, nn.SeparablePointwiseConv),
]


@pytest.mark.parametrize(
    "first_cls,second_cls", [c[1:] for c in COMPOSITES], ids=[c[0] for c in COMPOSITES]
)
@pytest.mark.parametrize("with_queries", [False, True], ids=["points", "queries"])
def test_composite_gradients_match_finite_differences(first_cls, second_cls, with_queries):
    rng = np.random.default_rng(2024)
    points, offsets = sphere_batch(rng, [60, 0, 45])
    queries = query_offsets = None
    if with_queries:
        queries, query_offsets = sphere_batch(rng, [20, 5, 15])
    first = first_cls(3, 4, 0.35, dilation=1, bias=True, dtype=np.float64, rng=1)
    second = second_cls(4, 2, 0.25, dilation=2, bias=True, dtype=np.float64, rng=2)
    for layer in (first, second):  # non-zero biases, so their gradients are exercised
        layer.params["bias"] = 0.3 * rng.standard_normal(layer.params["bias"].shape)
    model = Composite(first, second, points, offsets, queries, query_offsets)
    x = rng.standard_normal((len(points), 3))
    checked = _fd_check(model, x, rng)
    assert len(checked) == len(first.params) + len(second.params)


@pytest.mark.parametrize("cls", LAYERS)
def test_gradients_without_bias_match_finite_differences_on_dense_batch(cls):
    rng = np.random.default_rng(99)
    points = rng.random((3, 40, 3))
    first = cls(3, 5, 0.3, dilation=3, dtype=np.float64, rng=3)
    second = cls(5, 3, 0.2, dilation=1, kernel_size=5, dtype=np.float64, rng=4)

    class Dense(Composite):
        def loss(self, x):
            h = np.tanh(self.first.forward(self.points, x))
            y = self.second.forward(self.points, h)
            self._h, self._y = h, y
            return float(np.sum(y * y))

    model = Dense(first, second, points, None)
    _fd_check(model, rng.standard_normal((3, 40, 3)), rng)


# --- the protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_backward_overwrites_and_never_accumulates(cls, rng):
    points, offsets = sphere_batch(rng, [40, 30])
    layer = cls(3, 4, 0.3, bias=True, dtype=np.float64, rng=0)
    x1, x2 = rng.standard_normal((70, 3)), rng.standard_normal((70, 3))
    g1, g2 = rng.standard_normal((70, 4)), rng.standard_normal((70, 4))
    layer.forward(points, x1, offsets=offsets)
    d1, grads1 = layer.backward(g1)
    assert layer.grads is grads1
    snapshot = {k: v.copy() for k, v in grads1.items()}
    d1_again, grads1_again = layer.backward(g1)
    for name, value in snapshot.items():
        assert np.array_equal(grads1_again[name], value), name
    assert np.array_equal(d1_again, d1)
    layer.forward(points, x2, offsets=offsets)
    _, grads2 = layer.backward(g2)
    fresh = cls(3, 4, 0.3, bias=True, dtype=np.float64, rng=0)
    fresh.forward(points, x2, offsets=offsets)
    _, grads_fresh = fresh.backward(g2)
    for name in grads2:
        assert np.array_equal(grads2[name], grads_fresh[name]), name
        assert np.array_equal(layer.grads[name], grads_fresh[name]), name


@pytest.mark.parametrize("cls", LAYERS)
def test_backward_before_forward_raises(cls):
    layer = cls(3, 4, 0.3)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.ones((5, 4), dtype=np.float32))


@pytest.mark.parametrize("cls", LAYERS)
def test_grad_out_of_wrong_shape_raises(cls, rng):
    layer = cls(3, 4, 0.3, dtype=np.float64, rng=0)
    points = rng.random((20, 3))
    layer.forward(points, points)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \(20, 4\)"):
        layer.backward(np.ones((20, 3)))


@pytest.mark.parametrize("cls", LAYERS)
def test_features_of_other_dtype_than_the_layer_raise(cls, rng):
    layer = cls(3, 4, 0.3, dtype=np.float32, rng=0)
    points = rng.random((20, 3))
    with pytest.raises(TypeError, match="same dtype"):
        layer.forward(points, points.astype(np.float64))


@pytest.mark.parametrize("cls", LAYERS)
def test_train_and_eval_set_the_flag(cls):
    layer = cls(3, 4, 0.3)
    assert layer.training
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training


@pytest.mark.parametrize("cls", LAYERS)
def test_repr_names_the_layer_and_its_geometry(cls):
    text = repr(cls(3, 9, 0.1, dilation=4, bias=True))
    assert text.startswith(cls.__name__ + "(3 -> 9")
    assert "dilation=4" in text and "voxel_size=0.1" in text and "bias=True" in text


BAD_ARGS = [
    ({"c_in": 0}, ValueError, "c_in must be a positive integer, got 0"),
    ({"c_out": 2.5}, TypeError, "c_out must be a positive integer, got float 2.5"),
    ({"voxel_size": -1.0}, ValueError, "voxel_size must be positive and finite"),
    ({"dilation": 0}, ValueError, "dilation must be >= 1"),
    ({"kernel_size": 4}, ValueError, "kernel_size must be odd"),
    ({"bias": "yes"}, TypeError, "bias must be True or False"),
    ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64, got int32"),
]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("bad,error,match", BAD_ARGS, ids=[next(iter(b[0])) for b in BAD_ARGS])
def test_bad_constructor_arguments_raise(cls, bad, error, match):
    args = {"c_in": 3, "c_out": 4, "voxel_size": 0.1}
    args.update(bad)
    with pytest.raises(error, match=match):
        cls(**args)


@pytest.mark.parametrize("cls", LAYERS)
def test_backward_without_feats_grad_gives_the_same_parameter_gradients(cls, rng):
    layer = cls(3, 4, 0.3, dilation=2, bias=True, dtype=np.float64, rng=0)
    points, offsets = sphere_batch(rng, [50, 30])
    y = layer.forward(points, points, offsets=offsets)
    dy = rng.standard_normal(y.shape)
    d_feats, full = layer.backward(dy)
    assert d_feats.shape == points.shape
    none, grads = layer.backward(dy, feats_grad=False)
    assert none is None
    assert set(grads) == set(full)
    for k in full:
        np.testing.assert_array_equal(grads[k], full[k])
    with pytest.raises(TypeError, match="feats_grad must be True or False, got 'no'"):
        layer.backward(dy, feats_grad="no")
