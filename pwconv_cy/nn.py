"""Layers of pointwise convolution with explicit parameters, context and gradients.

A layer owns named parameters (``layer.params``, a dict of arrays).  ``forward`` returns the output
and keeps an explicit context (the inputs and the kernel map, computed once); ``backward(grad_out)``
returns ``(d_feats, grads)`` where ``grads`` has the same keys as ``params``.  Gradients are
overwritten by every backward call (also kept as ``layer.grads``), never accumulated.

The layers are framework-neutral: the arithmetic they add around the operator (bias, 1x1 map,
reductions) uses the array module of the input, so they work unchanged on any array type that the
functional operator accepts.  The context holds references to the caller's arrays, not copies:
do not modify ``feats`` in place between ``forward`` and ``backward``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys

import numpy as np

from pwconv_cy._arrays import cupy_device_context
from pwconv_cy._validation import check_bool, check_dilation, check_kernel_size, check_positive
from pwconv_cy.functional import pointwise_conv, pointwise_conv_backward
from pwconv_cy.neighbors import kernel_map as _kernel_map

__all__ = [
    "SELU",
    "AlphaDropout",
    "Concat",
    "Dropout",
    "Linear",
    "PointwiseConv",
    "ReLU",
    "SeparablePointwiseConv",
    "SoftmaxCrossEntropy",
    "SortFlatten",
    "array_module",
    "glorot_uniform",
    "param_count",
    "summary",
]


def array_module(*arrays):
    """The array module of the first device array among `arrays` (CuPy and the like, found via
    ``sys.modules`` without importing anything), else NumPy."""
    for a in arrays:
        if hasattr(a, "__cuda_array_interface__"):
            module = sys.modules.get(type(a).__module__.partition(".")[0])
            if module is not None:
                return module
    return np


def glorot_uniform(shape, fan_in: int, fan_out: int, rng: np.random.Generator, dtype):
    """Samples of U(-limit, limit), ``limit = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio)."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _check_channels(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _sum_rows(grad_out, xp):
    """Sum over every axis but the last (the bias gradient of packed or dense outputs)."""
    return xp.sum(grad_out.reshape(-1, grad_out.shape[-1]), axis=0)


def _check_rate(rate) -> float:
    if isinstance(rate, (bool, np.bool_)) or not isinstance(
        rate, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"rate must be a number in [0, 1), got {type(rate).__name__} {rate!r}")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    return rate


def _on_input_device(method):
    """Run a layer's forward / backward with its inputs' CUDA device current (backward without
    a device array: forward's), so that a layer on cuda:1 computes there whatever device is
    current; CuPy would otherwise copy the inputs to the current device, or refuse them."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        device = cupy_device_context(args, kwargs)
        if method.__name__ == "forward":
            self._input_device = device
        elif isinstance(device, contextlib.nullcontext):
            device = getattr(self, "_input_device", None) or device
        with device:
            return method(self, *args, **kwargs)

    return wrapper


class _Layer:
    """Flags, bookkeeping and the forward context of the layers below."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                setattr(cls, name, _on_input_device(cls.__dict__[name]))

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True
        self.last_output_shape: tuple | None = None
        self._ctx: dict | None = None
        self._input_device = None  # forward's CuPy device context (backward runs there too)

    def train(self, mode: bool = True):
        """Set the training flag; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def n_params(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def _save(self, **ctx) -> None:
        self._ctx = ctx

    def _context(self) -> dict:
        if self._ctx is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called before forward: there is "
                "no context to differentiate"
            )
        return self._ctx

    def _check_grad(self, grad_out, shape):
        xp = array_module(grad_out)
        dy = xp.asarray(grad_out)
        if tuple(dy.shape) != tuple(shape):
            raise ValueError(
                f"grad_out must have the output's shape {tuple(shape)}, got {dy.shape}"
            )
        return dy, xp

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class _PointwiseBase(_Layer):
    """Geometry, parameters' set-up, the kernel map and the forward context shared by the two
    pointwise-convolution layers; a subclass provides _init_params and _forward."""

    def __init__(
        self,
        c_in,
        c_out,
        voxel_size,
        dilation=1,
        kernel_size=3,
        bias=False,
        dtype=np.float32,
        rng=None,
    ):
        super().__init__()
        self.c_in = _check_channels(c_in, "c_in")
        self.c_out = _check_channels(c_out, "c_out")
        self.voxel_size = check_positive(voxel_size, "voxel_size")
        self.dilation = check_dilation(dilation)
        self.kernel_size = check_kernel_size(kernel_size)
        check_bool(bias, "bias")
        self.use_bias = bool(bias)
        self.dtype = _check_dtype(dtype)
        self._rng = np.random.default_rng(rng)
        self._init_params()
        if self.use_bias:
            self.params["bias"] = np.zeros(self.c_out, dtype=self.dtype)

    def forward(
        self,
        points,
        feats,
        *,
        offsets=None,
        kernel_map=None,
        queries=None,
        query_offsets=None,
        num_threads=None,
        check_map=True,
    ):
        """Output (m, c_out) (or (B, m, c_out) for dense input) for features (n, c_in) on
        `points`; the kernel map (the caller's or computed here) is kept for backward.

        Arguments as in :func:`pwconv_cy.pointwise_conv`; ``check_map`` applies to a caller's
        ``kernel_map`` (a map computed here is these points' by construction: not fingerprinted,
        in forward or backward)."""
        check_map = check_bool(check_map, "check_map")
        km = self._map_for(points, offsets, kernel_map, queries, query_offsets, num_threads)
        self._save(
            points=points,
            feats=feats,
            offsets=offsets,
            queries=queries,
            query_offsets=query_offsets,
            kernel_map=km,
            num_threads=num_threads,
            check_map=check_map and kernel_map is not None,
        )
        y = self._forward(points, feats, self._op_kwargs(self._ctx))
        if self.use_bias:
            y = y + self.params["bias"]
        return y

    __call__ = forward

    def _with_bias_grad(self, grads: dict, grad_out, xp) -> dict:
        """grads plus the bias gradient (when the layer has a bias); becomes self.grads."""
        if self.use_bias:
            grads["bias"] = _sum_rows(xp.asarray(grad_out), xp)
        self.grads = grads
        return grads

    @property
    def kernel_map(self):
        """The kernel map of the last forward call (None before the first)."""
        return None if self._ctx is None else self._ctx["kernel_map"]

    def _geometry_repr(self) -> str:
        return (
            f"voxel_size={self.voxel_size}, dilation={self.dilation}, "
            f"kernel_size={self.kernel_size}, bias={self.use_bias}, dtype={self.dtype.name}"
        )

    # -- forward context -------------------------------------------------------------------

    def _map_for(self, points, offsets, kernel_map, queries, query_offsets, num_threads):
        """The caller's kernel map (checked by the operator) or one computed once, here."""
        if kernel_map is not None:
            return kernel_map
        return _kernel_map(
            points,
            self.voxel_size,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            offsets=offsets,
            queries=queries,
            query_offsets=query_offsets,
            num_threads=num_threads,
        )

    def _op_kwargs(self, ctx) -> dict:
        return {
            "dilation": self.dilation,
            "offsets": ctx["offsets"],
            "queries": ctx["queries"],
            "query_offsets": ctx["query_offsets"],
            "kernel_map": ctx["kernel_map"],
            "num_threads": ctx["num_threads"],
            "check_map": ctx["check_map"],
        }


class PointwiseConv(_PointwiseBase):
    """Pointwise convolution layer (Hua et al., CVPR 2018): ``y = pointwise_conv(x, W) [+ b]``.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    voxel_size : float
        Kernel cell edge v (coordinate units).
    dilation : int
        À-trous stride s (the paper's layers: 1, 2, 3, 4).
    kernel_size : int
        Odd K (the paper: 3).
    bias : bool
        Add a per-channel bias (off by default, as in the paper).
    dtype : float32 or float64
    rng : None, int or numpy.random.Generator
        Seed or generator of the Glorot-uniform initialisation.

    Attributes
    ----------
    params : dict
        ``"weight"`` (K, K, K, c_in, c_out), Glorot-uniform with fan-in K^3 c_in and fan-out
        K^3 c_out; ``"bias"`` (c_out,) zeros when ``bias=True``.
    grads : dict
        Gradients of the last backward call, same keys and shapes as ``params``.
    """

    def _init_params(self):
        k3 = self.kernel_size**3
        shape = (self.kernel_size,) * 3 + (self.c_in, self.c_out)
        self.params["weight"] = glorot_uniform(
            shape, k3 * self.c_in, k3 * self.c_out, self._rng, self.dtype
        )

    def _forward(self, points, feats, op_kwargs):
        return pointwise_conv(points, feats, self.params["weight"], self.voxel_size, **op_kwargs)

    def backward(self, grad_out, *, feats_grad=True):
        """``(d_feats, grads)``: d_feats shaped like the forward's feats (None with
        ``feats_grad=False``, which skips its computation: for a first layer), grads with the
        keys of ``params``.  Overwrites ``self.grads``."""
        ctx = self._context()
        d_feats, d_weight = pointwise_conv_backward(
            grad_out,
            ctx["points"],
            ctx["feats"],
            self.params["weight"],
            self.voxel_size,
            feats_grad=feats_grad,
            **self._op_kwargs(ctx),
        )
        return d_feats, self._with_bias_grad({"weight": d_weight}, grad_out,
                                             array_module(grad_out))

    def __repr__(self) -> str:
        return f"PointwiseConv({self.c_in} -> {self.c_out}, {self._geometry_repr()})"


class SeparablePointwiseConv(_PointwiseBase):
    """Depthwise-separable pointwise convolution: a depthwise pointwise convolution (one K^3
    kernel per channel, no channel mixing) followed by a per-point 1x1 linear map, ``y = z P [+ b]``
    with ``z = pointwise_conv(x, D, depthwise=True)``: K^3 c_in + c_in c_out parameters.

    Parameters are as for :class:`PointwiseConv`.  ``params``: ``"depthwise"`` (K, K, K, c_in),
    Glorot-uniform with fan-in = fan-out = K^3 (each output channel sees K^3 cells of one
    channel); ``"pointwise"`` (c_in, c_out), Glorot-uniform with fan-in c_in and fan-out c_out;
    ``"bias"`` (c_out,) zeros when ``bias=True``.
    """

    def _init_params(self):
        k3 = self.kernel_size**3
        self.params["depthwise"] = glorot_uniform(
            (self.kernel_size,) * 3 + (self.c_in,), k3, k3, self._rng, self.dtype
        )
        self.params["pointwise"] = glorot_uniform(
            (self.c_in, self.c_out), self.c_in, self.c_out, self._rng, self.dtype
        )

    def _forward(self, points, feats, op_kwargs):
        z = pointwise_conv(
            points, feats, self.params["depthwise"], self.voxel_size, depthwise=True, **op_kwargs
        )
        self._ctx["depthwise_out"] = z
        return z @ self.params["pointwise"]

    def backward(self, grad_out, *, feats_grad=True):
        """``(d_feats, grads)`` with grads keyed like ``params`` (d_feats None with
        ``feats_grad=False``, which skips its computation); overwrites ``self.grads``."""
        ctx = self._context()
        xp = array_module(grad_out)
        z = ctx["depthwise_out"]
        pointwise = self.params["pointwise"]
        dy = xp.asarray(grad_out)
        if dy.shape != z.shape[:-1] + (self.c_out,):
            raise ValueError(
                f"grad_out must have the output's shape "
                f"{z.shape[:-1] + (self.c_out,)}, got {dy.shape}"
            )
        if dy.dtype != z.dtype:
            raise TypeError(f"grad_out must have the features' dtype {z.dtype}, got {dy.dtype}")
        dy2 = dy.reshape(-1, self.c_out)
        d_pointwise = z.reshape(-1, self.c_in).T @ dy2
        dz = (dy2 @ pointwise.T).reshape(z.shape)
        d_feats, d_depthwise = pointwise_conv_backward(
            dz,
            ctx["points"],
            ctx["feats"],
            self.params["depthwise"],
            self.voxel_size,
            depthwise=True,
            feats_grad=feats_grad,
            **self._op_kwargs(ctx),
        )
        grads = {"depthwise": d_depthwise, "pointwise": d_pointwise}
        return d_feats, self._with_bias_grad(grads, dy, xp)

    def __repr__(self) -> str:
        return f"SeparablePointwiseConv({self.c_in} -> {self.c_out}, {self._geometry_repr()})"


# ---------------------------------------------------------------------------------------------
# Dense layers, activations, dropout, reshaping and the loss of the paper's classifier (SPEC §1)
# ---------------------------------------------------------------------------------------------

SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805


class Linear(_Layer):
    """Fully connected layer on the last axis: ``y = x W [+ b]`` for x (..., c_in).

    ``params``: ``"weight"`` (c_in, c_out), Glorot-uniform with fan-in c_in and fan-out c_out;
    ``"bias"`` (c_out,) zeros when ``bias=True`` (the default).
    """

    def __init__(self, c_in, c_out, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.c_in = _check_channels(c_in, "c_in")
        self.c_out = _check_channels(c_out, "c_out")
        check_bool(bias, "bias")
        self.use_bias = bool(bias)
        self.dtype = _check_dtype(dtype)
        self._rng = np.random.default_rng(rng)
        self.params["weight"] = glorot_uniform(
            (self.c_in, self.c_out), self.c_in, self.c_out, self._rng, self.dtype
        )
        if self.use_bias:
            self.params["bias"] = np.zeros(self.c_out, dtype=self.dtype)

    def forward(self, x):
        """Output (..., c_out) for x (..., c_in); x is kept for backward."""
        xp = array_module(x)
        x = xp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.c_in:
            raise ValueError(f"input must have shape (..., {self.c_in}), got {x.shape}")
        self._save(x=x)
        y = x @ self.params["weight"]
        if self.use_bias:
            y = y + self.params["bias"]
        self.last_output_shape = tuple(y.shape)
        return y

    def backward(self, grad_out):
        """``(d_x, grads)`` with grads keyed like ``params``; overwrites ``self.grads``."""
        x = self._context()["x"]
        dy, xp = self._check_grad(grad_out, x.shape[:-1] + (self.c_out,))
        dy2 = dy.reshape(-1, self.c_out)
        grads = {"weight": x.reshape(-1, self.c_in).T @ dy2}
        if self.use_bias:
            grads["bias"] = _sum_rows(dy, xp)
        d_x = (dy2 @ self.params["weight"].T).reshape(x.shape)
        self.grads = grads
        return d_x, grads

    def __repr__(self) -> str:
        return f"Linear({self.c_in} -> {self.c_out}, bias={self.use_bias}, dtype={self.dtype.name})"


class SELU(_Layer):
    """Scaled exponential linear unit (Klambauer et al. 2017):
    ``scale * x`` for x > 0, ``scale * alpha * (exp(x) - 1)`` otherwise."""

    alpha = SELU_ALPHA
    scale = SELU_SCALE

    def forward(self, x):
        xp = array_module(x)
        x = xp.asarray(x)
        self._save(x=x)
        neg = self.scale * self.alpha * xp.expm1(xp.minimum(x, 0))
        y = xp.where(x > 0, self.scale * x, neg).astype(x.dtype, copy=False)
        self.last_output_shape = tuple(y.shape)
        return y

    def backward(self, grad_out):
        x = self._context()["x"]
        dy, xp = self._check_grad(grad_out, x.shape)
        slope = xp.where(x > 0, self.scale, self.scale * self.alpha * xp.exp(xp.minimum(x, 0)))
        self.grads = {}
        return (dy * slope).astype(x.dtype, copy=False), self.grads

    def __repr__(self) -> str:
        return "SELU()"


class ReLU(_Layer):
    """``max(x, 0)`` (gradient 0 at x = 0)."""

    def forward(self, x):
        xp = array_module(x)
        x = xp.asarray(x)
        self._save(x=x)
        y = xp.maximum(x, 0).astype(x.dtype, copy=False)
        self.last_output_shape = tuple(y.shape)
        return y

    def backward(self, grad_out):
        x = self._context()["x"]
        dy, xp = self._check_grad(grad_out, x.shape)
        self.grads = {}
        return xp.where(x > 0, dy, 0).astype(x.dtype, copy=False), self.grads

    def __repr__(self) -> str:
        return "ReLU()"


class _DropoutBase(_Layer):
    def __init__(self, rate, rng=None):
        super().__init__()
        self.rate = _check_rate(rate)
        self._rng = np.random.default_rng(rng)

    def _keep_mask(self, x, mask, xp):
        """Boolean keep-mask: the caller's (checked) or drawn from the layer's Generator."""
        if mask is None:
            return xp.asarray(self._rng.random(x.shape) >= self.rate)
        mask = xp.asarray(mask)
        if tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"mask must have the input's shape {x.shape}, got {mask.shape}")
        return mask.astype(bool)

    @property
    def mask(self):
        """The keep-mask of the last training-mode forward (None otherwise)."""
        return None if self._ctx is None else self._ctx.get("keep")

    def forward(self, x, mask=None):
        """Training: the dropped-out x (mask: the caller's keep-mask, True = keep, or None for a
        fresh one from the layer's Generator); evaluation: x itself."""
        xp = array_module(x)
        x = xp.asarray(x)
        keep = self._keep_mask(x, mask, xp) if self.training else None
        self._save(shape=x.shape, keep=keep)
        y = x if keep is None else self._drop(x, keep, xp).astype(x.dtype, copy=False)
        self.last_output_shape = tuple(y.shape)
        return y

    def backward(self, grad_out):
        ctx = self._context()
        dy, xp = self._check_grad(grad_out, ctx["shape"])
        self.grads = {}
        if ctx["keep"] is None:
            return dy, self.grads
        return self._drop_grad(dy, ctx["keep"], xp).astype(dy.dtype, copy=False), self.grads


class AlphaDropout(_DropoutBase):
    """Alpha-dropout (Klambauer et al. 2017), keeps mean 0 and variance 1 of SELU activations.

    Training: each unit is kept with probability ``1 - rate``; dropped units are set to
    ``alpha' = -scale * alpha``; then ``a * x + b`` with ``a = ((1-rate)(1 + rate alpha'^2))^-1/2``,
    ``b = -a alpha' rate``.  Evaluation: the identity.  The mask comes from the layer's seeded
    Generator (or ``forward(x, mask=...)``, True = keep) and is kept for backward.
    """

    alpha_prime = -SELU_SCALE * SELU_ALPHA

    @property
    def a(self) -> float:
        r, ap = self.rate, self.alpha_prime
        return ((1.0 - r) * (1.0 + r * ap * ap)) ** -0.5

    @property
    def b(self) -> float:
        return -self.a * self.alpha_prime * self.rate

    def _drop(self, x, keep, xp):
        return self.a * xp.where(keep, x, self.alpha_prime) + self.b

    def _drop_grad(self, dy, keep, xp):
        return xp.where(keep, self.a * dy, 0)

    def __repr__(self) -> str:
        return f"AlphaDropout(rate={self.rate})"


class Dropout(_DropoutBase):
    """Inverted dropout: training keeps each unit with probability ``1 - rate`` and scales it by
    ``1 / (1 - rate)``; evaluation is the identity."""

    def _drop(self, x, keep, xp):
        return xp.where(keep, x / (1.0 - self.rate), 0)

    def _drop_grad(self, dy, keep, xp):
        return xp.where(keep, dy / (1.0 - self.rate), 0)

    def __repr__(self) -> str:
        return f"Dropout(rate={self.rate})"


class Concat(_Layer):
    """Concatenation along `axis`: ``forward([x1, x2, ...])``; ``backward(grad)`` returns
    ``([d_x1, d_x2, ...], {})``."""

    def __init__(self, axis=-1):
        super().__init__()
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        self.axis = int(axis)

    def forward(self, xs):
        if isinstance(xs, (str, bytes)) or not hasattr(xs, "__len__") or len(xs) == 0:
            raise ValueError("Concat.forward expects a non-empty list of arrays")
        xp = array_module(*xs)
        xs = [xp.asarray(x) for x in xs]
        y = xp.concatenate(xs, axis=self.axis)
        axis = self.axis % y.ndim
        self._save(sizes=[x.shape[axis] for x in xs], axis=axis, shape=y.shape)
        self.last_output_shape = tuple(y.shape)
        return y

    def backward(self, grad_out):
        ctx = self._context()
        dy, xp = self._check_grad(grad_out, ctx["shape"])
        splits = np.cumsum(ctx["sizes"])[:-1].tolist()
        self.grads = {}
        return list(xp.split(dy, splits, axis=ctx["axis"])), self.grads

    def __repr__(self) -> str:
        return f"Concat(axis={self.axis})"


def _lexsort_xyz(points, xp):
    """(B, n) order of each cloud's points by x, then y, then z, ties kept in input order: the
    permutation of ``np.lexsort((z, y, x), axis=-1)``, made by three stable argsorts, least
    significant key first (CuPy's lexsort has no axis; its argsort is stable).  ``+ 0.0`` makes
    -0.0 +0.0, so a radix sort cannot tell them apart where a comparison sort does not."""
    perm = None
    for axis in (2, 1, 0):
        key = points[..., axis] + 0.0
        if perm is not None:
            key = xp.take_along_axis(key, perm, axis=-1)
        order = xp.argsort(key, axis=-1, kind="stable") if xp is np else xp.argsort(key, axis=-1)
        perm = order if perm is None else xp.take_along_axis(perm, order, axis=-1)
    return perm


class SortFlatten(_Layer):
    """Order-making flatten of the paper's classifier: ``forward(points (B, n, 3), feats (B, n, c))``
    sorts each cloud's points by x, then y, then z (x the primary key; stable:
    ``np.lexsort((z, y, x))``) and returns the permuted features flattened to (B, n*c).
    ``backward`` un-permutes: ``(d_feats (B, n, c), {})`` (no gradient w.r.t. coordinates)."""

    def forward(self, points, feats):
        xp = array_module(points, feats)
        points = xp.asarray(points)
        feats = xp.asarray(feats)
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (B, n, 3), got {points.shape}")
        if feats.ndim != 3 or feats.shape[:2] != points.shape[:2]:
            raise ValueError(
                f"feats must have shape (B, n, c) with (B, n) = {points.shape[:2]}, got {feats.shape}"
            )
        B, n, c = feats.shape
        perm = _lexsort_xyz(points, xp)
        rows = xp.arange(B)[:, None]
        y = feats[rows, perm].reshape(B, n * c)
        self._save(perm=perm, shape=feats.shape)
        self.last_output_shape = tuple(y.shape)
        return y

    @property
    def permutation(self):
        """(B, n) sort order of the last forward: output position k holds input point perm[b, k]."""
        return None if self._ctx is None else self._ctx["perm"]

    def backward(self, grad_out):
        ctx = self._context()
        B, n, c = ctx["shape"]
        dy, xp = self._check_grad(grad_out, (B, n * c))
        d_feats = xp.empty((B, n, c), dtype=dy.dtype)
        d_feats[xp.arange(B)[:, None], ctx["perm"]] = dy.reshape(B, n, c)
        self.grads = {}
        return d_feats, self.grads

    def __repr__(self) -> str:
        return "SortFlatten()"


class SoftmaxCrossEntropy(_Layer):
    """Softmax cross-entropy from logits (N, C) or (B, n, C) and integer labels of shape
    ``logits.shape[:-1]``, numerically stable (log-sum-exp).

    The loss is the mean over the samples whose label is not `ignore_index`; with
    `class_weights` (C,) it is the weighted mean ``sum w[y_i] nll_i / sum w[y_i]``, as PyTorch's
    ``CrossEntropyLoss``.  When every sample is ignored (or has weight 0) the loss is 0 and the
    gradient zero (PyTorch gives NaN).  ``backward(grad=1.0)`` returns d_logits.
    """

    def __init__(self, class_weights=None, ignore_index=None):
        super().__init__()
        if class_weights is not None:
            w = np.asarray(class_weights) if array_module(class_weights) is np else class_weights
            if w.ndim != 1:
                raise ValueError(f"class_weights must be one-dimensional (C,), got shape {w.shape}")
            if not np.issubdtype(np.dtype(w.dtype), np.number) or np.dtype(w.dtype) == np.bool_:
                raise TypeError(f"class_weights must be numeric, got dtype {w.dtype}")
            if bool((w < 0).any()):
                raise ValueError("class_weights must be non-negative")
            class_weights = w
        if ignore_index is not None and (
            isinstance(ignore_index, (bool, np.bool_))
            or not isinstance(ignore_index, (int, np.integer))
        ):
            raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
        self.class_weights = class_weights
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def forward(self, logits, labels):
        """Scalar (0-d, logits' dtype) loss."""
        xp = array_module(logits, labels)
        z = xp.asarray(logits)
        y = xp.asarray(labels)
        if z.ndim not in (2, 3):
            raise ValueError(f"logits must have shape (N, C) or (B, n, C), got {z.shape}")
        if np.dtype(z.dtype) not in (np.float32, np.float64):
            raise TypeError(f"logits must be float32 or float64, got {z.dtype}")
        C = z.shape[-1]
        if tuple(y.shape) != tuple(z.shape[:-1]):
            raise ValueError(
                f"labels must have shape {tuple(z.shape[:-1])} (the logits' shape without the "
                f"class axis), got {tuple(y.shape)}"
            )
        if not np.issubdtype(np.dtype(y.dtype), np.integer):
            raise TypeError(f"labels must be integers, got dtype {y.dtype}")
        if self.class_weights is not None and self.class_weights.shape[0] != C:
            raise ValueError(
                f"class_weights has {self.class_weights.shape[0]} entries but logits have {C} classes"
            )
        z2 = z.reshape(-1, C)
        y2 = y.reshape(-1).astype(np.int64)
        valid = (
            xp.ones(y2.shape, dtype=bool) if self.ignore_index is None else y2 != self.ignore_index
        )
        bad = valid & ((y2 < 0) | (y2 >= C))
        if bool(bad.any()):
            value = int(y2[xp.argmax(bad)])
            raise ValueError(
                f"label {value} is out of range: labels must be in [0, {C - 1}]"
                + (
                    ""
                    if self.ignore_index is None
                    else f" or equal ignore_index {self.ignore_index}"
                )
            )
        safe = xp.where(valid, y2, 0)
        shifted = z2 - z2.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=1))
        nll = lse - shifted[xp.arange(z2.shape[0]), safe]
        if self.class_weights is None:
            w = valid.astype(z.dtype)
        else:
            cw = xp.asarray(self.class_weights).astype(z.dtype)
            w = xp.where(valid, cw[safe], 0).astype(z.dtype)
        total = w.sum()
        denom = xp.where(total > 0, total, 1)
        loss = ((w * nll).sum() / denom).astype(z.dtype)
        self._save(shifted=shifted, lse=lse, safe=safe, w=w, denom=denom, shape=z.shape)
        self.last_output_shape = ()
        return loss

    def backward(self, grad=1.0):
        """d_logits, shaped like the forward's logits (``grad`` scales it: the upstream dL)."""
        ctx = self._context()
        xp = array_module(ctx["shifted"])
        p = xp.exp(ctx["shifted"] - ctx["lse"][:, None])
        p[xp.arange(p.shape[0]), ctx["safe"]] -= 1
        d = p * (ctx["w"] / ctx["denom"] * grad)[:, None]
        self.grads = {}
        return d.astype(ctx["shifted"].dtype, copy=False).reshape(ctx["shape"])

    def __repr__(self) -> str:
        parts = []
        if self.class_weights is not None:
            parts.append(f"class_weights=({self.class_weights.shape[0]},)")
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        return f"SoftmaxCrossEntropy({', '.join(parts)})"


def param_count(layers) -> int:
    """Total number of parameters of `layers` (objects without ``n_params`` count 0)."""
    return int(sum(getattr(layer, "n_params", 0) for layer in layers))


def _output_description(layer) -> str:
    shape = getattr(layer, "last_output_shape", None)
    if shape is not None:
        return "scalar" if shape == () else "(" + ", ".join(str(d) for d in shape) + ")"
    c_out = getattr(layer, "c_out", None)
    return f"(..., {c_out})" if c_out is not None else "-"


def summary(layers) -> str:
    """A table: index, layer, output (the last forward's shape, else what the layer fixes), and
    parameter count, with the total on the last line."""
    rows = [
        (str(i), repr(layer), _output_description(layer), f"{getattr(layer, 'n_params', 0):,}")
        for i, layer in enumerate(layers)
    ]
    header = ("#", "layer", "output", "params")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(4)]

    def fmt(r):
        return "  ".join(
            [
                r[0].rjust(widths[0]),
                r[1].ljust(widths[1]),
                r[2].ljust(widths[2]),
                r[3].rjust(widths[3]),
            ]
        ).rstrip()

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule] + [fmt(r) for r in rows] + [rule]
    lines.append(f"total parameters: {param_count(layers):,}")
    return "\n".join(lines)
