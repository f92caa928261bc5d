"""PyTorch adapter: pointwise convolution as an autograd op and a ``torch.nn.Module``.

``import pwconv_cy.torch`` (or use ``pwconv_cy.torch`` after ``import pwconv_cy``): PyTorch is
imported here and nowhere else in the package.

* :func:`pointwise_conv` — the operator of SPEC §1 on torch tensors, differentiable with respect
  to ``feats`` and ``weight`` through ``torch.autograd`` (a ``torch.autograd.Function``; double
  backward, ``create_graph=True``, raises).  CPU tensors run on the C++ core, CUDA tensors on the GPU path
  (CuPy), on PyTorch's current CUDA stream; tensors are read in place through DLPack.
* :class:`PointwiseConv` — the layer, with Glorot-uniform weights like
  :class:`pwconv_cy.nn.PointwiseConv` (and a depthwise option).

The kernel map is built once per forward call (or passed in: ``kernel_map=``, e.g. one
``pwconv_cy.kernel_map(points, ...)`` shared by the layers of one dilation) and reused by the
backward pass.  There is no gradient with respect to the coordinates (SPEC §1): a call whose
``points`` or ``queries`` require grad raises instead of returning a silent zero.  ``num_threads``
follows the package's one rule (None: the OpenMP default, which ``torch.set_num_threads`` sets too
when PyTorch and pwconv share one OpenMP runtime), resolved in the thread that calls the op and
used by its backward pass too.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from pwconv_cy import functional as _functional
from pwconv_cy import neighbors as _neighbors
from pwconv_cy._validation import (
    check_dilation,
    check_kernel_size,
    check_num_threads,
    check_positive,
    default_num_threads,
)

__all__ = ["PointwiseConv", "pointwise_conv"]


class _Geometry:
    """What forward and backward share besides the differentiable tensors."""

    __slots__ = ("check_finite", "depthwise", "dilation", "kernel_map", "method", "num_threads",
                 "offsets", "points", "queries", "query_offsets", "voxel_size")

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)

    def op_kwargs(self) -> dict:
        return {"dilation": self.dilation, "offsets": self.offsets, "queries": self.queries,
                "query_offsets": self.query_offsets, "kernel_map": self.kernel_map,
                "depthwise": self.depthwise, "method": self.method,
                "num_threads": self.num_threads, "check_finite": self.check_finite}


def _current_stream(tensor: torch.Tensor):
    """CuPy runs on PyTorch's current stream of the tensor's device (a no-op on the CPU, or when
    the GPU path is unavailable: the call then says why)."""
    if not tensor.is_cuda:
        return contextlib.nullcontext()
    from pwconv_cy import cuda

    if not cuda.is_available():
        return contextlib.nullcontext()
    import cupy

    stream = torch.cuda.current_stream(tensor.device)
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(tensor.device.index))
    stack.enter_context(_cupy_stream(cupy, stream))
    return stack


def _cupy_stream(cupy, stream):
    """PyTorch's stream as a CuPy stream.  CuPy 14 deprecates ExternalStream (one warning per
    call, hundreds per training epoch) in favour of Stream.from_external; the wrapper itself is
    unchanged, so the warning is silenced here, and from_external is used once ExternalStream is
    gone."""
    if hasattr(cupy.cuda, "ExternalStream"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(stream.cuda_stream)
    return cupy.cuda.Stream.from_external(stream)


def _plain(tensor, name: str):
    """A tensor the functions can read in place: detached and, on a GPU, contiguous (an explicit
    device copy, made here rather than refused, because autograd graphs produce strided views)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    return tensor.contiguous() if tensor.is_cuda else tensor


def _refuse_coordinate_grad(points, queries) -> None:
    if not torch.is_grad_enabled():
        return
    for name, value in (("points", points), ("queries", queries)):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise RuntimeError(
                f"{name} requires grad, but pointwise convolution has no gradient with respect "
                "to the coordinates (the kernel map is piecewise constant in them; SPEC §1): "
                f"pass {name}.detach() to differentiate with respect to feats and weight only")


class _PointwiseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, geometry):
        x, w = _plain(feats, "feats"), _plain(weight, "weight")
        k = int(w.shape[0]) if w.dim() >= 3 and w.shape[0] == w.shape[1] == w.shape[2] else 0
        with _current_stream(x):
            # Built here so that backward reuses it; a malformed weight (k even or 0) is left to
            # the operator, whose checks name it.
            if geometry.kernel_map is None and k % 2 == 1:
                geometry.kernel_map = _neighbors.kernel_map(
                    geometry.points, geometry.voxel_size, kernel_size=k,
                    dilation=geometry.dilation, queries=geometry.queries,
                    offsets=geometry.offsets, query_offsets=geometry.query_offsets,
                    method=geometry.method, num_threads=geometry.num_threads)
            y = _functional.pointwise_conv(geometry.points, x, w, geometry.voxel_size,
                                           **geometry.op_kwargs())
        ctx.save_for_backward(x, w)
        ctx.geometry = geometry
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            # create_graph=True: the gradients computed here are not differentiable again, and
            # letting them pass as constants would drop their dependence silently.
            raise RuntimeError("pwconv_cy.torch.pointwise_conv is differentiable once: double "
                               "backward (create_graph=True) is not supported")
        x, w = ctx.saved_tensors
        geometry = ctx.geometry
        dy = grad_y.contiguous()
        with _current_stream(x):
            d_feats, d_weight = _functional.pointwise_conv_backward(
                dy, geometry.points, x, w, geometry.voxel_size,
                feats_grad=bool(ctx.needs_input_grad[0]), **geometry.op_kwargs())
        return (d_feats if ctx.needs_input_grad[0] else None,
                d_weight if ctx.needs_input_grad[1] else None, None)


def pointwise_conv(points, feats, weight, voxel_size, *, dilation=1, offsets=None, queries=None,
                   query_offsets=None, kernel_map=None, depthwise=False, method="grid",
                   num_threads=None, check_finite=True) -> torch.Tensor:
    """Pointwise convolution on torch tensors, differentiable in ``feats`` and ``weight``.

    ``y_i = sum_f sum_{j in Omega_i(f)} x_j W_f / n_i(f)`` (SPEC §1), computed by
    :func:`pwconv_cy.pointwise_conv`, its gradients by :func:`pwconv_cy.pointwise_conv_backward`.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) tensor, float16/32/64
        Coordinates, on the device of ``feats``; must not require grad (no coordinate gradient).
    feats : (n, c_in) or (B, n, c_in) tensor, float32/float64
    weight : (K, K, K, c_in, c_out), or (K, K, K, c_in) with ``depthwise=True``
        Same dtype and device as ``feats``.
    voxel_size : float
        Kernel cell edge v (coordinate units).
    dilation, offsets, queries, query_offsets, depthwise, method, num_threads, check_finite
        As in :func:`pwconv_cy.pointwise_conv` (offsets: tensors, NumPy arrays or lists).
    kernel_map : KernelMap, optional
        From :func:`pwconv_cy.kernel_map` on the same points (checked); None builds one, used by
        the forward and the backward pass of this call.

    Returns
    -------
    y : (m, c_out) or (B, m, c_out) tensor in the features' dtype, on their device.
    """
    if not isinstance(feats, torch.Tensor) or not isinstance(weight, torch.Tensor):
        bad, value = ("feats", feats) if not isinstance(feats, torch.Tensor) else ("weight", weight)
        raise TypeError(f"{bad} must be a torch.Tensor, got {type(value).__name__}; the NumPy "
                        "function is pwconv_cy.pointwise_conv")
    _refuse_coordinate_grad(points, queries)
    # Resolved once, in the calling thread: the backward pass may run on another thread (the
    # autograd engine's), whose OpenMP default is not the caller's.
    check_num_threads(num_threads)
    if num_threads is None:
        num_threads = default_num_threads()
    geometry = _Geometry(
        points=_plain(points, "points") if isinstance(points, torch.Tensor) else points,
        voxel_size=voxel_size, dilation=dilation, offsets=offsets,
        queries=_plain(queries, "queries") if isinstance(queries, torch.Tensor) else queries,
        query_offsets=query_offsets, kernel_map=kernel_map, depthwise=depthwise, method=method,
        num_threads=num_threads, check_finite=check_finite)
    return _PointwiseConvFunction.apply(feats, weight, geometry)


def _check_channels(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class PointwiseConv(torch.nn.Module):
    """Pointwise convolution layer (Hua et al., CVPR 2018) for PyTorch: ``y = conv(x, W) [+ b]``.

    Parameters
    ----------
    c_in, c_out, voxel_size, dilation, kernel_size, bias
        As :class:`pwconv_cy.nn.PointwiseConv` (``c_out`` must equal ``c_in`` when
        ``depthwise``).
    depthwise : bool
        Per-channel weights (K, K, K, c) without channel mixing.
    device, dtype
        Of the parameters (float32 by default, or float64).

    Attributes
    ----------
    weight : Parameter (K, K, K, c_in, c_out), or (K, K, K, c) when depthwise
        Glorot-uniform with fan-in K^3 c_in and fan-out K^3 c_out (depthwise: K^3 and K^3), as
        :class:`pwconv_cy.nn.PointwiseConv`.
    bias : Parameter (c_out,) or None
        Zeros at initialisation.
    """

    def __init__(self, c_in, c_out, voxel_size, dilation=1, kernel_size=3, bias=False,
                 depthwise=False, device=None, dtype=None):
        super().__init__()
        self.c_in = _check_channels(c_in, "c_in")
        self.c_out = _check_channels(c_out, "c_out")
        if depthwise and self.c_out != self.c_in:
            raise ValueError(f"a depthwise layer keeps the channels: c_out must equal c_in "
                             f"({self.c_in}), got {self.c_out}")
        self.voxel_size = check_positive(voxel_size, "voxel_size")
        self.dilation = check_dilation(dilation)
        self.kernel_size = check_kernel_size(kernel_size)
        self.depthwise = bool(depthwise)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        shape = (self.kernel_size,) * 3 + ((self.c_in,) if depthwise else (self.c_in, self.c_out))
        self.weight = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.empty(self.c_out, device=device, dtype=dtype))
                     if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weight, zero bias."""
        k3 = self.kernel_size ** 3
        fan_in, fan_out = (k3, k3) if self.depthwise else (k3 * self.c_in, k3 * self.c_out)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        with torch.no_grad():
            self.weight.uniform_(-limit, limit)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, points, feats, *, offsets=None, queries=None, query_offsets=None,
                kernel_map=None, num_threads=None):
        """``(n, 3)`` points and ``(n, c_in)`` features (or the dense ``(B, n, ·)`` forms) to
        ``(m, c_out)`` outputs; arguments as in :func:`pointwise_conv`."""
        y = pointwise_conv(points, feats, self.weight, self.voxel_size, dilation=self.dilation,
                           offsets=offsets, queries=queries, query_offsets=query_offsets,
                           kernel_map=kernel_map, depthwise=self.depthwise,
                           num_threads=num_threads)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.c_in}, {self.c_out}, voxel_size={self.voxel_size}, "
                f"dilation={self.dilation}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}, depthwise={self.depthwise}")
