"""Input checks, one helper per concept.  Each returns canonical arrays (C-contiguous, canonical
dtype) or raises TypeError (dtypes) / ValueError (shapes, values) saying what was found and what
is required.  Nothing downstream re-validates."""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import NamedTuple

import numpy as np

from pwconv_cy._arrays import to_host

__all__ = [
    "PointBatch",
    "as_numpy",
    "check_choice",
    "check_dilation",
    "check_extent",
    "check_kernel_size",
    "check_leaf_size",
    "check_num_threads",
    "check_offsets",
    "check_points",
    "check_positive",
    "check_queries",
    "default_num_threads",
]


def as_numpy(x, name: str) -> np.ndarray:
    """A NumPy view of `x` (NumPy, array-likes, DLPack producers on the CPU), without copying;
    GPU arrays are refused, never copied (see pwconv_cy._arrays)."""
    return to_host(x, name)


class PointBatch(NamedTuple):
    points: np.ndarray       # (n, 3) C-contiguous: float32/float64 (CPU), float64 CuPy (GPU)
    offsets: np.ndarray      # (B + 1,) int64
    dense_shape: tuple | None  # (B, n_per_cloud) when given in the dense (B, n, 3) form


def _check_coordinates(arr: np.ndarray, name: str, finite: bool = True) -> np.ndarray:
    if arr.dtype.kind not in "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), "
                        f"got {arr.dtype}")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # exact
    arr = np.ascontiguousarray(arr)
    if finite:
        check_finite_coordinates(arr, name)
    return arr


def check_finite_coordinates(arr: np.ndarray, name: str) -> None:
    """Raise ValueError naming the first row of `arr` (n, 3) with a NaN or infinite value."""
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr.reshape(-1, 3)).all(axis=1))[0, 0]
        raise ValueError(f"{name} must be finite, got NaN or infinite coordinates "
                         f"(first at row {bad}: {arr.reshape(-1, 3)[bad].tolist()})")


def coordinates_unchecked_for_finiteness(arr: np.ndarray, name: str) -> np.ndarray:
    """_check_coordinates without the finiteness scan: for points a kernel map's digest will
    be compared with (equal to the map's points, which were checked when it was built)."""
    return _check_coordinates(arr, name, finite=False)


def check_offsets(offsets, n: int, name: str = "offsets", what: str = "points") -> np.ndarray:
    """Row splits (B + 1,) of any integer dtype -> int64: starts at 0, non-decreasing, ends at n
    (the number of `what`)."""
    arr = as_numpy(offsets, name)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n_clouds + 1,), got {arr.shape}: row splits "
                         "start with 0 and end with the number of " + what)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {arr[0]}")
    falls = arr[1:] < arr[:-1]  # (not np.diff: half the time, and every call checks offsets)
    if falls.any():
        k = int(np.argmax(falls))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{k}] = {arr[k]} > "
                         f"{name}[{k + 1}] = {arr[k + 1]}")
    if arr[-1] != n:
        raise ValueError(f"{name} must end at the number of {what} ({n}), got {name}[-1] = "
                         f"{arr[-1]}")
    return arr


def check_points(points, offsets=None, name: str = "points", offsets_name: str = "offsets",
                 what: str = "points", *, to_array=as_numpy,
                 coordinates=_check_coordinates) -> PointBatch:
    """Coordinates (n, 3) packed with `offsets`, or dense (B, n, 3) with offsets=None.
    `to_array` and `coordinates` (dtype, finiteness, canonical copy) are the GPU path's own
    there; offsets are host metadata on both paths."""
    arr = to_array(points, name)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if offsets is not None:
            raise ValueError(f"{offsets_name} must be None when {name} is dense (B, n, 3), got "
                             f"{name} of shape {arr.shape} and {offsets_name}")
        b, n_per = arr.shape[0], arr.shape[1]
        arr = coordinates(arr, name).reshape(b * n_per, 3)
        offs = np.arange(b + 1, dtype=np.int64) * n_per
        return PointBatch(arr, offs, (b, n_per))
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3) or (B, n, 3), got {arr.shape}")
    arr = coordinates(arr, name)
    if offsets is None:
        offs = np.array([0, arr.shape[0]], dtype=np.int64)
    else:
        offs = check_offsets(offsets, arr.shape[0], offsets_name, what)
    return PointBatch(arr, offs, None)


def check_queries(queries, query_offsets, batch: PointBatch, *, to_array=as_numpy,
                  coordinates=_check_coordinates, xp=np):
    """Query points for `batch`: returns (queries float64 (m, 3) or None, query offsets or None,
    dense shape or None).  None means 'the points themselves'.  The keyword arguments are the
    GPU path's (see check_points)."""
    if queries is None:
        if query_offsets is not None:
            raise ValueError("query_offsets was given without queries; pass queries=(m, 3) "
                             "points, or neither")
        return None, None, None
    n_clouds = batch.offsets.shape[0] - 1
    arr = to_array(queries, "queries")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if batch.dense_shape is None or arr.shape[0] != batch.dense_shape[0]:
            raise ValueError(f"dense queries (B, m, 3) need dense points with the same B, got "
                             f"queries of shape {arr.shape} and points packed in {n_clouds} "
                             f"cloud(s)")
        if query_offsets is not None:
            raise ValueError("query_offsets must be None when queries are dense (B, m, 3)")
        q = check_points(arr, None, "queries", "query_offsets", to_array=to_array,
                         coordinates=coordinates)
    else:
        if query_offsets is None and n_clouds != 1:
            raise ValueError(f"queries need query_offsets with {n_clouds + 1} entries, the "
                             "queries' row splits over the same clouds as the points "
                             f"({n_clouds} clouds), got query_offsets=None")
        q = check_points(arr, query_offsets, "queries", "query_offsets", "queries",
                         to_array=to_array, coordinates=coordinates)
    if q.offsets.shape[0] != batch.offsets.shape[0]:
        raise ValueError(f"query_offsets must describe as many clouds as offsets ({n_clouds}), "
                         f"got {q.offsets.shape[0] - 1}")
    return xp.ascontiguousarray(q.points, dtype=xp.float64), q.offsets, q.dense_shape


def check_positive(value, name: str) -> float:
    """A positive, finite real number (voxel_size, radius, cell_size)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__} "
                        f"{value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def _check_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def check_leaf_size(value) -> int:
    leaf = _check_int(value, "leaf_size")
    if leaf < 1:
        raise ValueError(f"leaf_size must be an integer >= 1, got {leaf}")
    return leaf


def check_extent(voxel_size: float, kernel_size: int, dilation: int) -> None:
    """The support's edge (dilation*(kernel_size-1)+1)*voxel_size must be a finite number."""
    extent = (dilation * (kernel_size - 1) + 1) * voxel_size
    if not math.isfinite(extent):
        raise ValueError(f"the kernel's extent (dilation*(kernel_size-1)+1)*voxel_size must be "
                         f"finite, got ({dilation}*({kernel_size}-1)+1)*{voxel_size!r} = {extent}")


def check_kernel_size(value) -> int:
    k = _check_int(value, "kernel_size")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {k}")
    if k > 1023:
        raise ValueError(f"kernel_size must be at most 1023, got {k}")
    return k


def check_dilation(value) -> int:
    s = _check_int(value, "dilation")
    if s < 1:
        raise ValueError(f"dilation must be >= 1, got {s}")
    if s > 1 << 20:
        raise ValueError(f"dilation must be at most {1 << 20}, got {s}")
    return s


def check_dilations(values) -> tuple:
    """A sequence of dilations (each as check_dilation) as a tuple of ints; empty is allowed."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"dilations must be a sequence of integers >= 1 (e.g. (1, 2, 3, 4)), got "
                        f"{type(values).__name__} {values!r}; for one map use kernel_map")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(check_dilation(value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"dilations[{i}]: {exc}") from None
    return tuple(out)


# The one rule for threads, everywhere (functions, NeighborIndex, layers, the torch and JAX
# adapters): num_threads=None is the OpenMP default of the calling thread in the runtime the core
# is linked with (omp_get_max_threads: OMP_NUM_THREADS, threadpoolctl.threadpool_limits,
# omp_set_num_threads - and torch.set_num_threads, since PyTorch and pwconv then share one
# libgomp); a positive count overrides it.  The adapters resolve None in the thread that calls
# them, as their callbacks and backward passes may run on other threads.  In a process forked
# from another, pwconv runs on one thread: GNU OpenMP hangs when a forked child starts a thread
# team after its parent ran one, and forked workers (DataLoader, multiprocessing) are the
# parallelism there anyway.
_forked_child = False
_warned_fork = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_num_threads(value) -> int:
    """None -> 0 (the OpenMP default, honouring OMP_NUM_THREADS/threadpoolctl); else >= 1.
    1 in a forked child process (see the rule above; a request for more warns once)."""
    if value is None:
        t = 0
    else:
        t = _check_int(value, "num_threads")
        if t < 1:
            raise ValueError(f"num_threads must be None (the OpenMP default) or >= 1, got {t}")
    if _forked_child and t != 1:
        global _warned_fork
        if t > 1 and not _warned_fork:
            _warned_fork = True
            warnings.warn(f"num_threads={t} in a forked child process: pwconv runs on one thread "
                          "there (GNU OpenMP cannot start threads after fork); use the 'spawn' "
                          "or 'forkserver' start method for multithreaded children",
                          RuntimeWarning, stacklevel=3)
        return 1
    return t


def default_num_threads() -> int:
    """How many threads num_threads=None means here and now (the rule above)."""
    if _forked_child:
        return 1
    from pwconv_cy import _core

    return int(_core.omp_default_threads())


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# The checkers of the operator's arrays serve the CPU and the GPU path (pwconv_cy/cuda): `to_array`
# turns the argument into an array of module `xp` (NumPy here, CuPy there) without copying it
# across devices; the rules and messages are the same on both.

def _check_real(arr, name: str) -> None:
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")


def _check_finite_values(arr, name: str, xp=np) -> None:
    """A reduction on the array's device; only the first bad value comes to the host."""
    if arr.size and not bool(xp.isfinite(arr).all()):
        flat = int(xp.flatnonzero(~xp.isfinite(arr.ravel()))[0])
        bad = np.unravel_index(flat, arr.shape)
        value = arr.ravel()[flat].item()
        raise ValueError(f"{name} must be finite, got {value} at index {tuple(map(int, bad))} "
                         "(pass check_finite=False to skip this check)")


def check_features(feats, batch: PointBatch, name: str = "feats", check_finite: bool = True,
                   *, to_array=as_numpy, xp=np):
    """Per-point features for `batch`: (n, c) packed, or (B, n, c) when the points are dense.
    Returns a C-contiguous (n, c) float32/float64 array."""
    arr = to_array(feats, name)
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
    arr = xp.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, name, xp)
    return arr


def check_weight(weight, c_in: int, dtype, depthwise: bool, check_finite: bool = True, *,
                 to_array=as_numpy, xp=np):
    """Weight (K, K, K, c_in, c_out), or (K, K, K, c) when depthwise, with K odd and the features'
    dtype.  Returns (C-contiguous weight, K, c_out)."""
    arr = to_array(weight, "weight")
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
    arr = xp.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, "weight", xp)
    return arr, k, int(c_out)


def check_map_matches(km, voxel_size: float, kernel_size: int, dilation: int,
                      batch: PointBatch, q, same_points, same_queries) -> None:
    """A ``kernel_map`` argument was built for this call: its voxel size, kernel size and
    dilation, its points (``same_points()``: the fingerprint check of the caller's path, run only
    after the cheap checks pass) and its queries (``same_queries()``; ``q`` is the call's query
    array or None).  Shared by the CPU and GPU paths; ValueError naming what differs.
    same_points / same_queries None (the caller's ``check_map=False``): the sizes, offsets and
    whether there are queries are checked, not the coordinates."""
    for name, have, want in (("voxel_size", km.voxel_size, voxel_size),
                             ("kernel_size", km.kernel_size, kernel_size),
                             ("dilation", km.dilation, dilation)):
        if have != want:
            raise ValueError(f"kernel_map was built for {name}={have}, but this call has "
                             f"{name}={want}; rebuild it or pass matching arguments")
    n = batch.points.shape[0]
    if km.n_points != n or not np.array_equal(km.offsets, batch.offsets) or (
            same_points is not None and not same_points()):
        raise other_points_error(km, batch)
    if same_queries is None:  # unchecked coordinates: whether there are queries, and how many
        same_queries = (lambda: (km.queries_digest is None) == (q is None)
                        and (q is None or km.n_queries == q.shape[0]))
    if not same_queries():
        raise ValueError("kernel_map was built for other query points than this call's "
                         f"(queries {'None' if q is None else q.shape}); rebuild it or pass the "
                         "same queries")


def other_points_error(km, batch: PointBatch) -> ValueError:
    """check_map_matches' error for a map of other points than the call's."""
    return ValueError(f"kernel_map was built for other points ({km.n_points} points in "
                      f"{km.offsets.shape[0] - 1} cloud(s)), not for these "
                      f"({batch.points.shape[0]} points in {batch.offsets.shape[0] - 1} "
                      "cloud(s)); rebuild it for these points")


def check_bool(value, name: str) -> bool:
    """A True/False flag argument (NumPy booleans too); TypeError naming it otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_grad_out(grad_out, m: int, c_out: int, dtype, dense_shape, check_finite: bool = True,
                   *, to_array=as_numpy, xp=np):
    """Gradient of the output: (m, c_out), or (B, m, c_out) for dense outputs."""
    arr = to_array(grad_out, "grad_out")
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
    arr = xp.ascontiguousarray(arr)
    if check_finite:
        _check_finite_values(arr, "grad_out", xp)
    return arr
