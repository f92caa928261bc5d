"""Neighbour search: fixed-radius search and the kernel map of pointwise convolution.

Both run on a reusable :class:`NeighborIndex` (a uniform grid or a kd-tree over a packed batch of
clouds) and return CSR arrays whose rows list neighbours in ascending index order — the same
result for every method and thread count.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pwconv_cy import _core
from pwconv_cy._arrays import CallArrays, describe, export, kind_of
from pwconv_cy._config import MemoryBudgetError, check_budget, max_pairs_within, resolve_budget
from pwconv_cy._validation import (
    PointBatch,
    check_choice,
    check_dilation,
    check_dilations,
    check_extent,
    check_kernel_size,
    check_leaf_size,
    check_num_threads,
    check_points,
    check_positive,
    check_queries,
)

__all__ = ["AUTO_KDTREE_MIN_POINTS", "KernelMap", "NeighborIndex", "kernel_map", "radius_search",
           "set_simd_enabled", "simd_enabled"]

METRICS = ("chebyshev", "euclidean")
METHODS = ("grid", "kdtree", "auto")

#: ``method="auto"`` picks the kd-tree from this many points per cloud on (None: never).  Set from
#: the crossover benchmark (benchmarks/crossover.py, benchmarks/RESULTS.md, 2026-11-26): from 1K to
#: 1M points, surface, volume, LiDAR and clustered clouds, 8-64 neighbours, 1 and 2 threads, the
#: grid was faster in 60 of 64 groups (1.2-2.9x on uniform data); the kd-tree led by at most 17%
#: only on strongly clustered clouds of 256K+ points with few neighbours.  So auto = grid.
AUTO_KDTREE_MIN_POINTS: int | None = None


def simd_enabled() -> bool:
    """Whether the kernel map's AVX-512 candidate filters run (the CPU has AVX-512F and they have
    not been turned off)."""
    return _core.simd_state()[1]


def set_simd_enabled(enabled: bool) -> bool:
    """Turn pwconv's SIMD loops on (the default, where the CPU has them) or off, process-wide:
    the kernel map's candidate filters and short-row sorts, and the operator's weight-gradient
    and wide-layer loops (16 outputs or more, float32), in AVX-512, or in AVX2 on CPUs without
    it.
    Returns the previous request (True also where the CPU lacks them).  Results are bit-identical
    either way: this exists to compare the code paths and to time the portable one."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be True or False, got {describe(enabled)}")
    return _core.set_simd(bool(enabled))


def _cell_dtype(kernel_size: int):
    n_cells = kernel_size ** 3
    if n_cells <= 256:
        return np.uint8
    if n_cells <= 32767:
        return np.int16
    return np.int32


def cloud_digest(points: np.ndarray, offsets: np.ndarray) -> str:
    """A fingerprint of a packed batch (dtype, shape, offsets and a 64-bit hash of every
    coordinate), kept in a KernelMap so that reusing it with other points is caught.  The hash
    is position sensitive (swapped or moved points change it) and runs at memory speed, in
    parallel (_core.fingerprint_)."""
    points = np.ascontiguousarray(points)
    threads = check_num_threads(None)
    h = _core.fingerprint_(memoryview(points).cast("B"), threads) if points.size else 0
    h_offsets = _core.fingerprint_(np.ascontiguousarray(offsets, dtype=np.int64).view(np.uint8),
                                   1)
    return f"{points.dtype.str}:{points.shape[0]}:{h:016x}:{h_offsets:016x}"


def digest_matches(digest: str, points: np.ndarray, offsets: np.ndarray) -> bool:
    """Whether `points`/`offsets` are the batch `digest` was taken of (comparing coordinates in
    the dtype the digest was taken in, so float32 and float64 copies of the same values match)."""
    dtype = np.dtype(digest.split(":", 1)[0])
    if points.dtype != dtype:
        points = points.astype(dtype)
    return cloud_digest(points, offsets) == digest


def _stored_key(name: str) -> str:
    return f"_{name}_stored"


def _stored(obj, name: str):
    """What a _DerivedField named `name` holds for obj, as given or last stored (None if unset)."""
    return obj.__dict__.get(_stored_key(name))


class _DerivedField:
    """A KernelMap field kept in a compact or absent form and completed on first access (the
    completed value then replaces the stored one).  A dataclass field without a default: reading
    it on the class raises AttributeError."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.name)
        stored = _stored(obj, self.name)
        value = self.complete(obj, stored)
        if value is not stored:
            self.__set__(obj, value)
        return value

    def __set__(self, obj, value):
        obj.__dict__[_stored_key(self.name)] = value

    def complete(self, obj, stored):
        raise NotImplementedError


class _LazyCounts(_DerivedField):
    """``KernelMap.counts``: the array given to the constructor, or, for a map made without it
    (``counts=None``: the convolution kernels tally each row's cells themselves, so maps are
    emitted without the (m, K^3) array), computed from ``splits`` and ``cell`` on first access,
    on the map's device."""

    def complete(self, obj, stored):
        if stored is not None:
            return stored
        if kind_of(obj.splits) == "cupy":  # a GPU map: counted on its device
            from pwconv_cy.cuda import _device_map_counts

            return _device_map_counts(obj)
        return _core.kernel_map_counts_(obj.splits, obj.cell, obj.kernel_size,
                                        check_num_threads(None))


class _WideIndex(_DerivedField):
    """``KernelMap.index``: int64, as documented.  A host map stores it as int32 when its points
    number fewer than 2**31 (half the bytes to write and to read; the kernels take either), and
    widens it on first access: the int64 copy then replaces the int32 one (never both held)."""

    def complete(self, obj, stored):
        return stored.astype(np.int64) if getattr(stored, "dtype", None) == np.int32 else stored


@dataclass(frozen=True, eq=False)
class KernelMap:
    """Neighbours of every query point in the K^3 cells of its kernel (SPEC §1).

    Attributes
    ----------
    splits : (m + 1,) int64
        CSR row splits: the neighbours of query i are ``index[splits[i]:splits[i+1]]``.
    index : (E,) int64
        Global (packed) indices of the neighbours, ascending within each row.  Host maps of
        fewer than 2**31 points keep it in 32 bits and widen it on first access.
    cell : (E,) uint8, int16 or int32
        Kernel cell ``f = (kz*K + ky)*K + kx`` of each neighbour (holes excluded).
    counts : (m, K**3) int32
        ``counts[i, f] = |Omega_i(f)|``, the number of neighbours of i in cell f.  Maps are
        made without it and compute it on first access (the operator does not need it).
    voxel_size, kernel_size, dilation
        The geometry the map was built for.
    n_points : int
        Number of data points the indices refer to.

    The four arrays are NumPy arrays on the host and CuPy arrays on a GPU; a map built from
    PyTorch tensors holds torch tensors (zero-copy views of the same memory) on the tensors'
    device, and every function taking ``kernel_map=`` accepts it back.  ``offsets`` and
    ``query_offsets`` are host NumPy int64 metadata in every case.
    """

    splits: np.ndarray
    # descriptors, not defaults (see _WideIndex, _LazyCounts)
    index: np.ndarray = _WideIndex()  # noqa: RUF009
    cell: np.ndarray
    counts: np.ndarray = _LazyCounts()  # noqa: RUF009
    voxel_size: float
    kernel_size: int
    dilation: int
    n_points: int
    offsets: np.ndarray = field(repr=False)
    query_offsets: np.ndarray = field(repr=False)
    points_digest: str = field(default="", repr=False)
    queries_digest: str | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_queries(self) -> int:
        return self.splits.shape[0] - 1

    @property
    def n_pairs(self) -> int:
        return int(self.splits[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the four arrays (the counts' included before they are computed)."""
        counts = self._stored_counts()
        counts_bytes = 4 * self.n_queries * self.kernel_size ** 3 if counts is None else \
            counts.nbytes
        return sum(a.nbytes for a in (self.splits, self._stored_index(), self.cell)) + \
            counts_bytes

    def _stored_index(self):
        """The index as stored: int32 for a host map of fewer than 2**31 points, else int64."""
        return _stored(self, "index")

    def _stored_counts(self):
        """The counts array if it exists (None for a host map whose counts were not computed)."""
        return _stored(self, "counts")

    def _with_arrays(self, convert) -> KernelMap:
        """The same map with ``convert(array, name)`` applied to splits, index, cell and counts
        (self when nothing changes).  Both share the cache of the transposed map.  Counts not
        computed yet stay so while nothing changes; a converted map gets them."""
        names = ("splits", "index", "cell")
        arrays = {"splits": self.splits, "index": self._stored_index(), "cell": self.cell}
        changed = {n: convert(a, n) for n, a in arrays.items()}
        counts = self._stored_counts()
        if counts is not None:
            changed["counts"] = convert(counts, "counts")
        if all(changed[n] is arrays[n] for n in names) and changed.get("counts") is counts:
            return self
        if getattr(arrays["index"], "dtype", None) == np.int32:  # others get the int64 index
            changed["index"] = convert(arrays["index"].astype(np.int64), "index")
        if counts is None:
            changed["counts"] = convert(self.counts, "counts")
        return dataclasses.replace(self, **changed)

    def clear_cache(self) -> None:
        """Drop the cached transposed map (it is rebuilt by the next backward pass)."""
        self._cache.clear()

    def transposed(self, num_threads=None):
        """For every point j, the rows i (ascending) with j in Omega_i(f) and the cell f of each:
        ``(tsplits (n_points + 1,) int64, tkeys (E,) int64)`` with ``tkeys = row << bits | cell``
        (``bits = ceil(log2(K**3))``).  Computed once and cached (in the backward's form, see
        _transposed_packed); the backward of small batches gathers over it.  Arrays of the map's
        own kind."""
        native = CallArrays({}, kernel_map=self).kernel_map
        if native is not self:
            return export(native.transposed(num_threads), kind_of(self.splits))
        if kind_of(self.splits) == "cupy":
            from pwconv_cy import cuda

            return cuda.transpose_map(self)
        tsplits, tkeys, count_bits = self._transposed_packed(num_threads)
        return tsplits, tkeys >> count_bits

    def _transposed_packed(self, num_threads=None):
        """The backward's form of a host map's transposed(): ``(tsplits, tkeys, count_bits)``
        with each key also carrying its count, ``tkeys = ((row << bits | cell) << count_bits) |
        min(n_row(cell), 2**count_bits - 1)`` (a saturated count is looked up), so that the
        gather reads its weights in order.  Cached."""
        if "host_transposed" not in self._cache:
            self._cache["host_transposed"] = _core.transpose_map(
                self.splits, self._stored_index(), self.cell, self.counts, self.n_points,
                self.kernel_size,
                self.offsets, self.query_offsets, True, check_num_threads(num_threads))
        return self._cache["host_transposed"]

    def __repr__(self) -> str:
        return (f"KernelMap(n_queries={self.n_queries}, n_points={self.n_points}, "
                f"n_pairs={self.n_pairs}, voxel_size={self.voxel_size}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation})")


class NeighborIndex:
    """A grid or kd-tree built once over a packed batch of clouds, queried many times.

    The grid's cell edge does not depend on the dilation, so one index serves all the layers of
    a network (the paper's four layers share one grid).

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) float16/32/64
        Coordinates: NumPy, CuPy (the index then lives on the GPU: pwconv_cy.cuda.NeighborIndex),
        torch/JAX/DLPack tensors on the CPU or a CUDA device (read without a copy).  Results
        (kernel maps, CSR arrays) take the kind of these points.
    cell_size : float
        Grid cell edge in coordinate units (use the voxel size, or the search radius).
    offsets : (B + 1,) integer, optional
        Row splits of the packed clouds (SPEC §2); None for one cloud or the dense form.
    method : {"grid", "kdtree", "auto"}
    leaf_size : int
        Points per kd-tree leaf.
    num_threads : int, optional
        None = the OpenMP default (OMP_NUM_THREADS, threadpoolctl).
    """

    def __init__(self, points, cell_size, *, offsets=None, method="grid", leaf_size=16,
                 num_threads=None):
        call = CallArrays({"points": points}, {"offsets": offsets})
        if call.on_gpu:
            from pwconv_cy import cuda

            check_leaf_size(leaf_size)
            self._gpu = cuda.NeighborIndex(call["points"], cell_size, offsets=offsets,
                                           method=method, num_threads=num_threads)
            self._batch, self.cell_size = self._gpu._batch, self._gpu.cell_size
            self.method, self._digest = self._gpu.method, None
        else:
            self._build(check_points(call["points"], offsets), cell_size, method, leaf_size,
                        num_threads)
        self._origin = (call.device, call.kind, describe(points))

    @classmethod
    def from_batch(cls, batch: PointBatch, cell_size, *, method="grid", leaf_size=16,
                   num_threads=None) -> NeighborIndex:
        """An index over an already validated batch (see _validation.check_points)."""
        self = cls.__new__(cls)
        self._build(batch, cell_size, method, leaf_size, num_threads)
        return self

    def _build(self, batch, cell_size, method, leaf_size, num_threads):
        self._gpu = None
        self._origin = ("cpu", "numpy", "numpy.ndarray")
        self._batch = batch
        self.cell_size = check_positive(cell_size, "cell_size")
        method = check_choice(method, "method", METHODS)
        leaf_size = check_leaf_size(leaf_size)
        threads = check_num_threads(num_threads)
        self.method = _resolve_method(method, self._batch)
        self._digest = None
        self._index = _core.SearchIndex(self._batch.points, self._batch.offsets, self.cell_size,
                                        self.method, int(leaf_size), threads)

    @property
    def n_points(self) -> int:
        return self._batch.points.shape[0]

    @property
    def n_clouds(self) -> int:
        return self._batch.offsets.shape[0] - 1

    @property
    def offsets(self) -> np.ndarray:
        return self._batch.offsets

    @property
    def points(self):
        """The (n, 3) coordinates the index was built over (packed; float64 on a GPU), in the
        kind of the points given."""
        return export(self._batch.points, self._origin[1])

    @property
    def memory_bytes(self) -> int:
        return (self._gpu if self._gpu is not None else self._index).memory_bytes

    @property
    def points_digest(self) -> str:
        if self._gpu is not None:
            return self._gpu.points_digest
        if self._digest is None:
            self._digest = cloud_digest(self._batch.points, self._batch.offsets)
        return self._digest

    def __repr__(self) -> str:
        where = "" if self._gpu is None else f", device={self._origin[0]!r}"
        return (f"NeighborIndex(n_points={self.n_points}, n_clouds={self.n_clouds}, "
                f"cell_size={self.cell_size}, method={self.method!r}{where})")

    def _call(self, queries, query_offsets) -> CallArrays:
        """The queries of a search, on the index's device; results in the kind of the index's
        points (or of the queries, when those are torch/JAX/CuPy and the points NumPy)."""
        return CallArrays({"queries": queries}, {"query_offsets": query_offsets},
                          bound=("the index's points", *self._origin))

    def radius_search(self, radius, queries=None, *, query_offsets=None, metric="chebyshev",
                      num_threads=None, memory_budget=None):
        """Neighbours within `radius` of each query (closed cube or ball), as CSR.

        Returns
        -------
        splits : (m + 1,) int64
        index : (E,) int64
            Global point indices, ascending within each row.  Queries default to the points
            (each point then finds itself).
        """
        call = self._call(queries, query_offsets)
        if self._gpu is not None:
            return call.export(self._gpu.radius_search(
                radius, call["queries"], query_offsets=query_offsets, metric=metric,
                num_threads=num_threads, memory_budget=memory_budget))
        queries = call["queries"]
        radius = check_positive(radius, "radius")
        metric_id = METRICS.index(check_choice(metric, "metric", METRICS))
        threads = check_num_threads(num_threads)
        q, q_offsets, _ = check_queries(queries, query_offsets, self._batch)
        budget = resolve_budget(memory_budget)
        # Pass 1 keeps 8 bytes per pair; pass 2 writes 8 more.
        pairs = self._index.radius_gather(q, q_offsets, radius, metric_id,
                                          max_pairs_within(budget, 16), threads)
        check_budget("radius_search", pairs.n_pairs, 16 * pairs.n_pairs, budget,
                     "reduce the radius, search fewer queries per call or split the batch",
                     pairs.complete)
        splits = pairs.splits()
        return call.export((splits, pairs.emit_radius(splits, threads)))

    def kernel_maps(self, kernel_size=3, dilations=(1,), *, voxel_size=None, queries=None,
                    query_offsets=None, num_threads=None, memory_budget=None) -> list:
        """One kernel map per dilation in `dilations` (the paper's network: (1, 2, 3, 4)), each
        equal to ``kernel_map(kernel_size, s, ...)``.  ``memory_budget`` bounds all the maps
        together.  On the GPU the maps are made together (one search launch, one scan and one
        fill for all of them; their index and cell arrays are views of one buffer each); on the
        CPU one after the other."""
        call = self._call(queries, query_offsets)
        if self._gpu is not None:
            return [call.export(km) for km in self._gpu.kernel_maps(
                kernel_size, dilations, voxel_size=voxel_size, queries=call["queries"],
                query_offsets=query_offsets, num_threads=num_threads,
                memory_budget=memory_budget)]
        dilations = check_dilations(dilations)
        budget = resolve_budget(memory_budget)
        maps, used = [], 0
        for s in dilations:
            if used >= budget:
                raise MemoryBudgetError(
                    f"kernel_maps: the maps for dilations {dilations[:len(maps)]} already use "
                    f"{used:,} bytes of the memory budget of {budget:,} bytes; make fewer maps per "
                    "call, or raise the budget with pwconv_cy.set_memory_budget(nbytes) or "
                    "memory_budget=...")
            try:
                km = self.kernel_map(kernel_size, s, voxel_size=voxel_size, queries=queries,
                                     query_offsets=query_offsets, num_threads=num_threads,
                                     memory_budget=budget - used)
            except MemoryBudgetError as exc:
                if not maps:
                    raise
                raise MemoryBudgetError(
                    f"kernel_maps, dilation {s} (the maps for dilations {dilations[:len(maps)]} "
                    f"already use {used:,} of the {budget:,}-byte budget): {exc}") from None
            used += sum(int(getattr(a, "nbytes", 0)) for a in (km.splits, km.index, km.cell))
            maps.append(km)
        return maps

    def kernel_map(self, kernel_size=3, dilation=1, *, voxel_size=None, queries=None,
                   query_offsets=None, num_threads=None, memory_budget=None) -> KernelMap:
        """The kernel map of SPEC §1 (voxel_size defaults to the index's cell size)."""
        call = self._call(queries, query_offsets)
        if self._gpu is not None:
            return call.export(self._gpu.kernel_map(
                kernel_size, dilation, voxel_size=voxel_size, queries=call["queries"],
                query_offsets=query_offsets, num_threads=num_threads,
                memory_budget=memory_budget))
        queries = call["queries"]
        v = self.cell_size if voxel_size is None else check_positive(voxel_size, "voxel_size")
        k = check_kernel_size(kernel_size)
        s = check_dilation(dilation)
        check_extent(v, k, s)
        threads = check_num_threads(num_threads)
        q, q_offsets, _ = check_queries(queries, query_offsets, self._batch)
        budget = resolve_budget(memory_budget)
        cell_dtype = _cell_dtype(k)
        m = self.n_points if q is None else q.shape[0]
        counts_bytes = 4 * m * k ** 3
        # Pass 1 keeps 8 bytes per pair; pass 2 writes the index (8) and cell of each pair.
        pair_bytes = 16 + np.dtype(cell_dtype).itemsize
        pairs = self._index.kernel_gather(q, q_offsets, v, k, s,
                                          max_pairs_within(budget - counts_bytes, pair_bytes),
                                          threads)
        check_budget("kernel_map", pairs.n_pairs, pair_bytes * pairs.n_pairs + counts_bytes,
                     budget, "reduce voxel_size, kernel_size or dilation, or split the batch",
                     pairs.complete)
        splits = pairs.splits()
        # No counts: the operator tallies them; KernelMap.counts computes them if asked.
        index, cell = pairs.emit_kernel(splits, cell_dtype,
                                        np.int32 if self.n_points < 2**31 else np.int64, threads)
        return call.export(KernelMap(
            splits=splits, index=index, cell=cell, counts=None, voxel_size=v, kernel_size=k,
            dilation=s, n_points=self.n_points, offsets=self._batch.offsets,
            query_offsets=self._batch.offsets if q is None else q_offsets,
            points_digest=self.points_digest,
            queries_digest=None if q is None else cloud_digest(q, q_offsets)))


def _resolve_method(method: str, batch: PointBatch) -> str:
    if method != "auto":
        return method
    if AUTO_KDTREE_MIN_POINTS is None:
        return "grid"
    sizes = np.diff(batch.offsets)
    largest = int(sizes.max()) if sizes.size else 0
    return "kdtree" if largest >= AUTO_KDTREE_MIN_POINTS else "grid"


def radius_search(points, radius, queries=None, *, offsets=None, query_offsets=None,
                  metric="chebyshev", method="grid", num_threads=None, memory_budget=None):
    """Fixed-radius neighbour search over a packed batch of clouds.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) float16/32/64
        NumPy or CuPy arrays, or torch/JAX/DLPack tensors on the CPU or a CUDA device (read
        without a copy; CUDA data runs on the GPU path).  All arrays of a call on one device;
        results in the caller's kind (see pwconv_cy._arrays).
    radius : float
        Closed search radius (coordinate units): ``|p - q|_inf <= r`` for "chebyshev",
        ``|p - q|_2 <= r`` for "euclidean", evaluated in float64.
    queries : (m, 3) or (B, m, 3), optional
        Query points (default: the points themselves).
    offsets, query_offsets : (B + 1,) integer, optional
        Row splits of points and queries; clouds never see each other's points.
    metric : {"chebyshev", "euclidean"}
    method : {"grid", "kdtree", "auto"}
    num_threads : int, optional
    memory_budget : int, optional
        Bytes the result may take (default: pwconv_cy.get_memory_budget()).

    Returns
    -------
    splits : (m + 1,) int64
    index : (E,) int64
        Global point indices of each query's neighbours, ascending within each row.
    """
    call = CallArrays({"points": points, "queries": queries},
                      {"offsets": offsets, "query_offsets": query_offsets})
    if call.on_gpu:
        from pwconv_cy import cuda

        return call.export(cuda.radius_search(
            call["points"], radius, call["queries"], offsets=offsets, query_offsets=query_offsets,
            metric=metric, method=method, num_threads=num_threads, memory_budget=memory_budget))
    radius = check_positive(radius, "radius")
    index = NeighborIndex(call["points"], radius, offsets=offsets, method=method,
                          num_threads=num_threads)
    return call.export(index.radius_search(radius, call["queries"], query_offsets=query_offsets,
                                           metric=metric, num_threads=num_threads,
                                           memory_budget=memory_budget))


def kernel_map(points, voxel_size, *, kernel_size=3, dilation=1, queries=None, offsets=None,
               query_offsets=None, method="grid", num_threads=None,
               memory_budget=None) -> KernelMap:
    """The kernel map of pointwise convolution (SPEC §1).

    For every query point i: its neighbours j in the closed cube of half-width
    ``(s*(K-1)+1)*v/2``, the kernel cell f of each (holes excluded) and the per-cell counts.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) float16/32/64
        Any array kind, as in :func:`radius_search`.
    voxel_size : float
        Kernel cell edge v (coordinate units).
    kernel_size : int
        Odd K >= 1 (the paper: 3).
    dilation : int
        À-trous stride s >= 1.
    queries, offsets, query_offsets, method, num_threads, memory_budget
        As in :func:`radius_search`.

    Returns
    -------
    KernelMap
        Arrays in the caller's kind: NumPy, CuPy, or torch tensors (JAX callers get NumPy
        arrays, see :class:`KernelMap`); accepted back by ``pointwise_conv(kernel_map=...)``.
    """
    call = CallArrays({"points": points, "queries": queries},
                      {"offsets": offsets, "query_offsets": query_offsets})
    if call.on_gpu:
        from pwconv_cy import cuda

        return call.export(cuda.kernel_map(
            call["points"], voxel_size, kernel_size=kernel_size, dilation=dilation,
            queries=call["queries"], offsets=offsets, query_offsets=query_offsets, method=method,
            num_threads=num_threads, memory_budget=memory_budget))
    v = check_positive(voxel_size, "voxel_size")
    k = check_kernel_size(kernel_size)
    s = check_dilation(dilation)
    index = NeighborIndex(call["points"], v, offsets=offsets, method=method,
                          num_threads=num_threads)
    return call.export(index.kernel_map(k, s, voxel_size=v, queries=call["queries"],
                                        query_offsets=query_offsets, num_threads=num_threads,
                                        memory_budget=memory_budget))
