"""The GPU kernels' memory requests, counted without a GPU: an L1 load model of every kernel of
the paper workload's iteration (grid + four maps, forward, backward), per variant.

The kernels run on the host emulation of kernels.cu (tests/test_cuda.py) in its counting build
(``build_emulator(count=True)``: every load and store the compiler instruments is grouped as a
warp issues it -- the 32 lanes' accesses at one instruction and its k-th execution -- and costed
as an H100/H200 L1 serves it):

* global memory (the kernels' array arguments): requests, 32-byte sectors, 128-byte lines;
* shared memory: wavefronts (the most distinct 4-byte words any of the 32 banks is asked for);
* local memory (a thread's dynamically indexed arrays): lines, in the GPU's interleaved layout.

A kernel's **L1 wavefronts** are its global lines + shared wavefronts, loads and stores, and
apart, its local lines (which arrays live in memory is the compiler's choice: g++'s here, at -O2,
nvcc's on a GPU).  An SM's L1 serves about one wavefront a cycle, so wavefronts / (SMs x clock)
bounds the kernel's time from below where its loads are what limits it (benchmarks/RESULTS.md, "A load model of the
shipped operator kernels", made this count by hand for two kernels; here it is made for all).
Counted on ``--clouds`` clouds of the benchmark's workload and scaled to its 128.  What the model
does not see: latency (dependent loads, occupancy), arithmetic, L2 and DRAM, launch gaps, and
where g++ keeps in registers what nvcc puts in local memory (or the other way round).  So it
ranks variants by the work their loads make, and says which kernels load the most; only a GPU
says how long they take.  ``gpu_check.sh``'s ncu steps measure the same quantities
(l1tex__t_requests / sectors / data_pipe_lsu_wavefronts) on the GPU.

Variants: the words of gpu_search_tuning.py (``tiles3``, ``slots``, ``r8``, ...) and of
gpu_conv_tuning.py (``thread``, ``tile``, ``chunks``, ``rank``, ...), joined by ``+``; each
runs in a fresh process.  Writes ``$OUT/gpu_load_model.json`` (else benchmarks/results/).
About a minute per variant on one cloud.  ``--gpu`` runs one variant's iteration on a GPU instead,
counting nothing, for ncu to measure what was counted here (gpu_check.sh, ``load_model_ncu``).

    python benchmarks/gpu_load_model.py                         # the default variants
    python benchmarks/gpu_load_model.py none tiles3+tile+warps --clouds 1
    ncu --section MemoryWorkloadAnalysis_Tables python benchmarks/gpu_load_model.py --gpu none
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
STANDIN = TESTS / "cupy_standin"

#: The paper workload's clouds (gpu_paper_workload.py): the counts are scaled to them.
PAPER_CLOUDS = 128
#: An H200's (and H100 SXM's) multiprocessors and boost clock: one L1 wavefront per SM a cycle.
SMS = 132
CLOCK_HZ = 1.98e9
#: The variants by default: as shipped, the defaults before 2026-11-28 (broadcast+sort) and the
#: opt-ins gpu_check.sh times.
DEFAULT_VARIANTS = ("none", "broadcast+sort", "tiles3", "tiles2+slots", "r8", "chunks",
                    "warps", "tile+chunks")
#: The source lines kept per kernel (those with the most wavefronts).
SITES_KEPT = 12
#: EmulatedBackend.memory's axes (test_cuda.MEMORY_COUNT_SHAPE).
SPACES = ("global", "shared", "local")
FIELDS = ("requests", "sectors", "lines", "wavefronts", "bytes")


def wavefronts(counts: np.ndarray) -> tuple[int, int]:
    """L1 wavefronts of a (3, 2, 5) count, loads and stores: (global lines + shared wavefronts,
    local lines)."""
    return (int(counts[0, :, 2].sum() + counts[1, :, 3].sum()), int(counts[2, :, 2].sum()))


def predicted_us(waves: float, scale: float) -> float:
    """The wavefronts' lower bound on time at one per SM a cycle, scaled to the paper's clouds."""
    return waves * scale / (SMS * CLOCK_HZ) * 1e6


# --- the child: one variant in a fresh process ----------------------------------------------


def _memory_total(cupy) -> tuple[dict, dict]:
    """Every emulator's counts so far, by kernel (the stand-in builds one per set of -D
    options), and where in kernels.cu they come from, then cleared: ({kernel: counts},
    {kernel: {(file:line, space, store): [requests, wavefronts]}})."""
    total: dict = {}
    sites: dict = {}
    for backend in cupy._emulators.values():
        for name, counts in backend.memory.items():
            total[name] = total.get(name, 0) + counts
        lib = backend.lib._name
        for name, by_pc in backend.sites.items():
            pcs = sorted({pc for pc, _, _ in by_pc})
            where = dict(zip(pcs, _source_lines(lib, pcs)))
            mine = sites.setdefault(name, {})
            for (pc, space, store), (requests, waves) in by_pc.items():
                cell = mine.setdefault((where[pc], space, store), [0, 0])
                cell[0] += requests
                cell[1] += waves
        backend.memory.clear()
        backend.sites.clear()
    return total, sites


def _source_lines(lib: str, pcs) -> list:
    """file:line (the file's name alone) of each access's return address in the library."""
    if not pcs:
        return []
    try:
        out = subprocess.run(["addr2line", "-e", lib, *(hex(pc - 1) for pc in pcs)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [hex(pc) for pc in pcs]
    lines = out.splitlines()
    if len(lines) != len(pcs):
        return [hex(pc) for pc in pcs]
    # the counting build compiles kernels_unrolled.cu, kernels.cu line for line
    return [Path(line.split(":")[0]).name.replace("kernels_unrolled.cu", "kernels.cu") + ":" +
            line.rsplit(":", 1)[-1].split()[0] if ":" in line else line for line in lines]


def count(variant: str, clouds: int, points_per_cloud: int, counting: bool = True) -> dict:
    """Runs the iteration once under `variant` on the counting emulator; the counts by stage
    and kernel (lists of MEMORY_COUNT_SHAPE).  counting=False: on whatever CuPy is imported (a
    GPU's, under ncu), counting nothing."""
    sys.path.insert(0, str(HERE))
    import gpu_conv_tuning
    import gpu_search_tuning

    parts = variant.split("+")
    factor, rest = gpu_search_tuning.apply_variant(parts)
    unknown = gpu_conv_tuning.apply_variant(rest)
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}")
    import cupy
    import gpu_paper_workload as wl

    if counting and not hasattr(cupy, "_emulators"):
        raise SystemExit("the CuPy stand-in was not imported: run this script as it is (it "
                         "starts its children with tests/cupy_standin on the path)")
    n = clouds * points_per_cloud
    points = wl.sphere(n, 0)
    offsets = np.arange(clouds + 1, dtype=np.int64) * points_per_cloud
    rng = np.random.default_rng(1)
    weights = [wl.glorot(rng, c_in, c_out) for c_in, c_out, _ in wl.LAYERS]
    grad = rng.standard_normal((n, sum(c for _, c, _ in wl.LAYERS))).astype(np.float32)
    pw = wl.PwconvGPU(points, offsets, weights, grad)
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _search

    stages: dict = {}
    sites: dict = {}

    def book(stage: str) -> None:
        if not counting:
            return
        counts, where = _memory_total(cupy)
        for name, c in counts.items():
            stages.setdefault(stage, {})
            stages[stage][name] = stages[stage].get(name, 0) + c
        for name, by_line in where.items():
            mine = sites.setdefault(stage, {}).setdefault(name, {})
            for key, (requests, waves) in by_line.items():
                cell = mine.setdefault(key, [0, 0])
                cell[0] += requests
                cell[1] += waves

    # The one pass's scratch is sized from a count over about CAPACITY_SAMPLE queries per map
    # whatever the batch: kept apart, it scales with the sample, not with the clouds.
    sized = _search._scratch_capacity

    def sample_counted(*args, **kwargs):
        book("kernel maps")
        out = sized(*args, **kwargs)
        book("kernel maps: capacity sample")
        return out

    _search._scratch_capacity = sample_counted

    def maps():
        index = cuda.NeighborIndex(pw.points, factor * wl.VOXEL, offsets=offsets)
        return index.kernel_maps(wl.K, [s for _, _, s in wl.LAYERS], voxel_size=wl.VOXEL)

    kms = maps()
    book("kernel maps")
    xs, zs = pw.forward(kms)
    book("forward")
    pw.backward(kms, xs, zs)
    book("backward")
    if not counting:
        cupy.cuda.Device().synchronize()
        return {"variant": variant, "pairs": [int(km.n_pairs) for km in kms]}
    # to the paper's 128 clouds x 2,048 points: by the queries (the capacity sample's by its own)
    scale = PAPER_CLOUDS * 2048 / n
    sample = int(_search.CAPACITY_SAMPLE)
    scales = {stage: scale for stage in stages}
    if "kernel maps: capacity sample" in stages:
        scales["kernel maps: capacity sample"] = min(PAPER_CLOUDS * 2048, sample) / min(n, sample)
    top = {stage: {name: [[*key, *value] for key, value in sorted(
        by_line.items(), key=lambda kv: -kv[1][1])[:SITES_KEPT]]
        for name, by_line in kernels.items()} for stage, kernels in sites.items()}
    return {"variant": variant, "clouds": clouds, "points_per_cloud": points_per_cloud,
            "pairs": [int(km.n_pairs) for km in kms], "scales": scales,
            "stages": {stage: {name: c.tolist() for name, c in kernels.items()}
                       for stage, kernels in stages.items()},
            "sites": top}


# --- the parent: variants, table ------------------------------------------------------------


def _counting_emulator(folder: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from test_cuda import build_emulator

    return build_emulator(folder, count=True)


def run(variants, clouds: int, points_per_cloud: int, timeout_s: int) -> list:
    """Each variant in a child process over the stand-in and one counting emulator."""
    with tempfile.TemporaryDirectory(prefix="pwconv_load_model_") as tmp:
        lib = _counting_emulator(Path(tmp))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), str(HERE)] +
                                            [p for p in [env.get("PYTHONPATH")] if p])
        env.update(CUPY_STANDIN_EMULATOR=str(lib), CUPY_STANDIN_COUNT="1",
                   CUPY_STANDIN_DEVICES="1")
        for name in list(env):  # the defaults, whatever the calling shell selects
            if name.startswith("PWCONV_CUDA_"):
                del env[name]
        records = []
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, "--clouds", str(clouds),
                   "--points", str(points_per_cloud)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                records.append({"variant": variant, "error": f"timed out after {timeout_s} s"})
                print(f"{variant}: timed out", flush=True)
                continue
            if proc.returncode != 0:
                records.append({"variant": variant,
                                "error": (proc.stdout + proc.stderr).strip().splitlines()[-5:]})
                print(f"{variant}: failed: {records[-1]['error']}", flush=True)
                continue
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{variant}: counted", flush=True)
    return records


def summarise(record: dict) -> dict:
    """{stage: {kernel: (global + shared, local) as µs}} and {stage: totals} of a child's
    record, at the paper's 128 clouds."""
    kernels, totals = {}, {}
    for stage, by_kernel in record["stages"].items():
        scale = record["scales"][stage]
        kernels[stage] = {
            name: tuple(predicted_us(w, scale)
                        for w in wavefronts(np.asarray(c, dtype=np.int64)))
            for name, c in by_kernel.items()}
        totals[stage] = tuple(sum(v[i] for v in kernels[stage].values()) for i in range(2))
    return {"kernels": kernels, "totals": totals}


def _cell(value) -> str:
    return "-" if value is None else f"{value[0]:.0f} +{value[1]:.0f}"


def print_report(records, sites: int = 0) -> bool:
    """Prints the table; whether every variant made the same pairs."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return False
    summaries = {r["variant"]: summarise(r) for r in ok}
    names = list(summaries)
    width = max(12, *(len(v) for v in names))
    print(f"\nL1 wavefronts as time at one per SM a cycle ({SMS} SMs, {CLOCK_HZ / 1e9:.2f} GHz), "
          f"in µs, scaled to the paper's {PAPER_CLOUDS} clouds x 2,048 points (counted on "
          f"{ok[0]['clouds']} x {ok[0]['points_per_cloud']}): global and shared memory, +local "
          "memory (as g++ keeps arrays in memory; nvcc may keep fewer, or more)")
    stages = list(dict.fromkeys(st for r in ok for st in r["stages"]))
    for stage in stages:
        def biggest(kernel, stage=stage):
            return -max(sum(s["kernels"].get(stage, {}).get(kernel, (0, 0)))
                        for s in summaries.values())

        rows = sorted({k for s in summaries.values() for k in s["kernels"].get(stage, {})},
                      key=biggest)
        print(f"\n{stage:<44}" + "".join(f"{v:>{width + 2}}" for v in names))
        for kernel in rows:
            cells = [summaries[v]["kernels"].get(stage, {}).get(kernel) for v in names]
            if -biggest(kernel) < 1.0:
                continue  # the grid's small kernels
            print(f"  {kernel[:42]:<42}" + "".join(f"{_cell(c):>{width + 2}}" for c in cells))
        print(f"  {'all kernels of the stage':<42}" + "".join(
            f"{_cell(summaries[v]['totals'].get(stage, (0, 0))):>{width + 2}}" for v in names))
    print(f"\n{'iteration':<44}" + "".join(
        f"{_cell(tuple(map(sum, zip(*summaries[v]['totals'].values())))):>{width + 2}}"
        for v in names))
    if sites:
        print(f"\nwhere in kernels.cu (the {sites} source lines with the most wavefronts of each "
              "kernel over 50 µs; µs at the paper's size, requests per warp-load):")
        shown = set()  # a kernel as the first variant that runs it counted it
        for r in ok:
            for stage, kernels in r.get("sites", {}).items():
                scale = r["scales"][stage]
                for name, rows in kernels.items():
                    us = summaries[r["variant"]]["kernels"][stage][name]
                    if sum(us) < 50 or (stage, name) in shown:
                        continue
                    shown.add((stage, name))
                    print(f"  {r['variant']} / {stage} / {name}:")
                    for where, space, store, requests, waves in rows[:sites]:
                        print(f"    {where:<24}{SPACES[space]:>7} {'st' if store else 'ld'}"
                              f"{predicted_us(waves, scale):>8.0f} µs"
                              f"{waves / max(requests, 1):>7.1f} wavefronts/request")
    pairs = {tuple(r["pairs"]) for r in ok}
    print(f"pairs per layer {min(pairs)} ({'the same' if len(pairs) == 1 else 'DIFFERENT'}"
          " in every variant)")
    return len(pairs) == 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="variants (default: %(default)s)",
                        default=list(DEFAULT_VARIANTS))
    parser.add_argument("--clouds", type=int, default=1, help="clouds counted (default 1)")
    parser.add_argument("--points", type=int, default=2048, help="points per cloud")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    parser.add_argument("--sites", type=int, default=0,
                        help="also print the N source lines with the most wavefronts of each "
                             "heavy kernel (default 0; the JSON keeps 12)")
    parser.add_argument("--gpu", action="store_true",
                        help="run the first variant's iteration once on the GPU, counting "
                             "nothing (for ncu: gpu_check.sh's load_model_ncu step)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.clouds < 1 or opts.points < 1:
        parser.error(f"--clouds and --points must be positive, got {opts.clouds} and "
                     f"{opts.points}")
    if opts.child or opts.gpu:
        print(json.dumps(count(opts.variants[0], opts.clouds, opts.points,
                               counting=not opts.gpu)))
        return 0
    records = run(opts.variants, opts.clouds, opts.points, opts.timeout)
    same = print_report(records, opts.sites)
    out = Path(os.environ["OUT"]) / "gpu_load_model.json" if os.environ.get("OUT") else \
        HERE / "results" / "gpu_load_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"sms": SMS, "clock_hz": CLOCK_HZ, "paper_clouds": PAPER_CLOUDS,
                  "spaces": SPACES, "fields": FIELDS},
        "records": records}))  # one line: the per-kernel counts would take thousands
    print(f"wrote {out}")
    return 0 if same and all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
