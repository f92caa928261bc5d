"""Variants of the GPU operator's "entries" kernels, each in a fresh process, on the paper
workload's four layers: the forward, input-gradient and weight-gradient kernels timed per layer
(CUDA events), the forward and input gradient required identical to the first variant's (the
variants change the schedule of the loads, not the arithmetic; the weight gradient's variants
change its order of additions, so its bits are not compared):

* ``none``: as shipped;
* ``uN`` (e.g. ``u2``): conv_entries' loop over a row unrolled N entries at a time (kernels.cu's
  PWCONV_CUDA_ENTRIES_UNROLL, given to NVRTC as -D; 4 shipped, 2 before 2026-11-27);
* ``broadcast``: a row's lanes each loading every value (PWCONV_CUDA_ENTRIES_LOADS=broadcast:
  conv_entries, the default before 2026-11-28) instead of one thread per row forming all its
  outputs, the cell matrices in shared memory (``thread``, the default: conv_entries_thread);
* ``tile``: as ``thread``, each cloud's source rows in shared memory too
  (PWCONV_CUDA_ENTRIES_LOADS=tile: conv_entries_tile), a block's rows taken longest first;
* ``inorder``: with ``tile``, a block's rows taken in map order (``_conv.TILE_BY_LENGTH``
  False);
* ``chunks``: the weight gradient by chunks of rows sorted by cell in shared memory
  (PWCONV_CUDA_WEIGHT_GRAD=chunks: conv_weight_chunks);
* ``warps``: the weight gradient by warps, each a run of rows entry by entry into its own
  sums in shared memory (PWCONV_CUDA_WEIGHT_GRAD=warps: conv_weight_warps);
* ``sort``: the transposed map (timed per layer with every variant) by one radix sort
  (PWCONV_CUDA_TRANSPOSE=sort, the default before 2026-11-28) instead of per-point sorts
  (``rank``, the default);
* several joined by ``+`` (``broadcast+sort``: the defaults before 2026-11-28).

A variant may be named more than once: on the H200 the first process measured ran 5-10 %
slower than the same code later on, so compare variants alternated (``u2 none u2 none``).

    python benchmarks/gpu_conv_tuning.py     # none broadcast+sort none broadcast+sort
    python benchmarks/gpu_conv_tuning.py none u1 none u8
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def apply_variant(parts) -> list:
    """Sets up this process for the operator variant's parts (switches, module settings, NVRTC
    -D options); returns the parts that are not operator variants."""
    import os

    from pwconv_cy.cuda import _backend, _conv

    rest = []
    for part in parts:
        if part in ("broadcast", "thread", "tile"):
            os.environ[_conv.ENTRIES_LOADS_ENV] = part
        elif part == "inorder":
            _conv.TILE_BY_LENGTH = False
        elif part in ("chunks", "warps"):
            os.environ[_conv.WEIGHT_GRAD_ENV] = part
        elif part in ("rank", "sort"):
            os.environ[_conv.TRANSPOSE_ENV] = part
        elif part[:1] == "u" and part[1:].isdigit():
            define = f"-DPWCONV_CUDA_ENTRIES_UNROLL={int(part[1:])}"
            _backend.compile_options = \
                lambda base=_backend.compile_options, define=define: base() + (define,)
        elif part != "none":
            rest.append(part)
    return rest


def measure(variant: str) -> dict:
    import numpy as np

    sys.path.insert(0, str(HERE))
    import gpu_paper_workload as wl

    from pwconv_cy import cuda
    from pwconv_cy.cuda import _conv
    from pwconv_cy.cuda._backend import get_backend

    unknown = apply_variant(variant.split("+"))
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}")
    import _common
    import cupy

    n_clouds, _, warmup, runs = _common.gpu_sizes(128, 0, 3, 20)
    n_points = 2048
    points = cupy.asarray(wl.sphere(n_clouds * n_points, 0))
    offsets = np.arange(n_clouds + 1, dtype=np.int64) * n_points
    cuda.compile_kernels()
    be = get_backend()
    rng = np.random.default_rng(1)
    index = cuda.NeighborIndex(points, wl.VOXEL, offsets=offsets)
    kms = index.kernel_maps(wl.K, [s for _, _, s in wl.LAYERS])
    digest = hashlib.sha256()
    out = {"variant": variant}
    for (c_in, c_out, s), km in zip(wl.LAYERS, kms):
        x = cupy.asarray(rng.standard_normal((n_clouds * n_points, c_in)).astype(np.float32))
        w = cupy.asarray(wl.glorot(rng, c_in, c_out))
        dy = cupy.asarray(rng.standard_normal((n_clouds * n_points, c_out)).astype(np.float32))
        y = _conv.forward(be, km, x, w, c_out, False)  # caches the weights, transposed map
        dx = _conv.backward_input(be, km, dy, w, c_in, False)
        for a in (y, dx):
            digest.update(cupy.asnumpy(a).tobytes())
        tag = f"s{s}"
        out[f"{tag}_forward_us"] = wl.time_cuda(
            lambda km=km, x=x, w=w, c_out=c_out: _conv.forward(be, km, x, w, c_out, False),
            warmup, runs)["median_s"] * 1e6
        out[f"{tag}_input_grad_us"] = wl.time_cuda(
            lambda km=km, dy=dy, w=w, c_in=c_in: _conv.backward_input(be, km, dy, w, c_in, False),
            warmup, runs)["median_s"] * 1e6

        def fresh_transposed(km=km):
            km._cache.pop("cuda_transposed_rows_float32", None)
            _conv.transposed_rows(be, km, cupy.float32)

        out[f"{tag}_transposed_us"] = wl.time_cuda(fresh_transposed, warmup, runs)[
            "median_s"] * 1e6
        out[f"{tag}_weight_grad_us"] = wl.time_cuda(
            lambda km=km, x=x, dy=dy, c_out=c_out: _conv.backward_weight(be, km, x, dy, c_out,
                                                                         False),
            warmup, runs)["median_s"] * 1e6
    out["results_sha256"] = digest.hexdigest()[:16]
    return out


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(measure(argv[1])))
        return 0
    sys.path.insert(0, str(HERE))
    import _common

    return _common.run_variants(
        __file__, argv or ["none", "broadcast+sort", "none", "broadcast+sort"],
        "results_sha256", "results")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
