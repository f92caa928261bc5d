"""Input checks of the GPU path: the CPU helpers' rules and messages (pwconv_cy/_validation.py)
for CuPy arrays.  Device data is never copied to the host: shapes and dtypes are read from the
array objects; the NaN/Inf checks reduce on the device and bring back one boolean.  Offsets are
small host metadata (NumPy, lists, or CuPy arrays copied explicitly) checked by the CPU helper."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pwconv_cy import _validation as _host
from pwconv_cy._validation import check_offsets

__all__ = [
    "DeviceBatch",
    "as_device",
    "check_features",
    "check_grad_out",
    "check_points",
    "check_queries",
    "check_weight",
    "host_offsets",
]


def _cupy():
    import cupy

    return cupy


def as_device(x, name: str, host_alternative: str = "the CPU functions of pwconv_cy"):
    """A CuPy view of `x` (CuPy arrays, or objects exposing __cuda_array_interface__ such as a
    detached CUDA torch.Tensor), without copying.  Host arrays are refused, not copied."""
    cupy = _cupy()
    if isinstance(x, cupy.ndarray):
        return x
    if x is None:
        raise TypeError(f"{name} must be a CuPy array, got None")
    try:
        on_device = hasattr(x, "__cuda_array_interface__")
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA tensor that requires grad
        raise TypeError(f"{name}: cannot read {type(x).__name__} as a CuPy array ({exc}); pass "
                        f"{name}.detach() for a tensor that requires grad") from None
    if on_device:
        try:
            return cupy.asarray(x)
        except Exception as exc:  # noqa: BLE001 - say what failed
            raise TypeError(f"{name}: cannot read {type(x).__name__} as a CuPy array ({exc})") \
                from None
    raise TypeError(f"{name} must be a CuPy array (GPU memory), got {type(x).__module__}."
                    f"{type(x).__name__}; host arrays go to {host_alternative}, or move the data "
                    f"with cupy.asarray({name}) first")


def host_offsets(offsets):
    """Offsets as host metadata: CuPy arrays are copied to the host explicitly (B + 1 integers)."""
    if offsets is None:
        return None
    cupy = _cupy()
    if isinstance(offsets, cupy.ndarray) or hasattr(offsets, "__cuda_array_interface__"):
        return cupy.asnumpy(cupy.asarray(offsets))
    return offsets


class DeviceBatch(NamedTuple):
    points: object             # (n, 3) float64 CuPy array, C-contiguous (binned in float64)
    offsets: np.ndarray        # (B + 1,) int64, host
    dense_shape: tuple | None  # (B, n_per_cloud) for the dense (B, n, 3) form


def _first_bad_row(arr):
    cupy = _cupy()
    rows = arr.reshape(arr.shape[0], -1)
    bad = int(cupy.flatnonzero(~cupy.isfinite(rows).all(axis=1))[0])
    return bad, cupy.asnumpy(rows[bad]).tolist()


def _check_coordinates(arr, name: str):
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), "
                        f"got {arr.dtype}")
    cupy = _cupy()
    arr = cupy.ascontiguousarray(arr, dtype=cupy.float64)  # exact for float16/float32
    if arr.size and not bool(cupy.isfinite(arr).all()):
        bad, row = _first_bad_row(arr.reshape(-1, 3))
        raise ValueError(f"{name} must be finite, got NaN or infinite coordinates (first at row "
                         f"{bad}: {row})")
    return arr


def check_points(points, offsets=None, name: str = "points", offsets_name: str = "offsets",
                 what: str = "points") -> DeviceBatch:
    """Coordinates (n, 3) packed with `offsets`, or dense (B, n, 3) with offsets=None."""
    arr = as_device(points, name)
    offsets = host_offsets(offsets)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if offsets is not None:
            raise ValueError(f"{offsets_name} must be None when {name} is dense (B, n, 3), got "
                             f"{name} of shape {arr.shape} and {offsets_name}")
        b, n_per = arr.shape[0], arr.shape[1]
        arr = _check_coordinates(arr, name).reshape(b * n_per, 3)
        return DeviceBatch(arr, np.arange(b + 1, dtype=np.int64) * n_per, (b, n_per))
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3) or (B, n, 3), got {arr.shape}")
    arr = _check_coordinates(arr, name)
    if offsets is None:
        offs = np.array([0, arr.shape[0]], dtype=np.int64)
    else:
        offs = check_offsets(offsets, arr.shape[0], offsets_name, what)
    return DeviceBatch(arr, offs, None)


def check_queries(queries, query_offsets, batch: DeviceBatch):
    """(queries float64 (m, 3) on the device or None, host query offsets or None, dense shape or
    None), as the CPU's check_queries."""
    query_offsets = host_offsets(query_offsets)
    if queries is None:
        if query_offsets is not None:
            raise ValueError("query_offsets was given without queries; pass queries=(m, 3) "
                             "points, or neither")
        return None, None, None
    n_clouds = batch.offsets.shape[0] - 1
    arr = as_device(queries, "queries")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if batch.dense_shape is None or arr.shape[0] != batch.dense_shape[0]:
            raise ValueError(f"dense queries (B, m, 3) need dense points with the same B, got "
                             f"queries of shape {arr.shape} and points packed in {n_clouds} "
                             f"cloud(s)")
        if query_offsets is not None:
            raise ValueError("query_offsets must be None when queries are dense (B, m, 3)")
        q = check_points(arr, None, "queries", "query_offsets")
    else:
        if query_offsets is None and n_clouds != 1:
            raise ValueError(f"queries need query_offsets with {n_clouds + 1} entries, the "
                             "queries' row splits over the same clouds as the points "
                             f"({n_clouds} clouds), got query_offsets=None")
        q = check_points(arr, query_offsets, "queries", "query_offsets", "queries")
    if q.offsets.shape[0] != batch.offsets.shape[0]:
        raise ValueError(f"query_offsets must describe as many clouds as offsets ({n_clouds}), "
                         f"got {q.offsets.shape[0] - 1}")
    return q.points, q.offsets, q.dense_shape


def check_features(feats, batch: DeviceBatch, name: str = "feats", check_finite: bool = True):
    """Per-point features (n, c) packed, or (B, n, c) for dense points -> C-contiguous (n, c);
    the CPU's rules and messages (pwconv_cy._validation.check_features) on CuPy arrays."""
    return _host.check_features(feats, batch, name, check_finite, to_array=as_device, xp=_cupy())


def check_weight(weight, c_in: int, dtype, depthwise: bool, check_finite: bool = True):
    """Weight (K, K, K, c_in, c_out), or (K, K, K, c) when depthwise -> (weight, K, c_out)."""
    return _host.check_weight(weight, c_in, dtype, depthwise, check_finite, to_array=as_device,
                              xp=_cupy())


def check_grad_out(grad_out, m: int, c_out: int, dtype, dense_shape, check_finite: bool = True):
    """Gradient of the output: (m, c_out), or (B, m, c_out) for dense outputs."""
    return _host.check_grad_out(grad_out, m, c_out, dtype, dense_shape, check_finite,
                                to_array=as_device, xp=_cupy())
