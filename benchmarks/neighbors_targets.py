"""Does pwconv's neighbour search meet the three targets of the neighbour-search issue?

a. Paper workload: 128 clouds x 2,048 points on the unit sphere, v = 0.1, K = 3, dilations 1-4
   from ONE shared NeighborIndex, versus the SciPy baseline (cKDTree.query_pairs(h, p=inf) per
   cloud + vectorised NumPy binning into the same CSR kernel map).  Target: >= 50x faster.
b. Euclidean radius search on 262,144 sphere points with ~32 neighbours (self included), full
   CSR with sorted rows, versus cKDTree + query_pairs + CSR assembly.  Target: >= 5x faster.
   Also shown: query_pairs alone, SciPy query_ball_point(workers=t) and Open3D when installed.
c. The kernel map (dilation 1) of 1 M sphere points (~20-30 neighbours) and of the real 0.7 M-point
   LiDAR tile at v = 0.5 m: time (target < 1 s), peak memory (each case in its own subprocess:
   peak RSS from /proc/self/status VmHWM, reset after loading the points; ru_maxrss is recorded
   too but starts at the parent's RSS), mean neighbours per point.

All at 1 and 2 threads; results in ``benchmarks/results/neighbors_targets.json``
(``neighbors_targets_quick.json`` with --quick).

    python benchmarks/neighbors_targets.py            # full size, a few minutes on 2 cores
    python benchmarks/neighbors_targets.py --quick    # reduced sizes, < 30 s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as C
import numpy as np
from scipy.spatial import cKDTree

import pwconv_cy

K = 3
DILATIONS = (1, 2, 3, 4)


# --- a. paper workload ---------------------------------------------------------------------


def baseline_kernel_map(clouds64, trees, v, kernel_size, dilation):
    """SPEC §1 kernel map of a packed batch the straightforward way: per cloud, every pair within
    the support cube from cKDTree.query_pairs (Chebyshev, radius h slightly enlarged), both
    directions plus self, binned with vectorised NumPy, rows sorted; then the batch's CSR."""
    span = dilation * (kernel_size - 1) + 1
    h = span * v / 2
    n_cells = kernel_size**3
    rows, cols, cells = [], [], []
    base = 0
    for p, tree in zip(clouds64, trees):
        n = p.shape[0]
        pairs = tree.query_pairs(h * (1 + 1e-9), p=np.inf, output_type="ndarray")
        ar = np.arange(n, dtype=np.int64)
        i = np.concatenate([pairs[:, 0], pairs[:, 1], ar])
        j = np.concatenate([pairs[:, 1], pairs[:, 0], ar])
        lo = p[i] - h
        t = (p[j] - lo) / v
        ok = np.all((t >= 0) & (t <= span), axis=1)
        c = np.minimum(span - 1, np.floor(t)).astype(np.int64)
        ok &= np.all(c % dilation == 0, axis=1)
        k = c // dilation
        f = (k[:, 2] * kernel_size + k[:, 1]) * kernel_size + k[:, 0]
        i, j, f = i[ok], j[ok], f[ok]
        order = np.lexsort((j, i))
        rows.append(i[order] + base)
        cols.append(j[order] + base)
        cells.append(f[order])
        base += n
    i = np.concatenate(rows)
    index = np.concatenate(cols)
    f = np.concatenate(cells)
    splits = np.searchsorted(i, np.arange(base + 1))
    counts = np.bincount(i * n_cells + f, minlength=base * n_cells)
    counts = counts.reshape(base, n_cells).astype(np.int32)
    return splits, index, f.astype(np.uint8), counts


def maps_equal(ours, ref) -> bool:
    splits, index, cell, counts = ref
    return bool(
        np.array_equal(ours.splits, splits)
        and np.array_equal(ours.index, index)
        and np.array_equal(ours.cell, cell)
        and np.array_equal(ours.counts, counts)
    )


def target_a(args, threads):
    n_clouds, n_per = (16, 2048) if args.quick else (128, 2048)
    v = 0.1
    points = C.sphere(n_clouds * n_per, args.seed)  # consecutive blocks: independent clouds
    offsets = np.arange(0, n_clouds * n_per + 1, n_per, dtype=np.int64)
    clouds64 = [points[a:b].astype(np.float64) for a, b in zip(offsets[:-1], offsets[1:])]
    print(
        f"\n== a. paper workload: {n_clouds} clouds x {n_per} sphere points (float32), v = {v}, "
        f"K = {K}, dilations {DILATIONS}, one shared index"
    )

    def base_build():
        return [cKDTree(p) for p in clouds64]

    def base_query(trees):
        return [baseline_kernel_map(clouds64, trees, v, K, s) for s in DILATIONS]

    trees = base_build()
    t0 = time.perf_counter()
    ref = base_query(trees)
    first = time.perf_counter() - t0
    tb, _ = C.time_calls(base_build, repeats=args.repeats, budget_s=args.budget)
    tq, runs_q = C.time_calls(
        lambda: base_query(trees),
        warmup=False,
        first_s=first,
        repeats=args.repeats,
        budget_s=args.budget,
    )
    baseline = {
        "build_s": tb,
        "query_s": tq,
        "total_s": tb + tq,
        "repeats": len(runs_q),
        "pairs_per_dilation": [int(r[0][-1]) for r in ref],
    }
    print(
        f"baseline (cKDTree per cloud + query_pairs p=inf + NumPy binning, 1 thread): "
        f"build {C.fmt_s(tb)}, 4 maps {C.fmt_s(tq)}, total {C.fmt_s(tb + tq)}; pairs per "
        f"dilation {baseline['pairs_per_dilation']}"
    )
    out = {
        "n_clouds": n_clouds,
        "points_per_cloud": n_per,
        "voxel_size": v,
        "kernel_size": K,
        "dilations": list(DILATIONS),
        "baseline": baseline,
        "ours": [],
    }
    rows = []
    for t in threads:
        C.limit_threads(t)
        for method in ("grid", "kdtree"):

            def build(method=method, t=t):
                return pwconv_cy.NeighborIndex(
                    points, v, offsets=offsets, method=method, num_threads=t
                )

            def query(idx, t=t):
                return [idx.kernel_map(K, s, num_threads=t) for s in DILATIONS]

            idx = build()
            t0 = time.perf_counter()
            maps = query(idx)
            first = time.perf_counter() - t0
            equal = all(maps_equal(m, r) for m, r in zip(maps, ref))
            pairs_equal = [m.n_pairs for m in maps] == baseline["pairs_per_dilation"]
            mean_nb = [m.n_pairs / m.n_queries for m in maps]
            del maps
            tb, _ = C.time_calls(build, repeats=args.repeats, budget_s=args.budget)
            tq, runs = C.time_calls(
                lambda idx=idx: query(idx),
                warmup=False,
                first_s=first,
                repeats=args.repeats,
                budget_s=args.budget,
            )
            ratio = baseline["total_s"] / (tb + tq)
            out["ours"].append(
                {
                    "method": method,
                    "threads": t,
                    "build_s": tb,
                    "query_s": tq,
                    "total_s": tb + tq,
                    "repeats": len(runs),
                    "speedup": ratio,
                    "pair_counts_equal": pairs_equal,
                    "maps_identical": equal,
                    "mean_neighbors_per_dilation": mean_nb,
                }
            )
            rows.append(
                [
                    method,
                    t,
                    C.fmt_s(tb),
                    C.fmt_s(tq),
                    C.fmt_s(tb + tq),
                    f"{ratio:.0f}x",
                    "met" if ratio >= 50 else "NOT met",
                    "yes" if pairs_equal else "NO",
                    "yes" if equal else "NO",
                    " ".join(f"{m:.1f}" for m in mean_nb),
                ]
            )
    C.print_table(
        [
            "ours",
            "thr",
            "build",
            "4 maps",
            "total",
            "vs baseline",
            ">=50x",
            "pairs equal",
            "maps identical",
            "mean nbrs s=1..4",
        ],
        rows,
    )
    return out


# --- b. radius search ------------------------------------------------------------------------


def target_b(args, threads, o3d):
    n = 32_768 if args.quick else 262_144
    target = 32
    points = C.sphere(n, args.seed)
    p64 = points.astype(np.float64)
    r = C.calibrate_radius(cKDTree(p64), p64, target, p=2, seed=args.seed)
    print(
        f"\n== b. Euclidean radius search: {n} sphere points (float32), r = {r:.6g} "
        f"(target ~{target} neighbours incl. self), CSR with self, rows sorted"
    )

    # SciPy baseline: serial, timed once for all thread counts.
    def sp_build():
        return cKDTree(p64)

    tree = sp_build()
    tb, _ = C.time_calls(sp_build, repeats=args.repeats, budget_s=args.budget)
    t_pairs, _ = C.time_calls(
        lambda: tree.query_pairs(r, output_type="ndarray"),
        repeats=args.repeats,
        budget_s=args.budget,
    )
    pairs = tree.query_pairs(r, output_type="ndarray")
    t_csr, _ = C.time_calls(
        lambda pairs=pairs: C.csr_from_pairs(pairs, n), repeats=args.repeats, budget_s=args.budget
    )
    ref_splits, ref_index = C.csr_from_pairs(pairs, n)
    del pairs
    baseline = {
        "build_s": tb,
        "query_pairs_s": t_pairs,
        "csr_s": t_csr,
        "query_s": t_pairs + t_csr,
        "total_s": tb + t_pairs + t_csr,
        "n_pairs": int(ref_splits[-1]),
        "mean_neighbors": float(ref_splits[-1]) / n,
    }
    print(
        f"baseline cKDTree + query_pairs + CSR (1 thread): build {C.fmt_s(tb)}, query_pairs "
        f"{C.fmt_s(t_pairs)}, CSR {C.fmt_s(t_csr)}, total {C.fmt_s(baseline['total_s'])}; "
        f"mean neighbours {baseline['mean_neighbors']:.2f}"
    )
    out = {
        "n": n,
        "radius": r,
        "target_neighbors": target,
        "baseline": baseline,
        "ours": [],
        "peers": [],
    }
    rows = []
    max_row = int(np.diff(ref_splits).max())
    t64 = o3d.core.Tensor(p64) if o3d is not None else None
    for t in threads:
        C.limit_threads(t)
        for method in ("grid", "kdtree"):

            def build(method=method, t=t):
                return pwconv_cy.NeighborIndex(points, r, method=method, num_threads=t)

            def query(idx, t=t):
                return idx.radius_search(r, metric="euclidean", num_threads=t)

            idx = build()
            t0 = time.perf_counter()
            splits, index = query(idx)
            first = time.perf_counter() - t0
            identical = bool(
                np.array_equal(splits, ref_splits) and np.array_equal(index, ref_index)
            )
            del splits, index
            tbo, _ = C.time_calls(build, repeats=args.repeats, budget_s=args.budget)
            tqo, runs = C.time_calls(
                lambda idx=idx: query(idx),
                warmup=False,
                first_s=first,
                repeats=args.repeats,
                budget_s=args.budget,
            )
            del idx
            ratio = baseline["total_s"] / (tbo + tqo)
            out["ours"].append(
                {
                    "method": method,
                    "threads": t,
                    "build_s": tbo,
                    "query_s": tqo,
                    "total_s": tbo + tqo,
                    "repeats": len(runs),
                    "speedup": ratio,
                    "speedup_vs_query_pairs_alone": t_pairs / (tbo + tqo),
                    "identical_to_baseline": identical,
                }
            )
            rows.append(
                [
                    f"pwconv {method}",
                    t,
                    C.fmt_s(tbo),
                    C.fmt_s(tqo),
                    C.fmt_s(tbo + tqo),
                    f"{ratio:.1f}x",
                    "met" if ratio >= 5 else "NOT met",
                    f"{t_pairs / (tbo + tqo):.1f}x",
                    "yes" if identical else "NO",
                ]
            )
        # SciPy, parallel query
        tq, runs = C.time_calls(
            lambda t=t: C.csr_from_lists(
                tree.query_ball_point(p64, r, workers=t, return_sorted=True), n
            ),
            repeats=args.repeats,
            budget_s=args.budget,
        )
        s_b, i_b = C.csr_from_lists(tree.query_ball_point(p64, r, workers=t, return_sorted=True), n)
        same = bool(np.array_equal(s_b, ref_splits) and np.array_equal(i_b, ref_index))
        del s_b, i_b
        out["peers"].append(
            {
                "method": "scipy query_ball_point",
                "threads": t,
                "build_s": tb,
                "query_s": tq,
                "total_s": tb + tq,
                "repeats": len(runs),
                "identical_to_baseline": same,
            }
        )
        rows.append(
            [
                "scipy ball_point",
                t,
                C.fmt_s(tb),
                C.fmt_s(tq),
                C.fmt_s(tb + tq),
                f"{baseline['total_s'] / (tb + tq):.1f}x",
                "",
                "",
                "yes" if same else "NO",
            ]
        )
        if o3d is not None:
            for kind in ("fixed_radius", "hybrid"):

                def o3_build(kind=kind):
                    nns = o3d.core.nns.NearestNeighborSearch(t64)
                    if kind == "fixed_radius":
                        nns.fixed_radius_index(r)
                    else:
                        nns.hybrid_index(r)
                    return nns

                def o3_query(nns, kind=kind):
                    if kind == "fixed_radius":
                        idx, _, spl = nns.fixed_radius_search(t64, r, sort=False)
                        return spl.numpy(), idx.numpy()
                    # Hybrid: fixed (n, max_knn) padded with -1, max_knn = the largest row
                    # (no truncation), compacted to CSR; rows sorted by distance.
                    idx, _, cnt = nns.hybrid_search(t64, r, max_row)
                    idx = idx.numpy()
                    spl = np.zeros(n + 1, np.int64)
                    np.cumsum(cnt.numpy(), out=spl[1:])
                    return spl, idx[idx >= 0]

                nns = o3_build()
                t0 = time.perf_counter()
                spl, _ = o3_query(nns)
                first = time.perf_counter() - t0
                rows_diff = int(np.count_nonzero(np.diff(spl) != np.diff(ref_splits)))
                tbo, _ = C.time_calls(o3_build, repeats=args.repeats, budget_s=args.budget)
                tqo, runs = C.time_calls(
                    lambda nns=nns: o3_query(nns),
                    warmup=False,
                    first_s=first,
                    repeats=args.repeats,
                    budget_s=args.budget,
                )
                del nns
                out["peers"].append(
                    {
                        "method": f"open3d {kind}",
                        "threads": t,
                        "build_s": tbo,
                        "query_s": tqo,
                        "total_s": tbo + tqo,
                        "repeats": len(runs),
                        "rows_with_other_count": rows_diff,
                    }
                )
                rows.append(
                    [
                        f"open3d {kind}",
                        t,
                        C.fmt_s(tbo),
                        C.fmt_s(tqo),
                        C.fmt_s(tbo + tqo),
                        f"{baseline['total_s'] / (tbo + tqo):.1f}x",
                        "",
                        "",
                        f"counts differ in {rows_diff} rows" if rows_diff else "same counts",
                    ]
                )
    C.print_table(
        [
            "method",
            "thr",
            "build",
            "query",
            "total",
            "vs baseline",
            ">=5x",
            "vs query_pairs alone",
            "identical to baseline",
        ],
        rows,
    )
    if o3d is not None:
        print(
            "(Open3D: float64 tensors; fixed_radius rows unsorted (sort=False), hybrid rows "
            "sorted by distance with max_knn = largest row, compacted to CSR)"
        )
    return out


# --- c. large kernel maps, one subprocess per case -------------------------------------------


def worker(argv):
    """Hidden entry point: one kernel-map case in a fresh process, JSON on the last line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", required=True)
    ap.add_argument("--voxel", type=float, required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=2.0)
    a = ap.parse_args(argv)
    import resource

    import psutil

    proc = psutil.Process()
    C.limit_threads(a.threads)
    points = np.load(a.points)
    reset = C.rss_peak_reset()
    rss_before = proc.memory_info().rss
    peak_before = C.rss_peak_bytes()
    t0 = time.perf_counter()
    idx = pwconv_cy.NeighborIndex(points, a.voxel, method=a.method, num_threads=a.threads)
    t1 = time.perf_counter()
    km = idx.kernel_map(K, 1, num_threads=a.threads)
    t2 = time.perf_counter()
    peak_first = C.rss_peak_bytes()
    result = {
        "n": int(points.shape[0]),
        "n_pairs": km.n_pairs,
        "mean_neighbors": km.n_pairs / km.n_queries,
        "result_bytes": km.nbytes,
        "index_bytes": idx.memory_bytes,
        "first_build_s": t1 - t0,
        "first_query_s": t2 - t1,
        "rss_before_bytes": rss_before,
        "peak_rss_before_bytes": peak_before,
        "peak_rss_after_first_call_bytes": peak_first,
        "peak_increase_bytes": peak_first - rss_before,
        "peak_was_reset": reset,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    del km
    tb, _ = C.time_calls(
        lambda: pwconv_cy.NeighborIndex(points, a.voxel, method=a.method, num_threads=a.threads),
        warmup=False,
        first_s=t1 - t0,
        repeats=a.repeats,
        budget_s=a.budget,
    )
    tq, runs = C.time_calls(
        lambda: idx.kernel_map(K, 1, num_threads=a.threads),
        warmup=False,
        first_s=t2 - t1,
        repeats=a.repeats,
        budget_s=a.budget,
    )
    result.update(
        build_s=tb,
        query_s=tq,
        total_s=tb + tq,
        repeats=len(runs),
        peak_rss_end_bytes=C.rss_peak_bytes(),
    )
    print(json.dumps(result))


def target_c(args, threads):
    n_sphere = 100_000 if args.quick else 1_000_000
    n_lidar = 100_000 if args.quick else None
    target = 25
    sphere = C.sphere(n_sphere, args.seed)
    p64 = sphere.astype(np.float64)
    r = C.calibrate_radius(cKDTree(p64), p64, target, p=np.inf, seed=args.seed)
    del p64
    v_sphere = r / 1.5  # dilation 1, K = 3: the support cube has half-width 1.5 v
    lidar = C.lidar_tile() if n_lidar is None else C.lidar_crop(n_lidar, args.seed)
    cases = [
        ("sphere", sphere, v_sphere),
        ("lidar_ign_698k" if n_lidar is None else "lidar_crop", lidar, 0.5),
    ]
    print(
        f"\n== c. kernel map K=3, s=1: {n_sphere} sphere points at v = {v_sphere:.6g} "
        f"(target ~{target} neighbours) and the LiDAR tile "
        f"({lidar.shape[0]} points) at v = 0.5 m; one subprocess per case"
    )
    out = {"target_neighbors_sphere": target, "cases": []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pts, v in cases:
            path = os.path.join(tmp, f"{name}.npy")
            np.save(path, pts)
            for t in threads:
                for method in ("grid", "kdtree"):
                    cmd = [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--_worker",
                        "--points",
                        path,
                        "--voxel",
                        repr(v),
                        "--method",
                        method,
                        "--threads",
                        str(t),
                        "--repeats",
                        str(args.repeats),
                        "--budget",
                        str(args.budget),
                    ]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        print(f"   {name} {method} {t}t FAILED:\n{proc.stderr[-2000:]}")
                        out["cases"].append(
                            {
                                "case": name,
                                "method": method,
                                "threads": t,
                                "error": proc.stderr[-2000:],
                            }
                        )
                        continue
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res.update(
                        case=name,
                        method=method,
                        threads=t,
                        voxel_size=v,
                        points_dtype=str(pts.dtype),
                    )
                    out["cases"].append(res)
                    mib = 2.0**20
                    rows.append(
                        [
                            name,
                            res["n"],
                            f"{v:.4g}",
                            method,
                            t,
                            f"{res['mean_neighbors']:.1f}",
                            C.fmt_s(res["build_s"]),
                            C.fmt_s(res["query_s"]),
                            C.fmt_s(res["total_s"]),
                            "met" if res["total_s"] < 1 else "NOT met",
                            f"{res['peak_increase_bytes'] / mib:.0f}",
                            f"{res['result_bytes'] / mib:.0f}",
                            f"{res['index_bytes'] / mib:.1f}",
                        ]
                    )
    C.print_table(
        [
            "case",
            "N",
            "v",
            "method",
            "thr",
            "mean nbrs",
            "build",
            "query",
            "total",
            "<1 s",
            "peak +MiB",
            "result MiB",
            "index MiB",
        ],
        rows,
    )
    print(
        "(peak +MiB: peak RSS (VmHWM, reset after loading the points) of the first build + "
        "kernel map minus the RSS before it, in a fresh process holding only the points; "
        "result MiB: splits + index + cell + counts)"
    )
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a: 16 clouds, b: 32K points, c: 100K points; < 30 s"
    )
    ap.add_argument("--targets", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs at most (after warm-up)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed runs per measurement before stopping early (default 3, --quick 0.5)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--name",
        default=None,
        help="result file stem (default neighbors_targets, neighbors_targets_quick with --quick)",
    )
    args = ap.parse_args(argv)
    if args.name is None:
        args.name = "neighbors_targets_quick" if args.quick else "neighbors_targets"
    if args.budget is None:
        args.budget = 0.5 if args.quick else 3.0
    o3d = C.open3d_module() if "b" in args.targets else None
    machine = C.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, "
        f"python {machine['python']}, numpy {machine['numpy']}, scipy {machine['scipy']}, "
        f"open3d {machine['open3d']}, {machine['date']}"
    )
    print("times: medians after a warm-up; speedup = baseline total / ours total (build + query)")
    start = time.perf_counter()
    payload = {
        "benchmark": "neighbors_targets",
        "machine": machine,
        "threads": args.threads,
        "quick": args.quick,
        "seed": args.seed,
    }
    if "a" in args.targets:
        payload["a_paper_workload"] = target_a(args, args.threads)
    if "b" in args.targets:
        payload["b_radius_search"] = target_b(args, args.threads, o3d)
    if "c" in args.targets:
        payload["c_large_kernel_maps"] = target_c(args, args.threads)
    payload["elapsed_s"] = time.perf_counter() - start
    path = C.write_json(args.name, payload)
    print(f"\nwrote {path} ({payload['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
