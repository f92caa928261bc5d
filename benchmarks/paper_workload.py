"""The paper workload (SPEC §7): pwconv side by side with a NumPy/SciPy and a PyTorch peer.

128 clouds x 2,048 points uniformly on the unit sphere (seeded), the paper's four layers
3->9 (s=1), 9->9 (s=2), 9->9 (s=3), 9->9 (s=4), v = 0.1, K = 3, float32.  Layer 1's input is
the xyz coordinates, layers 2-4 take the previous layer's output.  Timed separately, at each
thread count:

* kernel maps -- pwconv: one shared ``NeighborIndex`` per batch + four ``.kernel_map`` calls;
  peers: their neighbour search + binning (+ the sparse matrices for the SciPy peer);
* forward -- the four layers;
* backward -- the four layers, input and weight gradients, ``grad_out`` seeded normal.  pwconv's
  backward starts from the kernel maps alone (any cached transposed map is dropped before each
  run, as a fresh batch would have it): with 128 clouds it regroups each cloud's entries by
  point inside the backward, with fewer clouds it builds the transposed maps.

The same on 128 real ModelNet40 shapes (1,024 points each, ../shared/data, v = 0.1).  The peers
(benchmarks/peers.py) are checked against pwconv before anything is timed: identical kernel-map
counts and values within float32 rounding.  Medians of several runs after a warm-up; a call
slower than --slow-s is measured once (its first, cold run).  The NumPy/SciPy peer is timed on
the first --scipy-clouds clouds and scaled linearly to the batch (clouds are independent and of
equal size), which the output says.

Writes ``benchmarks/results/paper_workload.json`` (machine, threads, date) and prints a table with
the ratios peer / pwconv (> 1: pwconv is faster).

    python benchmarks/paper_workload.py            # full size; a few minutes on 2 cores
    python benchmarks/paper_workload.py --quick    # 8 clouds, under a minute
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import numpy as np
from peers import ScipyPeer, TorchPeer

import pwconv_cy
from pwconv_cy import NeighborIndex, pointwise_conv, pointwise_conv_backward
from pwconv_cy.nn import PointwiseConv

LAYERS = [(3, 9, 1), (9, 9, 2), (9, 9, 3), (9, 9, 4)]  # (c_in, c_out, dilation)
VOXEL = 0.1
KERNEL_SIZE = 3
STAGES = ("kernel_maps", "forward", "backward")
PAPER = {
    "forward_s": 1.272,
    "backward_s": 2.423,
    "threads": 16,
    "note": "Hua et al. 2018, same workload, their CPU implementation",
}
MODELNET = C.DATA_DIR / "modelnet40_1024" / "train.npz"
RTOL = 1e-4


# --- data -----------------------------------------------------------------------------------


class Workload:
    """A packed batch, the four layers' weights and the output gradient (all float32)."""

    def __init__(self, name, points, n_clouds, seed):
        self.name = name
        self.n_clouds = n_clouds
        self.n_per_cloud = points.shape[0] // n_clouds
        self.points = np.ascontiguousarray(points, dtype=np.float32)
        self.offsets = np.arange(n_clouds + 1, dtype=np.int64) * self.n_per_cloud
        self.weights = [
            PointwiseConv(c_in, c_out, VOXEL, dilation=s, rng=seed + i).params["weight"]
            for i, (c_in, c_out, s) in enumerate(LAYERS)
        ]
        self.grad_out = (
            np.random.default_rng(seed)
            .standard_normal((self.points.shape[0], LAYERS[-1][1]))
            .astype(np.float32)
        )

    def head(self, n_clouds: int) -> Workload:
        """The first n_clouds clouds (same weights; grad_out restricted)."""
        sub = Workload.__new__(Workload)
        n = n_clouds * self.n_per_cloud
        sub.__dict__.update(
            self.__dict__,
            n_clouds=n_clouds,
            points=self.points[:n],
            offsets=self.offsets[: n_clouds + 1],
            grad_out=self.grad_out[:n],
        )
        return sub


def sphere_workload(n_clouds, n_points, seed):
    return Workload("sphere", C.sphere(n_clouds * n_points, seed), n_clouds, seed)


def modelnet_workload(n_clouds, seed):
    with np.load(MODELNET) as z:
        shapes = z["points"]
        pick = np.sort(np.random.default_rng(seed).choice(shapes.shape[0], n_clouds, replace=False))
        points = shapes[pick].astype(np.float32).reshape(-1, 3)
    return Workload("modelnet40", points, n_clouds, seed)


# --- the three implementations --------------------------------------------------------------


class Pwconv:
    name = "pwconv"

    def __init__(self, threads):
        self.threads = threads

    def kernel_maps(self, wl):
        index = NeighborIndex(wl.points, VOXEL, offsets=wl.offsets, num_threads=self.threads)
        return [index.kernel_map(KERNEL_SIZE, s, num_threads=self.threads) for _, _, s in LAYERS]

    def forward(self, wl, kms):
        xs = [wl.points]
        for (_, _, s), w, km in zip(LAYERS, wl.weights, kms):
            xs.append(
                pointwise_conv(
                    wl.points,
                    xs[-1],
                    w,
                    VOXEL,
                    dilation=s,
                    offsets=wl.offsets,
                    kernel_map=km,
                    num_threads=self.threads,
                )
            )
        return xs

    def backward(self, wl, kms, xs, grad_out=None):
        for km in kms:
            km._cache.clear()  # nothing derived from the maps is reused across batches
        g = wl.grad_out if grad_out is None else grad_out
        d_weights = [None] * len(LAYERS)
        for layer in reversed(range(len(LAYERS))):
            g, d_weights[layer] = pointwise_conv_backward(
                g,
                wl.points,
                xs[layer],
                wl.weights[layer],
                VOXEL,
                dilation=LAYERS[layer][2],
                offsets=wl.offsets,
                kernel_map=kms[layer],
                num_threads=self.threads,
            )
        return g, d_weights

    def setup(self, wl):
        kms = self.kernel_maps(wl)
        return kms, self.forward(wl, kms)


class Scipy:
    name = ScipyPeer.name

    def __init__(self, threads):
        from threadpoolctl import threadpool_limits

        self.threads = threads
        self._limits = threadpool_limits

    def kernel_maps(self, wl):
        with self._limits(self.threads):
            n = wl.points.shape[0]
            maps = [
                ScipyPeer.kernel_map(wl.points, wl.offsets, VOXEL, KERNEL_SIZE, s)
                for _, _, s in LAYERS
            ]
            return maps, [ScipyPeer.operator(km, n, np.float32) for km in maps]

    def forward(self, wl, kms):
        with self._limits(self.threads):
            xs = [wl.points]
            for w, mats in zip(wl.weights, kms[1]):
                xs.append(ScipyPeer.forward(mats, xs[-1], w))
            return xs

    def backward(self, wl, kms, xs):
        with self._limits(self.threads):
            g = wl.grad_out
            d_weights = [None] * len(LAYERS)
            for layer in reversed(range(len(LAYERS))):
                g, d_weights[layer] = ScipyPeer.backward(
                    kms[1][layer], xs[layer], wl.weights[layer], g
                )
            return g, d_weights

    def setup(self, wl):
        kms = self.kernel_maps(wl)
        return kms, self.forward(wl, kms)


class Torch:
    name = TorchPeer.name

    def __init__(self, threads):
        import torch

        self.torch = torch
        self.threads = threads

    def _threads(self):
        if self.threads is not None:  # None (verification): torch's default
            self.torch.set_num_threads(self.threads)

    def kernel_maps(self, wl):
        self._threads()
        pts = self.torch.from_numpy(wl.points).to(self.torch.float64)
        return [
            TorchPeer.kernel_map(pts, wl.offsets, VOXEL, KERNEL_SIZE, s, dtype=self.torch.float32)
            for _, _, s in LAYERS
        ]

    def forward(self, wl, kms):
        """With autograd recording, as in training: returns [x1 (requires grad), W1..W4, y4]."""
        self._threads()
        x = self.torch.from_numpy(wl.points).requires_grad_(True)
        ws = [self.torch.from_numpy(w).requires_grad_(True) for w in wl.weights]
        h = x
        for w, km in zip(ws, kms):
            h = TorchPeer.forward(km, h, w)
        return [x, ws, h]

    def backward(self, wl, kms, state):
        self._threads()
        x, ws, y = state
        grads = self.torch.autograd.grad(
            y, [x] + ws, self.torch.from_numpy(wl.grad_out), retain_graph=True
        )
        return grads[0], list(grads[1:])

    def setup(self, wl):
        kms = self.kernel_maps(wl)
        return kms, self.forward(wl, kms)


IMPLS = {"pwconv": Pwconv, "numpy/scipy": Scipy, "pytorch": Torch}


# --- verification ---------------------------------------------------------------------------


def _np(a):
    return a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)


def max_rel_err(a, ref) -> float:
    a, ref = _np(a).astype(np.float64), _np(ref).astype(np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def verify(wl: Workload) -> dict:
    """Kernel-map counts identical, outputs and gradients within RTOL (max-abs relative)."""
    ref = Pwconv(None)
    kms, xs = ref.setup(wl)
    dx, dws = ref.backward(wl, kms, xs)
    report = {"clouds": wl.n_clouds}
    for cls in (Scipy, Torch):
        impl = cls(None)
        p_kms, state = impl.setup(wl)
        counts = [km.counts for km in p_kms[0]] if cls is Scipy else [km.counts for km in p_kms]
        same_maps = all(np.array_equal(_np(c), km.counts) for c, km in zip(counts, kms))
        p_dx, p_dws = impl.backward(wl, p_kms, state)
        outputs = state[1:] if cls is Scipy else [state[2]]
        errors = {
            f"y{len(xs) - len(outputs) + i}": max_rel_err(o, xs[len(xs) - len(outputs) + i])
            for i, o in enumerate(outputs)
        }
        errors["d_feats1"] = max_rel_err(p_dx, dx)
        errors.update(
            {f"d_weight{i + 1}": max_rel_err(g, r) for i, (g, r) in enumerate(zip(p_dws, dws))}
        )
        worst = max(errors.values())
        report[impl.name] = {
            "kernel_maps_identical": same_maps,
            "max_rel_err": worst,
            "errors": errors,
        }
        if not same_maps or not worst <= RTOL:
            raise SystemExit(
                f"{impl.name} disagrees with pwconv on {wl.name}: kernel maps "
                f"identical={same_maps}, max relative error {worst:.2e} > {RTOL} "
                f"({errors})"
            )
    return report


# --- timing ---------------------------------------------------------------------------------


def measure(fn, repeats: int, budget_s: float, slow_s: float, first_s: float | None = None):
    """(median seconds, runs): a warm-up (or `first_s`, the time of a call the caller already
    made), then up to `repeats` timed runs within `budget_s` (at least 3); a warm-up slower than
    `slow_s` is itself the single measurement."""
    if first_s is None:
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
    if first_s > slow_s:
        return first_s, [first_s]
    times = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_impl(impl, wl, args):
    # The set-up calls (kernel maps, then the forward whose state the backward needs) are the
    # warm-ups of their stages, so a slow peer's kernel maps are computed only once.
    t0 = time.perf_counter()
    kms = impl.kernel_maps(wl)
    t1 = time.perf_counter()
    state = impl.forward(wl, kms)
    first = {"kernel_maps": t1 - t0, "forward": time.perf_counter() - t1, "backward": None}
    fns = {
        "kernel_maps": lambda: impl.kernel_maps(wl),
        "forward": lambda: impl.forward(wl, kms),
        "backward": lambda: impl.backward(wl, kms, state),
    }
    out = {}
    for stage in STAGES:
        median, runs = measure(fns[stage], args.repeats, args.budget_s, args.slow_s, first[stage])
        out[stage] = {"median_s": median, "runs_s": runs}
    if isinstance(impl, Pwconv):
        out["neighbours_per_point"] = [km.n_pairs / wl.points.shape[0] for km in kms]
    return out


def run_dataset(wl: Workload, args) -> dict:
    scipy_clouds = min(args.scipy_clouds or wl.n_clouds, wl.n_clouds)
    print(
        f"\n{wl.name}: {wl.n_clouds} clouds x {wl.n_per_cloud} points, v = {VOXEL}, K = "
        f"{KERNEL_SIZE}, float32; verifying the peers on {min(args.verify_clouds, wl.n_clouds)}"
        " clouds ...",
        flush=True,
    )
    result = {
        "n_clouds": wl.n_clouds,
        "n_points_per_cloud": wl.n_per_cloud,
        "verification": verify(wl.head(min(args.verify_clouds, wl.n_clouds))),
        "numpy_scipy_timed_on_clouds": scipy_clouds,
        "numpy_scipy_scale": wl.n_clouds / scipy_clouds,
        "threads": {},
    }
    for threads in args.threads:
        per = {}
        for name in args.peers:
            impl = IMPLS[name](threads)
            if name == "numpy/scipy" and scipy_clouds < wl.n_clouds:
                timing = time_impl(impl, wl.head(scipy_clouds), args)
                scale = wl.n_clouds / scipy_clouds
                for stage in STAGES:
                    timing[stage]["measured_s"] = timing[stage]["median_s"]
                    timing[stage]["median_s"] *= scale
                timing["scaled_from_clouds"] = scipy_clouds
            else:
                timing = time_impl(impl, wl, args)
            per[name] = timing
        result["threads"][str(threads)] = per
        if "neighbours_per_point" in per.get("pwconv", {}):
            result["neighbours_per_point"] = per["pwconv"]["neighbours_per_point"]
        print_rows(wl, threads, per, args.peers)
    return result


def print_rows(wl, threads, per, peers):
    header = (
        ["data", "threads", "stage"] + list(peers) + [f"{p}/pwconv" for p in peers if p != "pwconv"]
    )
    rows = []
    for stage in STAGES + ("total",):
        times = {}
        for name in peers:
            t = per[name]
            times[name] = (
                sum(t[s]["median_s"] for s in STAGES) if stage == "total" else t[stage]["median_s"]
            )
        cells = [wl.name, threads, stage] + [C.fmt_s(times[p]) for p in peers]
        if "pwconv" in times:
            cells += [f"{times[p] / times['pwconv']:.1f}x" for p in peers if p != "pwconv"]
        rows.append(cells)
    C.print_table(header, rows)
    if "pwconv" in per:
        print(
            "  pwconv: neighbours/point per layer: "
            + ", ".join(f"{c:.1f}" for c in per["pwconv"]["neighbours_per_point"])
        )
    if "numpy/scipy" in per and "scaled_from_clouds" in per["numpy/scipy"]:
        print(
            f"  numpy/scipy timed on {per['numpy/scipy']['scaled_from_clouds']} of "
            f"{wl.n_clouds} clouds, scaled linearly"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 clouds (development)")
    parser.add_argument("--clouds", type=int, default=128)
    parser.add_argument("--points", type=int, default=2048, help="points per sphere cloud")
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    parser.add_argument(
        "--peers", type=lambda s: s.split(","), default=["pwconv", "numpy/scipy", "pytorch"]
    )
    parser.add_argument(
        "--scipy-clouds",
        type=int,
        default=32,
        help="clouds the NumPy/SciPy peer is timed on (scaled to --clouds)",
    )
    parser.add_argument("--verify-clouds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=3.0)
    parser.add_argument("--slow-s", type=float, default=5.0)
    parser.add_argument("--no-modelnet", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.clouds, args.repeats = 8, 3
    unknown = set(args.peers) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --peers {sorted(unknown)}; choose from {list(IMPLS)}")

    import torch

    info = C.machine_info()
    info.update(
        torch=torch.__version__,
        pwconv_openmp=pwconv_cy.show_config(file=_Null())["openmp"],
        threads_timed=args.threads,
    )
    print(
        f"{info['cpu_model']}, {info['usable_cores']} usable cores, {info['date']}; "
        f"threads {args.threads}; torch {torch.__version__}; PyTorch peer neighbours: "
        f"{TorchPeer.neighbours}"
    )
    datasets = [sphere_workload(args.clouds, args.points, args.seed)]
    if not args.no_modelnet:
        if MODELNET.exists():
            datasets.append(modelnet_workload(args.clouds, args.seed))
        else:
            print(f"note: {MODELNET} not found, ModelNet40 part skipped")
    results = {
        "machine": info,
        "config": {
            "layers": [{"c_in": a, "c_out": b, "dilation": s} for a, b, s in LAYERS],
            "voxel_size": VOXEL,
            "kernel_size": KERNEL_SIZE,
            "dtype": "float32",
            "quick": args.quick,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
            "slow_s": args.slow_s,
            "seed": args.seed,
            "verify_rtol": RTOL,
            "pytorch_neighbours": TorchPeer.neighbours,
            "pwconv_backward": "from the kernel maps alone (regrouping by point included)",
            "grad_out": "standard normal, seeded",
        },
        "paper": PAPER,
        "datasets": {},
    }
    for wl in datasets:
        results["datasets"][wl.name] = run_dataset(wl, args)
    path = C.write_json("paper_workload" + ("_quick" if args.quick else ""), results)
    print(f"\nwritten {path}")


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass


if __name__ == "__main__":
    main()
