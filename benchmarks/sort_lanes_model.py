"""How many threads a row ``sort_rows_by_rank`` should take: a model on real row lengths (CPU).

``sort_rows_by_rank`` (kernels.cu) sorts short rows in place by rank: ``lanes`` threads per row,
lane i taking keys i, i + lanes, ..., and for each of them one loop step per key of the row (the
row's L keys read at one address by all its lanes).  A row of L keys costs ceil(L / lanes) * L
steps; a warp holds 32 / lanes rows and issues as many steps as its slowest row; each step of
the warp loads one key for every row still going, so a warp step costs one L1 pass per distinct
128-byte line those keys sit on.  Two figures per row, for lanes = 4, 8, 16, 32:

* warp steps (issue slots) -- fewer with more rows a warp, until the rows' unequal lengths (the
  warp waits for its longest) eat the gain;
* L1 passes (distinct lines loaded per warp step, summed) -- more with more rows a warp.

The same unequal lengths cost the operator's kernels, which take a step per entry of a row: the
script also prints their warp steps over the ideal, in map order and with conv_entries_tile's
order (each block's rows longest first).

The GPU sorts two kinds of rows with it, whose lengths the CPU library gives exactly (its maps
equal the GPU's): the kernel maps' rows (one per query and map, read from the one-pass search's
scratch, where a warp's rows need not be neighbours: counted as a line per row and step) and,
with PWCONV_CUDA_TRANSPOSE=rank, the transposed map's per-point segments (contiguous).

Datasets: the paper workload's sphere clouds (2,048 points, v = 0.1, K = 3, s = 1-4) and, where
../shared/data is present, ModelNet40 shapes (1,024 points, v = 0.1).

    python benchmarks/sort_lanes_model.py                # a few seconds
    python benchmarks/sort_lanes_model.py --clouds 64
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

K = 3
LANES = (4, 8, 16, 32)
LINE_KEYS = 16  # int64 keys per 128-byte line
TILE_BUCKETS = 64  # conv_entries_tile's length classes (kernels.cu's PWCONV_CUDA_TILE_BUCKETS)
TILE_ROWS = 1024  # its rows per block (_conv.TILE_ROWS)


def sort_cost(lengths, lanes: int, bases=None) -> tuple[float, float]:
    """(warp steps, L1 passes) per row of sort_rows_by_rank over rows of `lengths` (in the
    kernel's row order) at `lanes` threads a row (a power of two up to 32).  `bases`: each row's
    first key's position (keys contiguous from there: lines shared between a warp's rows are
    counted once); None: every row on lines of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    m = len(lengths)
    if m == 0:
        return 0.0, 0.0
    if lanes < 1 or 32 % lanes:
        raise ValueError(f"lanes must divide 32, got {lanes}")
    rows_per_warp = 32 // lanes
    warp = np.arange(m) // rows_per_warp
    outer = -(-lengths // lanes)
    steps = outer * lengths
    starts = np.flatnonzero(np.r_[True, warp[1:] != warp[:-1]])
    warp_steps = np.maximum.reduceat(steps, starts).sum()
    # every (row, outer iteration, key j) a row's lanes load together: one load, at key j
    row = np.repeat(np.arange(m), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    k = np.arange(row.shape[0]) - first
    j = k % lengths[row]
    o = k // lengths[row]
    if bases is None:
        line = row  # a line (or more) of its own: no sharing between rows
    else:
        line = (np.asarray(bases, dtype=np.int64)[row] + j) // LINE_KEYS
    step_id = (o * (int(lengths.max()) + 1) + j)  # the warp's step
    keys = np.stack([warp[row], step_id, line])
    order = np.lexsort(keys[::-1])
    keys = keys[:, order]
    distinct = 1 + int(np.count_nonzero(np.any(keys[:, 1:] != keys[:, :-1], axis=0)))
    return warp_steps / m, distinct / m


def warp_overhead(lengths, rows_per_warp: int, block_rows: int = 0) -> float:
    """Warp steps over the ideal for a kernel giving each row rows_per_warp-th of a warp and a
    step per entry (conv_entries: 3 rows a warp; conv_entries_thread and _tile: 32): the sum
    over warps of rows_per_warp x their longest row, over the rows' entries.  With block_rows,
    each block of that many consecutive rows takes its rows longest first (conv_entries_tile's
    order, its length classes capped at TILE_BUCKETS - 1 entries) before they fill warps."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.sum() == 0:
        return 1.0
    if block_rows:
        key = np.minimum(lengths, TILE_BUCKETS - 1)
        block = np.arange(len(lengths)) // block_rows
        lengths = lengths[np.lexsort((-key, block))]  # blocks in order, longest class first
        block = np.arange(len(lengths)) // block_rows
        warp = block * (-(-block_rows // rows_per_warp)) + \
            (np.arange(len(lengths)) % block_rows) // rows_per_warp
    else:
        warp = np.arange(len(lengths)) // rows_per_warp
    starts = np.flatnonzero(np.r_[True, warp[1:] != warp[:-1]])
    return float(np.maximum.reduceat(lengths, starts).sum() * rows_per_warp / lengths.sum())


def map_rows(clouds, v: float, dilations) -> tuple[list, list]:
    """(maps' row lengths, map after map, as the one sort of kernel_maps_arrays has them; each
    map's per-point segment lengths, for the rank transposition)."""
    import pwconv_cy

    points = np.concatenate(clouds)
    offsets = np.r_[0, np.cumsum([len(c) for c in clouds])].astype(np.int64)
    rows, segments = [], []
    for s in dilations:
        km = pwconv_cy.kernel_map(points, v, kernel_size=K, dilation=s, offsets=offsets)
        rows.append(np.diff(km.splits))
        segments.append(np.bincount(km.index, minlength=len(points)))
    return rows, segments


def datasets(rng, n_clouds: int):
    """(name, clouds, voxel size, dilations)."""
    p = rng.standard_normal((n_clouds * 2048, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    yield "sphere clouds, 2,048 points (paper workload)", np.split(p, n_clouds), 0.1, (1, 2, 3, 4)
    import _common

    shapes = _common.modelnet_train_shapes(2 * n_clouds)
    if shapes is not None:
        yield f"ModelNet40 shapes, 1,024 points ({len(shapes)} of the train split)", \
            list(shapes), 0.1, (1, 2, 3, 4)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clouds", type=int, default=16, help="sphere clouds (2,048 points)")
    opts = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for name, clouds, v, dilations in datasets(rng, opts.clouds):
        rows, segments = map_rows(clouds, v, dilations)
        all_rows = np.concatenate(rows)
        print(f"\n{name}, v = {v}, K = {K}, s = {dilations}")
        print("row lengths by map: " + "; ".join(
            f"s={s}: mean {r.mean():.1f}, p10-p90 {np.percentile(r, 10):.0f}-"
            f"{np.percentile(r, 90):.0f}, max {r.max()}" for s, r in zip(dilations, rows)))
        print(f"{'lanes':>6}{'maps: warp steps':>20}{'L1 passes':>12}"
              f"{'transposed: warp steps':>26}{'L1 passes':>12}   (per row / segment)")
        for lanes in LANES:
            steps, passes = sort_cost(all_rows, lanes)
            t_steps = t_passes = 0.0
            for seg in segments:  # one rank sort per map, segments contiguous
                st, pa = sort_cost(seg, lanes, bases=np.cumsum(seg) - seg)
                t_steps += st * len(seg)
                t_passes += pa * len(seg)
            n_seg = sum(len(seg) for seg in segments)
            print(f"{lanes:>6}{steps:>20.2f}{passes:>12.2f}{t_steps / n_seg:>26.2f}"
                  f"{t_passes / n_seg:>12.2f}")
        print("the operator's warps, steps over the ideal (a warp waits for its longest row): "
              "forward rows / input-gradient segments")
        for label, rpw, block in (("conv_entries (3 rows a warp)", 3, 0),
                                  ("one thread a row, map order", 32, 0),
                                  (f"one thread a row, blocks of {TILE_ROWS} longest first",
                                   32, TILE_ROWS)):
            print(f"  {label:<48}" + "  ".join(
                f"s={s}: {warp_overhead(r, rpw, block):.2f} / {warp_overhead(g, rpw, block):.2f}"
                for s, r, g in zip(dilations, rows, segments)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
