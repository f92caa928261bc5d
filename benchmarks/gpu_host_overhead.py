"""The host's share of the GPU path: how long the Python side takes to issue one operator call.

On an H200 (2026-11-27 22:43) the paper workload's stages were bound by the host issuing them:
the backward's 3.85 ms took 3.32 ms of host time, and the issue's target (forward + backward at
least 4x faster than PyTorch's 4.3 ms) leaves about 0.14 ms per layer for everything, host
included.  This script times the host side of each of the paper's operator calls (the forward,
and the backward with its transposed map built fresh, as a training step builds it), as the
workload makes them: with a kernel map, checks off (``check_finite=False, check_map=False``).

* On a GPU: each call is timed from a synchronised start to its return, without waiting for its
  kernels (the host's issue time: validation, planning, CuPy's calls and launches).
* On the CuPy stand-in (``--standin``; tests/cupy_standin, no GPU needed): the kernels are not
  run (every launch returns at once), so the time is pwconv's Python and the stand-in's
  NumPy-backed array calls on small arrays: close to what the Python side costs on a GPU
  machine's host, minus CuPy's own per-call cost, which the counts of launches and array calls
  (printed beside) say how many of there are.

Prints a table and writes ``$OUT/gpu_host_overhead.json`` when $OUT is set, else
``benchmarks/results/gpu_host_overhead.json``.

    python benchmarks/gpu_host_overhead.py              # on a GPU
    python benchmarks/gpu_host_overhead.py --standin    # anywhere (builds the emulator, ~1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
STANDIN = TESTS / "cupy_standin"


def _results_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_host_overhead.json" if out else \
        HERE / "results" / "gpu_host_overhead.json"


def measure(clouds: int, points: int, runs: int, profile: bool = False) -> dict:
    """Median host microseconds per call of each layer's forward and backward, and the calls
    each makes (on the stand-in: launches, array-library calls)."""
    sys.path.insert(0, str(HERE))
    import cupy
    import gpu_paper_workload as g

    from pwconv_cy import cuda
    from pwconv_cy.cuda import ENTRY_COUNTS_KEY

    standin = hasattr(cupy, "tally")
    rng = np.random.default_rng(0)
    pts = np.concatenate([g.sphere(points, 100 + c) for c in range(clouds)]).astype(np.float32)
    offsets = np.arange(clouds + 1, dtype=np.int64) * points
    weights = [cupy.asarray(g.glorot(rng, ci, co).astype(np.float32)) for ci, co, _ in g.LAYERS]
    points_d = cupy.asarray(pts)
    kms = cuda.NeighborIndex(points_d, g.VOXEL, offsets=offsets).kernel_maps(
        g.K, [s for _, _, s in g.LAYERS])
    feats = [points_d] + [cupy.asarray(rng.standard_normal((len(pts), co)).astype(np.float32))
                          for _, co, _ in g.LAYERS]
    grads = [cupy.asarray(rng.standard_normal((len(pts), co)).astype(np.float32))
             for _, co, _ in g.LAYERS]
    if standin:  # from here on the kernels are not run: the host's part alone
        def counted(self, *args, **kwargs):
            cupy.tally[f"launch:{self.name}"] += 1

        cupy.RawKernel.__call__ = counted
    off = {"check_finite": False, "check_map": False}

    def forward(i):
        km = kms[i]
        for key in [k for k in km._cache if k != ENTRY_COUNTS_KEY]:
            del km._cache[key]  # what the forward derives from a map, built per batch
        return cuda.pointwise_conv(points_d, feats[i], weights[i], g.VOXEL,
                                   dilation=g.LAYERS[i][2], offsets=offsets, kernel_map=km, **off)

    def backward(i):
        km = kms[i]
        for key in [k for k in km._cache if k != ENTRY_COUNTS_KEY]:
            del km._cache[key]  # the transposed map too: built per batch
        return cuda.pointwise_conv_backward(grads[i], points_d, feats[i], weights[i], g.VOXEL,
                                            dilation=g.LAYERS[i][2], offsets=offsets,
                                            kernel_map=km, feats_grad=i > 0, **off)

    def timed(fn):
        times = []
        for k in range(runs + 5):
            if not standin:
                cupy.cuda.get_current_stream().synchronize()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if k >= 5:
                times.append(dt)
        if not standin:
            cupy.cuda.get_current_stream().synchronize()
        return statistics.median(times) * 1e6

    def calls(fn):
        if not standin:
            return None
        cupy.tally.clear()
        fn()
        launches = sum(v for k, v in cupy.tally.items() if k.startswith("launch:"))
        library = sum(v for k, v in cupy.tally.items() if k.startswith("library:"))
        return {"launches": launches, "array_calls": library, "to_host": cupy.tally["to_host"]}

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    rows = []
    for i, (c_in, c_out, s) in enumerate(g.LAYERS):
        for stage, fn in (("forward", forward), ("backward", backward)):
            rows.append({"layer": i + 1, "c_in": c_in, "c_out": c_out, "dilation": s,
                         "stage": stage, "host_us": timed(lambda fn=fn, i=i: fn(i)),
                         "calls": calls(lambda fn=fn, i=i: fn(i))})
    if profiler is not None:
        profiler.disable()
        _print_profile(profiler)
    return {"standin": standin, "clouds": clouds, "points_per_cloud": points, "runs": runs,
            "rows": rows}


def _print_profile(profiler, top: int = 30) -> None:
    """pwconv's functions by their own time (cProfile's, which inflates small functions)."""
    import pstats

    stats = pstats.Stats(profiler).stats
    mine = sorted(((tt, nc, ct, f"{Path(file).name}:{line} {name}")
                   for (file, line, name), (_, nc, tt, ct, _) in stats.items()
                   if "pwconv_cy" in file), reverse=True)
    total = sum(tt for (_, _, tt, _, _) in stats.values())
    print(f"cProfile: {sum(row[0] for row in mine) / total:.0%} of the time in pwconv_cy's "
          "own code; its functions by own time (and with what they call):")
    for tt, nc, ct, where in mine[:top]:
        print(f"  {tt * 1e3:8.1f} ms {ct * 1e3:8.1f} ms {nc:7d} calls  {where}")


def _standin_env(tmp: Path) -> dict:
    env = dict(os.environ)
    if not env.get("CUPY_STANDIN_EMULATOR"):
        sys.path.insert(0, str(TESTS))
        import test_cuda

        env["CUPY_STANDIN_EMULATOR"] = str(test_cuda.build_emulator(tmp))
    env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), str(HERE)] +
                                        [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("CUPY_STANDIN_DEVICES", "1")
    for name in list(env):  # the defaults, whatever the calling shell selects
        if name.startswith("PWCONV_CUDA_"):
            del env[name]
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--standin", action="store_true",
                        help="run on the CuPy stand-in (no GPU; kernels not run)")
    parser.add_argument("--clouds", type=int, default=None,
                        help="clouds (default: 128 on a GPU, 4 on the stand-in)")
    parser.add_argument("--points", type=int, default=None,
                        help="points per cloud (default: 2048 on a GPU, 256 on the stand-in)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="also print pwconv's functions by their own time (cProfile)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    clouds = args.clouds or (4 if args.standin else 128)
    points = args.points or (256 if args.standin else 2048)
    if args.standin and not args.child:
        with tempfile.TemporaryDirectory(prefix="pwconv_host_") as tmp:
            cmd = [sys.executable, __file__, "--standin", "--child", "--clouds", str(clouds),
                   "--points", str(points), "--runs", str(args.runs)] + \
                (["--profile"] if args.profile else [])
            return subprocess.run(cmd, env=_standin_env(Path(tmp)), check=False).returncode
    sys.path.insert(0, str(HERE))
    from _common import machine_info

    record = measure(clouds, points, args.runs, args.profile)
    record["machine"] = machine_info()
    where = "CuPy stand-in, kernels not run" if record["standin"] else "GPU, issue time"
    print(f"host time per operator call ({where}; {clouds} x {points} points, median of "
          f"{args.runs}):")
    print(f"{'layer':>5} {'stage':>9} {'host us':>8}  calls")
    for row in record["rows"]:
        c = row["calls"]
        calls = "" if c is None else \
            f"{c['launches']} launches, {c['array_calls']} array calls, {c['to_host']} to host"
        print(f"{row['layer']:>5} {row['stage']:>9} {row['host_us']:8.1f}  {calls}")
    total = sum(r["host_us"] for r in record["rows"])
    record["total_us"] = total
    print(f"all eight calls: {total:.0f} us")
    path = _results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
