"""Input checks of the GPU path: the CPU helpers' rules and messages (pwconv_cy/_validation.py)
for CuPy arrays.  Device data is never copied to the host: shapes and dtypes are read from the
array objects; the NaN/Inf checks reduce on the device and bring back one boolean.  Offsets are
small host metadata (NumPy, lists, or CuPy arrays copied explicitly) checked by the CPU helper."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

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


def _check_real(arr, name: str) -> None:
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")


def _check_finite_values(arr, name: str) -> None:
    cupy = _cupy()
    if arr.size and not bool(cupy.isfinite(arr).all()):
        flat = int(cupy.flatnonzero(~cupy.isfinite(arr.ravel()))[0])
        bad = np.unravel_index(flat, arr.shape)
        value = cupy.asnumpy(arr.ravel()[flat:flat + 1])[0]
        raise ValueError(f"{name} must be finite, got {value} at index {tuple(map(int, bad))} "
                         "(pass check_finite=False to skip this check)")


def check_features(feats, batch: DeviceBatch, name: str = "feats", check_finite: bool = True):
    """Per-point features (n, c) packed, or (B, n, c) for dense points -> C-contiguous (n, c)."""
    cupy = _cupy()
    arr = as_device(feats, name)
    n = batch.points.shape[0]
    if batch.dense_shape is not None and arr.ndim == 3:
        if arr.shape[:2] != batch.dense_shape:
            raise ValueError(f"{name} must have shape (B={batch.dense_shape[0]}, "
                             f"n={batch.dense_shape[1]}, c) like the points, got {arr.shape}")
        arr = arr.reshape(n, arr.shape[2])
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n_points={n}, c), got {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} must have shape (n_points={n}, c), got {arr.shape}: one row of "
                         "features per point")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one channel, got shape {arr.shape}")
    _check_real(arr, name)
    arr = cupy.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, name)
    return arr


def check_weight(weight, c_in: int, dtype, depthwise: bool, check_finite: bool = True):
    """Weight (K, K, K, c_in, c_out), or (K, K, K, c) when depthwise -> (weight, K, c_out)."""
    cupy = _cupy()
    arr = as_device(weight, "weight")
    want = "(K, K, K, c)" if depthwise else "(K, K, K, c_in, c_out)"
    ndim = 4 if depthwise else 5
    if arr.ndim != ndim:
        hint = (" (a 5-D weight is for depthwise=False)" if depthwise and arr.ndim == 5 else
                " (a 4-D weight is for depthwise=True)" if not depthwise and arr.ndim == 4 else "")
        raise ValueError(f"weight must have shape {want}, got {arr.shape}{hint}")
    k = arr.shape[0]
    if arr.shape[1] != k or arr.shape[2] != k or k < 1 or k % 2 == 0:
        raise ValueError(f"weight must have shape {want} with K odd, got {arr.shape}")
    if arr.shape[3] != c_in:
        raise ValueError(f"weight must have shape {want} with c{'' if depthwise else '_in'} = "
                         f"{c_in} (the features' channels), got {arr.shape}")
    c_out = c_in if depthwise else arr.shape[4]
    if c_out < 1:
        raise ValueError(f"weight must have at least one output channel, got {arr.shape}")
    _check_real(arr, "weight")
    if arr.dtype != dtype:
        raise TypeError(f"weight and feats must have the same dtype, got weight {arr.dtype} and "
                        f"feats {np.dtype(dtype)}")
    arr = cupy.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, "weight")
    return arr, k, int(c_out)


def check_grad_out(grad_out, m: int, c_out: int, dtype, dense_shape, check_finite: bool = True):
    """Gradient of the output: (m, c_out), or (B, m, c_out) for dense outputs."""
    cupy = _cupy()
    arr = as_device(grad_out, "grad_out")
    if dense_shape is not None and arr.ndim == 3:
        if arr.shape != (*dense_shape, c_out):
            raise ValueError(f"grad_out must have the output's shape {(*dense_shape, c_out)}, "
                             f"got {arr.shape}")
        arr = arr.reshape(m, c_out)
    if arr.shape != (m, c_out):
        want = (*dense_shape, c_out) if dense_shape is not None else (m, c_out)
        raise ValueError(f"grad_out must have the output's shape {want}, got {arr.shape}")
    _check_real(arr, "grad_out")
    if arr.dtype != dtype:
        raise TypeError(f"grad_out must have the features' dtype {np.dtype(dtype)}, got {arr.dtype}")
    arr = cupy.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, "grad_out")
    return arr
