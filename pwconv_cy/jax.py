"""JAX adapter: pointwise convolution as a ``jax.custom_vjp`` op, usable under ``jit``, ``grad``
and ``vmap``.

``import pwconv_cy.jax`` (or use ``pwconv_cy.jax`` after ``import pwconv_cy``): JAX is imported
here and nowhere else in the package.

The op runs the C++ core on the host through ``jax.pure_callback`` (forward and backward are two
callbacks), so it is a CPU op: arrays on a GPU or TPU are refused rather than copied to the host
behind the caller's back (put them on the CPU, e.g. ``with jax.default_device(jax.devices("cpu")
[0]):``).  Shapes and dtypes are checked when the op is traced (TypeError/ValueError naming the
argument); values (NaN/Inf, offsets, a kernel map that does not fit the points) are checked in the
callback, whose errors JAX reports as ``JaxRuntimeError`` carrying the same message.

The kernel map is built by the forward callback and reused by the backward callback of the same
points, and by later calls on them (a small cache of :data:`MAP_CACHE_SIZE` entries, keyed by the
geometry and a 64-bit hash of the coordinates, a hit compared in full), or passed in as a Python constant (``kernel_map=``, e.g. for a fixed cloud; it is then
part of the traced function, so a new map means a new trace).  There is no gradient with respect to
the coordinates (SPEC §1): differentiating with respect to ``points`` or ``queries`` raises instead
of returning a silent zero.  ``num_threads`` follows the package's one rule, applied in the
thread that calls (under ``jit``: traces) the op, since the callbacks run on a JAX thread whose
OpenMP settings are not the caller's: ``None`` is resolved there, so a ``threadpool_limits``
around the call (or the trace) holds.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from pwconv_cy import _validation as _v
from pwconv_cy import functional as _functional
from pwconv_cy import neighbors as _neighbors

__all__ = ["MAP_CACHE_SIZE", "clear_map_cache", "pointwise_conv"]

#: Kernel maps kept between a forward and a backward callback (the paper's network: one per
#: dilation, four per batch).
MAP_CACHE_SIZE = 8
_maps: OrderedDict = OrderedDict()
_maps_lock = threading.Lock()


def clear_map_cache() -> None:
    """Drop the kernel maps kept for backward passes."""
    with _maps_lock:
        _maps.clear()


# ------------------------------------------------------------------------- trace-time checks


class _Spec:
    """An array's shape and dtype at trace time: what the checkers of pwconv_cy._validation read
    when check_finite is off (nothing is allocated)."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))

    def reshape(self, *shape):
        shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        if -1 in shape:
            known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
            shape[shape.index(-1)] = self.size // known if known else 0
        return _Spec(shape, self.dtype)


class _SpecModule:
    """The array module of _Spec stand-ins: conversions keep the shape."""

    @staticmethod
    def ascontiguousarray(arr, dtype=None):
        return arr if dtype is None else _Spec(arr.shape, dtype)


def _spec(x, name: str) -> _Spec:
    if isinstance(x, _Spec):
        return x
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - report whatever the conversion said
            raise TypeError(f"{name} must be an array, got {type(x).__name__} ({exc})") from None
        shape, dtype = x.shape, x.dtype
    return _Spec(shape, dtype)


def _coordinates_dtype(arr: _Spec, name: str) -> _Spec:
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), "
                        f"got {arr.dtype}")
    return arr


def _output_spec(points, feats, weight, offsets, queries, depthwise: bool) -> jax.ShapeDtypeStruct:
    """Shape and dtype checks of pwconv_cy._validation on the traced shapes; the output's."""
    kw = {"to_array": _spec, "coordinates": _coordinates_dtype}
    p = _spec(points, "points")
    # Offsets' values are checked in the callback; a dense batch with offsets is caught here.
    batch = _v.check_points(p, offsets if p.ndim == 3 else None, **kw)
    x = _v.check_features(feats, batch, "feats", False, to_array=_spec, xp=_SpecModule)
    _, _, c_out = _v.check_weight(weight, x.shape[1], x.dtype, depthwise, False, to_array=_spec,
                                  xp=_SpecModule)
    if queries is None:
        m, dense = batch.points.shape[0], batch.dense_shape
    else:
        q = _spec(queries, "queries")
        if q.ndim == 3 and batch.dense_shape is None:
            raise ValueError(f"dense queries (B, m, 3) need dense points with the same B, got "
                             f"queries of shape {q.shape} and points of shape {p.shape}")
        qb = _v.check_points(q, None, "queries", "query_offsets", "queries", **kw)
        m, dense = qb.points.shape[0], qb.dense_shape
    shape = (*dense, c_out) if dense is not None else (m, c_out)
    return jax.ShapeDtypeStruct(shape, x.dtype)


def _check_on_cpu(arrays: dict) -> None:
    """The callbacks read host memory: arrays on another platform would be copied silently."""
    traced = False
    for name, a in arrays.items():
        if isinstance(a, jax.core.Tracer):
            traced = True
        elif isinstance(a, jax.Array):
            platforms = {d.platform for d in a.devices()}
            if platforms != {"cpu"}:
                raise ValueError(f"{name} is on {', '.join(sorted(platforms))}, but "
                                 "pwconv_cy.jax runs on the CPU (a host callback) and does not "
                                 "copy device data to the host behind your back: put the arrays "
                                 "on the CPU (jax.device_put(x, jax.devices('cpu')[0]))")
    if traced:
        default = jax.config.jax_default_device
        platform = getattr(default, "platform", default) or jax.default_backend()
        if platform != "cpu":
            raise ValueError(f"pwconv_cy.jax runs on the CPU (a host callback), but this trace "
                             f"targets {platform}; trace it under "
                             "jax.default_device(jax.devices('cpu')[0])")


# ------------------------------------------------------------------------- host callbacks


class _Config:
    """The static (non-array) arguments of one op."""

    __slots__ = ("check_finite", "depthwise", "dilation", "kernel_map", "method", "num_threads",
                 "voxel_size")

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)

    def op_kwargs(self, offsets, queries, query_offsets, kernel_map) -> dict:
        return {"dilation": self.dilation, "offsets": offsets, "queries": queries,
                "query_offsets": query_offsets, "kernel_map": kernel_map,
                "depthwise": self.depthwise, "method": self.method,
                "num_threads": self.num_threads, "check_finite": self.check_finite}


def _map_key(cfg: _Config, kernel_size: int, points, offsets, queries, query_offsets):
    """(dict key: the digests (64-bit hashes) and the geometry, the arrays themselves): a hit must
    match the arrays exactly, so that a hash collision can never hand back another cloud's map."""
    def digest(coords, offs):
        offs = np.zeros(0, np.int64) if offs is None else np.asarray(offs, dtype=np.int64)
        return _neighbors.cloud_digest(np.ascontiguousarray(coords), offs)

    key = (digest(points, offsets), None if queries is None else digest(queries, query_offsets),
           cfg.voxel_size, kernel_size, cfg.dilation, cfg.method)
    return key, (points, offsets, queries, query_offsets)


def _same_arrays(kept: tuple, arrays: tuple) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None
                                             and np.array_equal(a, b))
               for a, b in zip(kept, arrays))


def _kernel_map_for(cfg: _Config, weight, points, offsets, queries, query_offsets,
                    build: bool):
    """The caller's map, or the one cached for these exact arrays, or (build=True) a new one,
    kept for the backward pass (and later calls on the same points)."""
    if cfg.kernel_map is not None:
        return cfg.kernel_map
    kernel_size = int(weight.shape[0])
    key, arrays = _map_key(cfg, kernel_size, points, offsets, queries, query_offsets)
    with _maps_lock:
        hit = _maps.get(key)
        if hit is not None and _same_arrays(hit[0], arrays):
            _maps.move_to_end(key)
            return hit[1]
    if not build:
        return None
    km = _neighbors.kernel_map(points, cfg.voxel_size, kernel_size=kernel_size,
                               dilation=cfg.dilation, queries=queries, offsets=offsets,
                               query_offsets=query_offsets, method=cfg.method,
                               num_threads=cfg.num_threads)
    kept = tuple(None if a is None else np.array(a) for a in arrays)  # the callback's may be views
    with _maps_lock:
        _maps[key] = (kept, km)
        _maps.move_to_end(key)
        while len(_maps) > MAP_CACHE_SIZE:
            _maps.popitem(last=False)
    return km


def _kernel_size_ok(weight) -> bool:
    return weight.ndim >= 3 and weight.shape[0] % 2 == 1


def _forward_callback(cfg: _Config, points, feats, weight, offsets, queries, query_offsets):
    km = (_kernel_map_for(cfg, weight, points, offsets, queries, query_offsets, build=True)
          if _kernel_size_ok(weight) else None)
    return _functional.pointwise_conv(points, feats, weight, cfg.voxel_size,
                                      **cfg.op_kwargs(offsets, queries, query_offsets, km))


def _backward_callback(cfg: _Config, grad_out, points, feats, weight, offsets, queries,
                       query_offsets):
    km = _kernel_map_for(cfg, weight, points, offsets, queries, query_offsets, build=False)
    return _functional.pointwise_conv_backward(
        grad_out, points, feats, weight, cfg.voxel_size,
        **cfg.op_kwargs(offsets, queries, query_offsets, km))


# ------------------------------------------------------------------------- the op


def _unwrap(primal):
    return jax.tree_util.tree_map(lambda p: p.value, primal)


def _perturbed(primal) -> bool:
    return any(p.perturbed for p in jax.tree_util.tree_leaves(primal))


def _make_op(cfg: _Config, out: jax.ShapeDtypeStruct):
    forward = functools.partial(_forward_callback, cfg)
    backward = functools.partial(_backward_callback, cfg)

    @jax.custom_vjp
    def op(points, feats, weight, offsets, queries, query_offsets):
        return jax.pure_callback(forward, out, points, feats, weight, offsets, queries,
                                 query_offsets, vmap_method="sequential")

    def op_fwd(points, feats, weight, offsets, queries, query_offsets):
        for name, primal in (("points", points), ("queries", queries)):
            if _perturbed(primal):
                raise ValueError(
                    f"cannot differentiate pointwise_conv with respect to {name}: it has no "
                    "gradient with respect to the coordinates (the kernel map is piecewise "
                    "constant in them; SPEC §1); differentiate with respect to feats and weight "
                    f"only (wrap {name} in jax.lax.stop_gradient if it is computed)")
        args = tuple(_unwrap(a) for a in (points, feats, weight, offsets, queries,
                                          query_offsets))
        return op(*args), args

    def op_bwd(args, grad_out):
        points, feats, weight, offsets, queries, query_offsets = args
        if isinstance(grad_out, SymbolicZero):  # the output does not reach the loss
            return (None, jnp.zeros_like(feats), jnp.zeros_like(weight), None, None, None)
        shapes = (jax.ShapeDtypeStruct(feats.shape, feats.dtype),
                  jax.ShapeDtypeStruct(weight.shape, weight.dtype))
        d_feats, d_weight = jax.pure_callback(backward, shapes, grad_out, points, feats, weight,
                                              offsets, queries, query_offsets,
                                              vmap_method="sequential")
        return (None, d_feats, d_weight, None, None, None)

    op.defvjp(op_fwd, op_bwd, symbolic_zeros=True)
    return op


def pointwise_conv(points, feats, weight, voxel_size, *, dilation=1, offsets=None, queries=None,
                   query_offsets=None, kernel_map=None, depthwise=False, method="grid",
                   num_threads=None, check_finite=True):
    """Pointwise convolution on JAX arrays (CPU), differentiable in ``feats`` and ``weight``.

    ``y_i = sum_f sum_{j in Omega_i(f)} x_j W_f / n_i(f)`` (SPEC §1), computed by
    :func:`pwconv_cy.pointwise_conv` in a host callback, its VJP by
    :func:`pwconv_cy.pointwise_conv_backward`.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) float16/32/64
        Coordinates; not differentiable (differentiating with respect to them raises).
    feats : (n, c_in) or (B, n, c_in) float32/float64
    weight : (K, K, K, c_in, c_out), or (K, K, K, c_in) with ``depthwise=True``
        Same dtype as ``feats`` (float64 needs ``jax_enable_x64``).
    voxel_size : float
        Kernel cell edge v (coordinate units); a Python number (static).
    dilation, depthwise, method, num_threads, check_finite
        Static, as in :func:`pwconv_cy.pointwise_conv` (``num_threads=None`` is resolved when the
        op is called or traced).
    offsets, queries, query_offsets
        Arrays (traced) as in :func:`pwconv_cy.pointwise_conv`.
    kernel_map : KernelMap, optional
        A map of these exact points (checked in the callback), used as a constant.

    Returns
    -------
    y : (m, c_out) or (B, m, c_out) array in the features' dtype.
    """
    _v.check_bool(depthwise, "depthwise")
    if kernel_map is not None and not isinstance(kernel_map, _neighbors.KernelMap):
        raise TypeError(f"kernel_map must be a pwconv_cy.KernelMap (from pwconv_cy.kernel_map), "
                        f"got {type(kernel_map).__name__}")
    # The callbacks run on a JAX runtime thread, whose OpenMP default is not the caller's: None
    # is resolved here, in the calling (tracing) thread, where threadpool_limits apply.
    _v.check_num_threads(num_threads)
    threads = _v.default_num_threads() if num_threads is None else num_threads
    cfg = _Config(voxel_size=_v.check_positive(voxel_size, "voxel_size"),
                  dilation=_v.check_dilation(dilation), depthwise=bool(depthwise),
                  method=_v.check_choice(method, "method", _neighbors.METHODS),
                  num_threads=threads, check_finite=bool(check_finite), kernel_map=kernel_map)
    _check_on_cpu({"points": points, "feats": feats, "weight": weight, "offsets": offsets,
                   "queries": queries, "query_offsets": query_offsets})
    out = _output_spec(points, feats, weight, offsets, queries, bool(depthwise))
    return _make_op(cfg, out)(points, feats, weight, offsets, queries, query_offsets)
