"""pwconv_cy.torch: the autograd op and the nn.Module.  Gradients by torch.autograd.gradcheck in
float64 (packed, dense, queries, depthwise, dilations 1-4), values bit-identical to the NumPy
functions, one kernel map per forward+backward, no coordinate gradient, and a small model trained
with a torch optimiser.  CUDA checks run with ``-m gpu`` (CuPy, a device, CUDA PyTorch)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_interop import count_index_builds, gpu

import pwconv_cy as pc
import pwconv_cy.torch as pct


def _cloud(rng, n=90, c_in=3, c_out=2, dtype=torch.float64, depthwise=False, k=3):
    points = torch.from_numpy(rng.uniform(-1, 1, size=(n, 3)))
    feats = torch.from_numpy(rng.standard_normal((n, c_in))).to(dtype).requires_grad_()
    shape = (k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out)
    weight = torch.from_numpy(rng.standard_normal(shape)).to(dtype).requires_grad_()
    return points, feats, weight


def test_gradcheck_float64_full_jacobian(rng):
    """Every entry of both Jacobians against central differences."""
    points, feats, weight = _cloud(rng, n=50, c_in=2, c_out=2)
    assert torch.autograd.gradcheck(
        lambda f, w: pct.pointwise_conv(points, f, w, 0.35, dilation=2, num_threads=1),
        (feats, weight))


# The sweeps below use gradcheck's fast mode (random projections of the Jacobians: as strict a
# test of the adjoint, far fewer calls).

@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("depthwise", [False, True])
def test_gradcheck_float64(rng, dilation, depthwise):
    points, feats, weight = _cloud(rng, depthwise=depthwise)
    assert torch.autograd.gradcheck(
        lambda f, w: pct.pointwise_conv(points, f, w, 0.3, dilation=dilation,
                                        depthwise=depthwise, num_threads=1),
        (feats, weight), fast_mode=True)


def test_gradcheck_packed_batch_with_queries(rng):
    points, feats, weight = _cloud(rng, n=100)
    offsets = torch.tensor([0, 40, 40, 100])
    queries = torch.from_numpy(rng.uniform(-1, 1, size=(30, 3)))
    query_offsets = [0, 10, 12, 30]
    assert torch.autograd.gradcheck(
        lambda f, w: pct.pointwise_conv(points, f, w, 0.35, offsets=offsets, queries=queries,
                                        query_offsets=query_offsets, num_threads=1),
        (feats, weight), fast_mode=True)


def test_gradcheck_dense_batch_and_kernel_size_5(rng):
    points = torch.from_numpy(rng.uniform(-1, 1, size=(2, 40, 3)))
    feats = torch.from_numpy(rng.standard_normal((2, 40, 2))).requires_grad_()
    weight = torch.from_numpy(rng.standard_normal((5, 5, 5, 2, 3))).requires_grad_()
    y = pct.pointwise_conv(points, feats, weight, 0.2)
    assert y.shape == (2, 40, 3)
    assert torch.autograd.gradcheck(
        lambda f, w: pct.pointwise_conv(points, f, w, 0.2, num_threads=1), (feats, weight),
        fast_mode=True)


def test_float32_values_and_gradients_match_the_numpy_functions_bit_for_bit(rng):
    points, feats, weight = _cloud(rng, n=400, c_in=5, c_out=7, dtype=torch.float32)
    points = points.float()
    y = pct.pointwise_conv(points, feats, weight, 0.2, dilation=2)
    grad_y = torch.from_numpy(rng.standard_normal(tuple(y.shape)).astype(np.float32))
    y.backward(grad_y)
    p, f, w = points.numpy(), feats.detach().numpy(), weight.detach().numpy()
    expected = pc.pointwise_conv(p, f, w, 0.2, dilation=2)
    d_feats, d_weight = pc.pointwise_conv_backward(grad_y.numpy(), p, f, w, 0.2, dilation=2)
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    np.testing.assert_array_equal(feats.grad.numpy(), d_feats)
    np.testing.assert_array_equal(weight.grad.numpy(), d_weight)


def test_one_kernel_map_serves_forward_and_backward(rng, monkeypatch):
    builds = count_index_builds(monkeypatch)
    points, feats, weight = _cloud(rng)
    pct.pointwise_conv(points, feats, weight, 0.3).sum().backward()
    assert len(builds) == 1
    km = pc.kernel_map(points, 0.3, dilation=2)           # a torch-kind map, given by the caller
    assert len(builds) == 2
    pct.pointwise_conv(points, feats, weight, 0.3, dilation=2, kernel_map=km).sum().backward()
    assert len(builds) == 2


def test_coordinate_gradient_request_raises(rng):
    points, feats, weight = _cloud(rng)
    with pytest.raises(RuntimeError, match=r"points requires grad, but pointwise convolution has "
                                           r"no gradient with respect to the coordinates.*"
                                           r"points.detach\(\)"):
        pct.pointwise_conv(points.clone().requires_grad_(), feats, weight, 0.3)
    queries = points[:10].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"queries requires grad"):
        pct.pointwise_conv(points, feats, weight, 0.3, queries=queries)
    with torch.no_grad():  # nothing is recorded, so nothing is silently dropped
        y = pct.pointwise_conv(points.clone().requires_grad_(), feats, weight, 0.3)
    assert not y.requires_grad


def test_gradients_flow_only_where_asked(rng):
    points, feats, weight = _cloud(rng)
    frozen = weight.detach()
    pct.pointwise_conv(points, feats, frozen, 0.3).sum().backward()
    assert feats.grad is not None and frozen.grad is None
    y = pct.pointwise_conv(points, feats, weight, 0.3)
    with pytest.raises(RuntimeError, match=r"differentiable once: double backward"):
        torch.autograd.grad(y.sum(), feats, create_graph=True)


def test_bad_arguments_are_named(rng):
    points, feats, weight = _cloud(rng)
    with pytest.raises(TypeError, match=r"feats must be a torch.Tensor, got ndarray"):
        pct.pointwise_conv(points, feats.detach().numpy(), weight, 0.3)
    with pytest.raises(TypeError, match=r"weight and feats must have the same dtype"):
        pct.pointwise_conv(points, feats, weight.float(), 0.3)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, K, K, c_in, c_out\)"):
        pct.pointwise_conv(points, feats, weight[0], 0.3)
    with pytest.raises(ValueError, match=r"feats must have shape \(n_points=90, c\)"):
        pct.pointwise_conv(points, feats[:50], weight, 0.3)


def test_module_initialisation_matches_the_numpy_layer():
    layer = pct.PointwiseConv(6, 10, voxel_size=0.1, dilation=2, bias=True)
    limit = math.sqrt(6.0 / (27 * 6 + 27 * 10))
    w = layer.weight.detach()
    assert w.shape == (3, 3, 3, 6, 10) and w.dtype == torch.float32
    assert float(w.abs().max()) <= limit and float(w.abs().max()) > 0.9 * limit
    assert abs(float(w.std()) - limit / math.sqrt(3)) < 0.05 * limit
    assert not layer.bias.detach().any()
    dw = pct.PointwiseConv(4, 4, 0.1, depthwise=True, dtype=torch.float64)
    assert dw.weight.shape == (3, 3, 3, 4) and dw.weight.dtype == torch.float64
    assert float(dw.weight.detach().abs().max()) <= math.sqrt(6.0 / 54)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    with pytest.raises(ValueError, match=r"c_out must equal c_in \(4\), got 5"):
        pct.PointwiseConv(4, 5, 0.1, depthwise=True)
    with pytest.raises(TypeError, match=r"dtype must be torch.float32 or torch.float64"):
        pct.PointwiseConv(4, 5, 0.1, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"c_in must be a positive integer, got 0"):
        pct.PointwiseConv(0, 5, 0.1)
    with pytest.raises(ValueError, match=r"dilation must be >= 1"):
        pct.PointwiseConv(4, 5, 0.1, dilation=0)


def test_module_forward_with_bias_and_shared_kernel_map(rng):
    points, feats, _ = _cloud(rng)
    layer = pct.PointwiseConv(3, 4, 0.3, dilation=2, bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4.0))
    km = pc.kernel_map(points, 0.3, dilation=2)
    y = layer(points, feats, kernel_map=km)
    expected = pc.pointwise_conv(points.numpy(), feats.detach().numpy(),
                                 layer.weight.detach().numpy(), 0.3, dilation=2) + np.arange(4.0)
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    y.sum().backward()
    np.testing.assert_array_equal(layer.bias.grad.numpy(), np.full(4, 90.0))
    assert "dilation=2" in repr(layer) and "bias=True" in repr(layer)


class _TinyNet(torch.nn.Module):
    """Two pointwise layers (dilations 1 and 2, depthwise-separable second) and a per-point
    linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = pct.PointwiseConv(3, 8, 0.25, bias=True)
        self.conv2 = pct.PointwiseConv(8, 8, 0.25, dilation=2, depthwise=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, points, offsets):
        x = torch.selu(self.conv1(points, points, offsets=offsets))
        x = torch.selu(self.conv2(points, x, offsets=offsets))
        return self.head(x)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_a_small_model_trains_with_a_torch_optimizer(optimizer):
    """Per-point labels (inside/outside a sphere of radius 0.6) on batches of 4 clouds: the loss
    falls to less than half of its starting value."""
    torch.manual_seed(0)
    gen = np.random.default_rng(1)
    net = _TinyNet()
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if optimizer == "SGD"
           else torch.optim.Adam(net.parameters(), lr=0.02))
    losses = []
    for _ in range(60):
        points = torch.from_numpy(gen.uniform(-1, 1, size=(4 * 200, 3)).astype(np.float32))
        labels = (points.norm(dim=1) < 0.6).long()
        offsets = np.arange(5) * 200
        loss = torch.nn.functional.cross_entropy(net(points, offsets), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    start, end = np.mean(losses[:5]), np.mean(losses[-5:])
    assert end < 0.5 * start, (start, end)


def test_cupy_stream_wraps_torch_streams_without_deprecation_warnings():
    """CuPy 14 warns on every ExternalStream (hundreds of warnings per epoch of GPU training):
    the adapter silences that one warning, and uses Stream.from_external where ExternalStream is
    gone.  Fake CuPy modules stand in for both versions."""
    import types
    import warnings

    made = []

    class ExternalStream:
        def __init__(self, ptr):
            warnings.warn("ExternalStream is deprecated", DeprecationWarning, stacklevel=2)
            made.append(("external", ptr))

    class Stream:
        @staticmethod
        def from_external(obj):
            made.append(("from_external", obj.cuda_stream))
            return obj

    torch_stream = types.SimpleNamespace(cuda_stream=1234)
    cupy14 = types.SimpleNamespace(cuda=types.SimpleNamespace(ExternalStream=ExternalStream,
                                                              Stream=Stream))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        assert isinstance(pct._cupy_stream(cupy14, torch_stream), ExternalStream)
    later = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream))
    assert pct._cupy_stream(later, torch_stream) is torch_stream
    assert made == [("external", 1234), ("from_external", 1234)]
    with pytest.warns(DeprecationWarning):  # the silencing is local to the adapter
        ExternalStream(1)


# --------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@gpu
def test_gpu_op_matches_the_cpu_op_on_a_side_stream(rng):
    """CUDA tensors run on the GPU path, on PyTorch's current stream (here a side stream), and
    give the CPU's values and gradients within rounding; strided CUDA features are made
    contiguous by the adapter."""
    points, feats, weight = _cloud(rng, n=500, c_in=4, c_out=3)
    y = pct.pointwise_conv(points, feats, weight, 0.2, dilation=2)
    y.sum().backward()
    cpu = (y.detach(), feats.grad.clone(), weight.grad.clone())
    p, f, w = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (points, feats, weight))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        yg = pct.pointwise_conv(p, f.T.contiguous().T, w, 0.2, dilation=2)
        yg.sum().backward()
    torch.cuda.synchronize()
    assert yg.is_cuda and f.grad.is_cuda
    for got, ref in zip((yg.detach(), f.grad, w.grad), cpu):
        err = float((got.cpu() - ref).norm() / ref.norm())
        assert err <= 1e-12, err


@pytest.mark.gpu
@gpu
def test_gpu_gradcheck(rng):
    points, feats, weight = _cloud(rng, n=60)
    p, f, w = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (points, feats, weight))
    assert torch.autograd.gradcheck(lambda f, w: pct.pointwise_conv(p, f, w, 0.35, dilation=2),
                                    (f, w))
