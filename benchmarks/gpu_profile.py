"""One iteration of the GPU paper workload (kernel maps, forward, backward; caches cleared) between
cudaProfilerStart / Stop, for Nsight Compute's ``--profile-from-start off``:

    ncu --profile-from-start off --csv --metrics gpu__time_duration.sum \
        python benchmarks/gpu_profile.py

Without a profiler it prints the iteration's wall time (CUDA events) and nothing else.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_paper_workload as wl


def main() -> int:
    import cupy

    from pwconv_cy import cuda

    n_clouds, n_points = 128, 2048
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

    for _ in range(3):
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


if __name__ == "__main__":
    sys.exit(main())
