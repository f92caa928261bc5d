"""pwconv_cy.jax: the custom-VJP op through jax.pure_callback.  Values bit-identical to the NumPy
function, gradients checked by jax.test_util.check_grads (float64) and equal to the NumPy
backward, under jit, grad and vmap; one kernel map per forward+backward; no coordinate gradient;
shape and dtype errors at trace time, value errors from the callback."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp
from jax.test_util import check_grads
from test_interop import count_index_builds

import pwconv_cy as pc
import pwconv_cy.jax as pcj


@pytest.fixture(autouse=True)
def _fresh_cache():
    pcj.clear_map_cache()
    yield
    pcj.clear_map_cache()


def _cloud(rng, n=80, c_in=3, c_out=2, dtype=np.float64, depthwise=False):
    points = rng.uniform(-1, 1, size=(n, 3)).astype(dtype)
    feats = rng.standard_normal((n, c_in)).astype(dtype)
    shape = (3, 3, 3, c_in) if depthwise else (3, 3, 3, c_in, c_out)
    weight = rng.standard_normal(shape).astype(dtype)
    return points, feats, weight


def test_float32_forward_and_gradients_match_numpy_bit_for_bit(rng):
    p, f, w = _cloud(rng, n=300, c_in=4, c_out=5, dtype=np.float32)
    g = rng.standard_normal((300, 5)).astype(np.float32)
    y = pcj.pointwise_conv(jnp.asarray(p), jnp.asarray(f), jnp.asarray(w), 0.2, dilation=2)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), pc.pointwise_conv(p, f, w, 0.2, dilation=2))

    def loss(f_, w_):
        return jnp.vdot(pcj.pointwise_conv(jnp.asarray(p), f_, w_, 0.2, dilation=2), g)

    d_feats, d_weight = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(f), jnp.asarray(w))
    ref_feats, ref_weight = pc.pointwise_conv_backward(g, p, f, w, 0.2, dilation=2)
    np.testing.assert_array_equal(np.asarray(d_feats), ref_feats)
    np.testing.assert_array_equal(np.asarray(d_weight), ref_weight)


@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("depthwise", [False, True])
def test_check_grads_float64(rng, dilation, depthwise):
    with jax.enable_x64(True):
        p, f, w = _cloud(rng, depthwise=depthwise)
        points = jnp.asarray(p)
        check_grads(lambda f_, w_: pcj.pointwise_conv(points, f_, w_, 0.3, dilation=dilation,
                                                      depthwise=depthwise, num_threads=1),
                    (jnp.asarray(f), jnp.asarray(w)), order=1, modes=("rev",))


def test_check_grads_packed_and_dense_batches_with_queries(rng):
    with jax.enable_x64(True):
        p, f, w = _cloud(rng, n=100)
        offsets = jnp.asarray([0, 40, 40, 100])
        queries = jnp.asarray(rng.uniform(-1, 1, size=(30, 3)))
        query_offsets = jnp.asarray([0, 10, 12, 30])
        check_grads(lambda f_, w_: pcj.pointwise_conv(jnp.asarray(p), f_, w_, 0.35,
                                                      offsets=offsets, queries=queries,
                                                      query_offsets=query_offsets),
                    (jnp.asarray(f), jnp.asarray(w)), order=1, modes=("rev",))
        dense = jnp.asarray(p.reshape(2, 50, 3))
        y = pcj.pointwise_conv(dense, jnp.asarray(f.reshape(2, 50, 3)), jnp.asarray(w), 0.35)
        assert y.shape == (2, 50, 2)
        np.testing.assert_array_equal(np.asarray(y), pc.pointwise_conv(
            p.reshape(2, 50, 3), f.reshape(2, 50, 3), w, 0.35))
        check_grads(lambda f_, w_: pcj.pointwise_conv(dense, f_, w_, 0.35),
                    (jnp.asarray(f.reshape(2, 50, 3)), jnp.asarray(w)), order=1,
                    modes=("rev",))


def test_vmap_over_features_and_jit_with_a_constant_kernel_map(rng):
    p, f, w = _cloud(rng, dtype=np.float32)
    points = jnp.asarray(p)
    batch = jnp.stack([jnp.asarray(f), 2 * jnp.asarray(f), -jnp.asarray(f)])
    ys = jax.vmap(lambda x: pcj.pointwise_conv(points, x, jnp.asarray(w), 0.3))(batch)
    for i, scale in enumerate((1, 2, -1)):
        np.testing.assert_array_equal(np.asarray(ys[i]),
                                      pc.pointwise_conv(p, scale * f, w, 0.3))
    km = pc.kernel_map(p, 0.3)
    step = jax.jit(lambda x, w_: pcj.pointwise_conv(points, x, w_, 0.3, kernel_map=km))
    np.testing.assert_array_equal(np.asarray(step(jnp.asarray(f), jnp.asarray(w))),
                                  pc.pointwise_conv(p, f, w, 0.3))


def test_one_kernel_map_serves_forward_and_backward(rng, monkeypatch):
    builds = count_index_builds(monkeypatch)
    p, f, w = _cloud(rng, dtype=np.float32)
    points = jnp.asarray(p)
    grad = jax.grad(lambda f_, w_: pcj.pointwise_conv(points, f_, w_, 0.3).sum(), (0, 1))
    grad(jnp.asarray(f), jnp.asarray(w))
    assert len(builds) == 1
    km = pc.kernel_map(p, 0.3, dilation=3)
    assert len(builds) == 2
    jax.grad(lambda f_: pcj.pointwise_conv(points, f_, jnp.asarray(w), 0.3, dilation=3,
                                           kernel_map=km).sum())(jnp.asarray(f))
    assert len(builds) == 2
    # A map evicted between forward and backward is rebuilt there: the same gradient.
    fn = jax.jit(lambda f_: pcj.pointwise_conv(points, f_, jnp.asarray(w), 0.3, dilation=2))
    _, vjp = jax.vjp(fn, jnp.asarray(f))
    (cached,) = vjp(jnp.ones((80, 2), jnp.float32))
    assert len(builds) == 3
    _, vjp = jax.vjp(fn, jnp.asarray(f))     # the same points: the cached map again
    assert len(builds) == 3
    pcj.clear_map_cache()
    (rebuilt,) = vjp(jnp.ones((80, 2), jnp.float32))
    assert len(builds) == 4
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(cached))


def test_coordinate_gradient_request_raises(rng):
    p, f, w = _cloud(rng, dtype=np.float32)
    points, feats, weight = jnp.asarray(p), jnp.asarray(f), jnp.asarray(w)
    with pytest.raises(ValueError, match=r"cannot differentiate pointwise_conv with respect to "
                                         r"points: it has no gradient"):
        jax.grad(lambda q: pcj.pointwise_conv(q, feats, weight, 0.3).sum())(points)
    with pytest.raises(ValueError, match=r"with respect to queries"):
        jax.grad(lambda q: pcj.pointwise_conv(points, feats, weight, 0.3, queries=q).sum())(
            points[:10])
    # Points that are not differentiated may be traced (e.g. computed inside jit).
    y = jax.jit(lambda q, x: pcj.pointwise_conv(q, x, weight, 0.3))(points, feats)
    np.testing.assert_array_equal(np.asarray(y), pc.pointwise_conv(p, f, w, 0.3))


def test_shape_and_dtype_errors_at_trace_time(rng):
    p, f, w = _cloud(rng, dtype=np.float32)
    points, feats, weight = jnp.asarray(p), jnp.asarray(f), jnp.asarray(w)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, K, K, c_in, c_out\), got "
                                         r"\(3, 3, 3, 3\) \(a 4-D weight is for depthwise=True\)"):
        jax.jit(lambda x: pcj.pointwise_conv(points, x, weight[..., 0], 0.3))(feats)
    with pytest.raises(TypeError, match=r"feats must have dtype float32 or float64, got bfloat16"):
        pcj.pointwise_conv(points, feats.astype(jnp.bfloat16), weight, 0.3)
    with pytest.raises(ValueError, match=r"feats must have shape \(n_points=80, c\)"):
        pcj.pointwise_conv(points, feats[:70], weight, 0.3)
    with pytest.raises(ValueError, match=r"points must have shape \(n, 3\) or \(B, n, 3\)"):
        pcj.pointwise_conv(points[:, :2], feats, weight, 0.3)
    with pytest.raises(ValueError, match=r"offsets must be None when points is dense"):
        pcj.pointwise_conv(points.reshape(2, 40, 3), feats.reshape(2, 40, 3), weight, 0.3,
                           offsets=jnp.asarray([0, 40, 80]))
    with pytest.raises(ValueError, match=r"voxel_size must be positive"):
        pcj.pointwise_conv(points, feats, weight, -0.3)
    with pytest.raises(TypeError, match=r"kernel_map must be a pwconv_cy.KernelMap"):
        pcj.pointwise_conv(points, feats, weight, 0.3, kernel_map="map")


def test_value_errors_come_from_the_callback(rng):
    p, f, w = _cloud(rng, dtype=np.float32)
    f[5, 1] = np.nan
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"feats must be finite, got nan at "
                                                         r"index \(5, 1\)"):
        pcj.pointwise_conv(jnp.asarray(p), jnp.asarray(f), jnp.asarray(w), 0.3).block_until_ready()
    km = pc.kernel_map(p[:70], 0.3)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"kernel_map was built for other points"):
        pcj.pointwise_conv(jnp.asarray(p), jnp.asarray(np.nan_to_num(f)), jnp.asarray(w), 0.3,
                           kernel_map=km).block_until_ready()


def test_a_small_model_trains_under_jit(rng):
    """Gradient descent on one pointwise layer fitting another layer's output: the loss falls
    by two orders of magnitude."""
    p, f, w_true = _cloud(rng, n=200, dtype=np.float32)
    points, feats = jnp.asarray(p), jnp.asarray(f)
    target = pcj.pointwise_conv(points, feats, jnp.asarray(w_true), 0.3)

    @jax.jit
    def step(w):
        loss, g = jax.value_and_grad(
            lambda w_: jnp.mean((pcj.pointwise_conv(points, feats, w_, 0.3) - target) ** 2))(w)
        return w - 0.5 * g, loss

    w = jnp.zeros_like(jnp.asarray(w_true))
    losses = []
    for _ in range(150):
        w, loss = step(w)
        losses.append(float(loss))
    assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])


def test_map_cache_never_hands_back_another_clouds_map(rng, monkeypatch):
    """Every digest made equal (a forced CRC collision): the cache compares the points in full,
    so a second cloud of the same size gets its own map and its own result."""
    monkeypatch.setattr(pcj._neighbors, "cloud_digest", lambda points, offsets: "<f4:80:00000000")
    w = rng.standard_normal((3, 3, 3, 3, 2)).astype(np.float32)
    for _ in range(2):
        p, f, _ = _cloud(rng, dtype=np.float32)
        y = pcj.pointwise_conv(jnp.asarray(p), jnp.asarray(f), jnp.asarray(w), 0.3)
        np.testing.assert_array_equal(np.asarray(y), pc.pointwise_conv(p, f, w, 0.3))
    assert len(pcj._maps) == 1   # one key, replaced
