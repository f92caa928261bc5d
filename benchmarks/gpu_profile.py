"""One iteration of the GPU paper workload (kernel maps, forward, backward; caches cleared) between
cudaProfilerStart / Stop, for Nsight Compute's ``--profile-from-start off``, and a table of the
kernel time it recorded:

    ncu --profile-from-start off --csv --metrics gpu__time_duration.sum \
        python benchmarks/gpu_profile.py > kernels.csv
    python benchmarks/gpu_profile.py --table kernels.csv

Without a profiler the first command prints the iteration's wall time (CUDA events) only.
``--opt-ins`` runs the iteration with every opt-in written for speed and not yet adopted
(OPT_INS: the maps' search with each cloud's coordinates, cells and grid rows in shared memory;
the operator's one thread per row with each cloud's source rows in shared memory, its weight
gradient by warps), so that ncu shows them kernel by kernel beside the defaults.
"""
from __future__ import annotations

import collections
import csv
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import gpu_paper_workload as wl

#: The opt-ins of --opt-ins: environment variables (the modes are read at every call).
OPT_INS = {"PWCONV_CUDA_MAP_TILES": "3", "PWCONV_CUDA_ENTRIES_LOADS": "tile",
           "PWCONV_CUDA_WEIGHT_GRAD": "warps"}


def main(argv=None) -> int:
    import cupy

    from pwconv_cy import cuda

    argv = sys.argv[1:] if argv is None else argv
    if "--opt-ins" in argv:
        os.environ.update(OPT_INS)
        print("opt-ins:", OPT_INS)

    n_clouds, _, warmup, _ = _common.gpu_sizes(128, 0, 3, 1)
    n_points = 2048
    points = wl.sphere(n_clouds * n_points, 0)
    offsets = np.arange(n_clouds + 1, dtype=np.int64) * n_points
    rng = np.random.default_rng(1)
    weights = [wl.glorot(rng, c_in, c_out) for c_in, c_out, _ in wl.LAYERS]
    grad = rng.standard_normal((points.shape[0], sum(c for _, c, _ in wl.LAYERS)))
    cuda.compile_kernels()
    pw = wl.PwconvGPU(points, offsets, weights, grad.astype(np.float32))

    def iteration():
        kms = pw.kernel_maps()
        xs, zs = pw.forward(kms)
        pw.backward(kms, xs, zs)

    for _ in range(warmup):  # warm-up (with MAP_CAPACITY=last: the sampled first maps too)
        iteration()
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.cuda.runtime.profilerStart()
    start.record()
    iteration()
    end.record()
    end.synchronize()
    cupy.cuda.runtime.profilerStop()
    print(f"iteration: {cupy.cuda.get_elapsed_time(start, end):.2f} ms (wall, CUDA events)")
    return 0


_NS_PER_UNIT = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}


def kernel_table(csv_path: str, top: int = 30) -> str:
    """Total GPU time per kernel name (calls, microseconds), largest first, from ncu's --csv
    output of gpu__time_duration.sum."""
    header, per_kernel = None, collections.defaultdict(lambda: [0, 0.0])
    with open(csv_path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "ID":
                header = row
                continue
            if header is None or len(row) != len(header):
                continue  # the profiled program's own output
            rec = dict(zip(header, row))
            if rec["Metric Name"] != "gpu__time_duration.sum":
                continue
            ns = float(rec["Metric Value"].replace(",", "")) * _NS_PER_UNIT[rec["Metric Unit"]]
            entry = per_kernel[rec["Kernel Name"].split("(")[0][:64]]
            entry[0] += 1
            entry[1] += ns / 1e3
    total = sum(us for _, us in per_kernel.values())
    lines = [f"{sum(n for n, _ in per_kernel.values())} kernels, {total / 1e3:.2f} ms of GPU time"]
    for name, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{us:9.1f} us {n:4d}x  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(kernel_table(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
