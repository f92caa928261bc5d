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

import math
import sys

import numpy as np

from pwconv_cy._validation import check_dilation, check_kernel_size, check_positive
from pwconv_cy.functional import pointwise_conv, pointwise_conv_backward
from pwconv_cy.neighbors import kernel_map as _kernel_map

__all__ = ["PointwiseConv", "SeparablePointwiseConv", "array_module", "glorot_uniform"]


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


class _PointwiseBase:
    """Geometry, flags and the forward context shared by the two layers."""

    def __init__(self, c_in, c_out, voxel_size, dilation, kernel_size, bias, dtype, rng):
        self.c_in = _check_channels(c_in, "c_in")
        self.c_out = _check_channels(c_out, "c_out")
        self.voxel_size = check_positive(voxel_size, "voxel_size")
        self.dilation = check_dilation(dilation)
        self.kernel_size = check_kernel_size(kernel_size)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        self.use_bias = bool(bias)
        self.dtype = _check_dtype(dtype)
        self._rng = np.random.default_rng(rng)
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True
        self._ctx: dict | None = None

    # -- flags and bookkeeping -------------------------------------------------------------

    def train(self, mode: bool = True):
        """Set the training flag (no effect on this layer's arithmetic); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def n_params(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

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

    def _save(self, **ctx) -> None:
        self._ctx = ctx

    def _context(self) -> dict:
        if self._ctx is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called before forward: there is "
                "no context to differentiate"
            )
        return self._ctx

    def _op_kwargs(self, ctx) -> dict:
        return {
            "dilation": self.dilation,
            "offsets": ctx["offsets"],
            "queries": ctx["queries"],
            "query_offsets": ctx["query_offsets"],
            "kernel_map": ctx["kernel_map"],
            "num_threads": ctx["num_threads"],
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
        super().__init__(c_in, c_out, voxel_size, dilation, kernel_size, bias, dtype, rng)
        k3 = self.kernel_size**3
        shape = (self.kernel_size,) * 3 + (self.c_in, self.c_out)
        self.params["weight"] = glorot_uniform(
            shape, k3 * self.c_in, k3 * self.c_out, self._rng, self.dtype
        )
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
    ):
        """Output (m, c_out) (or (B, m, c_out) for dense input) for features (n, c_in) on
        `points`; the kernel map (the caller's or computed here) is kept for backward.

        Arguments as in :func:`pwconv_cy.pointwise_conv`."""
        km = self._map_for(points, offsets, kernel_map, queries, query_offsets, num_threads)
        self._save(
            points=points,
            feats=feats,
            offsets=offsets,
            queries=queries,
            query_offsets=query_offsets,
            kernel_map=km,
            num_threads=num_threads,
        )
        y = pointwise_conv(
            points, feats, self.params["weight"], self.voxel_size, **self._op_kwargs(self._ctx)
        )
        if self.use_bias:
            y = y + self.params["bias"]
        return y

    __call__ = forward

    def backward(self, grad_out):
        """``(d_feats, grads)``: d_feats shaped like the forward's feats, grads with the keys of
        ``params``.  Overwrites ``self.grads``."""
        ctx = self._context()
        d_feats, d_weight = pointwise_conv_backward(
            grad_out,
            ctx["points"],
            ctx["feats"],
            self.params["weight"],
            self.voxel_size,
            **self._op_kwargs(ctx),
        )
        grads = {"weight": d_weight}
        if self.use_bias:
            xp = array_module(grad_out)
            grads["bias"] = _sum_rows(xp.asarray(grad_out), xp)
        self.grads = grads
        return d_feats, grads

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
        super().__init__(c_in, c_out, voxel_size, dilation, kernel_size, bias, dtype, rng)
        k3 = self.kernel_size**3
        self.params["depthwise"] = glorot_uniform(
            (self.kernel_size,) * 3 + (self.c_in,), k3, k3, self._rng, self.dtype
        )
        self.params["pointwise"] = glorot_uniform(
            (self.c_in, self.c_out), self.c_in, self.c_out, self._rng, self.dtype
        )
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
    ):
        """Output (m, c_out) (or (B, m, c_out)); arguments as in :meth:`PointwiseConv.forward`."""
        km = self._map_for(points, offsets, kernel_map, queries, query_offsets, num_threads)
        self._save(
            points=points,
            feats=feats,
            offsets=offsets,
            queries=queries,
            query_offsets=query_offsets,
            kernel_map=km,
            num_threads=num_threads,
        )
        z = pointwise_conv(
            points,
            feats,
            self.params["depthwise"],
            self.voxel_size,
            depthwise=True,
            **self._op_kwargs(self._ctx),
        )
        self._ctx["depthwise_out"] = z
        y = z @ self.params["pointwise"]
        if self.use_bias:
            y = y + self.params["bias"]
        return y

    __call__ = forward

    def backward(self, grad_out):
        """``(d_feats, grads)`` with grads keyed like ``params``; overwrites ``self.grads``."""
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
            **self._op_kwargs(ctx),
        )
        grads = {"depthwise": d_depthwise, "pointwise": d_pointwise}
        if self.use_bias:
            grads["bias"] = _sum_rows(dy, xp)
        self.grads = grads
        return d_feats, grads

    def __repr__(self) -> str:
        return f"SeparablePointwiseConv({self.c_in} -> {self.c_out}, {self._geometry_repr()})"
