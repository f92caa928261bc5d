"""pointwise_conv and pointwise_conv_backward (SPEC §1, §2) against a dense float64 oracle.

The oracle below is written from SPEC §1 alone: it builds the operator as K^3 dense matrices
``A[f, i, j] = 1 / n_i(f)`` for ``j in Omega_i(f)`` (block-diagonal over the clouds of a batch),
then ``y = sum_f A_f x W_f``, ``dx = sum_f A_f^T dy W_f^T`` and ``dW_f = (A_f x)^T dy`` (and the
depthwise analogues).  It is O(K^3 m n) in memory: keep the clouds small.
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import simd_mode, simd_modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pwconv_cy
from pwconv_cy import pointwise_conv, pointwise_conv_backward

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

# --- the float64 oracle ---------------------------------------------------------------------


def dense_operator(
    points, voxel_size, kernel_size, dilation, offsets=None, queries=None, query_offsets=None
) -> np.ndarray:
    """``A`` of shape (K^3, m, n), float64: ``A[f, i, j] = 1 / n_i(f)`` if point j lies in kernel
    cell f of query i by the SPEC §1 rule, else 0; clouds never see each other."""
    p = np.asarray(points).astype(np.float64).reshape(-1, 3)
    offsets = np.array([0, len(p)]) if offsets is None else np.asarray(offsets, dtype=np.int64)
    if queries is None:
        q, q_offsets = p, offsets
    else:
        q = np.asarray(queries).astype(np.float64).reshape(-1, 3)
        q_offsets = (
            np.array([0, len(q)])
            if query_offsets is None
            else np.asarray(query_offsets, dtype=np.int64)
        )
    k, s, v = int(kernel_size), int(dilation), float(voxel_size)
    span = s * (k - 1) + 1
    h = span * v / 2
    a = np.zeros((k**3, len(q), len(p)))
    for b in range(len(offsets) - 1):
        pa, pb, qa, qb = offsets[b], offsets[b + 1], q_offsets[b], q_offsets[b + 1]
        if pa == pb or qa == qb:
            continue
        lower = q[qa:qb] - h  # p_i - h first ...
        t = (p[None, pa:pb, :] - lower[:, None, :]) / v  # ... then subtract, then divide
        inside = ((t >= 0) & (t <= span)).all(axis=2)  # closed cube
        c = np.minimum(s * (k - 1), np.floor(np.where(inside[..., None], t, 0))).astype(np.int64)
        in_cell = inside & (c % s == 0).all(axis=2)  # holes are ignored
        cell = c // s
        f = (cell[..., 2] * k + cell[..., 1]) * k + cell[..., 0]  # z slowest, x fastest
        ii, jj = np.nonzero(in_cell)
        a[f[ii, jj], qa + ii, pa + jj] = 1.0
    counts = a.sum(axis=2, keepdims=True)
    return np.divide(a, counts, out=np.zeros_like(a), where=counts > 0)


def oracle_forward(a, x, w, depthwise=False):
    n_cells = a.shape[0]
    means = np.einsum("fij,jc->fic", a, x)  # (K^3, m, c_in) per-cell means
    if depthwise:
        return np.einsum("fic,fc->ic", means, w.reshape(n_cells, -1))
    c_in, c_out = w.shape[-2:]
    return np.einsum("fic,fcd->id", means, w.reshape(n_cells, c_in, c_out))


def oracle_backward(a, x, w, dy, depthwise=False):
    n_cells = a.shape[0]
    means = np.einsum("fij,jc->fic", a, x)
    if depthwise:
        wf = w.reshape(n_cells, -1)
        dx = np.einsum("fij,fic->jc", a, dy[None] * wf[:, None, :])
        dw = np.einsum("fic,ic->fc", means, dy)
    else:
        c_in, c_out = w.shape[-2:]
        wf = w.reshape(n_cells, c_in, c_out)
        dx = np.einsum("fij,fic->jc", a, np.einsum("id,fcd->fic", dy, wf))
        dw = np.einsum("fic,id->fcd", means, dy)
    return dx, dw.reshape(w.shape)


def assert_close(actual, expected, rtol, what=""):
    """Norm-wise relative agreement, plus the same bound on the largest elementwise error."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.linalg.norm(expected), np.finfo(np.float64).tiny)
    err = np.linalg.norm(actual - expected)
    assert err <= rtol * scale, f"{what}: relative error {err / scale:.3e} > {rtol:.1e}"
    if expected.size:
        peak = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
        assert np.abs(actual - expected).max() <= rtol * peak * np.sqrt(expected.size), what


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(abs(a - b) / max(abs(b), np.finfo(np.float64).tiny))


def adjoint_gap(lhs_terms, rhs_terms) -> float:
    """|sum(lhs_terms) - sum(rhs_terms)| relative to the terms' magnitudes, max(sum |lhs|,
    sum |rhs|): the two sides of <A x, dy> = <x, A^T dy> round in float64 in proportion to
    those, not to the sums themselves, which may cancel (a sum of 0.012 from terms of order 1
    had a gap of 1e-12 of itself, yet 2e-16 of its terms')."""
    lhs = np.asarray(lhs_terms, dtype=np.float64)
    rhs = np.asarray(rhs_terms, dtype=np.float64)
    scale = max(float(np.abs(lhs).sum()), float(np.abs(rhs).sum()), np.finfo(np.float64).tiny)
    return float(abs(lhs.sum() - rhs.sum()) / scale)


# --- data -----------------------------------------------------------------------------------


def make_cloud(rng, n, layout):
    """n points in roughly the unit cube: uniform, on the dyadic lattice of step 1/16 (with
    voxel_for's 1/8 many points sit exactly on cell faces, and many coincide), or clustered with
    duplicates."""
    if layout == "uniform":
        return rng.random((n, 3))
    if layout == "lattice":
        return rng.integers(0, 17, size=(n, 3)) / 16.0
    centres = rng.random((max(1, n // 6), 3))
    p = centres[rng.integers(0, len(centres), n)] + 0.05 * rng.standard_normal((n, 3))
    dup = rng.random(n) < 0.2
    if n > 1 and dup.any():
        p[dup] = p[rng.integers(0, n, dup.sum())]
    return p


def voxel_for(n_per_cloud, kernel_size, dilation, layout):
    """A voxel size giving a few to a few dozen neighbours per point."""
    if layout == "lattice":
        return 0.125  # two lattice steps: many points lie exactly on cell faces
    # about 16 points in the K^3 cells, the whole cube at most 1.5 wide
    span = dilation * (kernel_size - 1) + 1
    v = (16.0 / (max(n_per_cloud, 1) * kernel_size**3)) ** (1 / 3)
    return min(v, 1.5 / span)


@st.composite
def conv_cases(draw, allow_queries=False):
    seed = draw(st.integers(0, 2**32 - 1))
    k = draw(st.sampled_from([1, 3, 5]))
    s = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["uniform", "lattice", "clustered"]))
    max_n = 30 if k == 5 else 60
    sizes = draw(st.lists(st.integers(0, max_n), min_size=1, max_size=3))
    c_in = draw(st.sampled_from([1, 2, 5, 17]))
    c_out = draw(st.sampled_from([1, 3, 17]))
    depthwise = draw(st.booleans())
    q_sizes = None
    if allow_queries and draw(st.booleans()):
        q_sizes = draw(st.lists(st.integers(0, max_n), min_size=len(sizes), max_size=len(sizes)))
    rng = np.random.default_rng(seed)
    points = np.concatenate([make_cloud(rng, n, layout) for n in sizes] or [np.zeros((0, 3))])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    v = voxel_for(max(sizes), k, s, layout)
    x = rng.standard_normal((len(points), c_in))
    w = rng.standard_normal((k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out))
    case = {
        "points": points,
        "offsets": offsets,
        "voxel_size": v,
        "kernel_size": k,
        "dilation": s,
        "depthwise": depthwise,
        "x": x,
        "w": w,
        "queries": None,
        "query_offsets": None,
    }
    if q_sizes is not None:
        case["queries"] = np.concatenate(
            [make_cloud(rng, m, layout) for m in q_sizes] or [np.zeros((0, 3))]
        )
        case["query_offsets"] = np.concatenate([[0], np.cumsum(q_sizes)]).astype(np.int64)
    m = len(points) if case["queries"] is None else len(case["queries"])
    case["dy"] = rng.standard_normal((m, c_in if depthwise else c_out))
    return case


def run(case, **extra):
    """Forward and backward of the library on a case dict; returns (y, dx, dw)."""
    kw = {
        "dilation": case["dilation"],
        "offsets": case["offsets"],
        "queries": case["queries"],
        "query_offsets": case["query_offsets"],
        "depthwise": case["depthwise"],
    }
    kw.update(extra)
    y = pointwise_conv(case["points"], case["x"], case["w"], case["voxel_size"], **kw)
    dx, dw = pointwise_conv_backward(
        case["dy"], case["points"], case["x"], case["w"], case["voxel_size"], **kw
    )
    return y, dx, dw


def oracle(case):
    a = dense_operator(
        case["points"],
        case["voxel_size"],
        case["kernel_size"],
        case["dilation"],
        case["offsets"],
        case["queries"],
        case["query_offsets"],
    )
    y = oracle_forward(a, case["x"], case["w"], case["depthwise"])
    dx, dw = oracle_backward(a, case["x"], case["w"], case["dy"], case["depthwise"])
    return y, dx, dw, a


def cast(case, dtype):
    out = dict(case)
    for key in ("x", "w", "dy"):
        out[key] = case[key].astype(dtype)
    return out


# --- agreement with the oracle --------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(conv_cases(allow_queries=True))
def test_forward_and_backward_match_dense_oracle_on_random_batches(case):
    y, dx, dw = run(case)
    y_ref, dx_ref, dw_ref, _ = oracle(case)
    assert y.dtype == dx.dtype == dw.dtype == np.float64
    assert dx.shape == case["x"].shape and dw.shape == case["w"].shape
    assert_close(y, y_ref, 1e-12, "forward")
    assert_close(dx, dx_ref, 1e-12, "input gradient")
    assert_close(dw, dw_ref, 1e-12, "weight gradient")


@pytest.mark.parametrize("depthwise", [False, True])
def test_oracle_and_library_agree_with_paper_layer_sizes(rng, depthwise):
    """A 250-point sphere patch, K = 3, the paper's dilations and channel counts 3 -> 9 / 9 -> 9."""
    p = rng.standard_normal((250, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    for s, c_in in ((1, 3), (2, 9), (3, 9), (4, 9)):
        c_out = c_in if depthwise else 9
        case = {
            "points": p,
            "offsets": None,
            "voxel_size": 0.15,
            "kernel_size": 3,
            "dilation": s,
            "depthwise": depthwise,
            "x": rng.standard_normal((250, c_in)),
            "w": rng.standard_normal((3, 3, 3, c_in) if depthwise else (3, 3, 3, c_in, 9)),
            "dy": rng.standard_normal((250, c_out)),
            "queries": None,
            "query_offsets": None,
        }
        y, dx, dw = run(case)
        y_ref, dx_ref, dw_ref, a = oracle(case)
        assert (a.sum(axis=(0, 2)) > 0).all()  # every point sees at least itself
        assert_close(y, y_ref, 1e-12, f"forward s={s}")
        assert_close(dx, dx_ref, 1e-12, f"input gradient s={s}")
        assert_close(dw, dw_ref, 1e-12, f"weight gradient s={s}")


@pytest.mark.parametrize("depthwise", [False, True])
def test_dense_form_matches_packed_form_and_oracle(rng, depthwise):
    b, n, c_in, c_out = 3, 40, 4, 6
    points = rng.random((b, n, 3))
    x = rng.standard_normal((b, n, c_in))
    w = rng.standard_normal((3, 3, 3, c_in) if depthwise else (3, 3, 3, c_in, c_out))
    c_y = c_in if depthwise else c_out
    dy = rng.standard_normal((b, n, c_y))
    kw = {"dilation": 2, "depthwise": depthwise}
    y = pointwise_conv(points, x, w, 0.15, **kw)
    dx, dw = pointwise_conv_backward(dy, points, x, w, 0.15, **kw)
    assert y.shape == (b, n, c_y) and dx.shape == (b, n, c_in) and dw.shape == w.shape
    offsets = np.arange(b + 1, dtype=np.int32) * n  # any integer dtype
    y_p = pointwise_conv(points.reshape(-1, 3), x.reshape(-1, c_in), w, 0.15, offsets=offsets, **kw)
    dx_p, dw_p = pointwise_conv_backward(
        dy.reshape(-1, c_y),
        points.reshape(-1, 3),
        x.reshape(-1, c_in),
        w,
        0.15,
        offsets=offsets,
        **kw,
    )
    assert np.array_equal(y.reshape(-1, c_y), y_p)
    assert np.array_equal(dx.reshape(-1, c_in), dx_p)
    assert np.array_equal(dw, dw_p)
    a = dense_operator(points, 0.15, 3, 2, offsets)
    assert_close(y.reshape(-1, c_y), oracle_forward(a, x.reshape(-1, c_in), w, depthwise), 1e-12)
    dx_ref, dw_ref = oracle_backward(a, x.reshape(-1, c_in), w, dy.reshape(-1, c_y), depthwise)
    assert_close(dx.reshape(-1, c_in), dx_ref, 1e-12)
    assert_close(dw, dw_ref, 1e-12)


def test_dense_queries_match_packed_queries(rng):
    b, n, m = 2, 30, 12
    points, queries = rng.random((b, n, 3)), rng.random((b, m, 3))
    x, w = rng.standard_normal((b, n, 3)), rng.standard_normal((3, 3, 3, 3, 5))
    dy = rng.standard_normal((b, m, 5))
    y = pointwise_conv(points, x, w, 0.2, queries=queries)
    dx, dw = pointwise_conv_backward(dy, points, x, w, 0.2, queries=queries)
    assert y.shape == (b, m, 5) and dx.shape == (b, n, 3)
    offs, q_offs = np.arange(b + 1) * n, np.arange(b + 1) * m
    a = dense_operator(points, 0.2, 3, 1, offs, queries, q_offs)
    assert_close(y.reshape(-1, 5), oracle_forward(a, x.reshape(-1, 3), w), 1e-12)
    dx_ref, dw_ref = oracle_backward(a, x.reshape(-1, 3), w, dy.reshape(-1, 5))
    assert_close(dx.reshape(-1, 3), dx_ref, 1e-12)
    assert_close(dw, dw_ref, 1e-12)


def test_queries_with_empty_query_cloud_and_empty_point_cloud(rng):
    points = rng.random((50, 3))
    offsets = np.array([0, 20, 20, 50])  # the middle cloud has no points
    queries = rng.random((25, 3))
    query_offsets = np.array([0, 0, 10, 25])  # the first cloud has no queries
    case = {
        "points": points,
        "offsets": offsets,
        "voxel_size": 0.2,
        "kernel_size": 3,
        "dilation": 1,
        "depthwise": False,
        "x": rng.standard_normal((50, 2)),
        "w": rng.standard_normal((3, 3, 3, 2, 4)),
        "dy": rng.standard_normal((25, 4)),
        "queries": queries,
        "query_offsets": query_offsets,
    }
    y, dx, dw = run(case)
    y_ref, dx_ref, dw_ref, a = oracle(case)
    assert np.all(y[:10] == 0)  # queries of the middle cloud have no points to see
    assert a[:, 10:, :].any()
    assert_close(y, y_ref, 1e-12)
    assert_close(dx, dx_ref, 1e-12)
    assert_close(dw, dw_ref, 1e-12)


def test_empty_batch_gives_empty_outputs():
    points = np.zeros((0, 3))
    x = np.zeros((0, 4))
    w = np.ones((3, 3, 3, 4, 2))
    y = pointwise_conv(points, x, w, 0.1)
    dx, dw = pointwise_conv_backward(np.zeros((0, 2)), points, x, w, 0.1)
    assert y.shape == (0, 2) and dx.shape == (0, 4)
    assert np.array_equal(dw, np.zeros_like(w))


# --- points on cell faces: the relation is not symmetric ------------------------------------


def lattice_case(rng, scale, voxel_size, kernel_size, dilation, depthwise, n=150):
    points = rng.integers(0, 12, size=(n, 3)) / scale
    c_in, c_out = 3, 4
    return {
        "points": points,
        "offsets": None,
        "voxel_size": voxel_size,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "depthwise": depthwise,
        "x": rng.standard_normal((n, c_in)),
        "w": rng.standard_normal((kernel_size,) * 3 + ((c_in,) if depthwise else (c_in, c_out))),
        "dy": rng.standard_normal((n, c_in if depthwise else c_out)),
        "queries": None,
        "query_offsets": None,
    }


def asymmetric_pairs(a) -> int:
    """Number of (i, j) with j in a cell of i while i sits in a hole (or outside) of j."""
    related = (a > 0).any(axis=0)
    return int((related & ~related.T).sum())


LATTICES = [
    (8.0, 0.25, 3, 2),
    (8.0, 0.25, 3, 3),
    (16.0, 0.125, 3, 2),
    (16.0, 0.125, 3, 3),
    (8.0, 0.25, 5, 2),
    (8.0, 0.125, 3, 2),
]


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("scale,voxel,k,s", LATTICES)
def test_dyadic_lattice_on_cell_faces_matches_oracle_and_adjoint(
    rng, scale, voxel, k, s, depthwise
):
    case = lattice_case(rng, scale, voxel, k, s, depthwise, n=100 if k == 5 else 150)
    y, dx, dw = run(case)
    y_ref, dx_ref, dw_ref, a = oracle(case)
    if scale * voxel == 2 and s > 1:
        # points on cell faces: the test is only meaningful if the relation really is asymmetric
        assert asymmetric_pairs(a) > 0
    assert_close(y, y_ref, 1e-12, "forward")
    assert_close(dx, dx_ref, 1e-12, "input gradient")
    assert_close(dw, dw_ref, 1e-12, "weight gradient")
    assert adjoint_gap(case["x"] * dx, y * case["dy"]) <= 1e-12
    assert adjoint_gap(case["w"] * dw, y * case["dy"]) <= 1e-12


# --- adjoint identity and finite differences (library only) --------------------------------


@settings(max_examples=40, **SETTINGS)
@given(conv_cases(allow_queries=True))
def test_adjoint_identity_for_input_and_weight_gradients(case):
    y, dx, dw = run(case)
    assert adjoint_gap(case["x"] * dx, y * case["dy"]) <= 1e-12
    assert adjoint_gap(case["w"] * dw, y * case["dy"]) <= 1e-12


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize(
    "layout,k,s",
    [
        ("uniform", 3, 1),
        ("clustered", 3, 3),
        ("lattice", 3, 2),
        ("uniform", 5, 2),
        ("uniform", 1, 1),
    ],
)
def test_gradients_match_central_finite_differences(layout, k, s, depthwise):
    """Loss L = <g, y> + 0.5 |y|^2, so dL/dy = g + y; directional derivatives along random
    directions of feats and weight agree with central differences."""
    rng = np.random.default_rng(7)
    n, c_in, c_out = 80, 3, 5
    points = make_cloud(rng, n, layout)
    v = voxel_for(n, k, s, layout)
    x = rng.standard_normal((n, c_in))
    w = rng.standard_normal((k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out))
    g = rng.standard_normal((n, c_in if depthwise else c_out))
    km = pwconv_cy.kernel_map(points, v, kernel_size=k, dilation=s)

    def loss(x_, w_):
        y = pointwise_conv(points, x_, w_, v, dilation=s, kernel_map=km, depthwise=depthwise)
        return float(np.sum(g * y) + 0.5 * np.sum(y * y))

    y = pointwise_conv(points, x, w, v, dilation=s, kernel_map=km, depthwise=depthwise)
    dx, dw = pointwise_conv_backward(
        g + y, points, x, w, v, dilation=s, kernel_map=km, depthwise=depthwise
    )
    eps = 1e-4
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        fd = (loss(x + eps * d, w) - loss(x - eps * d, w)) / (2 * eps)
        assert rel(np.sum(dx * d), fd) <= 1e-7
        d = rng.standard_normal(w.shape)
        fd = (loss(x, w + eps * d) - loss(x, w - eps * d)) / (2 * eps)
        assert rel(np.sum(dw * d), fd) <= 1e-7


# --- precision and determinism --------------------------------------------------------------


@settings(max_examples=25, **SETTINGS)
@given(conv_cases(allow_queries=True))
def test_float32_agrees_with_float64(case):
    """float32 results within 1e-5 of float64's, relative to the sums of the terms' magnitudes
    (the operator on |x|, |W|, |dy|): float32 rounds each term, so where terms cancel (e.g.
    every point in one cell) the result's own norm is not the scale of its error."""
    y64, dx64, dw64 = run(case)
    y32, dx32, dw32 = run(cast(case, np.float32))
    magnitudes = run({**case, "x": np.abs(case["x"]), "w": np.abs(case["w"]),
                      "dy": np.abs(case["dy"])})
    assert y32.dtype == dx32.dtype == dw32.dtype == np.float32
    for a32, a64, bound, what in zip((y32, dx32, dw32), (y64, dx64, dw64), magnitudes,
                                     ("forward", "input gradient", "weight gradient")):
        assert np.all(np.abs(a64) <= bound * (1 + 1e-12)), what  # it bounds the result
        scale = np.linalg.norm(bound)
        if scale == 0:
            assert not a32.any(), what
        else:
            assert np.linalg.norm(a32.astype(np.float64) - a64) <= 1e-5 * scale, what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("sizes", [[1500, 0, 1200, 700, 900], [300, 0] * 6 + [250] * 8],
                         ids=["5 clouds", "20 clouds"])
def test_one_and_two_threads_are_bit_identical(dtype, depthwise, sizes):
    """Several thousand points in five clouds: enough row blocks that two threads really split
    the forward gather, the transposed gather and the weight-gradient reduction.  Twenty clouds
    take the backward by cloud, whose tasks two threads split likewise."""
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.random((m, 3)) for m in sizes]).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    c_in, c_out = 9, 9
    case = {
        "points": points,
        "offsets": offsets,
        "voxel_size": 0.06,
        "kernel_size": 3,
        "dilation": 2,
        "depthwise": depthwise,
        "x": rng.standard_normal((len(points), c_in)).astype(dtype),
        "w": rng.standard_normal((3, 3, 3, c_in) if depthwise else (3, 3, 3, c_in, c_out)).astype(
            dtype
        ),
        "dy": rng.standard_normal((len(points), c_out)).astype(dtype),
        "queries": None,
        "query_offsets": None,
    }
    one = run(case, num_threads=1)
    two = run(case, num_threads=2)
    again = run(case, num_threads=2)
    for a, b, c, what in zip(one, two, again, ("forward", "input gradient", "weight gradient")):
        assert np.array_equal(a, b), f"{what}: 1 thread != 2 threads"
        assert np.array_equal(b, c), f"{what}: two runs differ"


@pytest.mark.parametrize("depthwise", [False, True])
def test_weight_gradient_of_many_blocks_is_thread_independent_and_exact(depthwise):
    """40,000 points: 157 blocks of 256, which the weight gradient sums two at a time per task
    (at least 64 tasks) before adding the tasks in order.  The result must not depend on the
    thread count, and must match the float64 computation of dW_f = sum_i mean_f(x)_i^T dy_i."""
    rng = np.random.default_rng(11)
    sizes = [20_000, 0, 20_000]
    points = np.concatenate([rng.random((m, 3)) for m in sizes])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    c = 4
    km = pwconv_cy.kernel_map(points, 0.04, offsets=offsets)
    x = rng.standard_normal((len(points), c)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, c) if depthwise else (3, 3, 3, c, c)).astype(np.float32)
    dy = rng.standard_normal((len(points), c)).astype(np.float32)
    results = [pointwise_conv_backward(dy, points, x, w, 0.04, offsets=offsets, kernel_map=km,
                                       depthwise=depthwise, num_threads=t) for t in (1, 2, 3)]
    for dx, dw in results[1:]:
        assert np.array_equal(dx, results[0][0]) and np.array_equal(dw, results[0][1])
    # float64 reference of the weight gradient from the map: mean_f(x)_i per row and cell
    rows = np.repeat(np.arange(km.n_queries), np.diff(km.splits))
    cells = km.cell.astype(np.int64)
    weight = 1.0 / km.counts[rows, cells]
    means = np.zeros((km.n_queries, 27, c))
    np.add.at(means, (rows, cells), x[km.index].astype(np.float64) * weight[:, None])
    if depthwise:
        want = np.einsum("ifc,ic->fc", means, dy.astype(np.float64))
    else:
        want = np.einsum("ifa,ib->fab", means, dy.astype(np.float64))
    got = results[0][1].reshape(want.shape).astype(np.float64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depthwise", [False, True])
def test_backward_with_packed_counts_equals_looked_up_counts(rng, dtype, depthwise):
    """The backward's transposed keys carry each entry's n_i(f) (saturated at 2**16 - 1, then
    looked up): the same bits as keys without counts, whose weights are all looked up.  A dense
    clump gives cells with more than 65,535 points, so the saturated case is met too."""
    clump = np.full((66_000, 3), 0.5) + rng.random((66_000, 3)) * 1e-3
    a, b = rng.random((400, 3)), rng.random((300, 3))
    points = np.concatenate([a, b, clump])
    offsets = np.cumsum([0, len(a), 0, len(b), len(clump)])
    queries = np.concatenate([a[:40], b[:30], clump[:2]])
    c = 3
    km = pwconv_cy.kernel_map(points, 0.15, dilation=2, offsets=offsets, queries=queries,
                              query_offsets=np.cumsum([0, 40, 0, 30, 2]))
    assert km.counts.max() > 0xFFFF
    x = rng.standard_normal((len(points), c)).astype(dtype)
    w = rng.standard_normal((27, c) if depthwise else (27, c, c)).astype(dtype).reshape(-1)
    dy = rng.standard_normal((km.n_queries, c)).astype(dtype)
    results = []
    for with_counts in (True, False):
        tsplits, tkeys, count_bits = pwconv_cy._core.transpose_map(
            km.splits, km.index, km.cell, km.counts, km.n_points, 3, km.offsets,
            km.query_offsets, with_counts, 2)
        assert count_bits == (16 if with_counts else 0)
        dx, dw = np.empty_like(x), np.empty_like(w)
        pwconv_cy._core.conv_backward_(km.splits, km.index, km.cell, km.counts, 3, tsplits,
                                       tkeys, count_bits, x, dy, w, depthwise, dx, dw, 2)
        results.append((dx, dw))
    for a, b in zip(*results):
        assert np.array_equal(a, b)



# --- the backward by cloud (batches of at least 16 clouds) -----------------------------------


def many_clouds_case(rng, k, s, depthwise, with_queries, n_clouds=18, layout="uniform"):
    """n_clouds small clouds (two of them empty; with queries, one query cloud empty): enough
    for the backward that transposes the map cloud by cloud on the fly."""
    sizes = rng.integers(1, 25, n_clouds)
    sizes[[2, 9]] = 0
    points = np.concatenate([make_cloud(rng, int(n), layout) for n in sizes])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    c_in, c_out = 3, 5
    case = {
        "points": points,
        "offsets": offsets,
        "voxel_size": voxel_for(int(sizes.max()), k, s, layout),
        "kernel_size": k,
        "dilation": s,
        "depthwise": depthwise,
        "x": rng.standard_normal((len(points), c_in)),
        "w": rng.standard_normal((k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out)),
        "queries": None,
        "query_offsets": None,
    }
    m = len(points)
    if with_queries:
        q_sizes = rng.integers(0, 20, n_clouds)
        q_sizes[5] = 0
        case["queries"] = np.concatenate([make_cloud(rng, int(n), layout) for n in q_sizes])
        case["query_offsets"] = np.concatenate([[0], np.cumsum(q_sizes)]).astype(np.int64)
        m = len(case["queries"])
    case["dy"] = rng.standard_normal((m, c_in if depthwise else c_out))
    return case


def backward_over_transposed_map(case, km, threads=2):
    """The backward as a gather over the stored transposed map (the path of small batches)."""
    x, dy = case["x"], case["dy"]
    w = case["w"].reshape(-1)
    dx, dw = np.empty_like(x), np.empty_like(w)
    tsplits, tkeys, count_bits = km._transposed_packed(threads)
    pwconv_cy._core.conv_backward_(km.splits, km.index, km.cell, km.counts, km.kernel_size,
                                   tsplits, tkeys, count_bits, x, dy, w, case["depthwise"], dx,
                                   dw, threads)
    return dx, dw.reshape(case["w"].shape)


def backward_by_cloud(case, km, threads=2):
    """The backward transposing cloud by cloud; asserts that this path ran."""
    x, dy = case["x"], case["dy"]
    w = case["w"].reshape(-1)
    dx, dw = np.empty_like(x), np.empty_like(w)
    ran = pwconv_cy._core.conv_backward_by_cloud_(
        km.splits, km.index, km.cell, km.kernel_size, km.offsets, km.query_offsets, x, dy, w,
        case["depthwise"], dx, dw, threads)
    assert ran is True
    return dx, dw.reshape(case["w"].shape)


@pytest.mark.parametrize("k, s, layout", [(1, 1, "uniform"), (3, 1, "lattice"),
                                          (3, 3, "clustered"), (5, 2, "uniform")])
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("with_queries", [False, True])
def test_backward_by_cloud_matches_oracle_and_the_transposed_gather(k, s, layout, depthwise,
                                                                    with_queries):
    """Batches of >= 16 clouds take the backward by cloud: exact against the oracle, the input
    gradient bit for bit the transposed gather's, the weight gradient equal to rounding (it is
    summed in groups of clouds instead of blocks of points)."""
    rng = np.random.default_rng(100 * k + 10 * s + 2 * depthwise + with_queries)
    case = many_clouds_case(rng, k, s, depthwise, with_queries, layout=layout)
    _, dx, dw = run(case)
    _, dx_ref, dw_ref, _ = oracle(case)
    assert_close(dx, dx_ref, 1e-12, "input gradient")
    assert_close(dw, dw_ref, 1e-12, "weight gradient")
    km = pwconv_cy.kernel_map(case["points"], case["voxel_size"], kernel_size=k, dilation=s,
                              offsets=case["offsets"], queries=case["queries"],
                              query_offsets=case["query_offsets"])
    dx_cloud, dw_cloud = backward_by_cloud(case, km)
    assert np.array_equal(dx_cloud, dx) and np.array_equal(dw_cloud, dw)
    dx_t, dw_t = backward_over_transposed_map(case, km)
    assert np.array_equal(dx_t, dx_cloud), "input gradients differ between the two paths"
    assert_close(dw_t, dw_cloud, 1e-13, "weight gradient of the two paths")


@pytest.mark.parametrize("n_clouds, runs", [(15, False), (16, True)])
def test_backward_by_cloud_runs_from_sixteen_clouds(n_clouds, runs):
    rng = np.random.default_rng(5)
    case = many_clouds_case(rng, 3, 1, False, False, n_clouds=n_clouds)
    km = pwconv_cy.kernel_map(case["points"], case["voxel_size"], offsets=case["offsets"])
    x, dy, w = case["x"], case["dy"], case["w"].reshape(-1)
    ran = pwconv_cy._core.conv_backward_by_cloud_(
        km.splits, km.index, km.cell, 3, km.offsets, km.query_offsets, x, dy, w, False,
        np.empty_like(x), np.empty_like(w), 2)
    assert ran is runs
    # either way the public backward is exact
    _, dx, dw = run(case)
    _, dx_ref, dw_ref, _ = oracle(case)
    assert_close(dx, dx_ref, 1e-12, "input gradient")
    assert_close(dw, dw_ref, 1e-12, "weight gradient")


def test_backward_by_cloud_rejects_a_map_that_crosses_clouds():
    """Rows must refer to their own cloud's points: offsets other than the map's (the first
    boundary moved) are caught, not read out of bounds."""
    rng = np.random.default_rng(8)
    case = many_clouds_case(rng, 3, 1, False, False)
    km = pwconv_cy.kernel_map(case["points"], case["voxel_size"], offsets=case["offsets"])
    shifted = km.offsets.copy()
    shifted[1] += 1
    x, dy, w = case["x"], case["dy"], case["w"].reshape(-1)
    with pytest.raises(ValueError, match="refers to a point outside the query's cloud"):
        pwconv_cy._core.conv_backward_by_cloud_(
            km.splits, km.index, km.cell, 3, shifted, shifted, x, dy, w, False,
            np.empty_like(x), np.empty_like(w), 2)


@pytest.mark.skipif(len(simd_modes()) < 2, reason="this CPU has neither AVX-512 nor AVX2")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_in, c_out", [(3, 9), (9, 9), (11, 16), (4, 17), (1, 8), (20, 33),
                                         (33, 20), (64, 40), (5, 65), (80, 33), (40, 16)])
@pytest.mark.parametrize("n_clouds", [3, 20], ids=["transposed", "by cloud"])
def test_operator_is_bit_identical_with_and_without_simd(dtype, c_in, c_out, n_clouds):
    """The SIMD loops -- AVX-512 (float32: the weight gradient's; and the cell products of the
    forward and the input gradient for 16 outputs or more, row by row for small weights and in
    tiles of slots for large ones, 64 x 40 x 27 floats being over 256 KiB) and their AVX2 twins
    for the cell products; float64 takes the portable loops either way -- perform the portable
    loops' operations in their order: identical bits, forward and both backward paths, for every
    family this CPU has."""
    rng = np.random.default_rng(c_in * 100 + c_out + n_clouds)
    sizes = rng.integers(50, 400, n_clouds)
    points = np.concatenate([rng.random((int(m), 3)) for m in sizes])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x = rng.standard_normal((len(points), c_in)).astype(dtype)
    w = rng.standard_normal((3, 3, 3, c_in, c_out)).astype(dtype)
    dy = rng.standard_normal((len(points), c_out)).astype(dtype)
    km = pwconv_cy.kernel_map(points, 0.12, dilation=2, offsets=offsets)
    results = []
    modes = simd_modes()
    for mode in modes:
        with simd_mode(mode):
            results.append(pointwise_conv_backward(dy, points, x, w, 0.12, dilation=2,
                                                   offsets=offsets, kernel_map=km)
                           + (pointwise_conv(points, x, w, 0.12, dilation=2, offsets=offsets,
                                             kernel_map=km),))
    for mode, other in zip(modes[1:], results[1:]):
        for a, b, what in zip(results[0], other, ("input gradient", "weight gradient", "forward")):
            assert np.array_equal(a, b), f"{what}: {modes[0]} and {mode} loops differ"

    # and right: dW_f = sum_i mean_f(x)_i^T dy_i in float64, from the map
    rows = np.repeat(np.arange(km.n_queries), np.diff(km.splits))
    cells = km.cell.astype(np.int64)
    means = np.zeros((km.n_queries, 27, c_in))
    np.add.at(means, (rows, cells), x[km.index].astype(np.float64) / km.counts[rows, cells, None])
    want = np.einsum("ifa,ib->fab", means, dy.astype(np.float64))
    got = results[0][1].reshape(want.shape).astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
    # and the forward: y_i = sum_f mean_f(x)_i W_f
    y_want = np.einsum("ifa,fab->ib", means, w.reshape(27, c_in, c_out).astype(np.float64))
    assert np.linalg.norm(results[0][2] - y_want) <= tol * np.linalg.norm(y_want)

@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_alone_equals_the_full_backward(rng, depthwise, dtype):
    points = rng.random((300, 3))
    offsets = np.array([0, 120, 300])
    x = rng.standard_normal((300, 4)).astype(dtype)
    w = rng.standard_normal((3, 3, 3, 4) if depthwise else (3, 3, 3, 4, 6)).astype(dtype)
    dy = rng.standard_normal((300, 4 if depthwise else 6)).astype(dtype)
    kw = {"dilation": 2, "offsets": offsets, "depthwise": depthwise}
    dx, dw = pointwise_conv_backward(dy, points, x, w, 0.1, **kw)
    none, dw_only = pointwise_conv_backward(dy, points, x, w, 0.1, feats_grad=False, **kw)
    assert none is None and dx.shape == x.shape
    np.testing.assert_array_equal(dw_only, dw)
    with pytest.raises(TypeError, match="feats_grad must be True or False, got 1"):
        pointwise_conv_backward(dy, points, x, w, 0.1, feats_grad=1, **kw)


# --- kernel maps ----------------------------------------------------------------------------


@pytest.mark.parametrize("depthwise", [False, True])
def test_reusing_a_kernel_map_gives_identical_results(rng, depthwise):
    points = rng.random((300, 3))
    offsets = np.array([0, 120, 300])
    queries = rng.random((40, 3))
    query_offsets = np.array([0, 15, 40])
    x = rng.standard_normal((300, 4))
    w = rng.standard_normal((3, 3, 3, 4) if depthwise else (3, 3, 3, 4, 6))
    c_y = 4 if depthwise else 6
    for q, qo in ((None, None), (queries, query_offsets)):
        kw = {
            "dilation": 2,
            "offsets": offsets,
            "queries": q,
            "query_offsets": qo,
            "depthwise": depthwise,
        }
        dy = rng.standard_normal((300 if q is None else 40, c_y))
        y = pointwise_conv(points, x, w, 0.1, **kw)
        dx, dw = pointwise_conv_backward(dy, points, x, w, 0.1, **kw)
        km = pwconv_cy.kernel_map(
            points, 0.1, kernel_size=3, dilation=2, offsets=offsets, queries=q, query_offsets=qo
        )
        index = pwconv_cy.NeighborIndex(points, 0.1, offsets=offsets)
        km2 = index.kernel_map(3, 2, queries=q, query_offsets=qo)
        for m in (km, km2, km):  # the cached transposed map is reused the second time
            y_m = pointwise_conv(points, x, w, 0.1, kernel_map=m, **kw)
            dx_m, dw_m = pointwise_conv_backward(dy, points, x, w, 0.1, kernel_map=m, **kw)
            assert np.array_equal(y, y_m)
            assert np.array_equal(dx, dx_m)
            assert np.array_equal(dw, dw_m)


def _mismatch_cases():
    rng = np.random.default_rng(11)
    points = rng.random((60, 3))
    offsets = np.array([0, 25, 60])
    queries = rng.random((10, 3))
    query_offsets = np.array([0, 4, 10])
    base = {
        "points": points,
        "offsets": offsets,
        "voxel_size": 0.2,
        "kernel_size": 3,
        "dilation": 2,
        "queries": None,
        "query_offsets": None,
    }
    with_q = dict(base, queries=queries, query_offsets=query_offsets)
    other_points = points.copy()
    other_points[7, 1] += 0.01
    return [
        ("other points", base, dict(base, points=other_points), "other points"),
        ("other offsets", base, dict(base, offsets=np.array([0, 30, 60])), "other points"),
        (
            "fewer points",
            base,
            dict(base, points=points[:50], offsets=np.array([0, 25, 50])),
            "other points",
        ),
        ("voxel size", base, dict(base, voxel_size=0.25), "voxel_size=0.2"),
        ("dilation", base, dict(base, dilation=3), "dilation=2"),
        ("kernel size", base, dict(base, kernel_size=5), "kernel_size=3"),
        ("queries vs none", base, with_q, "other query points"),
        ("none vs queries", with_q, base, "other query points"),
        ("other queries", with_q, dict(with_q, queries=queries + 0.01), "other query points"),
    ]


@pytest.mark.parametrize(
    "built,used,match", [c[1:] for c in _mismatch_cases()], ids=[c[0] for c in _mismatch_cases()]
)
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_kernel_map_for_other_geometry_raises(built, used, match, which):
    km = pwconv_cy.kernel_map(
        built["points"],
        built["voxel_size"],
        kernel_size=built["kernel_size"],
        dilation=built["dilation"],
        offsets=built["offsets"],
        queries=built["queries"],
        query_offsets=built["query_offsets"],
    )
    k = used["kernel_size"]
    n = len(used["points"])
    x = np.ones((n, 2))
    w = np.ones((k, k, k, 2, 3))
    kw = {
        "dilation": used["dilation"],
        "offsets": used["offsets"],
        "queries": used["queries"],
        "query_offsets": used["query_offsets"],
        "kernel_map": km,
    }
    with pytest.raises(ValueError, match=match):
        if which == "forward":
            pointwise_conv(used["points"], x, w, used["voxel_size"], **kw)
        else:
            m = n if used["queries"] is None else len(used["queries"])
            pointwise_conv_backward(np.ones((m, 3)), used["points"], x, w, used["voxel_size"], **kw)


#: Mismatches that check_map=False does not see: same sizes and offsets, other coordinates.
COORDINATES_ONLY = ("other points", "other queries")


@pytest.mark.parametrize(
    "built,used,match,case",
    [c[1:] + (c[0],) for c in _mismatch_cases()], ids=[c[0] for c in _mismatch_cases()]
)
def test_check_map_false_keeps_the_structural_checks(built, used, match, case):
    """check_map=False skips only the coordinates' fingerprint: every mismatch of sizes, offsets,
    voxel size, kernel size, dilation or query presence still raises (forward and backward); a
    map of other coordinates of the same sizes is then used as it is (documented)."""
    km = pwconv_cy.kernel_map(
        built["points"], built["voxel_size"], kernel_size=built["kernel_size"],
        dilation=built["dilation"], offsets=built["offsets"], queries=built["queries"],
        query_offsets=built["query_offsets"])
    k, n = used["kernel_size"], len(used["points"])
    m = n if used["queries"] is None else len(used["queries"])
    x, w, dy = np.ones((n, 2)), np.ones((k, k, k, 2, 3)), np.ones((m, 3))
    kw = {"dilation": used["dilation"], "offsets": used["offsets"], "queries": used["queries"],
          "query_offsets": used["query_offsets"], "kernel_map": km, "check_map": False}
    if case in COORDINATES_ONLY:
        y = pointwise_conv(used["points"], x, w, used["voxel_size"], **kw)
        assert y.shape == (m, 3)
        pointwise_conv_backward(dy, used["points"], x, w, used["voxel_size"], **kw)
        return
    with pytest.raises(ValueError, match=match):
        pointwise_conv(used["points"], x, w, used["voxel_size"], **kw)
    with pytest.raises(ValueError, match=match):
        pointwise_conv_backward(dy, used["points"], x, w, used["voxel_size"], **kw)


def test_check_map_false_gives_the_same_results_and_is_validated():
    """With the map's own points, check_map=False changes nothing but the work done; a flag that
    is not a bool is refused, naming check_map."""
    rng = np.random.default_rng(3)
    points = rng.random((200, 3))
    offsets = np.array([0, 80, 200])
    km = pwconv_cy.kernel_map(points, 0.15, dilation=2, offsets=offsets)
    x, w = rng.standard_normal((200, 4)), rng.standard_normal((3, 3, 3, 4, 5))
    dy = rng.standard_normal((200, 5))
    kw = {"dilation": 2, "offsets": offsets, "kernel_map": km}
    y = pointwise_conv(points, x, w, 0.15, **kw)
    assert np.array_equal(pointwise_conv(points, x, w, 0.15, check_map=False, **kw), y)
    dx, dw = pointwise_conv_backward(dy, points, x, w, 0.15, **kw)
    dx2, dw2 = pointwise_conv_backward(dy, points, x, w, 0.15, check_map=False, **kw)
    assert np.array_equal(dx, dx2) and np.array_equal(dw, dw2)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="check_map must be True or False"):
            pointwise_conv(points, x, w, 0.15, check_map=bad, **kw)
        with pytest.raises(TypeError, match="check_map must be True or False"):
            pointwise_conv_backward(dy, points, x, w, 0.15, check_map=bad, **kw)


@pytest.mark.parametrize("change", ["swap two rows", "opposite moves"])
def test_kernel_map_for_subtly_other_points_raises(change):
    """A large cloud changed so that its size, offsets and coordinate sum stay the same: the map
    no longer describes these points and must be refused, not silently used."""
    rng = np.random.default_rng(5)
    points = rng.random((1000, 3))
    km = pwconv_cy.kernel_map(points, 0.1)
    other = points.copy()
    if change == "swap two rows":
        other[[1, 2]] = other[[2, 1]]
    else:
        other[1, 0] += 0.25
        other[2, 0] -= 0.25
    x, w = rng.standard_normal((1000, 2)), rng.standard_normal((3, 3, 3, 2, 2))
    assert not np.array_equal(
        pointwise_conv(other, x, w, 0.1), pointwise_conv(points, x, w, 0.1)
    )  # the change matters
    with pytest.raises(ValueError, match="kernel_map was built for other points"):
        pointwise_conv(other, x, w, 0.1, kernel_map=km)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_points_with_a_kernel_map_raise_as_non_finite(value):
    """With a kernel map the points are compared by digest instead of being scanned for NaN
    (the map's own points were scanned); non-finite points still get the finiteness error,
    naming the row, not a mismatch."""
    rng = np.random.default_rng(6)
    points = rng.random((300, 3))
    km = pwconv_cy.kernel_map(points, 0.1)
    bad = points.copy()
    bad[17, 1] = value
    x, w = rng.standard_normal((300, 2)), rng.standard_normal((3, 3, 3, 2, 2))
    for call in (lambda: pointwise_conv(bad, x, w, 0.1, kernel_map=km),
                 lambda: pointwise_conv_backward(np.ones((300, 2)), bad, x, w, 0.1,
                                                 kernel_map=km)):
        with pytest.raises(ValueError, match=r"points must be finite.*first at row 17"):
            call()

def test_kernel_map_of_wrong_type_raises(rng):
    points = rng.random((10, 3))
    with pytest.raises(TypeError, match="kernel_map must be a pwconv_cy.KernelMap"):
        pointwise_conv(
            points,
            np.ones((10, 2)),
            np.ones((3, 3, 3, 2, 2)),
            0.1,
            kernel_map=(np.zeros(11), np.zeros(0)),
        )


# --- bad inputs -----------------------------------------------------------------------------

N = 10


def _good(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (
        rng.random((N, 3)),
        rng.standard_normal((N, 4)).astype(dtype),
        rng.standard_normal((3, 3, 3, 4, 5)).astype(dtype),
    )


def _with_nan(a, value=np.nan):
    a = a.copy()
    a.flat[a.size // 2] = value
    return a


BAD_FORWARD = [
    (
        "feature rows != points",
        lambda p, x, w: (p, x[:-1], w, {}),
        ValueError,
        r"feats must have shape \(n_points=10, c\), got \(9, 4\)",
    ),
    (
        "features 1-D",
        lambda p, x, w: (p, x[:, 0], w, {}),
        ValueError,
        r"feats must have shape \(n_points=10, c\), got \(10,\)",
    ),
    (
        "weight rank 4 without depthwise",
        lambda p, x, w: (p, x, w[..., 0], {}),
        ValueError,
        (
            r"weight must have shape \(K, K, K, c_in, c_out\), got \(3, 3, 3, 4\) \(a 4-D weight is "
            r"for depthwise=True\)"
        ),
    ),
    (
        "weight rank 5 with depthwise",
        lambda p, x, w: (p, x, w, {"depthwise": True}),
        ValueError,
        (
            r"weight must have shape \(K, K, K, c\), got \(3, 3, 3, 4, 5\) \(a 5-D weight is for "
            r"depthwise=False\)"
        ),
    ),
    (
        "weight not a cube",
        lambda p, x, w: (p, x, w[:, :, :1], {}),
        ValueError,
        r"weight must have shape \(K, K, K, c_in, c_out\) with K odd, got \(3, 3, 1, 4, 5\)",
    ),
    (
        "even K",
        lambda p, x, w: (p, x, w[:2, :2, :2], {}),
        ValueError,
        r"with K odd, got \(2, 2, 2, 4, 5\)",
    ),
    (
        "c_in != feature channels",
        lambda p, x, w: (p, x[:, :3], w, {}),
        ValueError,
        r"with c_in = 3 \(the features' channels\), got \(3, 3, 3, 4, 5\)",
    ),
    (
        "depthwise channels",
        lambda p, x, w: (p, x[:, :3], w[..., 0], {"depthwise": True}),
        ValueError,
        r"with c = 3 \(the features' channels\), got \(3, 3, 3, 4\)",
    ),
    (
        "mixed dtypes",
        lambda p, x, w: (p, x.astype(np.float32), w, {}),
        TypeError,
        r"weight and feats must have the same dtype, got weight float64 and feats float32",
    ),
    (
        "integer features",
        lambda p, x, w: (p, x.astype(np.int64), w, {}),
        TypeError,
        r"feats must have dtype float32 or float64, got int64",
    ),
    (
        "integer weight",
        lambda p, x, w: (p, x, w.astype(np.int32), {}),
        TypeError,
        r"weight must have dtype float32 or float64, got int32",
    ),
    (
        "NaN in weight",
        lambda p, x, w: (p, x, _with_nan(w), {}),
        ValueError,
        r"weight must be finite, got nan at index \(1, 1, 1, 2, 0\) \(pass check_finite=False",
    ),
    (
        "Inf in features",
        lambda p, x, w: (p, _with_nan(x, np.inf), w, {}),
        ValueError,
        r"feats must be finite, got inf at index \(5, 0\)",
    ),
    (
        "NaN in coordinates",
        lambda p, x, w: (_with_nan(p), x, w, {}),
        ValueError,
        r"points must be finite",
    ),
    (
        "offsets with dense points",
        lambda p, x, w: (p[None], x[None], w, {"offsets": [0, N]}),
        ValueError,
        r"offsets must be None when points is dense",
    ),
    (
        "offsets not ending at n",
        lambda p, x, w: (p, x, w, {"offsets": [0, 4, 9]}),
        ValueError,
        r"offsets must end at the number of points \(10\), got offsets\[-1\] = 9",
    ),
    (
        "voxel size zero",
        lambda p, x, w: (p, x, w, {"voxel_size": 0.0}),
        ValueError,
        r"voxel_size must be positive and finite, got 0.0",
    ),
    (
        "dilation zero",
        lambda p, x, w: (p, x, w, {"dilation": 0}),
        ValueError,
        r"dilation must be >= 1, got 0",
    ),
    (
        "num_threads zero",
        lambda p, x, w: (p, x, w, {"num_threads": 0}),
        ValueError,
        r"num_threads must be None \(the OpenMP default\) or >= 1, got 0",
    ),
    (
        "depthwise not bool",
        lambda p, x, w: (p, x, w, {"depthwise": 1}),
        TypeError,
        r"depthwise must be True or False, got 1",
    ),
]


def _call(fn_name, p, x, w, extra, grad_out=None):
    kw = dict(extra)
    v = kw.pop("voxel_size", 0.3)
    if fn_name == "forward":
        return pointwise_conv(p, x, w, v, **kw)
    if grad_out is None:
        lead = x.shape[:-1] if x.ndim > 1 else x.shape
        grad_out = np.ones((*lead, 5), dtype=x.dtype if x.dtype.kind == "f" else np.float64)
    return pointwise_conv_backward(grad_out, p, x, w, v, **kw)


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize(
    "make,error,match", [c[1:] for c in BAD_FORWARD], ids=[c[0] for c in BAD_FORWARD]
)
def test_bad_inputs_raise_with_clear_message(make, error, match, which):
    p, x, w, extra = make(*_good())
    with pytest.raises(error, match=match):
        _call(which, p, x, w, extra)


@pytest.mark.parametrize("where", ["feats", "weight"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_check_finite_false_skips_the_scan(where, value):
    p, x, w = _good()
    if where == "feats":
        x = _with_nan(x, value)
    else:
        w = _with_nan(w, value)
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        pointwise_conv(p, x, w, 0.3)
    y = pointwise_conv(p, x, w, 0.3, check_finite=False)
    assert y.shape == (N, 5) and not np.isfinite(y).all()
    dx, dw = pointwise_conv_backward(np.ones((N, 5)), p, x, w, 0.3, check_finite=False)
    assert not (np.isfinite(dx).all() and np.isfinite(dw).all())


BAD_GRAD = [
    (
        "too few rows",
        lambda y: y[:-1],
        ValueError,
        r"grad_out must have the output's shape \(10, 5\), got \(9, 5\)",
    ),
    (
        "wrong channels",
        lambda y: y[:, :4],
        ValueError,
        r"grad_out must have the output's shape \(10, 5\), got \(10, 4\)",
    ),
    ("1-D", lambda y: y.ravel(), ValueError, r"grad_out must have the output's shape \(10, 5\)"),
    (
        "float32 for float64",
        lambda y: y.astype(np.float32),
        TypeError,
        r"grad_out must have the features' dtype float64, got float32",
    ),
    (
        "integer",
        lambda y: y.astype(np.int64),
        TypeError,
        r"grad_out must have dtype float32 or float64, got int64",
    ),
    ("NaN", lambda y: _with_nan(y), ValueError, r"grad_out must be finite"),
]


@pytest.mark.parametrize(
    "make,error,match", [c[1:] for c in BAD_GRAD], ids=[c[0] for c in BAD_GRAD]
)
def test_bad_grad_out_raises_with_clear_message(make, error, match):
    p, x, w = _good()
    grad_out = make(np.ones((N, 5)))
    with pytest.raises(error, match=match):
        pointwise_conv_backward(grad_out, p, x, w, 0.3)


def test_dense_grad_out_of_wrong_shape_raises():
    rng = np.random.default_rng(1)
    p, x, w = rng.random((2, 6, 3)), rng.standard_normal((2, 6, 4)), np.ones((3, 3, 3, 4, 5))
    with pytest.raises(
        ValueError,
        match=r"grad_out must have the output's shape \(2, 6, 5\), "
        r"got \(2, 5, 5\)",
    ):
        pointwise_conv_backward(np.ones((2, 5, 5)), p, x, w, 0.3)
