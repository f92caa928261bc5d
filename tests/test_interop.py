"""Any array in, the same kind out (pwconv_cy._arrays): NumPy, PyTorch, JAX, bare DLPack producers
and array-likes through every public function, read without a copy where the layout allows, with
results in the caller's kind, equal bit for bit to the NumPy call; clear errors for arrays on two
devices, two frameworks, tracked tensors, unreadable dtypes and devices.  CUDA round trips run
with ``-m gpu`` on a machine with CuPy, a device and CUDA PyTorch (skipped otherwise)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pwconv_cy as pc
from pwconv_cy import _arrays

N, C_IN, C_OUT, V = 300, 4, 5, 0.25


@pytest.fixture
def cloud(rng):
    """Two packed clouds, features and weights in float32, and queries."""
    points = rng.uniform(-1, 1, size=(N, 3)).astype(np.float32)
    feats = rng.standard_normal((N, C_IN)).astype(np.float32)
    weight = rng.standard_normal((3, 3, 3, C_IN, C_OUT)).astype(np.float32)
    offsets = np.array([0, 120, N])
    queries = rng.uniform(-1, 1, size=(40, 3)).astype(np.float32)
    query_offsets = np.array([0, 15, 40])
    return points, feats, weight, offsets, queries, query_offsets


class Producer:
    """A bare DLPack producer (no framework behind it)."""

    def __init__(self, array, device=None):
        self._array = array
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device if self._device is not None else self._array.__dlpack_device__()


def _run_all(to):
    """Every public function on inputs converted by `to` -> a dict of results."""
    def run(points, feats, weight, offsets, queries, query_offsets):
        p, f, w, q = to(points), to(feats), to(weight), to(queries)
        out = {}
        km = pc.kernel_map(p, V, offsets=offsets, dilation=2)
        out["km"] = km
        out["km_q"] = pc.kernel_map(p, V, queries=q, offsets=offsets, query_offsets=query_offsets)
        out["radius"] = pc.radius_search(p, V, q, offsets=offsets, query_offsets=query_offsets)
        index = pc.NeighborIndex(p, V, offsets=offsets)
        out["index_km"] = index.kernel_map(3, 2)
        out["index_radius"] = index.radius_search(V, metric="euclidean")
        out["y"] = pc.pointwise_conv(p, f, w, V, dilation=2, offsets=offsets)
        out["y_map"] = pc.pointwise_conv(p, f, w, V, dilation=2, offsets=offsets, kernel_map=km)
        out["grads"] = pc.pointwise_conv_backward(out["y"], p, f, w, V, dilation=2,
                                                  offsets=offsets, kernel_map=km)
        out["y_q"] = pc.pointwise_conv(p, f, w, V, offsets=offsets, queries=q,
                                       query_offsets=query_offsets)
        return out
    return run


def _flatten(out):
    """(name, array) pairs of a result dict, kernel maps expanded."""
    for name, value in out.items():
        if isinstance(value, pc.KernelMap):
            for field in ("splits", "index", "cell", "counts"):
                yield f"{name}.{field}", getattr(value, field)
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                yield f"{name}[{i}]", v
        else:
            yield name, value


def _assert_round_trip(cloud, to, is_kind, *, maps_in_kind=True):
    expected = dict(_flatten(_run_all(lambda a: a)(*cloud)))
    got = dict(_flatten(_run_all(to)(*cloud)))
    assert got.keys() == expected.keys()
    for name, value in got.items():
        in_map = ".splits" in name or ".index" in name or ".cell" in name or ".counts" in name
        if maps_in_kind or not in_map:
            assert is_kind(value), f"{name}: {type(value)}"
        np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg=name)


def test_numpy_round_trip_returns_numpy(cloud):
    _assert_round_trip(cloud, lambda a: a, lambda v: isinstance(v, np.ndarray))


def test_array_likes_and_bare_dlpack_producers_give_numpy(cloud):
    """Lists (float64, as NumPy reads them) and producers without a framework: NumPy results
    (nothing to convert back to)."""
    cloud64 = tuple(a.astype(np.float64) if a.dtype == np.float32 else a for a in cloud)
    _assert_round_trip(cloud64, lambda a: a.tolist(), lambda v: isinstance(v, np.ndarray))
    _assert_round_trip(cloud, Producer, lambda v: isinstance(v, np.ndarray))


def test_torch_cpu_round_trip_returns_torch_tensors(cloud):
    torch = pytest.importorskip("torch")
    _assert_round_trip(cloud, torch.from_numpy, lambda v: isinstance(v, torch.Tensor)
                       and v.device.type == "cpu")


def test_jax_cpu_round_trip_returns_jax_arrays(cloud):
    """JAX arrays out (kernel maps keep NumPy arrays: JAX's 32-bit default cannot hold int64
    indices); with x64 on, dtypes are kept exactly."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        _assert_round_trip(cloud, jax.numpy.asarray, lambda v: isinstance(v, jax.Array),
                           maps_in_kind=False)
        y = pc.pointwise_conv(jax.numpy.asarray(cloud[0]), jax.numpy.asarray(cloud[1]),
                              jax.numpy.asarray(cloud[2]), V)
        assert y.dtype == np.float32
        splits, _ = pc.radius_search(jax.numpy.asarray(cloud[0]), V)
        assert splits.dtype == np.int64


def test_torch_kernel_map_is_accepted_back_and_its_transposed_map_is_torch(cloud, rng):
    torch = pytest.importorskip("torch")
    points, feats, weight = (torch.from_numpy(a) for a in cloud[:3])
    km = pc.kernel_map(points, V)
    assert isinstance(km.index, torch.Tensor) and km.cell.dtype == torch.uint8
    assert isinstance(km.offsets, np.ndarray)          # metadata stays on the host
    tsplits, tkeys = km.transposed()
    ref_splits, ref_keys = pc.kernel_map(cloud[0], V).transposed()
    assert isinstance(tsplits, torch.Tensor)
    np.testing.assert_array_equal(tsplits.numpy(), ref_splits)
    np.testing.assert_array_equal(tkeys.numpy(), ref_keys)
    # NumPy data with a torch map: the map decides the kind of the result.
    y = pc.pointwise_conv(cloud[0], cloud[1], cloud[2], V, kernel_map=km)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), pc.pointwise_conv(*cloud[:3], V))
    with pytest.raises(ValueError, match="kernel_map was built for other points"):
        pc.pointwise_conv(points + 1, feats, weight, V, kernel_map=km)


def test_inputs_are_read_without_a_copy():
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    t = torch.arange(12.0).reshape(4, 3)
    view = _arrays.to_host(t, "points")
    assert np.shares_memory(view, t.numpy())
    j = jax.numpy.arange(12.0).reshape(4, 3)
    assert np.shares_memory(_arrays.to_host(j, "points"), np.asarray(j))
    a = np.arange(12.0).reshape(4, 3)
    assert _arrays.to_host(a, "points") is a
    assert np.shares_memory(_arrays.to_host(Producer(a), "points"), a)


def test_results_are_exported_without_a_copy():
    pytest.importorskip("torch")
    y = np.arange(6.0).reshape(2, 3)
    t = _arrays.export(y, "torch")
    t[0, 0] = 42.0
    assert y[0, 0] == 42.0


def test_dense_batches_and_strided_tensors(rng):
    """Dense (B, n, ·) torch input gives dense torch output; a non-contiguous CPU tensor is
    copied on the host (the CPU path may) and gives the same result."""
    torch = pytest.importorskip("torch")
    p = rng.uniform(-1, 1, size=(3, 50, 3))
    f = rng.standard_normal((3, 50, 2))
    w = rng.standard_normal((3, 3, 3, 2, 4))
    y = pc.pointwise_conv(torch.from_numpy(p), torch.from_numpy(f), torch.from_numpy(w), 0.4)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 50, 4)
    np.testing.assert_array_equal(y.numpy(), pc.pointwise_conv(p, f, w, 0.4))
    strided = torch.from_numpy(np.ascontiguousarray(f.transpose(0, 2, 1))).transpose(1, 2)
    assert not strided.is_contiguous()
    y2 = pc.pointwise_conv(torch.from_numpy(p), strided, torch.from_numpy(w), 0.4)
    np.testing.assert_array_equal(y2.numpy(), y.numpy())


def test_offsets_may_be_tensors_or_lists(cloud):
    torch = pytest.importorskip("torch")
    points, feats, weight, offsets = cloud[:4]
    expected = pc.pointwise_conv(points, feats, weight, V, offsets=offsets)
    for offs in (torch.from_numpy(offsets), offsets.tolist(), offsets.astype(np.int32)):
        np.testing.assert_array_equal(
            pc.pointwise_conv(points, feats, weight, V, offsets=offs), expected)


def count_index_builds(monkeypatch) -> list:
    """A list that grows by one at every neighbour-index build (CPU), for map-reuse checks."""
    from pwconv_cy.neighbors import NeighborIndex

    builds = []
    original = NeighborIndex._build

    def counting(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NeighborIndex, "_build", counting)
    return builds


# ----------------------------------------------------------------------------------- errors


def test_tensor_that_requires_grad_is_refused_with_the_way_out(cloud):
    torch = pytest.importorskip("torch")
    feats = torch.from_numpy(cloud[1]).requires_grad_()
    with pytest.raises(TypeError, match=r"feats is a torch.Tensor that requires grad.*"
                                        r"pwconv_cy.torch.pointwise_conv.*feats.detach\(\)"):
        pc.pointwise_conv(cloud[0], feats, cloud[2], V)
    with pytest.raises(TypeError, match=r"points is a torch.Tensor that requires grad"):
        pc.kernel_map(torch.from_numpy(cloud[0]).requires_grad_(), V)


def test_traced_jax_values_are_refused_with_the_way_out(cloud):
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match=r"points is a traced JAX value .*"
                                        r"pwconv_cy.jax.pointwise_conv"):
        jax.jit(lambda p: pc.kernel_map(p, V).n_pairs)(jax.numpy.asarray(cloud[0]))
    with pytest.raises(TypeError, match=r"feats is a traced JAX value"):
        jax.grad(lambda f: pc.pointwise_conv(cloud[0], f, cloud[2], V).sum())(
            jax.numpy.asarray(cloud[1]))


def test_dtype_numpy_cannot_hold_is_a_clear_type_error(cloud):
    torch = pytest.importorskip("torch")
    feats = torch.from_numpy(cloud[1]).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"feats: cannot read torch.Tensor of dtype "
                                        r"torch.bfloat16.*float32/float64 features"):
        pc.pointwise_conv(cloud[0], feats, cloud[2], V)


def test_two_frameworks_in_one_call_are_named(cloud):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match=r"one framework, got points as torch.Tensor.*and feats "
                                        r"as jaxlib"):
        pc.pointwise_conv(torch.from_numpy(cloud[0]), jax.numpy.asarray(cloud[1]),
                          cloud[2], V)


def test_gpu_array_without_a_gpu_path_says_which_argument_and_why(cloud):
    """A CUDA DLPack producer goes to the GPU path (never to the host); without CuPy or a
    device the error names the argument and the reason."""
    from pwconv_cy import cuda

    if cuda.is_available():
        pytest.skip("a usable GPU is present: the GPU path runs (see the gpu tests below)")
    fake = Producer(cloud[1], device=(2, 0))
    with pytest.raises(RuntimeError, match=r"feats is in GPU memory \(test_interop.Producer\).*"
                                           r"GPU path of pwconv is not available: "):
        pc.pointwise_conv(cloud[0], fake, cloud[2], V)


def test_arrays_on_two_devices_are_named_both(cloud, monkeypatch):
    """The device check itself (the GPU path is reported available so that it is reached):
    host points with CUDA features, and CUDA data on two devices."""
    monkeypatch.setattr(_arrays, "_gpu_unavailable", lambda name, x: None)
    with pytest.raises(TypeError, match=r"same device, got points on the CPU \(numpy.ndarray of "
                                        r"dtype float32\) and feats on cuda:0"):
        pc.pointwise_conv(cloud[0], Producer(cloud[1], device=(2, 0)), cloud[2], V)
    with pytest.raises(TypeError, match=r"same device, got points on cuda:0 .* and queries on "
                                        r"cuda:1"):
        pc.kernel_map(Producer(cloud[0], device=(2, 0)), V,
                      queries=Producer(cloud[4], device=(2, 1)), query_offsets=[0, 40])


def test_gpu_offsets_with_host_points_are_refused(cloud):
    offsets = Producer(cloud[3], device=(2, 0))
    with pytest.raises(TypeError, match=r"offsets is in GPU memory.*this call runs on the CPU"):
        pc.kernel_map(cloud[0], V, offsets=offsets)


def test_memory_pwconv_cannot_read_is_refused(cloud):
    with pytest.raises(TypeError, match=r"points lives on a ROCm device"):
        pc.kernel_map(Producer(cloud[0], device=(10, 0)), V)


def test_a_neighbor_index_refuses_queries_from_another_device(cloud, monkeypatch):
    monkeypatch.setattr(_arrays, "_gpu_unavailable", lambda name, x: None)
    index = pc.NeighborIndex(cloud[0], V)
    with pytest.raises(TypeError, match=r"got the index's points on the CPU .* and queries on "
                                        r"cuda:0"):
        index.kernel_map(queries=Producer(cloud[4], device=(2, 0)))


# ----------------------------------------------------------------------------- lazy imports


def test_the_package_imports_neither_torch_nor_jax_unless_asked(tmp_path):
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import pwconv_cy
        p = np.random.default_rng(0).uniform(size=(50, 3))
        pwconv_cy.pointwise_conv(p, p, np.ones((3, 3, 3, 3, 2)), 0.2)
        pwconv_cy.kernel_map(p, 0.2)
        pwconv_cy.show_config(file=open("/dev/null", "w"))
        assert "torch" not in sys.modules and "jax" not in sys.modules, sorted(sys.modules)
        pwconv_cy.torch.PointwiseConv  # asked for: imported now
        assert "torch" in sys.modules and "jax" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    if proc.returncode != 0 and "No module named 'torch'" in proc.stderr:
        pytest.skip("torch is not installed")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# --------------------------------------------------------------------------------- on a GPU


def _gpu_torch_reason():
    from pwconv_cy import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        return reason
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    return None if torch.cuda.is_available() else "PyTorch has no CUDA device"


_GPU_REASON = _gpu_torch_reason()
gpu = pytest.mark.skipif(_GPU_REASON is not None,
                         reason=f"needs CuPy, a CUDA device and CUDA PyTorch: {_GPU_REASON}")


@pytest.mark.gpu
@gpu
def test_gpu_torch_cuda_round_trip_returns_cuda_tensors(cloud):
    import torch

    def to(a):
        return None if a is None else torch.from_numpy(a).cuda()

    expected = dict(_flatten(_run_all(lambda a: a)(*cloud)))
    got = dict(_flatten(_run_all(to)(*cloud)))
    for name, value in got.items():
        assert isinstance(value, torch.Tensor) and value.is_cuda, name
        if value.dtype.is_floating_point:
            ref = expected[name]
            err = np.linalg.norm(value.cpu().numpy() - ref) / max(np.linalg.norm(ref), 1e-30)
            assert err <= 1e-5, name
        else:
            np.testing.assert_array_equal(value.cpu().numpy(), expected[name], err_msg=name)


@pytest.mark.gpu
@gpu
def test_gpu_bad_inputs_are_refused_not_copied(cloud):
    import torch

    points, feats, weight = (torch.from_numpy(a).cuda() for a in cloud[:3])
    strided = torch.from_numpy(np.ascontiguousarray(cloud[1].T)).cuda().T
    with pytest.raises(ValueError, match=r"feats is a non-contiguous GPU array.*feats.contiguous"):
        pc.pointwise_conv(points, strided, weight, V)
    with pytest.raises(TypeError, match=r"same device, got points on cuda:\d .* and feats on the "
                                        r"CPU"):
        pc.pointwise_conv(points, feats.cpu(), weight, V)
    with pytest.raises(TypeError, match=r"feats.*bfloat16"):
        pc.pointwise_conv(points, feats.to(torch.bfloat16), weight, V)
    with pytest.raises(TypeError, match=r"feats is a torch.Tensor that requires grad"):
        pc.pointwise_conv(points, feats.clone().requires_grad_(), weight, V)
