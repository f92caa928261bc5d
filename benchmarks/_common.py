"""Shared helpers of the benchmarks: machine record, timing, seeded data, parameter calibration,
peer implementations (SciPy, Open3D) and result files.  Not a benchmark itself."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
# The tests' variable names the data folder for the benchmarks too; PWCONV_DATA, the benchmarks'
# older name for it, is still read.
DATA_DIR = Path(os.environ.get("PWCONV_SHARED_DATA") or os.environ.get("PWCONV_DATA")
                or BENCH_DIR.parent.parent / "shared" / "data")
LIDAR_TILE = DATA_DIR / "lidar_als_labelled" / "ign_lambert93_tile_698k.npz"
#: PWCONV_GPU_BENCH_SMOKE=1: the GPU benchmarks shrink to a smoke test (2 clouds or shapes, a
#: 20,000-point big cloud, one timed run, no warm-up): tests/test_gpu_standin.py runs them so
#: on the CuPy stand-in to check their code before a GPU session does.  The figures mean nothing.
GPU_SMOKE = os.environ.get("PWCONV_GPU_BENCH_SMOKE", "").strip() == "1"


def gpu_sizes(clouds: int, big_points: int, warmup: int, runs: int) -> tuple:
    """(clouds, big_points, warmup, runs) as given, or the smoke test's (GPU_SMOKE)."""
    return (2, 20_000, 0, 1) if GPU_SMOKE else (clouds, big_points, warmup, runs)


# --- machine record -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(*dists: str):
    """Installed version of the first of these distributions (no import), else None."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _pwconv_build(pwconv_cy) -> dict | None:
    """pwconv_cy.show_config()'s dict (compiler, OpenMP, native build), printed to nowhere."""
    import io

    try:
        info = pwconv_cy.show_config(file=io.StringIO())
    except Exception:  # noqa: BLE001 - older builds without show_config
        return None
    return {k: str(v) for k, v in info.items()}


def machine_info() -> dict:
    """CPU, cores, memory, library versions and the date, stored with every result file."""
    import pwconv_cy

    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        memory = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "open3d": _version("open3d-cpu", "open3d"),
        "matplotlib": _version("matplotlib"),
        "pwconv_cy": getattr(pwconv_cy, "__version__", "unknown"),
        "pwconv_build": _pwconv_build(pwconv_cy),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "threadpools": threadpools(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


def write_json(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json, or $OUT/NAME.json where $OUT is set (the GPU machine's
    folder that comes back, and the smoke tests' scratch)."""
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- timing ---------------------------------------------------------------------------------


def time_calls(
    fn,
    *,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_s: float = 2.0,
    warmup: bool = True,
    first_s: float | None = None,
):
    """Median wall time of fn() after one untimed warm-up call.

    Cheap calls (warm-up at most budget_s / 3) are repeated until at least `min_repeats` timed
    runs and `budget_s` of timed runs, at most `repeats`; an expensive call gets
    round(budget_s / warm-up) timed runs (at least one).  `first_s` is the duration of a warm-up
    call made by the caller (then pass warmup=False).  The result of every call is dropped before
    the next one starts, so a call's peak memory never includes the previous call's output.
    Returns (median_s, all_times_s).
    """
    if warmup:
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
    if first_s is not None and 3 * first_s > budget_s:
        repeats = int(min(repeats, max(1, round(budget_s / first_s))))
        min_repeats = repeats
    times = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and sum(times) >= budget_s:
            break
    return statistics.median(times), times


def run_variants(script, variants, digest_key: str, what: str, timeout_s: int = 120) -> int:
    """Runs ``python script --child VARIANT`` for each variant (a fresh process each: compile
    options and switches are read once per process), printing each child's last stdout line (a
    JSON record) as it comes; 0 when every record has the same ``digest_key`` (the variants must
    not change the results), else 1."""
    import subprocess

    rows = []
    for v in variants:
        try:
            out = subprocess.run([sys.executable, str(script), "--child", v], capture_output=True,
                                 text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            rows.append({"variant": v, "error": f"timed out after {timeout_s} s"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if out.returncode != 0:
            rows.append({"variant": v, "error": out.stderr.strip().splitlines()[-3:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    digests = [r.get(digest_key) for r in rows]
    same = None not in digests and len(set(digests)) == 1
    print(f"{what} identical across variants: {same}")
    return 0 if same else 1


def fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def print_table(header, rows) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def print_row(cells, widths, rule: bool = False) -> None:
    """One right-aligned row of a table printed as it is measured (cells may overflow)."""
    print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)), flush=True)
    if rule:
        print("  ".join("-" * w for w in widths), flush=True)


# --- seeded data ----------------------------------------------------------------------------


def sphere(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """n points uniformly on the unit sphere."""
    p = np.random.default_rng(seed).standard_normal((n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p.astype(dtype)


def cube(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """n points uniformly in the unit cube."""
    return np.random.default_rng(seed).random((n, 3)).astype(dtype)


def clustered(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A strongly non-uniform synthetic cloud in the unit cube: 64 Gaussian clusters whose
    widths span two decades (0.002 to 0.2) and whose sizes follow a power law, plus 5 % uniform
    background points.  Local densities differ by several orders of magnitude."""
    rng = np.random.default_rng(seed)
    n_clusters = 64
    centres = rng.random((n_clusters, 3))
    sigma = 10.0 ** rng.uniform(np.log10(0.002), np.log10(0.2), n_clusters)
    weight = 1.0 / np.arange(1, n_clusters + 1) ** 1.2
    weight /= weight.sum()
    n_background = n // 20
    which = rng.choice(n_clusters, size=n - n_background, p=weight)
    p = centres[which] + rng.standard_normal((n - n_background, 3)) * sigma[which, None]
    p = np.concatenate([p, rng.random((n_background, 3))])
    return p[rng.permutation(n)].astype(dtype)


_LIDAR_CACHE: dict = {}


def modelnet_train_shapes(count: int):
    """`count` ModelNet40 training shapes ((count, 1,024, 3) float64, unit sphere), evenly spaced
    through the split, or None where the shared data is absent (the models print that they skip
    it)."""
    path = DATA_DIR / "modelnet40_1024" / "train.npz"
    if not path.exists():
        print(f"(ModelNet40 skipped: {path} not found; set PWCONV_SHARED_DATA to the shared "
              "data folder)")
        return None
    with np.load(path) as z:
        shapes = z["points"][:: max(1, len(z["points"]) // count)][:count]
    return shapes.astype(np.float64)


def lidar_tile() -> np.ndarray:
    """The 697,721-point IGN ALS tile (float32 metres, local coordinates), read from shared data."""
    if "tile" not in _LIDAR_CACHE:
        if not LIDAR_TILE.exists():
            raise FileNotFoundError(
                f"{LIDAR_TILE} not found; set PWCONV_SHARED_DATA to the shared data folder"
            )
        with np.load(LIDAR_TILE) as z:
            _LIDAR_CACHE["tile"] = np.ascontiguousarray(z["points"], dtype=np.float32)
    return _LIDAR_CACHE["tile"]


def lidar_crop(n: int, seed: int = 0) -> np.ndarray:
    """The n points of the real LiDAR tile nearest (in x, y) to the tile's centre: a disc crop
    that keeps the real, uneven point spacing (scan lines, vegetation, buildings).  n at or
    above the tile size returns the whole tile.  The order is shuffled with `seed`."""
    tile = lidar_tile()
    if n >= tile.shape[0]:
        return tile
    centre = 0.5 * (tile[:, :2].min(axis=0) + tile[:, :2].max(axis=0))
    d2 = ((tile[:, :2] - centre) ** 2).sum(axis=1)
    keep = np.argpartition(d2, n - 1)[:n]
    keep = keep[np.random.default_rng(seed).permutation(n)]
    return np.ascontiguousarray(tile[keep])


# --- parameter calibration ------------------------------------------------------------------


def mean_count(tree, queries: np.ndarray, r: float, p: float) -> float:
    return float(np.mean(tree.query_ball_point(queries, r, p=p, return_length=True, workers=-1)))


def calibrate_radius(
    tree,
    points64: np.ndarray,
    target: float,
    *,
    p: float,
    sample: int = 4000,
    seed: int = 0,
    rtol: float = 0.03,
    max_iter: int = 25,
) -> float:
    """A radius whose mean neighbour count (self included, metric p) is about `target`.

    Estimated on a seeded sample of query points with SciPy (setup, never timed): start at the
    median distance to the target-th nearest neighbour, then a secant search on log(count) versus
    log(r), kept inside a bracket.  The achieved mean is measured again on the real results."""
    n = points64.shape[0]
    rng = np.random.default_rng(seed)
    q = points64 if n <= sample else points64[rng.choice(n, sample, replace=False)]
    k = int(min(max(1, round(target)), n))
    dist, _ = tree.query(q, k=k, p=p, workers=-1)
    dist = dist.reshape(len(q), -1)[:, -1]
    # Nudged off the median: a radius equal to an actual pairwise distance (common with the
    # quantised coordinates of LiDAR) puts neighbours exactly on the sphere, where peers differ.
    r = float(np.median(dist[np.isfinite(dist)])) * (1 + 1.234567e-6)
    if not r > 0:
        r = 1e-6
    lo = hi = None  # bracket in log r: f(lo) < 0 < f(hi)
    prev = None
    for _ in range(max_iter):
        c = mean_count(tree, q, r, p)
        f = np.log(c / target)
        if abs(c / target - 1) <= rtol:
            return r
        if f < 0:
            lo = r if lo is None else max(lo, r)
        else:
            hi = r if hi is None else min(hi, r)
        slope = 2.0
        if prev is not None and prev[0] != r and prev[1] != f:
            slope = (f - prev[1]) / (np.log(r) - np.log(prev[0]))
            slope = float(np.clip(slope, 0.3, 6.0))
        prev = (r, f)
        r_new = float(np.exp(np.log(r) - f / slope))
        if lo is not None and hi is not None and not lo < r_new < hi:
            r_new = float(np.sqrt(lo * hi))
        r = r_new
    return r


# --- peers ----------------------------------------------------------------------------------


def csr_from_lists(lists, n: int):
    """CSR (splits, index) from cKDTree.query_ball_point's object array of lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=n)
    splits = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=splits[1:])
    index = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(splits[-1]))
    return splits, index


def csr_from_pairs(pairs: np.ndarray, n: int):
    """CSR of a symmetric neighbour relation from query_pairs' (i < j) array: both directions,
    self added, rows sorted by neighbour index."""
    ar = np.arange(n, dtype=np.int64)
    i = np.concatenate([pairs[:, 0], pairs[:, 1], ar])
    j = np.concatenate([pairs[:, 1], pairs[:, 0], ar])
    order = np.argsort(i * n + j)
    index = j[order]
    splits = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(i, minlength=n), out=splits[1:])
    return splits, index


_O3D: dict = {}


def open3d_module():
    """open3d, or None (the note saying why is printed once)."""
    if "module" not in _O3D:
        try:
            import open3d
            import open3d.core

            _O3D["module"] = open3d
        except Exception as exc:  # noqa: BLE001 - any import failure skips the peer
            _O3D["module"] = None
            print(
                f"note: Open3D peer skipped ({type(exc).__name__}: {exc}); "
                "pip install open3d-cpu (needs Debian's libusb-1.0-0) to include it"
            )
    return _O3D["module"]


def limit_threads(n: int) -> None:
    """Cap every native thread pool threadpoolctl knows (OpenMP, BLAS) and Open3D's at n threads
    for what follows (the libraries' own num_threads= / workers= arguments are passed as well)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(n))
    open3d_threads(n)


def threadpools() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads")
    return [{k: p.get(k) for k in keys} for p in threadpool_info()]


def open3d_threads(n: int) -> None:
    """Open3D's thread cap, only if a script already imported it (no import here)."""
    o3d = _O3D.get("module")
    if o3d is not None:
        o3d.utility.set_max_threads(int(n))


def rss_peak_bytes() -> int:
    """Peak resident set size of this process: VmHWM from /proc/self/status (Linux; reset by
    rss_peak_reset), else ru_maxrss.  Note that ru_maxrss of a subprocess starts at its parent's
    RSS at fork time, so it cannot measure a small child of a big parent; VmHWM can."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak_reset() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
