"""Where does pwconv's kd-tree beat its uniform grid?  (Sets ``AUTO_KDTREE_MIN_POINTS``.)

Sweeps the cloud size N for four point distributions -- surface-like (unit sphere), volume-uniform
(unit cube), real airborne LiDAR (disc crops of the IGN tile, and the whole 0.7 M-point tile) and a
synthetic clustered cloud -- and target mean neighbour counts 8/16/32/64 (self included; the radius
or voxel size is calibrated per cloud, the achieved mean is reported).  For each case it times,
build and query separately, at every thread count:

* Euclidean radius search returning CSR: pwconv grid, pwconv kd-tree, ``scipy.spatial.cKDTree``
  (``query_ball_point(return_sorted=True, workers=t)`` + CSR assembly) and, when installed, Open3D
  (``NearestNeighborSearch.fixed_radius_index`` / ``fixed_radius_search``);
* the kernel map (K = 3, dilation 1): pwconv grid versus pwconv kd-tree.

Writes ``benchmarks/results/crossover.json`` and ``crossover.png`` (``crossover_quick.*`` with
--quick) and prints the crossover: the smallest N from which the kd-tree is faster than the grid
(by more than --margin, 5 %) at every larger N of the sweep, or "none".

    python benchmarks/crossover.py            # full sweep, ~10 min on 2 cores
    python benchmarks/crossover.py --quick    # N <= 16K, < 30 s
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np
from scipy.spatial import cKDTree

import pwconv_cy

DENSITIES = {
    "sphere": "surface-like: uniform on the unit sphere",
    "cube": "volume-uniform: uniform in the unit cube",
    "lidar": "real ALS LiDAR (IGN tile, disc crops; the largest N is the whole tile)",
    "clustered": "synthetic clustered: 64 Gaussian clusters, widths 0.002-0.2, + 5% background",
}
FULL_SIZES = [1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000]
QUICK_SIZES = [1_000, 4_000, 16_000]
NEIGHBORS = [8, 16, 32, 64]
QUICK_NEIGHBORS = [8, 32]
KERNEL_SIZE = 3


def make_cloud(density: str, n: int, seed: int) -> np.ndarray:
    if density == "sphere":
        return C.sphere(n, seed)
    if density == "cube":
        return C.cube(n, seed)
    if density == "clustered":
        return C.clustered(n, seed)
    if density == "lidar":
        return C.lidar_crop(n, seed)
    raise ValueError(density)


def sizes_for(density: str, sizes: list[int], quick: bool) -> list[int]:
    """The sweep's sizes; the LiDAR sweep is capped at the tile and, in a full run, ends with the
    whole tile (the real cloud at full size)."""
    if density != "lidar":
        return sizes
    n_tile = C.lidar_tile().shape[0]
    out = [n for n in sizes if n < n_tile]
    if not quick and (not sizes or max(sizes) >= n_tile):
        out.append(n_tile)
    return out


def measure(build, query, budget_s: float, repeats: int):
    """Warm-up build + query (the query's result is kept and returned for checks), then the
    median of timed builds and of timed queries on the warm-up's index."""
    t0 = time.perf_counter()
    obj = build()
    t1 = time.perf_counter()
    res = query(obj)
    t2 = time.perf_counter()
    tb, _ = C.time_calls(build, warmup=False, first_s=t1 - t0, repeats=repeats, budget_s=budget_s)
    tq, runs = C.time_calls(
        lambda: query(obj), warmup=False, first_s=t2 - t1, repeats=repeats, budget_s=budget_s
    )
    return tb, tq, len(runs), res


def row_mismatches(splits_a, splits_b) -> int:
    return int(np.count_nonzero(np.diff(splits_a) != np.diff(splits_b)))


def run_case(points, p64, tree_cal, density, n, target, threads, args, o3d, records):
    """All methods for one (cloud, target neighbour count), every thread count."""
    r_euc = C.calibrate_radius(tree_cal, p64, target, p=2, seed=args.seed)
    r_cheb = C.calibrate_radius(tree_cal, p64, target, p=np.inf, seed=args.seed)
    span = 1 * (KERNEL_SIZE - 1) + 1  # dilation 1: the support cube is span voxels wide
    v = r_cheb / (span / 2)
    t64 = o3d.core.Tensor(p64) if o3d is not None else None
    lines = []
    for t in threads:
        C.limit_threads(t)
        base = {"density": density, "n": n, "target_neighbors": target, "threads": t}
        # --- Euclidean radius search ---
        ours = {}
        for method in ("grid", "kdtree"):

            def build(method=method, t=t):
                return pwconv_cy.NeighborIndex(points, r_euc, method=method, num_threads=t)

            def query(idx, t=t):
                return idx.radius_search(r_euc, metric="euclidean", num_threads=t)

            tb, tq, reps, res = measure(build, query, args.budget, args.repeats)
            ours[method] = (tb, tq, reps, res)
        splits, index = ours["grid"][3]
        n_pairs = int(splits[-1])
        same = bool(
            np.array_equal(splits, ours["kdtree"][3][0])
            and np.array_equal(index, ours["kdtree"][3][1])
        )
        op = dict(
            base,
            op="radius_search",
            metric="euclidean",
            radius=r_euc,
            n_pairs=n_pairs,
            mean_neighbors=n_pairs / n,
            kdtree_equals_grid=same,
        )
        for method in ("grid", "kdtree"):
            tb, tq, reps, _ = ours[method]
            records.append(
                dict(op, method=method, build_s=tb, query_s=tq, total_s=tb + tq, repeats=reps)
            )
        del ours
        peers = {}
        if n_pairs <= args.scipy_max_pairs:

            def sp_build():
                return cKDTree(p64)

            def sp_query(tree, t=t):
                return C.csr_from_lists(
                    tree.query_ball_point(p64, r_euc, workers=t, return_sorted=True), n
                )

            tb, tq, reps, res = measure(sp_build, sp_query, args.budget / 2, args.repeats)
            peers["scipy"] = {
                "build_s": tb,
                "query_s": tq,
                "total_s": tb + tq,
                "repeats": reps,
                "rows_differing": row_mismatches(splits, res[0]),
            }
            del res
        if o3d is not None and n_pairs <= args.open3d_max_pairs:

            def o3_build():
                nns = o3d.core.nns.NearestNeighborSearch(t64)
                nns.fixed_radius_index(r_euc)
                return nns

            def o3_query(nns):
                idx, _, spl = nns.fixed_radius_search(t64, r_euc, sort=False)
                return spl.numpy(), idx.numpy()

            tb, tq, reps, res = measure(o3_build, o3_query, args.budget / 2, args.repeats)
            peers["open3d"] = {
                "build_s": tb,
                "query_s": tq,
                "total_s": tb + tq,
                "repeats": reps,
                "rows_differing": row_mismatches(splits, res[0]),
            }
            del res
        for name, rec in peers.items():
            records.append(dict(op, method=name, **rec))
        del splits, index
        rad = {r["method"]: r for r in records[-(2 + len(peers)) :]}
        # --- kernel map, K = 3, dilation 1 ---
        km = {}
        for method in ("grid", "kdtree"):

            def build(method=method, t=t):
                return pwconv_cy.NeighborIndex(points, v, method=method, num_threads=t)

            def query(idx, t=t):
                return idx.kernel_map(KERNEL_SIZE, 1, num_threads=t)

            km[method] = measure(build, query, args.budget, args.repeats)
        kg, kk = km["grid"][3], km["kdtree"][3]
        same = bool(
            np.array_equal(kg.splits, kk.splits)
            and np.array_equal(kg.index, kk.index)
            and np.array_equal(kg.cell, kk.cell)
        )
        op = dict(
            base,
            op="kernel_map",
            kernel_size=KERNEL_SIZE,
            dilation=1,
            voxel_size=v,
            n_pairs=kg.n_pairs,
            mean_neighbors=kg.n_pairs / n,
            kdtree_equals_grid=same,
        )
        for method in ("grid", "kdtree"):
            tb, tq, reps, _ = km[method]
            records.append(
                dict(op, method=method, build_s=tb, query_s=tq, total_s=tb + tq, repeats=reps)
            )
        kmr = {"grid": records[-2], "kdtree": records[-1]}
        del km, kg, kk
        lines.append(_line(rad, kmr, n, target, t))
    return lines


def _bq(rec):
    if rec is None:
        return "-"
    return f"{C.fmt_s(rec['build_s'])}+{C.fmt_s(rec['query_s'])}"


def _line(rad, kmr, n, target, t):
    g, k = rad["grid"], rad["kdtree"]
    flags = "" if g["kdtree_equals_grid"] and kmr["grid"]["kdtree_equals_grid"] else " MISMATCH"
    for name in ("scipy", "open3d"):
        if name in rad and rad[name]["rows_differing"]:
            flags += f" {name}:{rad[name]['rows_differing']}rows-differ"
    return [
        n,
        target,
        t,
        f"{g['mean_neighbors']:.1f}",
        _bq(g),
        _bq(k),
        _bq(rad.get("scipy")),
        _bq(rad.get("open3d")),
        f"{k['total_s'] / g['total_s']:.2f}",
        f"{kmr['grid']['mean_neighbors']:.1f}",
        _bq(kmr["grid"]),
        _bq(kmr["kdtree"]),
        f"{kmr['kdtree']['total_s'] / kmr['grid']['total_s']:.2f}" + flags,
    ]


HEADER = [
    "N",
    "k",
    "thr",
    "rad:mean",
    "grid b+q",
    "kdtree b+q",
    "scipy b+q",
    "open3d b+q",
    "kd/grid",
    "km:mean",
    "km grid b+q",
    "km kdtree b+q",
    "kd/grid",
]
WIDTHS = [8, 3, 3, 8, 15, 15, 15, 15, 7, 7, 15, 15, 7]


def crossovers(records, key="total_s", margin=0.05):
    """Per (density, op, target, threads): the smallest N from which the kd-tree is faster than
    the grid (kd/grid < 1 - margin) at every larger N of the sweep (None: not at the largest N)."""
    out = []
    groups = {}
    for r in records:
        if r["method"] in ("grid", "kdtree"):
            g = groups.setdefault((r["density"], r["op"], r["target_neighbors"], r["threads"]), {})
            g.setdefault(r["n"], {})[r["method"]] = r[key]
    for (density, op, target, t), by_n in sorted(groups.items()):
        ns = sorted(n for n in by_n if len(by_n[n]) == 2)
        faster = [by_n[n]["kdtree"] < (1 - margin) * by_n[n]["grid"] for n in ns]
        cross = None
        for i in range(len(ns) - 1, -1, -1):
            if not faster[i]:
                break
            cross = ns[i]
        out.append(
            {
                "density": density,
                "op": op,
                "target_neighbors": target,
                "threads": t,
                "by": key,
                "crossover_n": cross,
                "margin": margin,
                "kd_over_grid": {str(n): by_n[n]["kdtree"] / by_n[n]["grid"] for n in ns},
            }
        )
    return out


def plot(records, path, densities, threads, plot_k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(densities), figsize=(4.2 * len(densities), 13), squeeze=False)
    styles = {t: s for t, s in zip(threads, ["-", "--", ":", "-."])}
    colors = {"grid": "C0", "kdtree": "C1", "scipy": "C2", "open3d": "C3"}
    k_colors = {k: f"C{i}" for i, k in enumerate(sorted({r["target_neighbors"] for r in records}))}
    for col, density in enumerate(densities):
        recs = [r for r in records if r["density"] == density]
        for row, op in enumerate(("radius_search", "kernel_map")):
            ax = axes[row, col]
            for method, color in colors.items():
                for t in threads:
                    pts = sorted(
                        (r["n"], r["total_s"])
                        for r in recs
                        if r["op"] == op
                        and r["method"] == method
                        and r["threads"] == t
                        and r["target_neighbors"] == plot_k
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts),
                            styles[t],
                            color=color,
                            marker="o",
                            ms=3,
                            label=f"{method} {t}t",
                        )
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="N points",
                ylabel="build + query [s]",
                title=f"{density}: {op.replace('_', ' ')}, k~{plot_k}",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        for row, op in ((2, "kernel_map"), (3, "radius_search")):
            ax = axes[row, col]
            for k, c in k_colors.items():
                for t in threads:
                    by_n = {}
                    for r in recs:
                        if (
                            r["op"] == op
                            and r["threads"] == t
                            and r["target_neighbors"] == k
                            and r["method"] in ("grid", "kdtree")
                        ):
                            by_n.setdefault(r["n"], {})[r["method"]] = r["total_s"]
                    pts = sorted(
                        (n, d["kdtree"] / d["grid"]) for n, d in by_n.items() if len(d) == 2
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts), styles[t], color=c, marker="o", ms=3, label=f"k~{k} {t}t"
                        )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="N points",
                ylabel="kd-tree / grid time",
                title=f"{density}: {op.replace('_', ' ')}, kd/grid (<1: kd faster)",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N <= 16K, k in {8, 32}: < 30 s")
    ap.add_argument("--sizes", type=int, nargs="+", help=f"cloud sizes (default {FULL_SIZES})")
    ap.add_argument("--neighbors", type=int, nargs="+", help=f"targets (default {NEIGHBORS})")
    ap.add_argument("--densities", nargs="+", choices=list(DENSITIES), default=list(DENSITIES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs at most (after warm-up)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed runs per measurement: >= 3 runs of a cheap call, "
        "round(budget / warm-up) (>= 1) of an expensive one; the peers get half (default 1.0, "
        "--quick 0.2)",
    )
    ap.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="the kd-tree counts as faster only when kd/grid < 1 - margin (timing noise)",
    )
    ap.add_argument(
        "--scipy-max-pairs",
        type=float,
        default=8.5e6,
        help="skip the SciPy peer above this many result pairs (time; its Python "
        "lists also take ~40 bytes per pair)",
    )
    ap.add_argument(
        "--open3d-max-pairs",
        type=float,
        default=8.5e6,
        help="skip the Open3D peer above this many result pairs (time)",
    )
    ap.add_argument(
        "--max-pairs",
        type=float,
        default=35e6,
        help="skip cases whose expected pairs N*k exceed this (all methods; the default drops "
        "k=64 at 1M points and at the whole LiDAR tile to keep the full run near 10 min; "
        "0 = no limit)",
    )
    ap.add_argument("--plot-k", type=int, default=32, help="neighbour target of the time panels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--name",
        default=None,
        help="result file stem (default crossover, crossover_quick with --quick)",
    )
    args = ap.parse_args(argv)
    if args.name is None:
        args.name = "crossover_quick" if args.quick else "crossover"
    if args.budget is None:
        args.budget = 0.2 if args.quick else 1.0
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    neighbors = args.neighbors or (QUICK_NEIGHBORS if args.quick else NEIGHBORS)
    o3d = C.open3d_module()
    machine = C.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, "
        f"python {machine['python']}, numpy {machine['numpy']}, scipy {machine['scipy']}, "
        f"open3d {machine['open3d']}, {machine['date']}"
    )
    print(
        "times: median build + median query; rad = Euclidean radius search (CSR, rows "
        "sorted; Open3D rows unsorted), km = kernel map K=3 s=1; k = target mean neighbours "
        "incl. self, mean = achieved; '-' = peer skipped (more than "
        f"{args.scipy_max_pairs:.3g} / {args.open3d_max_pairs:.3g} result pairs for SciPy / "
        "Open3D)"
    )
    records = []
    skipped = []
    start = time.perf_counter()
    for density in args.densities:
        print(f"\n== {density}: {DENSITIES[density]}")
        rows = []
        for n in sizes_for(density, sizes, args.quick):
            points = make_cloud(density, n, args.seed)
            p64 = points.astype(np.float64)
            tree_cal = cKDTree(p64)
            for target in neighbors:
                if target > n:
                    continue
                if args.max_pairs and n * target > args.max_pairs:
                    print(f"{n:>8}  {target:>3}  skipped: N*k > --max-pairs {args.max_pairs:.3g}")
                    skipped.append({"density": density, "n": n, "target_neighbors": target})
                    continue
                new = run_case(
                    points, p64, tree_cal, density, n, target, args.threads, args, o3d, records
                )
                for line in new:
                    if not rows:
                        C.print_row(HEADER, WIDTHS, rule=True)
                    C.print_row(line, WIDTHS)
                    rows.append(line)
        print(f"   [{density} done, {time.perf_counter() - start:.0f} s elapsed]")
    cross = crossovers(records, margin=args.margin) + crossovers(
        records, key="query_s", margin=args.margin
    )
    print(
        "\nCrossover N, by build+query / by query alone: the smallest N from which the "
        f"kd-tree beats the grid by more than {args.margin:.0%} at every larger N of the sweep "
        "('none': not at the largest N); kd/grid = time ratio at the largest N (build+query)"
    )
    by_key = {
        (c["by"], c["density"], c["op"], c["threads"], c["target_neighbors"]): c for c in cross
    }
    table = []
    for density in args.densities:
        for op in ("radius_search", "kernel_map"):
            for t in args.threads:
                row = [density, op, t]
                for k in neighbors:
                    tot = by_key.get(("total_s", density, op, t, k))
                    qry = by_key.get(("query_s", density, op, t, k))
                    if tot is None:
                        row.append("-")
                        continue
                    largest = max(tot["kd_over_grid"], key=int)
                    row.append(
                        f"{tot['crossover_n'] or 'none'} / {qry['crossover_n'] or 'none'}"
                        f"  ({tot['kd_over_grid'][largest]:.2f})"
                    )
                table.append(row)
    C.print_table(
        ["density", "op", "thr"] + [f"k~{k}: N total / query  (kd/grid)" for k in neighbors], table
    )
    wins = sum(c["crossover_n"] is not None for c in cross if c["by"] == "total_s")
    print(
        f"kd-tree wins at the largest N in {wins} of "
        f"{sum(c['by'] == 'total_s' for c in cross)} (density, op, k, threads) groups "
        "(build + query)"
    )
    payload = {
        "benchmark": "crossover",
        "machine": machine,
        "threads": args.threads,
        "sizes": sizes,
        "neighbors": neighbors,
        "densities": {d: DENSITIES[d] for d in args.densities},
        "quick": args.quick,
        "seed": args.seed,
        "kernel_size": KERNEL_SIZE,
        "notes": [
            "build and query medians are timed separately; total = build + query",
            (
                "radius search: Euclidean, CSR with self; pwconv and SciPy rows sorted by index, "
                "Open3D rows unsorted (sort=False, its fastest mode)"
            ),
            (
                "SciPy: cKDTree build (single-threaded) + query_ball_point(return_sorted=True, "
                "workers=threads) + CSR assembly; input float64 prepared outside the timing"
            ),
            "Open3D: float64 tensors, threads via open3d.utility.set_max_threads",
            ("kernel map: K=3, dilation 1, cell edge = voxel size; the grid and the kd-tree only"),
            "target neighbour counts calibrated with SciPy on a sample (untimed)",
            "crossover: smallest N from which kd/grid < 1 - margin at every larger N",
        ],
        "elapsed_s": time.perf_counter() - start,
        "records": records,
        "skipped_cases": skipped,
        "crossovers": cross,
    }
    path = C.write_json(args.name, payload)
    png = path.with_suffix(".png")
    plot(
        records,
        png,
        args.densities,
        args.threads,
        args.plot_k if args.plot_k in neighbors else neighbors[len(neighbors) // 2],
    )
    print(f"\nwrote {path} and {png} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
