"""GPU pointwise convolution over a kernel map: forward, input gradient, weight gradient.

Three schemes, with the same results to rounding and each bit-identical from run to run:

* "entries" (kernels.cu's conv_entries, conv_weight_cells), the default up to 32 channels: every
  map entry carries its weight 1 / n_i(f) (entry_weights, in map order), so the forward is one
  thread per (row, output channel) adding w_e * (x_j . W_f[:, o]) over the row's entries in map
  order -- no per-cell tables, which the paper's sparse rows (7-18 entries spread over up to 27
  cells) mostly leave empty; the input gradient runs the same kernel over the transposed map
  (the "rows" scheme's, below).  The weight gradient is the "rows" scheme's (conv_weight_rows,
  the map read as it is) where its shared accumulators hold the weight, else
  (or with ``PWCONV_CUDA_WEIGHT_GRAD=cells``) it reads the entries ordered by cell (one stable
  sort): fixed chunks of a cell's run each add their entries' outer products in registers, then
  a second kernel adds each cell's chunks in chunk order.
* "rows" (kernels.cu's conv_rows, conv_weight_rows): a group of lanes per row reads the row's
  entries in map order and sums them per kernel cell in shared memory, so the forward needs no
  reordering of the map; the input gradient runs the same kernel over the transposed map, whose
  entries carry their weights 1 / n_i(f) (made in map order, then one stable sort by point).
  Used when the channel counts are at most 32 and the per-cell sums fit the kernels' shared
  arrays (:func:`rows_plan`) -- the paper's networks and most point-cloud layers.
* "by cell", the general one, described below.

``PWCONV_CUDA_OPERATOR=bycell`` (or ``rows``, ``entries``) forces one scheme where it applies
(benchmarks, tests); the default ("auto") picks "entries" up to 32 channels, "by cell" beyond.
``PWCONV_CUDA_DETERMINISTIC=0`` opts into the one non-deterministic path: the "entries" input
gradient added straight over the map with floating-point atomics (no transposed map).
Written for the load pattern that bounds the "entries" scheme (its lanes load each value at one
address, so one load instruction serves few values), the defaults since 2026-11-28 run its
forward and input gradient one thread per row where they apply (``PWCONV_CUDA_ENTRIES_LOADS``
"thread": conv_entries_thread, vector loads of the source rows, the cell matrices in shared
memory, the same bits; "broadcast": conv_entries as described above; "tile":
conv_entries_tile, each cloud's source rows in shared memory too), and make the transposed map
by per-point sorts of its own, two kernels (``PWCONV_CUDA_TRANSPOSE`` "rank"; "sort": CuPy's
radix sort, the same map).  ``PWCONV_CUDA_WEIGHT_GRAD=chunks`` (opt-in) makes the weight
gradient by chunks of rows whose entries are sorted by cell in shared memory
(conv_weight_chunks).

The "by cell" kernels read the map "by cell": each row's entries ordered by (cell, index), so
that every Omega_i(f) is one run (a counting sort per row, one thread per row).  The input gradient
gathers over the transposed map ordered by (point, cell, row) (one stable radix sort).  Both are
cached on the KernelMap (``_cache``), so a layer's forward and backward share them.  The weight gradient is
reduced deterministically: blocks of a fixed number of rows write partial sums, a second kernel
adds them in block order.  No floating-point atomics: bit-identical results from run to run.
"""
from __future__ import annotations

import numpy as np

from pwconv_cy.cuda._backend import (
    THREAD_OUTPUTS,
    conv_name,
    env_choice,
    env_flag,
    order_name,
    rows_name,
    sort_into_name,
    thread_name,
)
from pwconv_cy.cuda._search import THREADS, blocks, cell_bits_for, expand_rows

__all__ = [
    "backward_input",
    "backward_weight",
    "by_cell",
    "cell_entries",
    "chunk_blocks",
    "chunks_plan",
    "deterministic",
    "entries_loads",
    "entry_counts",
    "entry_weights",
    "forward",
    "input_grad_mode",
    "partial_runs",
    "rows_per_partial",
    "rows_plan",
    "scheme_for",
    "thread_plan",
    "transpose_mode",
    "transposed",
    "transposed_by_cell",
    "transposed_counts",
    "transposed_rows",
    "warp_runs",
    "warps_plan",
    "weight_grad_mode",
]

i64 = np.int64
i32 = np.int32

#: Rows per partial sum of the weight gradient (grown for huge weights, see rows_per_partial).
WEIGHT_BLOCK_ROWS = 256
#: Partial sums held at once by the weight gradient.
PARTIAL_BYTES = 256 * 1024 * 1024
#: Slices of the partials summed side by side (kernels.cu's PWCONV_CUDA_SUM_SLICES).
SUM_SLICES = 8

# Capacities of the "rows" kernels (kernels.cu: PWCONV_CUDA_SUMS_BYTES, _TALLY_CAP, _ACC_BYTES,
# _ROW_THREADS; _WEIGHTS_TALLY_CAP is _search.py's): keep in step.
ROWS_SUMS_BYTES = 16384
ROWS_TALLY_CAP = 1024
ROWS_ACC_BYTES = 20480
ROWS_THREADS = 256
OPERATOR_ENV = "PWCONV_CUDA_OPERATOR"
OPERATOR_SCHEMES = ("auto", "entries", "rows", "bycell")
#: Channels per side up to which the "entries" and "rows" kernels apply (the lanes of a warp).
LANE_CHANNELS = 32
#: Entries per chunk of conv_weight_cells at least (grown with the sizes, see _cell_chunk).
CELL_CHUNK = 1024


DETERMINISTIC_ENV = "PWCONV_CUDA_DETERMINISTIC"
#: Which kernels make the "entries" scheme's weight gradient: "rows" (default: conv_weight_rows
#: over the map as it is, where its shared accumulators hold the weight) or "cells"
#: (conv_weight_cells over the entries sorted by cell).  Same results to rounding.
#: "chunks" (opt-in): conv_weight_chunks, one thread per (cell, input channel) adding its cell's
#: entries of a chunk of rows, sorted by cell in shared memory, in registers (see
#: chunks_plan for where it applies; elsewhere the default).  "warps" (opt-in, written
#: 2026-11-28 without a GPU): conv_weight_warps, each warp a run of rows, entry by entry, its
#: own sums of the weight in shared memory, a lane per (input, output channel) pair (see
#: warps_plan for where it applies; elsewhere the default).
WEIGHT_GRAD_ENV = "PWCONV_CUDA_WEIGHT_GRAD"
WEIGHT_GRAD_MODES = ("rows", "cells", "chunks", "warps")


#: How the "entries" scheme's deterministic input gradient is made: "gather" (default: over the
#: transposed map, as SPEC's design) or "fixed" (opt-in: straight over the map, each
#: contribution rounded to a per-point power-of-two grid and added by 64-bit integer atomics,
#: whose sums do not depend on the order; no transposed map).  Results within rounding of each
#: other, each bit-identical from run to run.
INPUT_GRAD_ENV = "PWCONV_CUDA_INPUT_GRAD"


#: How transposed_rows puts the map's entries in point order: "rank" (default: each entry
#: scattered into its point's segment by an integer atomic cursor, then every segment sorted by
#: sort_segments: two kernels; for transposed_counts, the input gradient's, with each entry's
#: row in its key and the segments unpacked by the sort: _transposed_by_rank_packed) or "sort"
#: (one stable radix sort of the entries by point, CuPy's argsort: Thrust's kernels and a
#: temporary buffer, and before CuPy 14 a synchronisation of the stream after every sort,
#: cupy/cupy#9126; the default before, with which the paper workload's backward took 3.85 ms
#: against 3.10 ms by rank on an H200, 2026-11-27).  The same transposed map either way.
TRANSPOSE_ENV = "PWCONV_CUDA_TRANSPOSE"
#: sort_segments: segments of the transposed map up to this many entries are sorted by rank
#: (len^2 / 32 comparisons per lane), longer ones by a radix sort (about 2 log2(range) * len / 32
#: loads per lane); the paper's maps name a point 7-18 times on average.
SEGMENT_RANK_MAX = 64


def transpose_mode() -> str:
    """PWCONV_CUDA_TRANSPOSE: "rank" (default) or "sort"."""
    return env_choice(TRANSPOSE_ENV, ("rank", "sort"), "rank")


def input_grad_mode() -> str:
    """PWCONV_CUDA_INPUT_GRAD: "gather" (default) or "fixed"."""
    return env_choice(INPUT_GRAD_ENV, ("gather", "fixed"), "gather")


#: How the "entries" forward and input gradient load a row: "thread" (default,
#: conv_entries_thread: one thread per row forms all its outputs from 16-byte vector loads of
#: the source rows and the cell matrices in shared memory, where thread_plan allows; else
#: "broadcast"), "broadcast" (conv_entries: every lane loads each value, the row's lanes at one
#: address; the default before: forward 1.11 ms against 0.89 ms with "thread" on an H200, paper
#: workload, 2026-11-27) or "tile" (conv_entries_tile: as "thread", each cloud's source rows
#: copied to shared memory first, where tile_plan allows; else "thread").  Same bits.
ENTRIES_LOADS_ENV = "PWCONV_CUDA_ENTRIES_LOADS"

#: conv_entries_thread's shared copy of the cell matrices (kernels.cu's
#: PWCONV_CUDA_THREAD_MATS_BYTES) and conv_weight_chunks' sizes (PWCONV_CUDA_CHUNK_ROWS,
#: _CHUNK_MAX_CELLS): keep in step.
THREAD_MATS_BYTES = 32768
CHUNK_ROWS = 64
CHUNK_MAX_CELLS = 64
#: Blocks of conv_weight_chunks at most (each adds a fixed run of chunks; a constant, so the
#: summation order never depends on the device).
CHUNK_BLOCKS = 2048
#: conv_entries_tile's threads per block (at most its __launch_bounds__, 512) and rows per block
#: (a cloud's rows in blocks of that many; each block copies the cloud's source rows once).
TILE_THREADS = 512
TILE_ROWS = 1024
#: Whether conv_entries_tile's blocks take their rows longest first (a counting sort of the
#: lengths in shared memory: a warp's rows then have about one length, and a warp issues as many
#: steps as its longest row has entries) or in map order.  The same bits either way.
TILE_BY_LENGTH = True


def entries_loads() -> str:
    """PWCONV_CUDA_ENTRIES_LOADS: "thread" (default), "broadcast" or "tile"."""
    return env_choice(ENTRIES_LOADS_ENV, ("thread", "broadcast", "tile"), "thread")


def _thread_outputs(n: int):
    """The smallest BM of the one-thread-per-row kernels holding n outputs, or None."""
    return next((bm for bm in THREAD_OUTPUTS if n <= bm), None)


def thread_plan(n_cells: int, a: int, b: int, itemsize: int, depthwise: bool, cell_dtype):
    """BM of conv_entries_thread summing `a` source channels per cell into `b` outputs, or None
    where it does not apply: map cells wider than uint8, more than 32 outputs, or cell matrices
    beyond its shared copy (THREAD_MATS_BYTES)."""
    per_cell = a if depthwise else a * b
    if np.dtype(cell_dtype) != np.uint8 or n_cells * per_cell * itemsize > THREAD_MATS_BYTES:
        return None
    return _thread_outputs(b)


def chunks_plan(n_cells: int, a: int, b: int, depthwise: bool, cell_dtype):
    """(BM, threads per block) of conv_weight_chunks, or None where it does not apply: map cells
    wider than uint8 or more than CHUNK_MAX_CELLS, more than 32 channels, or more (cell, input
    channel) pairs than a block's 1,024 threads."""
    bm = 8 if depthwise else _thread_outputs(b)
    n_pairs = n_cells * a
    if (np.dtype(cell_dtype) != np.uint8 or n_cells > CHUNK_MAX_CELLS or bm is None or a > 32
            or n_pairs > 1024):
        return None
    return bm, max(128, -(-n_pairs // 32) * 32)


#: conv_weight_warps: (input, output channel) pairs a warp holds per cell at most (kernels.cu's
#: PWCONV_CUDA_WARP_PAIRS), shared bytes of a block's sums at most (under the 48 KiB a launch
#: may use without opting in), warps per block at most, the runs of rows aimed at (their
#: partial sums: one per run) and rows per run at least.  Sizes only decide the runs, so the
#: summation order never depends on the device.
WARP_PAIRS = 128
WARPS_SHARED_BYTES = 40 * 1024
WARPS_PER_BLOCK = 8
WARP_RUNS = 4096
WARP_RUN_ROWS = 16


def warps_plan(n_cells: int, a: int, b: int, itemsize: int, depthwise: bool):
    """Warps per block of conv_weight_warps for a weight gradient of `a` input and `b` output
    channels, or None where it does not apply: more (input, output) pairs than WARP_PAIRS, or a
    warp's sums (n_cells * pairs values) beyond WARPS_SHARED_BYTES."""
    pairs = a if depthwise else a * b
    per_warp = n_cells * pairs * itemsize
    if pairs > WARP_PAIRS or per_warp > WARPS_SHARED_BYTES:
        return None
    return max(1, min(WARPS_PER_BLOCK, WARPS_SHARED_BYTES // per_warp))


def partial_runs(n: int, least: int, most: int, w_size: int, itemsize: int) -> tuple:
    """(items per run, runs) of a weight gradient reduced from one partial sum per run of
    consecutive items (rows or chunks of rows): at most `most` runs of at least `least` items,
    fewer where their partial sums (w_size values each) would exceed PARTIAL_BYTES.  A
    function of the sizes only, so the summation order never depends on the device."""
    most = max(1, min(most, PARTIAL_BYTES // max(1, w_size * itemsize)))
    per_run = max(least, -(-n // most))
    return per_run, -(-n // per_run)


def warp_runs(m: int, w_size: int, itemsize: int) -> tuple:
    """(rows per run, runs) of conv_weight_warps over m rows: about WARP_RUNS runs of at least
    WARP_RUN_ROWS rows (partial_runs)."""
    return partial_runs(m, WARP_RUN_ROWS, WARP_RUNS, w_size, itemsize)


def weight_grad_mode() -> str:
    """PWCONV_CUDA_WEIGHT_GRAD: "rows" (default), "cells", "chunks" or "warps".

    "rows" reads the map in its own order, a block of rows at a time, and needs no sorted copy
    of the map: on an H200 (paper workload, 19:42 run of 2026-11-26) it took 0.31-0.41 ms of wall
    time per layer against 0.41-0.64 ms for sorting the entries by cell and running
    conv_weight_cells.  "cells" is used anyway where the weight outgrows the rows kernel's
    shared accumulators (rows_plan)."""
    return env_choice(WEIGHT_GRAD_ENV, WEIGHT_GRAD_MODES, "rows")


def deterministic() -> bool:
    """False when PWCONV_CUDA_DETERMINISTIC=0 (or false / no / off): the "entries" scheme's input
    gradient then adds straight over the map with floating-point atomics (conv_entries_scatter:
    no transposed map, last bits varying from run to run).  True by default: every result
    bit-identical from run to run."""
    return env_flag(DETERMINISTIC_ENV, True)


def operator_scheme() -> str:
    """The scheme asked for by PWCONV_CUDA_OPERATOR: auto (default), rows or bycell."""
    return env_choice(OPERATOR_ENV, OPERATOR_SCHEMES, "auto")


def scheme_for(n_cells: int, a: int, b: int, itemsize: int, weight_entries: int = 0) -> str:
    """The scheme ("entries", "rows" or "bycell") of a product summing `a` source channels per
    cell into `b` outputs (the forward: c_in, c_out; the input gradient: c_out, c_in; the weight
    gradient: c_in, c_out with its weight_entries).  "entries" by default up to LANE_CHANNELS
    channels, "rows" where PWCONV_CUDA_OPERATOR=rows asks and its shared arrays allow, else
    "bycell"."""
    scheme = operator_scheme()
    if scheme == "bycell" or max(a, b) > LANE_CHANNELS or min(a, b) < 1:
        return "bycell"
    if scheme == "rows":
        return "rows" if rows_plan(n_cells, a, b, itemsize, weight_entries) else "bycell"
    return "entries"


def rows_plan(n_cells: int, a: int, b: int, itemsize: int, weight_entries: int = 0):
    """(lanes per row, rows per block) of the "rows" kernels summing `a` source channels per cell
    into `b` outputs in floats of `itemsize` bytes, or None when they do not apply: more than 32
    channels, per-cell sums or tallies beyond the kernels' shared arrays, or (weight_entries > 0:
    the weight gradient) more weight entries than its shared accumulators.  Also None when
    PWCONV_CUDA_OPERATOR=bycell."""
    if operator_scheme() == "bycell" or max(a, b) > 32 or a < 1 or b < 1:
        return None
    group = _group(a, b)
    per_block = min(ROWS_THREADS // group, ROWS_SUMS_BYTES // (itemsize * n_cells * a),
                    ROWS_TALLY_CAP // n_cells)
    if per_block < 1 or weight_entries * itemsize > ROWS_ACC_BYTES:
        return None
    return group, per_block


def _row_of(be, km):
    if "cuda_row_of" not in km._cache:
        km._cache["cuda_row_of"] = expand_rows(be, km.splits, int(km.index.shape[0]))
    return km._cache["cuda_row_of"]


def by_cell(be, km) -> dict:
    """The map's rows ordered by (cell, index): col (E,) int64, cell (E,) int32, and run_start
    (m, K^3) int32, the offset of Omega_i(f)'s run within row i (a counting sort per row)."""
    if "cuda_by_cell" not in km._cache:
        xp = be.xp
        m = km.n_queries
        n_cells = km.kernel_size ** 3
        n_entries = int(km.index.shape[0])
        counts = km.counts
        run_start = xp.ascontiguousarray(xp.cumsum(counts, axis=1, dtype=xp.int32) - counts,
                                         dtype=xp.int32)
        cursor = run_start.copy()
        col = xp.empty(n_entries, dtype=xp.int64)
        cell = xp.empty(n_entries, dtype=xp.int32)
        be.launch(order_name(km.cell.dtype), (blocks(m),), (THREADS,),
                  (i64(m), km.splits, km.index, km.cell, i32(n_cells), cursor, col, cell))
        km._cache["cuda_by_cell"] = {"col": col, "cell": cell, "run_start": run_start}
    return km._cache["cuda_by_cell"]


def _per_point(be, km, lead: int = 0):
    """(lead + n,) int32: `lead` zeros, then the map's entries naming each point (a count with
    integer atomics; CuPy's bincount is several times slower)."""
    xp = be.xp
    n_entries = int(km.index.shape[0])
    per_point = xp.zeros(lead + km.n_points, dtype=xp.int32)
    be.launch("count_per_point", (blocks(n_entries),), (THREADS,),
              (i64(n_entries), km.index, per_point[lead:]))
    return per_point


def _point_counts_splits(be, km):
    """(counts (n+1,) int32: 0, then the entries naming each point; splits (n+1,) int64: where
    each point's entries start in the transposed map, their scan): two library calls and a
    kernel."""
    counts = _per_point(be, km, lead=1)
    return counts, be.xp.cumsum(counts, dtype=be.xp.int64)


def _point_splits(be, km):
    """(n+1,) int64: where each point's entries start in the transposed map."""
    return _point_counts_splits(be, km)[1]


def _order_by_point_rank(be, km, tsplits, counts):
    """order (E,) int64: the map's entries ordered by point, rows ascending within each (entry
    numbers ascend with the rows, and a row names a point once): scatter_by_point puts every
    entry's number in its point's segment (counts[1:], each point's entries, counted down as its
    cursor: used up), sort_segments sorts every segment (a warp each:
    segments of up to SEGMENT_RANK_MAX entries by rank, longer ones by a binary radix sort, so
    a point named by thousands of rows costs linear time).  Two kernels, where CuPy's argsort
    runs Thrust's (and before CuPy 14 synchronised the stream after them)."""
    xp = be.xp
    n_entries = int(km.index.shape[0])
    scattered = xp.empty(max(n_entries, 1), dtype=xp.int64)
    be.launch("scatter_by_point", (blocks(n_entries),), (THREADS,),
              (i64(n_entries), km.index, tsplits, counts[1:], scattered))
    order = xp.empty(max(n_entries, 1), dtype=xp.int64)
    n = km.n_points
    be.launch("sort_segments", (blocks(32 * n),), (THREADS,),
              (i64(n), tsplits, scattered, order, i64(max(0, int(SEGMENT_RANK_MAX)))))
    return order[:n_entries]


def _order_by_point_cell(be, km):
    """order (E,) int64: the map's entries ordered by (point, cell), rows ascending within each
    (one stable sort of the map, whose rows ascend).  The key point * K^3 + cell in 32 bits
    where it fits: a 32-bit radix sort is about twice as fast as a 64-bit one."""
    xp = be.xp
    n_cells = km.kernel_size ** 3
    key = km.index * n_cells + km.cell.astype(xp.int64)
    if km.n_points * n_cells <= np.iinfo(np.uint32).max:
        key = key.astype(xp.uint32)
    return xp.ascontiguousarray(be.argsort(key), dtype=xp.int64)


def transposed_by_cell(be, km) -> dict:
    """For every point j the entries (i, f) with j in Omega_i(f), ordered by (f, i):
    splits (n+1,) int64, row (E,) int64, cell (E,) int32."""
    if "cuda_transposed_by_cell" not in km._cache:
        xp = be.xp
        order = _order_by_point_cell(be, km)
        km._cache["cuda_transposed_by_cell"] = {
            "splits": _point_splits(be, km),
            "row": xp.ascontiguousarray(_row_of(be, km)[order]),
            "cell": xp.ascontiguousarray(km.cell[order].astype(xp.int32)),
        }
    return km._cache["cuda_transposed_by_cell"]


def entry_counts(be, km):
    """counts (E,) int32: n_i(f) of every map entry (row i, cell f), in map order -- made with
    the map by its row sort (pwconv_cy.cuda.ENTRY_COUNTS_KEY), else here (one thread per row, no
    atomics) and cached on the map."""
    from pwconv_cy.cuda import ENTRY_COUNTS_KEY
    from pwconv_cy.cuda._search import entry_cell_counts

    if ENTRY_COUNTS_KEY not in km._cache:
        km._cache[ENTRY_COUNTS_KEY] = entry_cell_counts(be, km.splits, km.cell,
                                                        km.kernel_size ** 3)
    return km._cache[ENTRY_COUNTS_KEY]


def entry_weights(be, km, dtype):
    """w (E,) `dtype`: 1 / n_i(f) of every map entry (row i, cell f), in map order, from
    entry_counts.  Cached on the map: the forward, the transposed map and the by-cell order of
    the weight gradient share it."""
    key = f"cuda_entry_weights_{np.dtype(dtype).name}"
    if key not in km._cache:
        counts = entry_counts(be, km)
        weight = be.xp.empty(int(counts.shape[0]), dtype=dtype)
        be.launch(conv_name("weights_from_counts", dtype), (blocks(int(counts.shape[0])),),
                  (THREADS,), (i64(int(counts.shape[0])), counts, weight))
        km._cache[key] = weight
    return km._cache[key]


def cell_entries(be, km, dtype) -> dict:
    """The map's entries ordered by cell (one stable sort: map order within a cell), for the
    weight gradient of the "entries" scheme: row, col (E,) int64, weight (E,) `dtype` (1 / n_i(f))
    and cell_splits (K^3 + 1,) int64, where each cell's run starts.  Cached on the map."""
    key = f"cuda_cell_entries_{np.dtype(dtype).name}"
    if key not in km._cache:
        xp = be.xp
        n_cells = km.kernel_size ** 3
        order = xp.ascontiguousarray(be.argsort(km.cell), dtype=xp.int64)  # stable
        row, col, cell, w = _permute_entries(be, km, dtype, order, with_col=True)
        del order
        if n_cells <= np.iinfo(cell.dtype).max:
            bounds = xp.arange(n_cells + 1, dtype=cell.dtype)
        else:
            cell, bounds = cell.astype(xp.int64), xp.arange(n_cells + 1, dtype=xp.int64)
        cell_splits = xp.ascontiguousarray(xp.searchsorted(cell, bounds), dtype=xp.int64)
        km._cache[key] = {"row": row, "col": col, "weight": w, "cell_splits": cell_splits}
    return km._cache[key]


def _permute_entries(be, km, dtype, order, with_col: bool, with_counts: bool = False):
    """(row, col or None, cell, weight) of the map's entries taken in `order` (permute_entries:
    one kernel; rows from the map's cached row_of, weights from entry_weights) -- with_counts:
    their n_i(f) (entry_counts, int32) in place of the weights."""
    xp = be.xp
    n_entries = int(order.shape[0])
    counts = entry_counts(be, km) if with_counts else xp.empty(1, dtype=xp.int32)
    weight = xp.empty(1, dtype=dtype) if with_counts else entry_weights(be, km, dtype)
    row = xp.empty(n_entries, dtype=xp.int64)
    col = xp.empty(n_entries if with_col else 1, dtype=xp.int64)
    cell = xp.empty(n_entries, dtype=km.cell.dtype)
    w = xp.empty(1 if with_counts else n_entries, dtype=dtype)
    out_counts = xp.empty(n_entries if with_counts else 1, dtype=xp.int32)
    be.launch(rows_name("permute_entries", dtype, km.cell.dtype), (blocks(n_entries),),
              (THREADS,), (i64(n_entries), order, _row_of(be, km), km.index, km.cell, weight,
                           counts, i32(1 if with_col else 0), i32(0 if with_counts else 1),
                           i32(1 if with_counts else 0), row, col, cell, w, out_counts))
    return row, (col if with_col else None), cell, (out_counts if with_counts else w)


def _cell_chunk(n_entries: int, n_cells: int, n_vals: int, itemsize: int) -> int:
    """Entries per chunk of conv_weight_cells: CELL_CHUNK, more when the partial sums of that
    many chunks would exceed PARTIAL_BYTES.  A function of the sizes only, so the summation order
    (and the result) never depends on the device."""
    max_chunks = max(1, PARTIAL_BYTES // max(1, n_vals * itemsize) - n_cells)
    return max(CELL_CHUNK, -(-n_entries // max_chunks))


def transposed_rows(be, km, dtype) -> dict:
    """The transposed map of the "rows" scheme: for every point j the entries (i, f) with j in
    Omega_i(f), ordered by (i, f), each with its weight 1 / n_i(f) in `dtype`:
    splits (n+1,) int64, row (E,) int64, cell (E,) as the map's cells, weight (E,) dtype.

    The weights are made in map order (one thread per row, no atomics), then the entries are
    ordered by point with one stable sort: rows ascend within a point (a row names a point once),
    whatever the schedule."""
    key = f"cuda_transposed_rows_{np.dtype(dtype).name}"
    if key not in km._cache:
        tsplits, order = _transposed_order(be, km)
        trow, _, tcell, tw = _permute_entries(be, km, dtype, order, with_col=False)
        del order
        km._cache[key] = {"splits": tsplits, "row": trow, "cell": tcell, "weight": tw}
    return km._cache[key]


def transposed_counts(be, km) -> dict:
    """transposed_rows with each entry's n_i(f) (int32, "count") in place of its weight: the
    one-thread-per-row input gradient (conv_entries_thread) forms 1 / n_i(f) itself, so no
    weights are made.  Cached on the map."""
    if "cuda_transposed_counts" not in km._cache:
        packed = _transposed_by_rank_packed(be, km) if transpose_mode() == "rank" else None
        if packed is None:
            tsplits, order = _transposed_order(be, km)
            trow, _, tcell, tcount = _permute_entries(be, km, np.float32, order, with_col=False,
                                                      with_counts=True)
            del order
            packed = tsplits, trow, tcell, tcount
        km._cache["cuda_transposed_counts"] = dict(zip(("splits", "row", "cell", "count"),
                                                       packed))
    return km._cache["cuda_transposed_counts"]


def _transposed_by_rank_packed(be, km):
    """(splits, row, cell, count) of transposed_counts by rank in three kernels: each entry
    scattered into its point's segment as the key (row << bits) | entry (scatter_rows_by_point,
    a warp per 32 rows), every segment sorted and unpacked into rows, cells and counts
    (sort_segments_into: what sort_segments, expand_rows and permute_entries did in three
    kernels and two more arrays).  The same transposed map.  None where the keys need more than
    63 bits (the caller takes the unpacked way)."""
    xp = be.xp
    m, n = km.n_queries, km.n_points
    n_entries = int(km.index.shape[0])
    bits = max(1, (n_entries - 1).bit_length())
    if max(m - 1, 0).bit_length() + bits > 63:
        return None
    counts, tsplits = _point_counts_splits(be, km)
    keys = xp.empty(max(n_entries, 1), dtype=xp.int64)
    be.launch("scatter_rows_by_point", (blocks(-(-m // 32) * 32),), (THREADS,),
              (i64(m), km.splits, km.index, tsplits, counts[1:], i32(bits), keys))
    trow = xp.empty(max(n_entries, 1), dtype=xp.int64)
    tcell = xp.empty(n_entries, dtype=km.cell.dtype)
    tcount = xp.empty(n_entries, dtype=xp.int32)
    be.launch(sort_into_name(km.cell.dtype), (blocks(32 * n),), (THREADS,),
              (i64(n), tsplits, keys, trow, i64(max(0, int(SEGMENT_RANK_MAX))), i32(bits),
               km.cell, entry_counts(be, km), tcell, tcount))
    return tsplits, trow[:n_entries], tcell, tcount


def _transposed_order(be, km):
    """(splits (n+1,) int64, order (E,) int64) of the transposed map: where each point's entries
    start, and the map's entries ordered by point, rows ascending within each (one stable radix
    sort by point, or with PWCONV_CUDA_TRANSPOSE=rank per-point rank sorts)."""
    xp = be.xp
    counts, tsplits = _point_counts_splits(be, km)
    if transpose_mode() == "rank":
        return tsplits, _order_by_point_rank(be, km, tsplits, counts)
    # 32-bit keys when the points allow: a radix sort of half the passes
    point = km.index.astype(xp.uint32) if km.n_points <= np.iinfo(np.uint32).max else km.index
    return tsplits, xp.ascontiguousarray(be.argsort(point), dtype=xp.int64)  # stable


def transposed(be, km):
    """The CPU's KernelMap.transposed(): (tsplits (n+1,) int64, tkeys (E,) int64) with
    tkeys = row << bits | cell, rows ascending within each point."""
    if "transposed" not in km._cache:
        xp = be.xp
        bits = cell_bits_for(km.kernel_size)
        order = be.argsort(km.index)  # stable: rows ascend within each point
        tkeys = (_row_of(be, km)[order] << bits) | km.cell[order].astype(xp.int64)
        km._cache["transposed"] = (_point_splits(be, km), xp.ascontiguousarray(tkeys))
    return km._cache["transposed"]


def _group(a: int, b: int) -> int:
    """Lanes per row of conv_gather_dense: a power of two >= max(a, b), at most 32."""
    g = 1
    while g < min(max(a, b), 32):
        g *= 2
    return g


def _gather(be, dtype, rows, splits, col, cell, weight_row, counts, n_cells, src, a, M, b,
            depthwise, out):
    use_weight_row = i32(0 if weight_row is None else 1)
    weight_row = col if weight_row is None else weight_row  # unused when use_weight_row == 0
    if depthwise:
        be.launch(conv_name("conv_gather_depthwise", dtype), (blocks(rows * a),), (THREADS,),
                  (i64(rows), splits, col, cell, use_weight_row, weight_row, counts, i32(n_cells),
                   src, i64(a), M, out))
        return
    g = _group(a, b)
    rows_per_block = THREADS // g
    be.launch(conv_name("conv_gather_dense", dtype),
              (blocks(rows, rows_per_block), (b + g - 1) // g), (THREADS,),
              (i64(rows), splits, col, cell, use_weight_row, weight_row, counts, i32(n_cells), src,
               i64(a), M, i64(b), out, i32(g)))


def _rows_gather(be, dtype, rows, splits, col, cell, weight, n_cells, src, a, M, b, depthwise,
                 plan, out):
    group, per_block = plan
    use_w = i32(0 if weight is None else 1)
    weight = src if weight is None else weight  # unused when use_w == 0
    be.launch(rows_name("conv_rows", dtype, cell.dtype), (blocks(rows, per_block),),
              (per_block * group,),
              (i64(rows), splits, col, cell, use_w, weight, i32(n_cells), src, i32(a), M, i32(b),
               i32(1 if depthwise else 0), i32(group), out))


def _entries_launch(be, kernel, dtype, rows, splits, col, cell, weight, src, a, M, b, depthwise,
                    out):
    """conv_entries or conv_entries_scatter: b lanes per row, 32 // b rows per warp; M
    (n_cells, a, b) (dense) or (n_cells, a) (depthwise), C-contiguous."""
    n_threads = -(-rows // (32 // b)) * 32
    be.launch(rows_name(kernel, dtype, cell.dtype), (blocks(n_threads),), (THREADS,),
              (i64(rows), splits, col, cell, weight, src, i32(a), M, i32(b),
               i32(1 if depthwise else 0), out))


def _thread_bm(km, a: int, b: int, itemsize: int, depthwise: bool):
    """BM of conv_entries_thread (or _tile) for this product where PWCONV_CUDA_ENTRIES_LOADS is
    thread (the default) or tile and thread_plan allows, else None."""
    if entries_loads() not in ("thread", "tile"):
        return None
    return thread_plan(km.kernel_size ** 3, a, b, itemsize, depthwise, km.cell.dtype)


def _padded(n_values: int, itemsize: int) -> int:
    """n_values rounded up to a multiple of 16 bytes (of Vec16 vectors): a source row's length
    in the one-thread-per-row kernels, conv_entries_tile's cell matrices."""
    per_vector = 16 // itemsize
    return -(-n_values // per_vector) * per_vector


def tile_plan(be, row_offsets, src_offsets, n_cells: int, a: int, b: int, itemsize: int,
              depthwise: bool):
    """(blocks per cloud, dynamic shared bytes) of conv_entries_tile for rows split by cloud as
    row_offsets and their source rows as src_offsets (host arrays), or None where it is not
    asked for (PWCONV_CUDA_ENTRIES_LOADS=tile) or the largest cloud's source rows, the cell
    matrices and (TILE_BY_LENGTH) the block's row order do not fit a block's shared memory."""
    if entries_loads() != "tile":
        return None
    row_offsets = np.asarray(row_offsets, dtype=np.int64)
    src_offsets = np.asarray(src_offsets, dtype=np.int64)
    if len(row_offsets) != len(src_offsets) or len(row_offsets) < 2:
        return None
    mats = _padded(n_cells * (a if depthwise else a * b), itemsize)
    shared = (mats + int(np.diff(src_offsets).max()) * _padded(a, itemsize)) * itemsize
    if TILE_BY_LENGTH:  # the order: an int per row, rounded up to 16 bytes (tile_order_len)
        shared += -(-TILE_ROWS // 4) * 16
    if shared > be.max_shared_bytes():
        return None
    return max(1, -(-int(np.diff(row_offsets).max()) // TILE_ROWS)), shared


def _device_offsets(be, km, which: str):
    """km.offsets or km.query_offsets (which) as an int64 device array, cached on the map."""
    key = f"cuda_{which}"
    if key not in km._cache:
        km._cache[key] = be.to_device(np.ascontiguousarray(getattr(km, which), dtype=np.int64))
    return km._cache[key]


def _address(a) -> int:
    """The address of a's first element (a CuPy or, on the host emulation, a NumPy array)."""
    return int(a.data.ptr) if hasattr(a.data, "ptr") else int(a.ctypes.data)


def _thread_rows_launch(be, km, rows_by, splits, col, cell, counts, src, a, M, n_cells, b,
                        depthwise, bm, out, m_transposed: bool = False):
    """One thread per row, each entry's weight 1 / n_i(f) from its count, over rows split by
    cloud as km's `rows_by` offsets ("query_offsets": the map's rows, sources the points;
    "offsets": the transposed map's, sources the queries): conv_entries_tile where
    PWCONV_CUDA_ENTRIES_LOADS=tile asks and tile_plan allows, else conv_entries_thread.  The
    source rows padded to 16 bytes (_padded_rows) for their vector loads.  m_transposed: M is
    the weight (n_cells, b, a), read transposed by the kernel (the input gradient's W_f^T)."""
    src_by = "offsets" if rows_by == "query_offsets" else "query_offsets"
    dtype = src.dtype
    plan = tile_plan(be, getattr(km, rows_by), getattr(km, src_by), n_cells, a, b,
                     dtype.itemsize, depthwise)
    src, lda = _padded_rows(be, src, a)
    head = (splits, col, cell, counts, i32(1), src, i32(a), i32(lda), M,
            i32(1 if m_transposed else 0), i32(n_cells), i32(b), i32(1 if depthwise else 0))
    if plan is None:
        rows = int(splits.shape[0]) - 1
        be.launch(thread_name("conv_entries_thread", dtype, bm), (blocks(rows),), (THREADS,),
                  (i64(rows),) + head + (out,))
        return
    blocks_per_cloud, shared = plan
    n_clouds = len(km.offsets) - 1
    be.launch(thread_name("conv_entries_tile", dtype, bm), (n_clouds * blocks_per_cloud,),
              (TILE_THREADS,),
              head + (_device_offsets(be, km, rows_by), _device_offsets(be, km, src_by),
                      i64(blocks_per_cloud), i64(TILE_ROWS), i32(1 if TILE_BY_LENGTH else 0),
                      out), shared_mem=shared)


def _padded_rows(be, src, a: int):
    """(src, lda): the source rows 16-byte aligned, `lda` values apart -- src itself where it
    is already, else a copy by pad_rows."""
    xp = be.xp
    lda = _padded(a, src.dtype.itemsize)
    if lda != a or _address(src) % 16:
        n_src = int(src.shape[0])
        padded = xp.empty((n_src, lda), dtype=src.dtype)
        be.launch(conv_name("pad_rows", src.dtype), (blocks(n_src * lda),), (THREADS,),
                  (i64(n_src), i32(a), i32(lda), xp.ascontiguousarray(src), padded))
        src = padded
    return src, lda


def forward(be, km, x, w, c_out: int, depthwise: bool):
    """y (m, c_out) = sum_f mean_{Omega_i(f)} x . W_f (x (n, c_in), w C-contiguous)."""
    xp = be.xp
    m = km.n_queries
    n_cells = km.kernel_size ** 3
    c_in = int(x.shape[1])
    y = xp.empty((m, c_out), dtype=x.dtype)
    if m == 0:
        return y
    scheme = scheme_for(n_cells, c_in, c_out, x.dtype.itemsize)
    bm = _thread_bm(km, c_in, c_out, x.dtype.itemsize, depthwise) if scheme == "entries" else None
    if bm is not None:  # one thread per row (default), the clouds' rows in shared memory or not
        _thread_rows_launch(be, km, "query_offsets", km.splits, km.index, km.cell,
                            entry_counts(be, km), x, c_in, w, n_cells, c_out, depthwise, bm, y)
        return y
    if scheme == "entries":  # W as it is, (K^3, c_in, c_out): a row's lanes read along c_out
        _entries_launch(be, "conv_entries", x.dtype, m, km.splits, km.index, km.cell,
                        entry_weights(be, km, x.dtype), x, c_in, w, c_out, depthwise, y)
        return y
    if scheme == "rows":
        _rows_gather(be, x.dtype, m, km.splits, km.index, km.cell, None, n_cells, x, c_in, w,
                     c_out, depthwise, rows_plan(n_cells, c_in, c_out, x.dtype.itemsize), y)
        return y
    bc = by_cell(be, km)
    _gather(be, x.dtype, m, km.splits, bc["col"], bc["cell"], None, km.counts, n_cells, x, c_in,
            w, c_out, depthwise, y)
    return y


def backward_input(be, km, dy, w, c_in: int, depthwise: bool):
    """dx (n, c_in) = sum_i sum_{f: j in Omega_i(f)} dy_i W_f^T / n_i(f), a gather over the
    transposed map."""
    xp = be.xp
    n = km.n_points
    n_cells = km.kernel_size ** 3
    c_out = int(dy.shape[1])
    dx = xp.empty((n, c_in), dtype=dy.dtype)
    if n == 0:
        return dx
    scheme = scheme_for(n_cells, c_out, c_in, dy.dtype.itemsize)
    by_thread = scheme == "entries" and deterministic() and input_grad_mode() != "fixed"
    bm = _thread_bm(km, c_out, c_in, dy.dtype.itemsize, depthwise) if by_thread else None
    if bm is not None:  # one thread per row (default), over the transposed map's counts; W_f^T
        tc = transposed_counts(be, km)  # read from w by the kernel (no transposed copy)
        _thread_rows_launch(be, km, "offsets", tc["splits"], tc["row"], tc["cell"], tc["count"],
                            dy, c_out, w, n_cells, c_in, depthwise, bm, dx,
                            m_transposed=not depthwise)
        return dx
    if depthwise:
        M = w
    else:  # W_f^T: (K^3, c_out, c_in)
        M = xp.ascontiguousarray(w.reshape(n_cells, c_in, c_out).transpose(0, 2, 1))
    if scheme == "entries":  # M (K^3, c_out, c_in): a row's lanes read along c_in
        if not deterministic():  # opt-in: atomics straight over the map
            dx[...] = 0
            _entries_launch(be, "conv_entries_scatter", dy.dtype, km.n_queries, km.splits,
                            km.index, km.cell, entry_weights(be, km, dy.dtype), dy, c_out, M,
                            c_in, depthwise, dx)
            return dx
        if input_grad_mode() == "fixed":  # opt-in: integer atomics straight over the map
            _input_grad_fixed(be, km, dy, M, c_out, c_in, depthwise, dx)
            return dx
        tr = transposed_rows(be, km, dy.dtype)
        _entries_launch(be, "conv_entries", dy.dtype, n, tr["splits"], tr["row"], tr["cell"],
                        tr["weight"], dy, c_out, M, c_in, depthwise, dx)
        return dx
    if scheme == "rows":
        tr = transposed_rows(be, km, dy.dtype)
        _rows_gather(be, dy.dtype, n, tr["splits"], tr["row"], tr["cell"], tr["weight"], n_cells,
                     dy, c_out, M, c_in, depthwise,
                     rows_plan(n_cells, c_out, c_in, dy.dtype.itemsize), dx)
        return dx
    tb = transposed_by_cell(be, km)
    _gather(be, dy.dtype, n, tb["splits"], tb["row"], tb["cell"], tb["row"], km.counts, n_cells,
            dy, c_out, M, c_in, depthwise, dx)
    return dx


def _input_grad_fixed(be, km, dy, M, a: int, b: int, depthwise: bool, dx) -> None:
    """dx (n, b) = the "entries" input gradient in 64-bit fixed point (kernels.cu's
    fixed_bounds, conv_entries_fixed, fixed_to_float): a bound per point, every contribution
    rounded to the point's power-of-two grid and added by integer atomics, then scaled back.
    Deterministic without a transposed map; src = dy (m, a), M as conv_entries_scatter's."""
    xp = be.xp
    n, m = km.n_points, km.n_queries
    dtype = dy.dtype
    w = entry_weights(be, km, dtype)
    per_point = _per_point(be, km)
    wmax = xp.ascontiguousarray(xp.asarray(xp.abs(M).max(), dtype=dtype).reshape(1))
    bound = xp.zeros(n, dtype=xp.uint64)
    be.launch(conv_name("fixed_bounds", dtype), (blocks(m),), (THREADS,),
              (i64(m), km.splits, km.index, w, dy, i32(a), wmax, bound))
    acc = xp.zeros(n * b, dtype=xp.uint64)
    n_threads = -(-m // (32 // b)) * 32
    be.launch(rows_name("conv_entries_fixed", dtype, km.cell.dtype), (blocks(n_threads),),
              (THREADS,), (i64(m), km.splits, km.index, km.cell, w, dy, i32(a), M, i32(b),
                           i32(1 if depthwise else 0), bound, per_point, acc))
    be.launch(conv_name("fixed_to_float", dtype), (blocks(n * b),), (THREADS,),
              (i64(n), i32(b), acc, bound, per_point, dx))


def rows_per_partial(m: int, w_size: int, itemsize: int) -> int:
    """Rows per partial sum of the weight gradient: WEIGHT_BLOCK_ROWS, more when the partial sums
    of that many blocks would exceed PARTIAL_BYTES (partial_runs, with no other bound on the
    blocks)."""
    return partial_runs(m, WEIGHT_BLOCK_ROWS, max(1, m), w_size, itemsize)[0]


def backward_weight(be, km, x, dy, c_out: int, depthwise: bool):
    """dW (flat, weight.size) = sum_i mean_{Omega_i(f)}(x)^T dy_i, reduced in a fixed order."""
    xp = be.xp
    m = km.n_queries
    n_cells = km.kernel_size ** 3
    c_in = int(x.shape[1])
    w_size = n_cells * c_in if depthwise else n_cells * c_in * c_out
    if m == 0:
        return xp.zeros(w_size, dtype=x.dtype)
    dw = xp.empty(w_size, dtype=x.dtype)  # every value written by _sum_partials
    scheme = scheme_for(n_cells, c_in, c_out, x.dtype.itemsize, w_size)
    plan = rows_plan(n_cells, c_in, c_out, x.dtype.itemsize, w_size)
    mode = weight_grad_mode() if scheme == "entries" else None
    if mode == "chunks" and (
            chunks := chunks_plan(n_cells, c_in, c_out, depthwise, km.cell.dtype)) is not None:
        _weight_by_chunks(be, km, x, dy, c_in, c_out, depthwise, chunks, dw)
        return dw
    if mode == "warps" and (
            warps := warps_plan(n_cells, c_in, c_out, x.dtype.itemsize, depthwise)) is not None:
        _weight_by_warps(be, km, x, dy, c_in, c_out, depthwise, warps, dw)
        return dw
    if scheme == "entries" and (mode == "cells" or plan is None):
        _weight_by_cell_entries(be, km, x, dy, c_in, c_out, depthwise, dw)
        return dw
    rpb = rows_per_partial(m, w_size, x.dtype.itemsize)
    n_blocks = -(-m // rpb)
    partial = xp.empty(n_blocks * w_size, dtype=x.dtype)
    if scheme in ("rows", "entries"):  # entries: its weight gradient by rows (weight_grad_mode)
        group, per_block = plan
        be.launch(rows_name("conv_weight_rows", x.dtype, km.cell.dtype), (n_blocks,),
                  (per_block * group,),
                  (i64(m), km.splits, km.index, km.cell, i32(n_cells), x, i32(c_in), dy,
                   i32(c_out), i32(1 if depthwise else 0), i32(group), i64(rpb), partial))
        _sum_partials(be, n_blocks, w_size, partial, dw)
        return dw
    bc = by_cell(be, km)
    if depthwise:
        be.launch(conv_name("conv_weight_partial_depthwise", x.dtype),
                  (n_blocks, blocks(n_cells * c_in)), (THREADS,),
                  (i64(m), km.splits, bc["col"], bc["run_start"], km.counts, i32(n_cells), x,
                   i64(c_in), dy, i64(rpb), partial))
    else:
        co_tile = min(c_out, 32)
        ci_tile = min(c_in, THREADS // co_tile)
        n_co_tiles = -(-c_out // co_tile)
        n_ci_tiles = -(-c_in // ci_tile)
        be.launch(conv_name("conv_weight_partial_dense", x.dtype),
                  (n_blocks, n_cells, n_ci_tiles * n_co_tiles), (ci_tile * co_tile,),
                  (i64(m), km.splits, bc["col"], bc["run_start"], km.counts, i32(n_cells), x,
                   i64(c_in), dy, i64(c_out), i64(rpb), i32(ci_tile), i32(co_tile),
                   i64(n_co_tiles), partial))
    _sum_partials(be, n_blocks, w_size, partial, dw)
    return dw


def chunk_blocks(m: int, w_size: int, itemsize: int) -> tuple:
    """(blocks, chunks per block) of conv_weight_chunks over m rows: CHUNK_BLOCKS blocks at most
    (partial_runs over the chunks of CHUNK_ROWS rows)."""
    per_block, n_blocks = partial_runs(-(-m // CHUNK_ROWS), 1, CHUNK_BLOCKS, w_size, itemsize)
    return n_blocks, per_block


def _weight_by_chunks(be, km, x, dy, c_in, c_out, depthwise, plan, dw) -> None:
    """dw = conv_weight_chunks' block partials (each block's run of chunks of rows, every entry's
    product added by its (cell, input channel) thread in map order), then sum_partials in block
    order.  Each entry's weight 1 / n_i(f) made in the kernel from its count (entry_counts)."""
    bm, threads = plan
    m = km.n_queries
    n_cells = km.kernel_size ** 3
    w_size = int(dw.shape[0])
    n_blocks, per_block = chunk_blocks(m, w_size, x.dtype.itemsize)
    partial = be.xp.empty(n_blocks * w_size, dtype=x.dtype)
    be.launch(thread_name("conv_weight_chunks", x.dtype, bm), (n_blocks,), (threads,),
              (i64(m), km.splits, km.index, km.cell, entry_counts(be, km), i32(1), i32(n_cells),
               x, i32(c_in), dy, i32(c_out), i32(1 if depthwise else 0), i64(per_block), partial))
    _sum_partials(be, n_blocks, w_size, partial, dw)


def _weight_by_warps(be, km, x, dy, c_in, c_out, depthwise, warps: int, dw) -> None:
    """dw = conv_weight_warps' run partials (each warp's run of rows, entry by entry, in its
    own shared sums), then sum_partials in run order.  Each entry's weight 1 / n_i(f) made in
    the kernel from its count (entry_counts)."""
    m = km.n_queries
    n_cells = km.kernel_size ** 3
    w_size = int(dw.shape[0])
    itemsize = x.dtype.itemsize
    rows_per_run, n_runs = warp_runs(m, w_size, itemsize)
    partial = be.xp.empty(n_runs * w_size, dtype=x.dtype)
    be.launch(rows_name("conv_weight_warps", x.dtype, km.cell.dtype), (-(-n_runs // warps),),
              (32 * warps,),
              (i64(m), km.splits, km.index, km.cell, entry_counts(be, km), i32(1), i32(n_cells),
               x, i32(c_in), dy, i32(c_out), i32(1 if depthwise else 0), i64(rows_per_run),
               i64(n_runs), partial), shared_mem=warps * w_size * itemsize)
    _sum_partials(be, n_runs, w_size, partial, dw)


def _weight_by_cell_entries(be, km, x, dy, c_in, c_out, depthwise, dw) -> None:
    """dw = the weight gradient of the "entries" scheme: conv_weight_cells over fixed chunks of
    each cell's entries, then sum_partials adds each cell's chunks in chunk order."""
    xp = be.xp
    n_cells = km.kernel_size ** 3
    n_vals = c_in if depthwise else c_in * c_out
    ce = cell_entries(be, km, x.dtype)
    n_entries = int(ce["row"].shape[0])
    chunk = _cell_chunk(n_entries, n_cells, n_vals, x.dtype.itemsize)
    chunks = (xp.diff(ce["cell_splits"]) + (chunk - 1)) // chunk
    chunk_splits = xp.zeros(n_cells + 1, dtype=xp.int64)
    chunk_splits[1:] = xp.cumsum(chunks)
    max_chunks = n_entries // chunk + n_cells  # >= sum over f of ceil(n_f / chunk)
    partial = xp.empty(max_chunks * n_vals, dtype=x.dtype)
    be.launch(conv_name("conv_weight_cells", x.dtype), (max_chunks,), (THREADS,),
              (i32(n_cells), ce["cell_splits"], chunk_splits, i64(chunk), ce["row"], ce["col"],
               ce["weight"], x, i32(c_in), dy, i32(c_out), i32(1 if depthwise else 0), partial))
    _sum_partials(be, max_chunks, n_vals, partial, dw, group_splits=chunk_splits)


def _sum_partials(be, n_blocks: int, size: int, partial, dw, group_splits=None) -> None:
    """dw = the partial sums added in a fixed order (kernels.cu's sum_partials: 32 values and
    SUM_SLICES slices of the partials per block): all n_blocks partials of `size` values, or with
    group_splits (n_groups + 1,) the partials of each group g in [group_splits[g],
    group_splits[g + 1]) into dw[g * size:(g + 1) * size]."""
    grouped = group_splits is not None
    n_groups = int(group_splits.shape[0]) - 1 if grouped else 1
    splits = group_splits if grouped else be.xp.empty(0, dtype=be.xp.int64)  # unused then
    be.launch(conv_name("sum_partials", dw.dtype), (blocks(size, 32), n_groups),
              (32 * SUM_SLICES,),
              (i64(n_blocks), i32(1 if grouped else 0), splits, i64(size), partial, dw))
