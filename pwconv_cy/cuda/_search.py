"""GPU neighbour search: the grid, the kernel map and the radius search.

The kernel map is counted, scanned and filled like the CPU's, but each query is searched once
(map_passes_mode "one"): kernel_map_once counts every row exactly and leaves its keys in a
scratch buffer (sized from a count over a sample of the queries, so no buffer is sized by
queries x neighbours); the scan of the counts gives the CSR, and sort_rows_by_rank moves each row
into place sorted.  Rows longer than SHORT_ROW are not kept: they alone are searched again by
the fill pass (only_missing).  Where the scratch estimate falls short, the counts are already
exact and the fill pass runs over every row as in "two" (count pass, scan, fill pass).  The
radius search is made the same way (radius_once).  The scratch is sized from the last maps of
the same kind where there were some (PWCONV_CUDA_MAP_CAPACITY), and the grid's cells and rows
come from one scan (PWCONV_CUDA_GRID_BUILD).  Opt-in, for timing on a GPU:
PWCONV_CUDA_MAP_TILES=1, 2 or 3 (the one pass with each cloud's coordinates, also its cells,
also its grid rows, in shared memory: kernel_map_tiled) and PWCONV_CUDA_ROW_SLOTS=1 (the row
table as (key, cells) pairs); the same maps either way.

Works on canonical arrays (validated by the caller) through a backend (``_backend.py``): ``be.xp``
is the array module, ``be.launch`` runs a kernel of kernels.cu.  The results are the CPU's, bit for
bit: the same rows, neighbours in ascending index order, the same cells and counts.

The grid: points sorted by (cloud, cz, cy, cx) cell (edge ``cell_size``, origin at each cloud's
lower corner, as the C++ grid), the occupied cells in that order with their first point, and the
first cell of each cloud.  The sort key packs the four integers into one int64 when they fit
(mixed radix), else the four int64 columns are sorted with ``lexsort``: cell coordinates may need
over 40 bits per axis.  Nothing is sized by the bounding box.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pwconv_cy.cuda._backend import (
    SHORT_ROW,
    counts_name,
    digest_name,
    env_choice,
    env_flag,
    kernel_map_name,
    kernel_map_once_name,
    kernel_map_tiled_name,
    radius_name,
    split_name,
)

__all__ = [
    "DeviceGrid",
    "blocks",
    "build_grid",
    "cell_bits_for",
    "entry_cell_counts",
    "expand_rows",
    "kernel_map_arrays",
    "kernel_map_counts",
    "kernel_maps_arrays",
    "points_digest",
    "radius_search_arrays",
]

#: PWCONV_CUDA_ROW_TABLE=0 finds grid rows by binary search instead of the hash table (for
#: comparisons: the results are the same).
ROW_TABLE_ENV = "PWCONV_CUDA_ROW_TABLE"
#: PWCONV_CUDA_ROW_SLOTS=1 (opt-in) lays the grid's row table out as (key, the row's cells)
#: pairs: one 16-byte load per probe instead of the key, the row and its first and end cells
#: (four dependent loads).  The same maps; read when a grid is built.
ROW_SLOTS_ENV = "PWCONV_CUDA_ROW_SLOTS"


def row_slots_mode() -> bool:
    """True when PWCONV_CUDA_ROW_SLOTS asks for the pairs layout of the row table (1 / true /
    yes / on; 0 / false / no / off or unset: the split layout)."""
    return env_flag(ROW_SLOTS_ENV, False)


#: How the fill passes' short rows are sorted: "rank" (default: sort_rows_by_rank, SORT_LANES
#: threads per row, after the fill) or "thread" (each fill thread sorts its own row in place).
#: Same results.
ROW_SORT_ENV = "PWCONV_CUDA_ROW_SORT"


def row_sort_mode() -> str:
    """PWCONV_CUDA_ROW_SORT: "rank" (default) or "thread"."""
    return env_choice(ROW_SORT_ENV, ("rank", "thread"), "rank")


#: How kernel maps are searched: "one" (default: kernel_map_once searches every query once,
#: its rows reserved in a scratch buffer sized from a sampled count) or "two" (count pass, scan,
#: fill pass: every query searched twice).  Same maps.  "one" falls back to the fill pass where
#: rows are longer than SHORT_ROW or the scratch estimate fell short; row_sort_mode "thread"
#: implies "two".
MAP_PASSES_ENV = "PWCONV_CUDA_MAP_PASSES"


#: PWCONV_CUDA_GRID_BUILD: "scan" (default) makes the grid's cells, rows and clouds' first cells
#: from one inclusive scan of the sorted points' cell and row starts and one kernel (one host
#: synchronisation); "nonzero" (the default before: 1.02 ms against 0.69 ms for the paper
#: workload's grid on an H200, 2026-11-27) from flatnonzero over the cell starts, a kernel, a
#: search for the clouds and flatnonzero over the row starts (three synchronisations, about
#: twelve CuPy calls).  The same grid.
GRID_BUILD_ENV = "PWCONV_CUDA_GRID_BUILD"


def grid_build_mode() -> str:
    """PWCONV_CUDA_GRID_BUILD: "scan" (default) or "nonzero"."""
    return env_choice(GRID_BUILD_ENV, ("scan", "nonzero"), "scan")


def map_passes_mode() -> str:
    """PWCONV_CUDA_MAP_PASSES: "one" (default) or "two"."""
    return env_choice(MAP_PASSES_ENV, ("one", "two"), "one")


#: PWCONV_CUDA_MAP_TILES (opt-in) runs the one-pass search as kernel_map_tiled: a block per
#: (cloud, run of TILE_QUERIES queries, map), its cloud's coordinates copied to shared memory
#: first (1: the coordinates, 24 bytes a point; 2: the cells' x and first point too, 40 bytes a
#: point; 3: and a hash table of the cloud's grid rows, 32 bytes or more a row), where the
#: largest cloud fits a block's shared memory and the grid has its row table.  The same maps.
MAP_TILES_ENV = "PWCONV_CUDA_MAP_TILES"
#: Threads per block of kernel_map_tiled (its __launch_bounds__) and queries per block.
TILE_THREADS = 256
TILE_QUERIES = 512


def map_tiles_mode() -> int:
    """PWCONV_CUDA_MAP_TILES: 0 (default: kernel_map_once), 1 (kernel_map_tiled, the clouds'
    coordinates in shared memory), 2 (their cells too) or 3 (and their grid rows)."""
    return int(env_choice(MAP_TILES_ENV, ("0", "1", "2", "3"), "0"))


#: One-pass maps: the scratch buffer is sized from a count pass over about this many queries
#: per map (every stride-th in grid order, spatially even), times CAPACITY_MARGIN, plus
#: CAPACITY_SLACK keys.  A short estimate costs the fill pass the one pass saved, never a
#: wrong map (tests shrink these to force it).
CAPACITY_SAMPLE = 8192
CAPACITY_MARGIN = 1.125
CAPACITY_SLACK = 32 * SHORT_ROW

#: PWCONV_CUDA_MAP_CAPACITY: "last" (default) sizes the one-pass maps' scratch from the pairs
#: per query of the last maps made with the same kernel, dilations, voxel and cell sizes (a
#: training loop's previous batch), times CAPACITY_MARGIN plus CAPACITY_SLACK, instead of
#: counting a sample first (one search launch of few threads, and a host synchronisation); the
#: first such maps still count a sample.  "sample" counts a sample for every call (the default
#: before: 4.72 ms against 4.29 ms for the paper workload's maps on an H200, 2026-11-27).  The
#: maps are the same either way: a short estimate runs the fill pass.
MAP_CAPACITY_ENV = "PWCONV_CUDA_MAP_CAPACITY"
_LAST_PAIRS_PER_QUERY: dict = {}


def map_capacity_mode() -> str:
    """PWCONV_CUDA_MAP_CAPACITY: "last" (default) or "sample"."""
    return env_choice(MAP_CAPACITY_ENV, ("last", "sample"), "last")


#: Points of a cloud per block when finding the clouds' lower corners (cloud_lower_corner): 64
#: per thread; a longer cloud takes several blocks and a merge.
LOWER_CORNER_CHUNK = 16384

SEARCH_THREADS = 128  # threads per block of the search kernels (heavy threads, many registers)
#: Threads per row of sort_rows_by_rank (any positive number; the results do not depend on
#: it): a warp per row, the measured default.  Fewer lanes a row put several rows on a warp and
#: save issue slots, but each warp step then loads a key for every row it holds, and the warp
#: waits for its longest row.  On the paper workload's real row lengths (7-18 entries on
#: average, up to 37; benchmarks/sort_lanes_model.py) 8 lanes issue 15 % fewer warp steps and
#: make 2.2x the L1 passes; on ModelNet40's longer rows they issue more steps too.  They would
#: still win if the kernel waits on memory (four rows' loads in flight a warp): gpu_check.sh's
#: tuning times 8 lanes against it (benchmarks/gpu_search_tuning.py's r8; r16 by hand).
SORT_LANES = 32
THREADS = 256
#: Cell tallies per block of entry_cell_counts (kernels.cu's PWCONV_CUDA_WEIGHTS_TALLY_CAP).
WEIGHTS_TALLY_CAP = 8192

i64 = np.int64
i32 = np.int32
f64 = np.float64
_NULL = np.uint64(0)  # a null pointer argument of a kernel (the kernel tests it)


def blocks(n: int, threads: int = THREADS) -> int:
    return (int(n) + threads - 1) // threads


def cell_bits_for(kernel_size: int) -> int:
    """Bits of the flat cell index f < K^3 (as the C++ core's cell_bits_for)."""
    n_cells = kernel_size ** 3
    bits = 0
    while (1 << bits) < n_cells:
        bits += 1
    return bits


def inverse_cell_size(cell_size: float) -> float:
    """1 / cell_size, or 0 when that is not finite (as pwconv::inverse_cell_size)."""
    with np.errstate(over="ignore", divide="ignore"):
        inv = float(np.float64(1.0) / np.float64(cell_size))
    return inv if np.isfinite(inv) else 0.0


@dataclass
class DeviceGrid:
    """A uniform grid over a packed batch on the device (see the module docstring)."""

    n_points: int
    n_clouds: int
    cell_size: float
    inv_cell_size: float
    offsets: np.ndarray        # (B + 1,) int64, host
    offsets_dev: object        # (B + 1,) int64, device
    x: object                  # (n,) float64, sorted
    y: object
    z: object
    order: object              # (n,) int64, sorted position -> point index
    cell_start: object         # (n_cells + 1,) int64
    cell_x: object             # (n_cells,) int64
    cell_y: object
    cell_z: object
    cloud_cell_begin: object   # (B + 1,) int64
    origin: object             # (B, 3) float64
    cmax: tuple                # largest cell coordinate per axis (x, y, z)
    # grid rows (cloud, cz, cy): first cell of each (n_rows + 1,) and an open-addressing hash
    # table of their keys (2^table_bits slots; table_bits = 0: no table, rows are found by
    # binary search over the cells -- cell coordinates too wide to pack into one key)
    row_cell_begin: object = None
    table_keys: object = None
    table_rows: object = None
    table_bits: int = 0
    table_slots: int = 0  # 1: table_keys holds (key, the row's cells) pairs (ROW_SLOTS_ENV)
    # (cloud_row_begin (B + 1,) int64 on the device: each cloud's first row, the most rows of a
    # cloud): made by the first search that asks for them (PWCONV_CUDA_MAP_TILES=3)
    cloud_rows: tuple | None = None
    # the points' fingerprint (points_digest) and their NaN / infinite values, taken with the
    # grid's largest cell coordinates: one transfer for the three
    points_digest: str = ""
    n_nonfinite: int = 0

    @property
    def n_cells(self) -> int:
        return int(self.cell_x.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (
            self.x, self.y, self.z, self.order, self.cell_start, self.cell_x, self.cell_y,
            self.cell_z, self.cloud_cell_begin, self.origin, self.row_cell_begin,
            self.table_keys, self.table_rows) if a is not None)

    def grid_args(self) -> tuple:
        """The grid's part of the search kernels' arguments, in kernels.cu's order."""
        return (self.x, self.y, self.z, self.order, self.cell_start, self.cell_x, self.cell_y,
                self.cell_z, self.cloud_cell_begin, self.origin, f64(self.cell_size),
                f64(self.inv_cell_size), i64(self.cmax[0]), i64(self.cmax[1]), i64(self.cmax[2]),
                self.row_cell_begin, self.table_keys, self.table_rows, i32(self.table_bits),
                i32(self.table_slots))


def build_grid(be, points, offsets: np.ndarray, cell_size: float) -> DeviceGrid:
    """Grid over points (n, 3) float64 (device, C-contiguous) packed by offsets (host int64).

    The points need not have been checked finite: the grid counts their NaN / infinite values
    (``n_nonfinite``, with their fingerprint ``points_digest``) in the transfer that brings the
    largest cell coordinates to the host, and stops there when there are any -- the caller
    raises.  One host synchronisation for the three instead of three."""
    xp = be.xp
    n = int(points.shape[0])
    n_clouds = int(offsets.shape[0]) - 1
    cell_size = float(cell_size)
    inv = inverse_cell_size(cell_size)
    offsets_dev = be.to_device(np.ascontiguousarray(offsets, dtype=np.int64))
    if n == 0:
        empty_f = xp.zeros(0, dtype=xp.float64)
        empty_i = xp.zeros(0, dtype=xp.int64)
        return DeviceGrid(0, n_clouds, cell_size, inv, offsets, offsets_dev, empty_f, empty_f,
                          empty_f, empty_i, xp.zeros(1, dtype=xp.int64), empty_i, empty_i, empty_i,
                          xp.zeros(n_clouds + 1, dtype=xp.int64),
                          xp.zeros((n_clouds, 3), dtype=xp.float64), (0, 0, 0),
                          *_no_row_table(xp), points_digest=digest_string(points, offsets, None))
    # meta: the digest's two sums and NaN count (uint64), then the largest cell coordinate per
    # axis (int64, grid_cell_coords): brought to the host together
    meta = xp.zeros(6, dtype=xp.uint64)
    launch_digest(be, points, meta[:3])
    # grid_cell_coords saturates non-finite coordinates (grid_coord): no undefined conversion
    origin = cloud_lower_corners(be, points, offsets, offsets_dev)
    cloud = xp.empty(n, dtype=xp.int64)
    cxyz = xp.empty((3, n), dtype=xp.int64)  # columns cx, cy, cz
    be.launch("grid_cell_coords", (blocks(n),), (THREADS,),
              (points, i64(n), offsets_dev, i64(n_clouds), origin, f64(cell_size), f64(inv),
               cloud, cxyz, meta[3:].view(xp.int64)))
    meta = np.ascontiguousarray(be.to_host(meta), dtype=np.uint64)
    digest, n_bad = digest_string(points, offsets, meta[:3]), int(meta[2])
    if n_bad:  # nothing else is built: the caller raises (the cell coordinates mean nothing)
        return DeviceGrid(n, n_clouds, cell_size, inv, offsets, offsets_dev, None, None, None,
                          None, None, None, None, None, None, origin, (0, 0, 0),
                          points_digest=digest, n_nonfinite=n_bad)
    # The largest cell coordinate per axis sizes the sort key (and the row table's key).
    cmax = tuple(int(c) for c in meta[3:].view(np.int64))
    rx, ry, rz = cmax[0] + 1, cmax[1] + 1, cmax[2] + 1
    packed = n_clouds * rz * ry * rx <= np.iinfo(np.int64).max  # exact Python integers
    scan = grid_build_mode() == "scan" and n < (1 << 32)  # the starts' scan packs 32-bit counts
    if packed:
        narrow = n_clouds * rz * ry * rx <= np.iinfo(np.uint32).max  # the same order, half the
        key32 = narrow and scan  # radix passes; written as 32-bit by the kernel itself
        key = xp.empty(n, dtype=xp.uint32 if key32 else xp.int64)
        be.launch("grid_cell_keys", (blocks(n),), (THREADS,),
                  (i64(n), cloud, cxyz, i64(rx), i64(ry), i64(rz), key, key if key32 else _NULL))
        if narrow and not scan:
            key = key.astype(xp.uint32)
        order = be.argsort(key)
        del key
    else:  # cell coordinates too wide to pack: sort the four columns
        order = be.lexsort(xp.stack([cxyz[0], cxyz[1], cxyz[2], cloud]))
    order = xp.ascontiguousarray(order, dtype=xp.int64)
    x, y, z = (xp.empty(n, dtype=xp.float64) for _ in range(3))
    with_table = packed and os.environ.get(ROW_TABLE_ENV, "1").strip() != "0"  # the row key fits
    if scan:
        cells = _cells_by_scan(be, n, n_clouds, order, points, cloud, cxyz, x, y, z)
    else:
        cells = _cells_by_nonzero(be, n, n_clouds, order, points, cloud, cxyz, x, y, z,
                                  with_table)
    cell_start, cell_x, cell_y, cell_z, cell_cloud, cloud_cell_begin, row_cell_begin = cells
    if with_table:
        rows = _row_table(be, row_cell_begin, cell_cloud, cell_z, cell_y, cmax)
    else:
        rows = _no_row_table(xp)
    return DeviceGrid(
        n_points=n, n_clouds=n_clouds, cell_size=cell_size, inv_cell_size=inv, offsets=offsets,
        offsets_dev=offsets_dev, x=x, y=y, z=z, order=order, cell_start=cell_start,
        cell_x=cell_x, cell_y=cell_y, cell_z=cell_z,
        cloud_cell_begin=xp.ascontiguousarray(cloud_cell_begin), origin=origin, cmax=cmax,
        row_cell_begin=rows[0], table_keys=rows[1], table_rows=rows[2], table_bits=rows[3],
        table_slots=rows[4], points_digest=digest)


def _cells_by_nonzero(be, n, n_clouds, order, points, cloud, cxyz, x, y, z, rows: bool) -> tuple:
    """The sorted points' coordinates into x, y, z, and (cell_start, cell_x, cell_y, cell_z,
    cell_cloud, cloud_cell_begin, row_cell_begin or None) from the cells' first points
    (flatnonzero: a host synchronisation), the clouds' first cells by a search, and with `rows`
    the rows' first cells (another flatnonzero)."""
    xp = be.xp
    new_cell = xp.empty(n, dtype=xp.int32)
    be.launch("grid_sorted_points", (blocks(n),), (THREADS,),
              (i64(n), order, points, cloud, cxyz, x, y, z, new_cell, _NULL))
    first = xp.flatnonzero(new_cell).astype(xp.int64, copy=False)
    n_cells = int(first.shape[0])
    cell_start = xp.empty(n_cells + 1, dtype=xp.int64)
    cell_x, cell_y, cell_z, cell_cloud = (xp.empty(n_cells, dtype=xp.int64) for _ in range(4))
    new_row = xp.empty(n_cells, dtype=xp.int32)
    be.launch("grid_cells", (blocks(n_cells + 1),), (THREADS,),
              (i64(n_cells), i64(n), first, order, cloud, cxyz, cell_start, cell_x, cell_y,
               cell_z, cell_cloud, new_row))
    cloud_cell_begin = xp.searchsorted(cell_cloud, xp.arange(n_clouds + 1, dtype=xp.int64),
                                       side="left").astype(xp.int64)
    row_cell_begin = None
    if rows:
        row_first = xp.flatnonzero(new_row).astype(xp.int64, copy=False)
        row_cell_begin = xp.concatenate([row_first, xp.full(1, n_cells, dtype=xp.int64)])
    return (cell_start, cell_x, cell_y, cell_z, cell_cloud,
            xp.ascontiguousarray(cloud_cell_begin), row_cell_begin)


def _cells_by_scan(be, n, n_clouds, order, points, cloud, cxyz, x, y, z) -> tuple:
    """_cells_by_nonzero's arrays (the rows' first cells always) from one inclusive scan of the
    sorted points' cell and row starts and one kernel (grid_cells_scanned), one host
    synchronisation for the numbers of cells and rows (PWCONV_CUDA_GRID_BUILD=scan)."""
    xp = be.xp
    starts = xp.empty(n, dtype=xp.int64)
    be.launch("grid_sorted_points", (blocks(n),), (THREADS,),
              (i64(n), order, points, cloud, cxyz, x, y, z, _NULL, starts))
    scanned = xp.cumsum(starts)
    total = int(be.to_host(scanned[-1:])[0])
    n_cells, n_rows = total & 0xFFFFFFFF, total >> 32
    cell_start = xp.empty(n_cells + 1, dtype=xp.int64)
    cell_x, cell_y, cell_z, cell_cloud = (xp.empty(n_cells, dtype=xp.int64) for _ in range(4))
    row_cell_begin = xp.empty(n_rows + 1, dtype=xp.int64)
    cloud_cell_begin = xp.empty(n_clouds + 1, dtype=xp.int64)
    be.launch("grid_cells_scanned", (blocks(n),), (THREADS,),
              (i64(n), i64(n_clouds), order, cloud, cxyz, starts, scanned, cell_start, cell_x,
               cell_y, cell_z, cell_cloud, row_cell_begin, cloud_cell_begin))
    return cell_start, cell_x, cell_y, cell_z, cell_cloud, cloud_cell_begin, row_cell_begin


def cloud_lower_corners(be, points, offsets: np.ndarray, offsets_dev):
    """origin (B, 3) float64 on the device: each cloud's per-axis minimum (0 for an empty one).
    A block per LOWER_CORNER_CHUNK points of a cloud, then, where a cloud has several, one merge
    per cloud: a long cloud is not left to one block."""
    xp = be.xp
    n_clouds = int(offsets.shape[0]) - 1
    longest = int(np.diff(offsets).max()) if n_clouds > 0 else 0
    if longest == 0:  # no points (or no clouds): nothing to launch
        return xp.zeros((max(n_clouds, 0), 3), dtype=xp.float64)
    n_chunks = min(-(-longest // int(LOWER_CORNER_CHUNK)), 65535)  # a CUDA grid's y limit
    chunk = -(-longest // n_chunks)
    origin = xp.empty((n_clouds, 3), dtype=xp.float64)
    partial = xp.empty(n_clouds * n_chunks * 3 if n_chunks > 1 else 1, dtype=xp.float64)
    be.launch("cloud_lower_corner", (n_clouds, n_chunks), (256,),
              (points, offsets_dev, i64(chunk), partial, origin))
    if n_chunks > 1:
        be.launch("cloud_lower_corner_merge", (n_clouds,), (256,),
                  (offsets_dev, i64(n_chunks), partial, origin))
    return origin


def _no_row_table(xp) -> tuple:
    """The row fields of a grid without a hash table (placeholders the kernels never read)."""
    return (xp.zeros(1, dtype=xp.int64), xp.zeros(1, dtype=xp.uint64),
            xp.zeros(1, dtype=xp.int64), 0, 0)


def _row_table(be, row_cell_begin, cell_cloud, cell_z, cell_y, cmax) -> tuple:
    """(row_cell_begin (n_rows + 1,), table_keys, table_rows, table_bits, table_slots): the grid
    rows (cloud, cz, cy) -- runs of consecutive cells, which are sorted by (cloud, cz, cy, cx);
    row_cell_begin holds each run's first cell, then n_cells -- and a hash table with at least
    twice as many slots as rows (O(points) memory): keys and rows apart, or
    (PWCONV_CUDA_ROW_SLOTS=1, fewer than 2^32 cells) each key beside its row's cells."""
    xp = be.xp
    n_cells = int(cell_z.shape[0])
    n_rows = int(row_cell_begin.shape[0]) - 1
    table_bits = _row_table_bits(n_rows)
    slots = row_slots_mode() and n_cells < (1 << 32)
    table_keys = xp.full((2 if slots else 1) << table_bits, np.uint64(np.iinfo(np.uint64).max),
                         dtype=xp.uint64)
    table_rows = xp.empty(1 if slots else 1 << table_bits, dtype=xp.int64)
    be.launch("build_row_table", (blocks(n_rows),), (THREADS,),
              (i64(n_rows), row_cell_begin, cell_cloud, cell_z, cell_y, i64(cmax[1]),
               i64(cmax[2]), i32(table_bits), i32(int(slots)), table_keys, table_rows))
    return row_cell_begin, table_keys, table_rows, table_bits, int(slots)


def points_digest(be, points, offsets) -> tuple[str, int]:
    """(fingerprint, number of NaN or infinite values) of a packed batch of coordinates on the
    device, in one kernel and one small transfer: the shape, the offsets and two position-sensitive
    64-bit sums of the coordinates' float64 bit patterns (float32 and float64 copies of the same
    values agree).  Used to check that a kernel map was built for these points."""
    if not points.size:
        return digest_string(points, offsets, None), 0
    sums = be.xp.zeros(3, dtype=be.xp.uint64)
    launch_digest(be, points, sums)
    sums = np.ascontiguousarray(be.to_host(sums), dtype=np.uint64)
    return digest_string(points, offsets, sums), int(sums[2])


def launch_digest(be, points, sums) -> None:
    """Adds the digest's two sums and the count of NaN / infinite values of `points` (device,
    any shape, non-empty) into `sums` (3,) uint64 on the device (zeroed by the caller)."""
    xp = be.xp
    if np.dtype(points.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        points = points.astype(xp.float64)  # float16: exact
    values = xp.ascontiguousarray(points).reshape(-1)
    n_values = int(values.shape[0])
    be.launch(digest_name(values.dtype), (min(blocks(n_values), 1024),), (256,),
              (i64(n_values), values, sums))


def digest_string(points, offsets, sums) -> str:
    """points_digest's fingerprint from the shape, the offsets and the sums (host (3,) uint64,
    or None for no points)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(points.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    if sums is not None:
        h.update(np.ascontiguousarray(sums[:2], dtype=np.uint64).tobytes())
    return "cuda:" + h.hexdigest()


def _queries(be, grid: DeviceGrid, queries, query_offsets):
    """(m, qrow, qx, qy, qz, query offsets on the device) for the search kernels."""
    xp = be.xp
    if queries is None:  # the points themselves, in grid order (spatially coherent threads)
        return grid.n_points, grid.order, grid.x, grid.y, grid.z, grid.offsets_dev
    m = int(queries.shape[0])
    cols = [xp.ascontiguousarray(queries[:, a]) for a in range(3)]
    q_offsets = be.to_device(np.ascontiguousarray(query_offsets, dtype=np.int64))
    return (m, xp.arange(m, dtype=xp.int64), *cols, q_offsets)


def expand_rows(be, splits, n_entries: int):
    """row_of (E,) int64: the row of every entry of a CSR."""
    xp = be.xp
    m = int(splits.shape[0]) - 1
    row_of = xp.empty(n_entries, dtype=xp.int64)
    be.launch("expand_rows", (blocks(32 * m),), (THREADS,), (i64(m), splits, row_of))
    return row_of


def _scan(be, row_len, every: int = 0, flag=None):
    """splits (m + 1,) int64 and, on the host, (total, longest row) -- with every > 0 (a divisor
    of m), (splits[::every] as a host array, longest row), in the same one transfer.  With flag
    (a device int32 scalar, e.g. a status word), its value comes in that transfer too, as a
    fourth result."""
    xp = be.xp
    m = int(row_len.shape[0])
    splits = xp.zeros(m + 1, dtype=xp.int64)
    parts = [] if flag is None else [flag.astype(xp.int64).reshape(1)]
    if m == 0:
        marks_host = np.zeros(1, dtype=np.int64) if every else 0
        flag_value = int(be.to_host(parts[0])[0]) if parts else 0
        return (splits, marks_host, 0) + (() if flag is None else (flag_value,))
    splits[1:] = xp.cumsum(row_len)
    marks = splits[::every] if every else splits[-1:]
    host = be.to_host(xp.concatenate([marks, row_len.max().reshape(1)] + parts))
    if parts:
        flag_value, host = int(host[-1]), host[:-1]
    longest = int(host[-1])
    out = (splits, (np.asarray(host[:-1], dtype=np.int64) if every else int(host[0])), longest)
    return out + (() if flag is None else (flag_value,))


def _rows_into_place(be, kept, splits, n_pairs: int, longest: int, fill_name, grid_dim, head,
                     status, cell_bits=None):
    """(keys (n_pairs,) int64, counts, filled): a search's rows in place after the scan of their
    lengths, those of at most SHORT_ROW entries sorted.

    kept: (scratch, row_at) of a one-pass search whose scratch holds every row of at most
    SHORT_ROW entries: those are sorted into place from it by sort_rows_by_rank, and the longer
    ones (row_at -1) are searched again and filled alone (fill_name with only_missing, unsorted:
    the caller sorts them).  Else None: the fill pass runs over every row (filled), its rows of
    at most SHORT_ROW entries sorted by the fill threads themselves or by sort_rows_by_rank after
    an unsorted fill (row_sort_mode).  With cell_bits (kernel maps: the keys' cell bits, 0 for
    K = 1), the rank sort also counts each entry it places: counts (n_pairs,) int32 of n_i(f),
    complete for the rows it sorted; None when it did not run.  The caller checks the fill's
    status once everything is queued (the kernels after it stay within their arrays whatever
    the keys), so the device does not idle while the host reads it."""
    xp = be.xp
    dummy = xp.zeros(1, dtype=xp.int64)
    if kept is not None:
        scratch, row_at = kept
        keys, counts = _rank_sort(be, splits, scratch, row_at, n_pairs, cell_bits)
        if longest > SHORT_ROW:
            be.launch(fill_name, grid_dim, (SEARCH_THREADS,),
                      head + (dummy, splits, keys, i64(0), status, row_at, i32(1)))
        return keys, counts, False
    by_rank = row_sort_mode() == "rank"
    keys = xp.empty(n_pairs, dtype=xp.int64)
    be.launch(fill_name, grid_dim, (SEARCH_THREADS,),
              head + (dummy, splits, keys, i64(0 if by_rank else SHORT_ROW), status, dummy,
                      i32(0)))
    if not (by_rank and n_pairs):
        return keys, None, True
    return (*_rank_sort(be, splits, keys, None, n_pairs, cell_bits), True)


def _rank_sort(be, splits, unsorted, row_at, n_pairs: int, cell_bits=None):
    """sort_rows_by_rank: (keys (n_pairs,) int64 with rows of at most SHORT_ROW entries sorted,
    counts).  Row r is read from unsorted[row_at[r]...]
    (kernel_map_once's scratch), or with row_at None from unsorted[splits[r]...].  counts (n_i(f)
    per entry, int32) with cell_bits (kernel maps), else None."""
    xp = be.xp
    m = int(splits.shape[0]) - 1
    with_counts = cell_bits is not None
    keys = xp.empty(n_pairs, dtype=xp.int64)
    counts = xp.empty(max(n_pairs, 1) if with_counts else 1, dtype=xp.int32)
    gathered = row_at is not None
    lanes = int(SORT_LANES)
    be.launch("sort_rows_by_rank", (blocks(lanes * m),), (THREADS,),
              (i64(m), splits, unsorted, row_at if gathered else splits, i32(int(gathered)),
               keys, i64(SHORT_ROW),
               i64((1 << cell_bits) - 1 if with_counts else 0),
               i32(int(with_counts)), counts, i32(lanes)))
    return keys, counts[:n_pairs] if with_counts else None


def entry_cell_counts(be, splits, cell, n_cells: int):
    """counts (E,) int32: n_i(f) of every entry of a kernel map (row i, cell f), one thread per
    row (entry_cell_counts), for maps whose row sort did not count them."""
    from pwconv_cy.cuda._backend import entry_counts_name

    m = int(splits.shape[0]) - 1
    counts = be.xp.empty(int(cell.shape[0]), dtype=be.xp.int32)
    threads = max(1, min(THREADS, WEIGHTS_TALLY_CAP // n_cells))
    be.launch(entry_counts_name(cell.dtype), (blocks(m, threads),), (threads,),
              (i64(m), splits, cell, i32(n_cells), counts))
    return counts


def _sort_long_rows(be, splits, keys, key_bits: int):
    """Sorts the rows of keys longer than SHORT_ROW (the shorter ones are sorted already), their
    entries only, keys (E,) int64 in [0, 2**key_bits) distinct within a row: one global sort of
    (row, key) -- rows are contiguous and in order, so the sorted entries go back to the same
    positions in order."""
    xp = be.xp
    m = int(splits.shape[0]) - 1
    row_of = expand_rows(be, splits, int(keys.shape[0]))
    row_len = splits[1:] - splits[:-1]
    where = xp.flatnonzero(row_len[row_of] > SHORT_ROW)
    rows, long_keys = row_of[where], keys[where]
    row_bits = max(1, int(m - 1).bit_length())
    if row_bits + key_bits <= 63:  # one int64 composite key (row, key): unique, any sort will do
        composite = be.sort((rows << key_bits) | long_keys)
        keys[where] = composite & ((1 << key_bits) - 1)
    else:
        keys[where] = long_keys[be.lexsort(xp.stack([long_keys, rows]))]
    return keys


def _budget_check(n_pairs: int, nbytes: int, budget: int, what: str, remedy: str) -> None:
    from pwconv_cy._config import check_budget

    check_budget(what, n_pairs, nbytes, budget, remedy)


def kernel_map_arrays(be, grid: DeviceGrid, voxel_size: float, kernel_size: int, dilation: int,
                      cell_dtype, budget: int, queries=None, query_offsets=None):
    """(splits (m+1,) int64, index (E,) int64, cell (E,) cell_dtype); the (m, K^3) counts are
    not made (kernel_map_counts computes them when asked for).

    queries: (m, 3) float64 on the device with host query_offsets, or None for the points."""
    return kernel_maps_arrays(be, grid, voxel_size, kernel_size, (dilation,), cell_dtype, budget,
                              queries, query_offsets)[0][:3]


def kernel_maps_arrays(be, grid: DeviceGrid, voxel_size: float, kernel_size: int, dilations,
                       cell_dtype, budget: int, queries=None, query_offsets=None) -> list:
    """The kernel maps of the same queries for each dilation in `dilations` (same voxel size and
    kernel size), as kernel_map_arrays' (splits, index, cell) each plus entry_counts (E,) int32
    (n_i(f) of each entry, counted by the row sort).  Made together: one search launch (see the
    module docstring), one scan (one host synchronisation), one row sort for all of them (map d
    is rows d * m ... of one CSR; its arrays are views of shared ones)."""
    xp = be.xp
    k = int(kernel_size)
    dilations = [int(s) for s in dilations]
    n_maps = len(dilations)
    if n_maps == 0:
        return []
    if n_maps > 65535:
        raise ValueError(f"at most 65535 maps per call (one CUDA grid row each), got {n_maps}")
    n_cells = k ** 3
    bits = cell_bits_for(k)
    n = grid.n_points
    if not (bits < 62 and (n >> (62 - bits)) == 0):
        raise ValueError("n_points * kernel_size**3 must fit in 62 bits")
    m, qrow, qx, qy, qz, q_offsets = _queries(be, grid, queries, query_offsets)
    dil = be.to_device(np.asarray(dilations, dtype=np.int32))
    axis_d = xp.empty(n_maps * 2 * k, dtype=xp.float64)
    be.launch("kernel_axis_diffs", (blocks(n_maps),), (THREADS,),
              (f64(voxel_size), i32(k), i64(n_maps), dil, axis_d))
    head = (i64(m), qrow, qx, qy, qz, q_offsets, i64(grid.n_clouds)) + grid.grid_args() + (
        f64(voxel_size), i32(k), dil, i32(bits), axis_d)
    rows = n_maps * m
    status = xp.zeros(1, dtype=xp.int32)
    grid_dim = (blocks(m, SEARCH_THREADS), n_maps)
    counts_bytes = 4 * rows * n_cells  # made if KernelMap.counts is read: keep room for them
    # keys x 2, index, entry count, cell
    pair_bytes = 20 + np.dtype(cell_dtype).itemsize
    what = "kernel_map (GPU)" if n_maps == 1 else f"kernel_maps (GPU, {n_maps} dilations)"
    once = None
    remember = None  # the key under which this call's pairs per query are kept ("last")
    count = kernel_map_name(k, False)
    if m and map_passes_mode() == "one" and row_sort_mode() == "rank":
        capacity = None
        if map_capacity_mode() == "last":
            remember = (k, tuple(dilations), float(voxel_size), grid.cell_size,
                        queries is None)
            if remember in _LAST_PAIRS_PER_QUERY:
                capacity = _with_margin(m * _LAST_PAIRS_PER_QUERY[remember])
        if capacity is None:
            capacity = _scratch_capacity(be, head, lambda h: _count_pass(be, count, h, n_maps))
        if pair_bytes * capacity + counts_bytes <= budget:
            tiles = _tile_plan(be, grid, query_offsets if queries is not None else grid.offsets)
            once = _search_once(be, k, head, grid_dim, rows, capacity, tiles)
    if once is not None:
        row_len, row_at, scratch, overflow = once
        splits, firsts, longest, overflow = _scan(be, row_len, every=m, flag=overflow)
    else:
        row_len = _count_pass(be, count, head, n_maps)
        splits, firsts, longest = _scan(be, row_len, every=max(m, 1))
    n_pairs = int(firsts[-1])  # firsts[d]: where map d's entries start
    del row_len
    if remember is not None:
        if len(_LAST_PAIRS_PER_QUERY) >= 64 and remember not in _LAST_PAIRS_PER_QUERY:
            _LAST_PAIRS_PER_QUERY.clear()  # a few kinds of maps are expected: keep it small
        _LAST_PAIRS_PER_QUERY[remember] = n_pairs / m
    _budget_check(n_pairs, pair_bytes * n_pairs + counts_bytes, budget, what,
                  "reduce voxel_size, kernel_size or dilation, or split the batch"
                  + ("" if n_maps == 1 else ", or make fewer maps per call"))
    # (ModelNet40's maps have rows over SHORT_ROW in most shapes: 20 % of the rows at s = 1)
    kept = (scratch, row_at) if once is not None and not overflow else None
    once = scratch = row_at = None  # a fill pass over every row gets the room
    keys, counts, filled = _rows_into_place(be, kept, splits, n_pairs, longest,
                                            kernel_map_name(k, True), grid_dim, head, status,
                                            cell_bits=bits)
    del kept
    if longest > SHORT_ROW:  # a fill pass ran, of every row or of the long ones
        be.check_status(status, "kernel_map fill pass")  # before the sort reads the keys
        keys = _sort_long_rows(be, splits, keys, max(1, n).bit_length() + bits)
    index = xp.empty(n_pairs, dtype=xp.int64)
    cell = xp.empty(n_pairs, dtype=cell_dtype)
    be.launch(split_name(cell_dtype), (blocks(n_pairs),), (THREADS,),
              (i64(n_pairs), keys, i32(bits), index, cell))
    del keys
    if counts is None or longest > SHORT_ROW:  # rows the rank sort did not count
        counts = entry_cell_counts(be, splits, cell, n_cells)
    if filled and longest <= SHORT_ROW:  # checked above otherwise (a host synchronisation)
        be.check_status(status, "kernel_map fill pass")
    if n_maps == 1:
        return [(splits, index, cell, counts)]
    out = []
    for d in range(n_maps):  # each map's splits from 0
        a, b = (int(firsts[d]), int(firsts[d + 1])) if m else (0, 0)
        split_d = splits[d * m:(d + 1) * m + 1] - i64(a)
        out.append((split_d, index[a:b], cell[a:b], counts[a:b]))
    return out


def _count_pass(be, kernel: str, head: tuple, n_maps: int = 1):
    """row_len (n_maps * m,) int64: the count pass `kernel` (kernel_map_pass<K, 0>, map d =
    blockIdx.y; radius_pass<0>) over the queries of `head` (the search kernels' leading
    arguments, m first)."""
    xp = be.xp
    m = int(head[0])
    row_len = xp.zeros(n_maps * m, dtype=xp.int64)
    dummy = xp.zeros(1, dtype=xp.int64)
    be.launch(kernel, (blocks(m, SEARCH_THREADS), n_maps), (SEARCH_THREADS,),
              head + (row_len, dummy, dummy, i64(SHORT_ROW), xp.zeros(1, dtype=xp.int32), dummy,
                      i32(0)))
    return row_len


def _scratch_capacity(be, head: tuple, count_rows):
    """Keys to reserve for a one-pass search (kernel_map_once, radius_once): the count pass
    (count_rows(sample head) -> row lengths) over every stride-th query of `head` (about
    CAPACITY_SAMPLE per map; all of them for small batches), scaled to all m queries, times
    CAPACITY_MARGIN plus CAPACITY_SLACK.  Rows longer than SHORT_ROW do not count: the one pass
    does not keep them (they are filled alone)."""
    xp = be.xp
    m, _, qx, qy, qz, q_offsets, n_clouds = head[:7]
    m = int(m)
    stride = max(1, m // max(1, int(CAPACITY_SAMPLE)))
    if stride == 1:
        sample = head
        m_s = m
    else:
        # query r of the sample is query r * stride; clouds are contiguous in query order, so
        # cloud c's sampled queries are those from ceil(offsets[c] / stride)
        m_s = (m + stride - 1) // stride
        pick = [xp.ascontiguousarray(a[::stride]) for a in (qx, qy, qz)]
        offsets_s = (q_offsets + (stride - 1)) // stride
        sample = (i64(m_s), xp.arange(m_s, dtype=xp.int64), *pick, offsets_s, n_clouds) + head[7:]
    row_len = count_rows(sample)
    total = int(be.to_host(xp.where(row_len <= SHORT_ROW, row_len, 0).sum().reshape(1))[0])
    return _with_margin(total * (m / m_s))


def _with_margin(estimate: float) -> int:
    """Scratch keys for an estimated number of pairs: CAPACITY_MARGIN times it plus
    CAPACITY_SLACK."""
    return int(estimate * float(CAPACITY_MARGIN)) + int(CAPACITY_SLACK)


@dataclass
class TilePlan:
    """How kernel_map_tiled runs (see kernels.cu): points per tile (>= the largest cloud's),
    blocks per (cloud, map), whether the cells go to shared memory too and, where the rows do
    (row_bits > 0), each cloud's first row (B + 1,) on the device."""

    tile_points: int
    blocks_per_cloud: int
    cells: bool
    row_bits: int = 0
    cloud_row_begin: object = None

    @property
    def shared_bytes(self) -> int:
        return _tile_bytes(self.tile_points, self.cells, self.row_bits)


def _tile_plan(be, grid: DeviceGrid, query_offsets) -> TilePlan | None:
    """kernel_map_tiled's plan, or None where it is not asked for (PWCONV_CUDA_MAP_TILES) or does
    not apply: no row table, or the largest cloud's coordinates (and cells, rows) beyond a
    block's shared memory; mode 3 falls back to 2 where its rows do not fit or the grid has
    2^32 cells or more (the pairs' cell fields).  query_offsets: host row splits of the queries
    by cloud."""
    mode = map_tiles_mode()
    if not mode or grid.table_bits == 0 or grid.n_clouds == 0:
        return None
    largest = max(1, int(np.diff(np.asarray(grid.offsets)).max()))
    if _tile_bytes(largest, mode >= 2) > be.max_shared_bytes():
        return None
    most_queries = int(np.diff(np.asarray(query_offsets, dtype=np.int64)).max())
    plan = TilePlan(largest, max(1, -(-most_queries // TILE_QUERIES)), mode >= 2)
    if mode == 3 and grid.n_cells < (1 << 32):
        cloud_row_begin, most_rows = _cloud_rows(be, grid)
        row_bits = _row_table_bits(most_rows)
        if _tile_bytes(largest, True, row_bits) <= be.max_shared_bytes():
            plan.row_bits, plan.cloud_row_begin = row_bits, cloud_row_begin
    return plan


def _cloud_rows(be, grid: DeviceGrid) -> tuple:
    """(cloud_row_begin (B + 1,) int64 on the device, the most grid rows of any cloud), kept on
    the grid: made once (a host synchronisation) for all the searches over it.  A cloud's cells
    begin a row (the row key holds the cloud), so its first row is where its first cell is."""
    if grid.cloud_rows is None:
        xp = be.xp
        begin = xp.searchsorted(grid.row_cell_begin, grid.cloud_cell_begin).astype(xp.int64)
        grid.cloud_rows = (begin, int(be.to_host(xp.diff(begin).max())))
    return grid.cloud_rows


def _row_table_bits(n_rows: int) -> int:
    """log2 of a row table's slots: at least twice as many as rows (load <= 1/2), 16 or more."""
    return max(4, (2 * int(n_rows) - 1).bit_length())


def _tile_bytes(tile_points: int, cells: bool, row_bits: int = 0) -> int:
    """kernel_map_tiled's dynamic shared memory: x, y, z (and cell x, first points; and the
    points' order and the rows' (key, cells) pairs from an even 64-bit word) of a cloud."""
    if not cells:
        return 24 * tile_points
    if row_bits == 0:
        return 8 * (5 * tile_points + 1)
    words = 5 * tile_points + 1 + (tile_points + 1) // 2  # the order as 32-bit offsets
    return 8 * (words + (words & 1)) + (16 << row_bits)


def _search_once(be, k: int, head: tuple, grid_dim: tuple, rows: int, capacity: int,
                 tiles=None):
    """Launches kernel_map_once, or kernel_map_tiled with tiles (_tile_plan): (row_len (rows,),
    row_at (rows,), scratch (capacity,) int64, status), all on the device (see kernels.cu)."""
    tail = _once_outputs(be, rows, capacity)
    row_len, row_at, scratch, status = tail[0], tail[1], tail[2], tail[-1]
    if tiles is None:
        be.launch(kernel_map_once_name(k), grid_dim, (SEARCH_THREADS,), head + tail)
    else:
        n_clouds = int(head[6])
        row_begin = tiles.cloud_row_begin if tiles.row_bits else tail[4]  # unread without rows
        be.launch(kernel_map_tiled_name(k), (n_clouds * tiles.blocks_per_cloud, grid_dim[1]),
                  (TILE_THREADS,),
                  head + tail + (i64(tiles.tile_points), i64(tiles.blocks_per_cloud),
                                 i64(TILE_QUERIES), i32(int(tiles.cells)), row_begin,
                                 i32(tiles.row_bits)), shared_mem=tiles.shared_bytes)
    return row_len, row_at, scratch, status


def kernel_map_counts(be, splits, cell, n_cells: int):
    """counts (m, n_cells) int32: the entries of every row of a kernel map in each kernel cell."""
    m = int(splits.shape[0]) - 1
    counts = be.xp.empty((m, n_cells), dtype=be.xp.int32)
    be.launch(counts_name(cell.dtype), (blocks(m),), (THREADS,),
              (i64(m), splits, cell, i32(n_cells), counts))
    return counts


def radius_search_arrays(be, grid: DeviceGrid, radius: float, euclidean: bool, budget: int,
                         queries=None, query_offsets=None):
    """(splits (m+1,) int64, index (E,) int64): neighbours within radius, ascending per row.
    Searched once, as the kernel maps are (radius_once, a scratch sized from a sampled count,
    sort_rows_by_rank; rows over SHORT_ROW searched again alone), or by count + fill passes
    (PWCONV_CUDA_MAP_PASSES=two, PWCONV_CUDA_ROW_SORT=thread, or where the scratch falls short)."""
    xp = be.xp
    m, qrow, qx, qy, qz, q_offsets = _queries(be, grid, queries, query_offsets)
    head = (i64(m), qrow, qx, qy, qz, q_offsets, i64(grid.n_clouds)) + grid.grid_args() + (
        f64(radius), i32(1 if euclidean else 0))
    status = xp.zeros(1, dtype=xp.int32)
    grid_dim = (blocks(m, SEARCH_THREADS),)
    count = radius_name(False)
    once = None
    if m and map_passes_mode() == "one" and row_sort_mode() == "rank":
        capacity = _scratch_capacity(be, head, lambda h: _count_pass(be, count, h))
        if 8 * capacity <= budget:
            once = _radius_once(be, head, grid_dim, m, capacity)
    if once is not None:
        row_len, row_at, scratch, overflow = once
        splits, n_pairs, longest, overflow = _scan(be, row_len, flag=overflow)
    else:
        row_len = _count_pass(be, count, head)
        splits, n_pairs, longest = _scan(be, row_len)
    del row_len
    _budget_check(n_pairs, 16 * n_pairs, budget, "radius_search (GPU)",
                  "reduce the radius, search fewer queries per call or split the batch")
    kept = (scratch, row_at) if once is not None and not overflow else None
    once = scratch = row_at = None  # a fill pass over every row gets the room
    keys, _, filled = _rows_into_place(be, kept, splits, n_pairs, longest, radius_name(True),
                                       grid_dim, head, status)
    del kept
    if filled or longest > SHORT_ROW:
        be.check_status(status, "radius_search fill pass")
    if longest > SHORT_ROW:
        keys = _sort_long_rows(be, splits, keys, max(1, grid.n_points).bit_length())
    return splits, keys


def _radius_once(be, head: tuple, grid_dim: tuple, m: int, capacity: int):
    """Launches radius_once: (row_len (m,), row_at (m,), scratch (capacity,) int64, status)."""
    tail = _once_outputs(be, m, capacity)
    be.launch("radius_once", grid_dim, (SEARCH_THREADS,), head + tail)
    return tail[0], tail[1], tail[2], tail[-1]


def _once_outputs(be, rows: int, capacity: int) -> tuple:
    """The one-pass kernels' trailing arguments (see emit_once_row): row_len and row_at (rows,)
    int64, scratch (capacity,) int64, capacity, the scratch cursor, SHORT_ROW and a status word."""
    xp = be.xp
    return (xp.empty(rows, dtype=xp.int64), xp.empty(rows, dtype=xp.int64),
            xp.empty(max(int(capacity), 1), dtype=xp.int64), i64(capacity),
            xp.zeros(1, dtype=xp.uint64), i64(SHORT_ROW), xp.zeros(1, dtype=xp.int32))
