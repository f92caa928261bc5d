"""Variants of the GPU kernel-map kernels, each in a fresh process, on the paper workload's four
kernel maps and the 1M-point sphere's map (timed; the maps must be identical to the first
variant's):

* ``none``: as shipped;
* ``N`` (a number): compiled with ``__launch_bounds__(128, N)`` (kernels.cu's
  PWCONV_CUDA_SEARCH_MIN_BLOCKS, given to NVRTC as -D): the register budget;
* ``qN`` (q256, q1024, q2048): kernel_map_tiled with N queries per block instead of 512
  (``_search.TILE_QUERIES``; 2048: one block per cloud and map for the paper's clouds);
* ``tbN`` (tb1, tb3, tb4): kernel_map_tiled compiled for N resident blocks per multiprocessor
  instead of 2 (PWCONV_CUDA_TILE_MIN_BLOCKS, -D): its register budget;
* ``k3``: the kernel size 3 compiled as a constant (PWCONV_CUDA_SPECIALISE_K=3, opt-in);
* ``two``: the maps by count + fill passes (PWCONV_CUDA_MAP_PASSES=two) instead of one pass;
* ``k3-two``: both;
* ``bN`` (b2, b4, b8): the grid rows of a query looked up N at a time (kernels.cu's
  PWCONV_CUDA_ROW_BATCH, given to NVRTC as -D; 1 shipped, b4 the default before 2026-11-27).

* ``rN`` (r8, r16): the maps' rows sorted into place by N threads per row instead of a warp
  (``_search.SORT_LANES``; benchmarks/sort_lanes_model.py: 8 lanes save 15 % of the warp steps
  on the paper's rows and make 2.2x the L1 passes);
* ``slots``: the grid's row table as (key, the row's cells) pairs, one load per probe
  (PWCONV_CUDA_ROW_SLOTS=1, opt-in);
* ``cF`` (c1.5, c2): the grid's cells F times the voxel's edge (``NeighborIndex(points,
  F * v)``; any cell size gives the same maps): fewer grid rows per query, more points per cell;
* ``tiles``, ``tiles2``, ``tiles3``: the one pass as kernel_map_tiled, each cloud's
  coordinates (with tiles2 its cells too, with tiles3 its grid rows too) in shared memory
  (PWCONV_CUDA_MAP_TILES=1, 2 or 3, opt-in; the 1M-point cloud is too big for it and keeps
  kernel_map_once);
* ``nonzero``: the grid's cells, rows and clouds' first cells by flatnonzero and a search
  (PWCONV_CUDA_GRID_BUILD=nonzero, the default before 2026-11-28) instead of one scan and one
  kernel (``scan``, the default; the maps timed here include the grid);
* ``sample``: the one pass's scratch sized from a count over a sample of the queries every time
  (PWCONV_CUDA_MAP_CAPACITY=sample, the default before 2026-11-28) instead of from the last
  maps of the kind (``last``, the default);
* several joined by ``+`` (``tiles+slots+k3``).

A variant may be named more than once: on the H200 the first process measured ran 5-10 %
slower than the same code later on, so compare variants alternated (``none b4 none b4``).

    python benchmarks/gpu_search_tuning.py            # none 6 8
    python benchmarks/gpu_search_tuning.py none k3 none k3 two b4
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


#: The variant words without a number (``none``: as shipped).
WORDS = ("none", "k3", "two", "slots", "tiles", "tiles2", "tiles3", "last", "scan", "sample",
         "nonzero")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_variant(parts) -> tuple[float, list]:
    """Sets up this process for the search variant's parts (switches, module settings, NVRTC
    -D options); returns (the grid's cell / voxel, the parts that are not search variants).
    Call before pwconv_cy.cuda compiles or searches anything."""
    if "k3" in parts:  # read when pwconv_cy.cuda is imported
        os.environ["PWCONV_CUDA_SPECIALISE_K"] = "3"
    if "two" in parts:
        os.environ["PWCONV_CUDA_MAP_PASSES"] = "two"
    if "slots" in parts:  # read when a grid is built
        os.environ["PWCONV_CUDA_ROW_SLOTS"] = "1"
    for mode in ("scan", "nonzero"):
        if mode in parts:  # read when a grid is built
            os.environ["PWCONV_CUDA_GRID_BUILD"] = mode
    for mode in ("last", "sample"):
        if mode in parts:  # read when a map is made
            os.environ["PWCONV_CUDA_MAP_CAPACITY"] = mode
    for mode, part in (("1", "tiles"), ("2", "tiles2"), ("3", "tiles3")):
        if part in parts:  # read when a map is made
            os.environ["PWCONV_CUDA_MAP_TILES"] = mode

    from pwconv_cy.cuda import _backend, _search

    defines = []
    factor = 1.0  # the grid's cell / voxel
    rest = []
    for part in parts:
        if part.isdigit():
            defines.append(f"-DPWCONV_CUDA_SEARCH_MIN_BLOCKS={part}")
        elif part[:1] == "q" and part[1:].isdigit():
            _search.TILE_QUERIES = int(part[1:])
        elif part[:2] == "tb" and part[2:].isdigit():
            defines.append(f"-DPWCONV_CUDA_TILE_MIN_BLOCKS={part[2:]}")
        elif part[:1] == "r" and part[1:].isdigit():
            _search.SORT_LANES = int(part[1:])
        elif part[:1] == "b" and part[1:].isdigit():
            defines.append(f"-DPWCONV_CUDA_ROW_BATCH={part[1:]}")
        elif part[:1] == "c" and _number(part[1:]):
            factor = float(part[1:])
        elif part not in WORDS:
            rest.append(part)
    if defines:
        _backend.compile_options = \
            lambda base=_backend.compile_options, extra=tuple(defines): base() + extra
    return factor, rest


def measure(variant: str) -> dict:
    parts = variant.replace("k3-two", "k3+two").split("+")
    factor, unknown = apply_variant(parts)
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}")
    import numpy as np

    sys.path.insert(0, str(HERE))
    import _common
    import cupy
    import gpu_paper_workload as wl

    from pwconv_cy import cuda
    from pwconv_cy.cuda import _backend

    n_clouds, big_n, warmup, runs = _common.gpu_sizes(128, wl.BIG_N, 3, 20)
    points = cupy.asarray(wl.sphere(n_clouds * 2048, 0))
    offsets = np.arange(n_clouds + 1, dtype=np.int64) * 2048
    big = cupy.asarray(wl.sphere(big_n, 1))
    big_voxel = wl.BIG_VOXEL * (wl.BIG_N / big_n) ** 0.5  # the same neighbour count
    cuda.compile_kernels()

    def maps():
        index = cuda.NeighborIndex(points, factor * wl.VOXEL, offsets=offsets)
        # the kernel's voxel given: the index's cell size (the variant's) only sets the speed
        return index.kernel_maps(wl.K, [s for _, _, s in wl.LAYERS], voxel_size=wl.VOXEL)

    def big_map():
        return big_index.kernel_map(wl.K, 1, voxel_size=big_voxel)

    digest = hashlib.sha256()
    big_index = cuda.NeighborIndex(big, factor * big_voxel)
    for km in maps() + [big_map()]:
        for a in (km.splits, km.index, km.cell):
            digest.update(cupy.asnumpy(a).tobytes())
    return {"variant": variant, "kernel": _backend.kernel_map_name(3, True),
            "paper_maps_ms": wl.time_cuda(maps, warmup, runs)["median_s"] * 1e3,
            "sphere_1m_map_ms": wl.time_cuda(big_map, min(warmup, 2), max(1, runs // 2))[
                "median_s"] * 1e3,
            "maps_sha256": digest.hexdigest()[:16]}


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(measure(argv[1])))
        return 0
    sys.path.insert(0, str(HERE))
    import _common

    return _common.run_variants(__file__, argv or ["none", "6", "8"], "maps_sha256", "maps")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
