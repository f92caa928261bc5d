"""The kernel map's loop families side by side: the paper workload's four kernel maps (128 sphere
clouds x 2,048 points, v = 0.1, K = 3, s = 1..4, grid built each time) and the real LiDAR tile's
map (v = 0.5 m, when the shared data is there), with the AVX-512, AVX2 and portable loops in
alternating rounds of one process.  Results are identical whichever runs (tests/test_neighbors.py).

    python benchmarks/simd_maps.py [--rounds 3] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C
import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args(argv)

    import pwconv_cy as pc
    from pwconv_cy import _core

    modes = (["avx512"] if _core.simd_state()[0] else []) + (
        ["avx2"] if _core.avx2_state()[0] else []) + ["portable"]
    sphere = C.sphere(128 * 2048, 0)
    offsets = np.arange(129, dtype=np.int64) * 2048
    workloads = {"paper maps (4)": lambda: [
        pc.NeighborIndex(sphere, 0.1, offsets=offsets).kernel_map(3, s) for s in (1, 2, 3, 4)]}
    try:
        tile = C.lidar_tile()
        workloads["LiDAR tile map"] = lambda: pc.kernel_map(tile, 0.5)
    except FileNotFoundError as exc:
        print(f"(LiDAR tile skipped: {exc})")

    def set_mode(mode):
        _core.set_simd(mode != "portable")
        _core.set_avx512(mode == "avx512")

    times = {(w, m): [] for w in workloads for m in modes}
    for _ in range(opts.rounds):
        for mode in modes:
            set_mode(mode)
            for name, fn in workloads.items():
                fn()  # warm-up
                runs = []
                for _ in range(opts.runs):
                    t0 = time.perf_counter()
                    fn()
                    runs.append(time.perf_counter() - t0)
                times[(name, mode)].append(statistics.median(runs))
    set_mode("avx512")
    record = {"machine": C.machine_info(), "modes": modes, "rounds": opts.rounds,
              "runs": opts.runs, "median_s_per_round": {f"{w} / {m}": v
                                                       for (w, m), v in times.items()}}
    rows = []
    for name in workloads:
        portable = statistics.median(times[(name, "portable")])
        for mode in modes:
            med = statistics.median(times[(name, mode)])
            rows.append([name, mode, " ".join(f"{t * 1e3:.0f}" for t in times[(name, mode)]),
                         f"{portable / med:.2f}x"])
    C.print_table(["workload", "loops", "ms per round", "vs portable"], rows)
    print("wrote", C.write_json("simd_maps", record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
