"""Variants of the GPU kernel-map kernels, each in a fresh process, on the paper workload's four
kernel maps and the 1M-point sphere's map (timed; the maps must be identical to the first
variant's):

* ``none``: as shipped;
* ``N`` (a number): compiled with ``__launch_bounds__(128, N)`` (kernels.cu's
  PWCONV_CUDA_SEARCH_MIN_BLOCKS, given to NVRTC as -D): the register budget;
* ``k3``: the kernel size 3 compiled as a constant (PWCONV_CUDA_SPECIALISE_K=3, opt-in);
* ``two``: the maps by count + fill passes (PWCONV_CUDA_MAP_PASSES=two) instead of one pass;
* ``k3-two``: both;
* ``bN`` (b2, b4, b8): the grid rows of a query looked up N at a time (kernels.cu's
  PWCONV_CUDA_ROW_BATCH, given to NVRTC as -D; 1 shipped, b4 the default before 2026-11-27).

* ``rN`` (r8, r16): the maps' rows sorted into place by N threads per row instead of 32
  (``_search.SORT_LANES``).

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


def measure(variant: str) -> dict:
    if variant.startswith("k3"):  # read when pwconv_cy.cuda is imported
        os.environ["PWCONV_CUDA_SPECIALISE_K"] = "3"
    if variant.endswith("two"):
        os.environ["PWCONV_CUDA_MAP_PASSES"] = "two"
    import numpy as np

    sys.path.insert(0, str(HERE))
    import gpu_paper_workload as wl

    from pwconv_cy import cuda
    from pwconv_cy.cuda import _backend

    if variant.isdigit():
        base = _backend.compile_options
        _backend.compile_options = lambda: base() + (f"-DPWCONV_CUDA_SEARCH_MIN_BLOCKS={variant}",)
    if variant[:1] == "r" and variant[1:].isdigit():
        from pwconv_cy.cuda import _search

        _search.SORT_LANES = int(variant[1:])
    if variant[:1] == "b" and variant[1:].isdigit():
        base_b = _backend.compile_options
        _backend.compile_options = lambda: base_b() + (f"-DPWCONV_CUDA_ROW_BATCH={variant[1:]}",)
    import cupy

    points = cupy.asarray(wl.sphere(128 * 2048, 0))
    offsets = np.arange(129, dtype=np.int64) * 2048
    big = cupy.asarray(wl.sphere(wl.BIG_N, 1))
    cuda.compile_kernels()

    def maps():
        index = cuda.NeighborIndex(points, wl.VOXEL, offsets=offsets)
        return index.kernel_maps(wl.K, [s for _, _, s in wl.LAYERS])

    digest = hashlib.sha256()
    for km in maps() + [cuda.NeighborIndex(big, wl.BIG_VOXEL).kernel_map(wl.K, 1)]:
        for a in (km.splits, km.index, km.cell):
            digest.update(cupy.asnumpy(a).tobytes())
    big_index = cuda.NeighborIndex(big, wl.BIG_VOXEL)
    return {"variant": variant, "kernel": _backend.kernel_map_name(3, True),
            "paper_maps_ms": wl.time_cuda(maps, 3, 20)["median_s"] * 1e3,
            "sphere_1m_map_ms": wl.time_cuda(lambda: big_index.kernel_map(wl.K, 1), 2, 10)[
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
