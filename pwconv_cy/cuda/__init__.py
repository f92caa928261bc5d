"""The GPU path of pwconv: CUDA kernels compiled at run time by CuPy (NVRTC), CuPy arrays in and out.

The functions mirror the CPU API (:func:`pwconv_cy.kernel_map`, :func:`pwconv_cy.radius_search`,
:func:`pwconv_cy.pointwise_conv`, :func:`pwconv_cy.pointwise_conv_backward`) and give the same
results: identical kernel maps and neighbour lists (the binning arithmetic is the C++ core's own
header, compiled by NVRTC without FMA contraction), operator values equal to the CPU's within
rounding, bit-identical from run to run (no floating-point atomics).

Importing this module needs neither CuPy nor a GPU; :func:`is_available` says whether the path can
run.  The kernels (``kernels.cu``) are compiled on first use, once per device (CuPy also keeps them
in its on-disk cache).  ``PWCONV_CUDA_DEBUG=1`` synchronises after every kernel launch so that a
failing kernel raises :class:`CudaKernelError` naming it.

Arrays: coordinates, features, weights and gradients must be CuPy arrays (or objects exposing
``__cuda_array_interface__``, e.g. detached CUDA tensors); host arrays are refused, never copied.
``offsets`` / ``query_offsets`` are small metadata: NumPy, lists or CuPy (copied to the host).
The returned :class:`pwconv_cy.KernelMap` holds CuPy arrays (``splits``, ``index``, ``cell``;
``counts`` made on the device when first read) and host ``offsets``.
"""
from __future__ import annotations

import contextlib
import sys

# Imported here, not in each call: an operator call's host time counts (the paper workload's
# stages were bound by the host issuing them), and none of these imports CuPy.
from pwconv_cy import _arrays
from pwconv_cy import _validation as H
from pwconv_cy import neighbors as _neighbors
from pwconv_cy.cuda import _conv, _search
from pwconv_cy.cuda import _validation as V
from pwconv_cy.cuda._backend import MAX_KERNEL_SIZE, CudaKernelError, debug_enabled, get_backend

#: Where a GPU kernel map keeps n_i(f) of each entry ((E,) int32, made with the map).
ENTRY_COUNTS_KEY = "cuda_entry_counts"

__all__ = [
    "MAX_KERNEL_SIZE",
    "CudaKernelError",
    "NeighborIndex",
    "compile_kernels",
    "debug_enabled",
    "is_available",
    "is_device_array",
    "kernel_map",
    "pointwise_conv",
    "pointwise_conv_backward",
    "radius_search",
    "transpose_map",
    "unavailable_reason",
]

METRICS = ("chebyshev", "euclidean")


def unavailable_reason() -> str | None:
    """None when the GPU path can run, else why not (no CuPy, no device, ...)."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA installation
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device
        return f"CuPy {cupy.__version__} finds no usable CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return f"CuPy {cupy.__version__} finds no CUDA device"
    return None


def is_available() -> bool:
    """True when CuPy is importable and sees a CUDA device (never raises)."""
    return unavailable_reason() is None


def is_device_array(x) -> bool:
    """True for CuPy arrays and objects exposing ``__cuda_array_interface__`` (GPU memory), such
    as CUDA torch tensors.  Does not import CuPy; never raises."""
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - e.g. a CUDA torch.Tensor that requires grad
        return bool(getattr(x, "is_cuda", False))


def compile_kernels() -> None:
    """Compile (or load from CuPy's cache) the kernels for the current device now, instead of at
    the first call.  Raises CudaKernelError with NVRTC's log on failure."""
    _checked_backend().compile()


def _inputs_device(**arrays):
    """The CUDA device that a call's device arrays are on, as a context: validation, kernels and
    results then stay on it whatever device is current (CuPy would otherwise copy the inputs to
    the current device, or refuse them).  TypeError, naming two of them, when they are on
    different devices: pwconv never copies between devices.  Host arrays and None are left to
    the validators."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:  # the common case, CuPy arrays alone, without the general probing
        ids = {a.device.id if type(a) is cupy.ndarray else None
               for a in arrays.values() if a is not None}
        if len(ids) == 1 and None not in ids:
            (device,) = ids
            return contextlib.nullcontext() if device == cupy.cuda.runtime.getDevice() \
                else cupy.cuda.Device(device)
    entries = {name: (_arrays.device_of(a, name), "cupy", _arrays.Described(a))
               for name, a in arrays.items() if a is not None and is_device_array(a)}
    device = _arrays.CallArrays._common_device(entries)
    head, _, index = device.partition(":")
    if head != "cuda" or not index.isdigit():
        return contextlib.nullcontext()  # no device array, or one whose device is not known
    import cupy

    return cupy.cuda.Device(int(index))


_found_usable = False


def _unavailable_until_usable() -> str | None:
    """unavailable_reason() until the GPU path is once found usable, then None without asking
    CuPy again (every GPU call asks: _checked_backend, and the interop's refusal of device
    arrays without a usable GPU path)."""
    global _found_usable
    if _found_usable:
        return None
    reason = unavailable_reason()
    _found_usable = reason is None
    return reason


def _checked_backend():
    reason = _unavailable_until_usable()
    if reason is not None:
        raise RuntimeError(f"the GPU path of pwconv is not available: {reason}")
    return get_backend()


def _checked_queries(be, queries, query_offsets, batch) -> tuple:
    """(queries float64 (m, 3) on the device or None, host query offsets or None, dense shape or
    None, their fingerprint or None): check_queries, the NaN scan and the fingerprint in one
    transfer (points_digest counts the non-finite values beside its sums) instead of two; the
    same error for non-finite queries, before anything is searched for them."""
    if queries is None and query_offsets is None:
        return None, None, None, None
    q, q_offsets, q_dense = V.check_queries(queries, query_offsets, batch, finite=False)
    if q is None:
        return None, None, None, None
    digest, n_bad = _search.points_digest(be, q, q_offsets)
    if n_bad:
        V.raise_nonfinite(q, "queries")
    return q, q_offsets, q_dense, digest


def _device_map_counts(km):
    """KernelMap.counts of a GPU map (made on first access, on the map's device)."""
    from pwconv_cy.cuda._search import kernel_map_counts

    be = _checked_backend()
    with _inputs_device(kernel_map=km.splits):
        return kernel_map_counts(be, km.splits, km.cell, km.kernel_size ** 3)


def _budget(be, memory_budget) -> int:
    """memory_budget when given; else the global budget capped at half the device's memory."""
    from pwconv_cy._config import get_memory_budget, resolve_budget

    if memory_budget is not None:
        return resolve_budget(memory_budget)
    return min(get_memory_budget(), be.device_memory_bytes() // 2)


def _check_method(method) -> None:
    H.check_choice(method, "method", ("grid", "kdtree", "auto"))
    if method == "kdtree":
        raise ValueError("method='kdtree' is not available on the GPU (the GPU path searches a "
                         "grid, with identical results); use method='grid' or 'auto'")


def _check_kernel_size_gpu(k: int) -> None:
    if k > MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be at most {MAX_KERNEL_SIZE} on the GPU, got {k}; "
                         "use the CPU path (pwconv_cy.kernel_map on host arrays) for larger "
                         "kernels")


class NeighborIndex:
    """A grid over a packed batch of clouds on the GPU, built once and queried many times (the
    paper's four layers share one).  Same queries and results as :class:`pwconv_cy.NeighborIndex`.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) CuPy float16/32/64
        Coordinates (binned in float64).
    cell_size : float
        Grid cell edge (the voxel size, or the search radius); any positive value gives the same
        results, it only sets the speed.
    offsets : (B + 1,) integer, optional
        Row splits of the packed clouds (host or CuPy); None for one cloud or the dense form.
    method : {"grid", "auto"}
        Accepted for symmetry with the CPU class; the GPU always uses the grid.
    """

    def __init__(self, points, cell_size, *, offsets=None, method="grid", num_threads=None):
        from pwconv_cy._validation import check_positive
        from pwconv_cy.cuda import _validation as V

        _check_method(method)
        self._be = _checked_backend()
        with _inputs_device(points=points):
            # float64, not yet scanned for NaN: the grid build does that (_init)
            batch = V.float64_coordinates(V.check_points(points, offsets, finite=False))
            cell_size = check_positive(cell_size, "cell_size")
            self._batch = batch
            self._init(cell_size)

    @classmethod
    def from_batch(cls, batch, cell_size) -> NeighborIndex:
        """An index over a DeviceBatch of float64 coordinates (check_points(...,
        finite=False) then float64_coordinates: the grid checks them finite)."""
        self = cls.__new__(cls)
        self._be = _checked_backend()
        self._batch = batch
        self._init(float(cell_size))
        return self

    def _init(self, cell_size: float) -> None:
        from pwconv_cy.cuda import _validation as V
        from pwconv_cy.cuda._search import build_grid

        self.cell_size = cell_size
        self.method = "grid"
        with _inputs_device(points=self._batch.points):
            grid = build_grid(self._be, self._batch.points, self._batch.offsets, cell_size)
            if grid.n_nonfinite:
                V.raise_nonfinite(self._batch.points, "points")
        self._grid = grid
        self._digest = grid.points_digest  # taken with the grid: no transfer of its own

    @property
    def n_points(self) -> int:
        return int(self._batch.points.shape[0])

    @property
    def n_clouds(self) -> int:
        return int(self._batch.offsets.shape[0]) - 1

    @property
    def offsets(self):
        return self._batch.offsets

    @property
    def points(self):
        """The (n, 3) float64 coordinates on the device (packed)."""
        return self._batch.points

    @property
    def memory_bytes(self) -> int:
        return self._grid.nbytes

    @property
    def points_digest(self) -> str:
        return self._digest

    def __repr__(self) -> str:
        return (f"pwconv_cy.cuda.NeighborIndex(n_points={self.n_points}, "
                f"n_clouds={self.n_clouds}, cell_size={self.cell_size}, "
                f"n_cells={self._grid.n_cells})")

    def kernel_map(self, kernel_size=3, dilation=1, *, voxel_size=None, queries=None,
                   query_offsets=None, num_threads=None, memory_budget=None):
        """The kernel map of SPEC §1 (voxel_size defaults to the index's cell size); a
        :class:`pwconv_cy.KernelMap` of CuPy arrays, identical to the CPU's."""
        from pwconv_cy._validation import check_dilation

        return self.kernel_maps(kernel_size, (check_dilation(dilation),), voxel_size=voxel_size,
                                queries=queries, query_offsets=query_offsets,
                                memory_budget=memory_budget)[0]

    def kernel_maps(self, kernel_size=3, dilations=(1,), *, voxel_size=None, queries=None,
                    query_offsets=None, num_threads=None, memory_budget=None) -> list:
        """One kernel map per dilation in `dilations` (the paper's network: 1, 2, 3, 4), each
        identical to ``kernel_map(kernel_size, s)``, made together: one search launch, one scan
        and one fill for all of them (the maps' index and cell arrays are views of one shared
        buffer each).  ``memory_budget`` bounds all the maps together."""
        from pwconv_cy._validation import (
            check_dilations,
            check_extent,
            check_kernel_size,
            check_positive,
        )
        from pwconv_cy.cuda._search import kernel_maps_arrays
        from pwconv_cy.neighbors import KernelMap, _cell_dtype

        v = self.cell_size if voxel_size is None else check_positive(voxel_size, "voxel_size")
        k = check_kernel_size(kernel_size)
        _check_kernel_size_gpu(k)
        dilations = check_dilations(dilations)
        for s in dilations:
            check_extent(v, k, s)
        be = self._be
        with _inputs_device(points=self._batch.points, queries=queries):
            q, q_offsets, _, q_digest = _checked_queries(be, queries, query_offsets, self._batch)
            arrays = kernel_maps_arrays(be, self._grid, v, k, dilations, _cell_dtype(k),
                                        _budget(be, memory_budget), q, q_offsets)
            maps = []
            for s, (splits, index, cell, entry_counts) in zip(dilations, arrays):
                km = KernelMap(
                    splits=splits, index=index, cell=cell, counts=None, voxel_size=v,
                    kernel_size=k, dilation=s, n_points=self.n_points,
                    offsets=self._batch.offsets,
                    query_offsets=self._batch.offsets if q is None else q_offsets,
                    points_digest=self.points_digest, queries_digest=q_digest)
                # n_i(f) of every entry, counted by the map's row sort: the operator's weights
                km._cache[ENTRY_COUNTS_KEY] = entry_counts
                maps.append(km)
            return maps

    def radius_search(self, radius, queries=None, *, query_offsets=None, metric="chebyshev",
                      num_threads=None, memory_budget=None):
        """Neighbours within `radius` of each query (closed cube or ball): (splits (m+1,) int64,
        index (E,) int64) CuPy arrays, indices ascending within each row."""
        from pwconv_cy._validation import check_choice, check_positive
        from pwconv_cy.cuda._search import radius_search_arrays

        radius = check_positive(radius, "radius")
        metric = check_choice(metric, "metric", METRICS)
        be = self._be
        with _inputs_device(points=self._batch.points, queries=queries):
            q, q_offsets, _, _ = _checked_queries(be, queries, query_offsets, self._batch)
            return radius_search_arrays(be, self._grid, radius, metric == "euclidean",
                                        _budget(be, memory_budget), q, q_offsets)


def kernel_map(points, voxel_size, *, kernel_size=3, dilation=1, queries=None, offsets=None,
               query_offsets=None, method="grid", num_threads=None, memory_budget=None):
    """The kernel map of pointwise convolution (SPEC §1) on the GPU.

    Same parameters and result as :func:`pwconv_cy.kernel_map`, with CuPy arrays: a
    :class:`pwconv_cy.KernelMap` whose ``splits`` (m+1,) int64, ``index`` (E,) int64, ``cell`` (E,)
    and ``counts`` (m, K^3) int32 live on the device, identical to the CPU's map.  ``kernel_size``
    is at most 15 on the GPU.  ``method`` (grid only) and ``num_threads`` (ignored) are accepted
    for symmetry with the CPU function.
    """
    from pwconv_cy._validation import check_dilation, check_kernel_size, check_positive

    v = check_positive(voxel_size, "voxel_size")
    k = check_kernel_size(kernel_size)
    _check_kernel_size_gpu(k)
    s = check_dilation(dilation)
    index = NeighborIndex(points, v, offsets=offsets, method=method)
    return index.kernel_map(k, s, voxel_size=v, queries=queries, query_offsets=query_offsets,
                            memory_budget=memory_budget)


def radius_search(points, radius, queries=None, *, offsets=None, query_offsets=None,
                  metric="chebyshev", method="grid", num_threads=None, memory_budget=None):
    """Fixed-radius neighbour search on the GPU: :func:`pwconv_cy.radius_search` with CuPy arrays.

    Returns
    -------
    splits : (m + 1,) int64 CuPy array
    index : (E,) int64 CuPy array
        Global point indices of each query's neighbours, ascending within each row.
    """
    from pwconv_cy._validation import check_positive

    radius = check_positive(radius, "radius")
    index = NeighborIndex(points, radius, offsets=offsets, method=method)
    return index.radius_search(radius, queries, query_offsets=query_offsets, metric=metric,
                               memory_budget=memory_budget)


def _is_device_map(km) -> bool:
    cupy = sys.modules.get("cupy")  # a map of CuPy arrays: CuPy is imported already
    return cupy is not None and isinstance(km.splits, cupy.ndarray)


def transpose_map(kernel_map):
    """The GPU twin of ``KernelMap.transposed()``: ``(tsplits (n+1,) int64, tkeys (E,) int64)``
    CuPy arrays with ``tkeys = row << bits | cell`` (``bits = ceil(log2(K**3))``), rows ascending
    within each point; cached on the map."""
    from pwconv_cy.cuda._conv import transposed

    be = _checked_backend()
    _check_device_map(kernel_map)
    with _inputs_device(kernel_map=kernel_map.splits):
        return transposed(be, kernel_map)


def _check_device_map(km) -> None:
    if not isinstance(km, _neighbors.KernelMap):
        raise TypeError(f"kernel_map must be a pwconv_cy.KernelMap (from pwconv_cy.cuda.kernel_map "
                        f"or pwconv_cy.cuda.NeighborIndex.kernel_map), got {type(km).__name__}")
    if not _is_device_map(km):
        raise TypeError("kernel_map holds host arrays (built by the CPU path); the GPU path needs a "
                        "map built by pwconv_cy.cuda.kernel_map on CuPy arrays")


def _resolve_map(be, batch, v, k, s, queries, query_offsets, kernel_map, check_map, checks):
    """The call's kernel map: built here (after `checks` run: the inputs' scans come before the
    search), or the caller's, checked against the call (the points' fingerprint deferred to
    `checks`, which the caller runs)."""
    q, q_offsets, q_dense, q_digest = _checked_queries(be, queries, query_offsets, batch)
    out_dense = q_dense if q is not None else batch.dense_shape
    if kernel_map is None:
        _check_kernel_size_gpu(k)
        checks.run()
        index = NeighborIndex.from_batch(V.float64_coordinates(batch), v)
        return index.kernel_map(k, s, voxel_size=v, queries=q, query_offsets=q_offsets), out_dense
    km = kernel_map
    _check_device_map(km)
    H.check_map_matches(
        km, v, k, s, batch, q, same_points=None,
        same_queries=(lambda: km.queries_digest == q_digest) if check_map else None)
    if check_map and batch.points.size:
        # One pass over the points, as they came (not converted to float64): their digest's sums
        # and their NaN count, brought to the host with the call's other verdicts.
        # Non-finite points are reported as such, not as "other points".
        def settle(slot):
            if slot[2]:
                V.raise_nonfinite(batch.points, "points")
            if _search.digest_string(batch.points, batch.offsets, slot) != km.points_digest:
                raise H.other_points_error(km, batch)

        checks.scan(batch.points, settle)
    return km, out_dense


def _prepare(points, feats, weight, voxel_size, dilation, offsets, queries, query_offsets,
             kernel_map, depthwise, method, check_finite, check_map=True, checks=None):
    """The operator's validated inputs.  The device-side verdicts (NaN scans, the map's
    fingerprint) go to `checks` when given, for the caller to run (with its own), else they
    are run here: one transfer either way."""
    be = _checked_backend()
    _check_method(method)
    run_here = checks is None
    checks = V.DeferredChecks() if run_here else checks
    # The coordinates as they came: with a kernel map they are only fingerprinted (_resolve_map);
    # without one they are converted to float64 and checked finite by the grid's build.
    batch = V.check_points(points, offsets, finite=False)
    v = H.check_positive(voxel_size, "voxel_size")
    s = H.check_dilation(dilation)
    H.check_bool(depthwise, "depthwise")
    x = V.check_features(feats, batch, "feats", check_finite, checks)
    w, k, c_out = V.check_weight(weight, x.shape[1], x.dtype, bool(depthwise), check_finite,
                                 checks)
    check_map = H.check_bool(check_map, "check_map")
    km, out_dense = _resolve_map(be, batch, v, k, s, queries, query_offsets, kernel_map,
                                 check_map, checks)
    if run_here:
        checks.run()
    return be, batch, x, w, c_out, km, out_dense


def _call_device(points, feats, weight, queries, kernel_map, grad_out=None):
    """_inputs_device of an operator call (the map's arrays count as inputs)."""
    return _inputs_device(points=points, feats=feats, weight=weight, queries=queries,
                          kernel_map=getattr(kernel_map, "splits", None), grad_out=grad_out)


def pointwise_conv(points, feats, weight, voxel_size, *, dilation=1, offsets=None, queries=None,
                   query_offsets=None, kernel_map=None, depthwise=False, method="grid",
                   num_threads=None, check_finite=True, check_map=True):
    """Pointwise convolution on the GPU: :func:`pwconv_cy.pointwise_conv` with CuPy arrays.

    ``y_i = sum_f sum_{j in Omega_i(f)} x_j W_f / n_i(f)`` (SPEC §1).  Parameters as the CPU
    function; ``kernel_map`` must be a map of CuPy arrays (:func:`pwconv_cy.cuda.kernel_map`).

    Returns
    -------
    y : (m, c_out), or (B, m, c_out) for dense input, CuPy array in the features' dtype.
    """
    with _call_device(points, feats, weight, queries, kernel_map):
        be, _, x, w, c_out, km, out_dense = _prepare(
            points, feats, weight, voxel_size, dilation, offsets, queries, query_offsets,
            kernel_map, depthwise, method, check_finite, check_map)
        y = _conv.forward(be, km, x, w, c_out, bool(depthwise))
        return y.reshape(*out_dense, c_out) if out_dense is not None else y


def pointwise_conv_backward(grad_out, points, feats, weight, voxel_size, *, dilation=1,
                            offsets=None, queries=None, query_offsets=None, kernel_map=None,
                            depthwise=False, method="grid", num_threads=None, check_finite=True,
                            feats_grad=True, check_map=True):
    """Gradients of :func:`pointwise_conv` on the GPU (its exact adjoint): ``(d_feats, d_weight)``
    CuPy arrays shaped like ``feats`` and ``weight`` (``d_feats`` None, and not computed, with
    ``feats_grad=False``).  The input gradient gathers over the transposed kernel map (built on
    the device, cached on the map); the weight gradient is reduced from fixed blocks of rows in a
    fixed order: bit-identical from run to run."""
    H.check_bool(feats_grad, "feats_grad")
    with _call_device(points, feats, weight, queries, kernel_map, grad_out):
        checks = V.DeferredChecks()  # one transfer for the NaN scans and the map's fingerprint
        be, _, x, w, c_out, km, out_dense = _prepare(
            points, feats, weight, voxel_size, dilation, offsets, queries, query_offsets,
            kernel_map, depthwise, method, check_finite, check_map, checks)
        dy = V.check_grad_out(grad_out, km.n_queries, c_out, x.dtype, out_dense, check_finite,
                              checks)
        checks.run()
        dx = _conv.backward_input(be, km, dy, w, int(x.shape[1]), bool(depthwise)) \
            if feats_grad else None
        dw = _conv.backward_weight(be, km, x, dy, c_out, bool(depthwise))
        return (None if dx is None else dx.reshape(feats.shape)), dw.reshape(w.shape)
