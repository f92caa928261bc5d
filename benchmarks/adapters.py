"""What a call through each adapter costs compared with the direct NumPy call (issue 6).

Two inputs, seeded, points uniformly on the unit sphere, float32, K = 3, s = 1:

* small: 1 cloud of 1,024 points, 8 -> 8 channels, v = 0.14 (the paper's v = 0.1 scaled for half
  the points: about the same neighbour count);
* large: 128 clouds x 2,048 points (the paper workload's batch, packed with offsets), 9 -> 9
  channels, v = 0.1.

Paths, each timed for the forward pass alone and for forward + backward (input and weight
gradients, ``grad_out`` seeded normal); every path builds its kernel map inside the timed region
(once per forward + backward):

* ``numpy``: ``pwconv_cy.pointwise_conv`` on NumPy arrays (forward + backward: ``kernel_map``,
  then ``pointwise_conv`` and ``pointwise_conv_backward`` on that map) — the baseline;
* ``torch tensors``: the same functions on torch CPU tensors (DLPack in, torch tensors out);
* ``jax arrays``: the same functions on JAX CPU arrays;
* ``pwconv_cy.torch``: the autograd op (forward under ``torch.no_grad``; forward + backward:
  ``y.backward(g)`` with ``feats`` and ``weight`` requiring grad);
* ``pwconv_cy.jax``: the custom-VJP op under ``jax.jit`` (forward; forward + backward:
  ``jax.jit(jax.grad(vdot(y, g)))`` in ``feats`` and ``weight``), compiled before timing.

Outputs are checked equal to the NumPy path's before anything is timed.  The paths are timed
round-robin (one call of each per round, each round starting with the next path; medians of at
least 5 rounds after a warm-up round), so that load from other processes falls on all of them
alike; the overhead is a path's median minus
the NumPy median.  Writes ``benchmarks/results/adapters.json`` (machine, threads, date) and prints
a table.

    python benchmarks/adapters.py                 # 1 and 2 threads
    python benchmarks/adapters.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import numpy as np

import pwconv_cy

SIZES = {
    "small": {"clouds": 1, "points": 1024, "channels": 8, "voxel": 0.14},
    "large": {"clouds": 128, "points": 2048, "channels": 9, "voxel": 0.1},
}


def make_input(size: str) -> dict:
    spec = SIZES[size]
    b, n, c = spec["clouds"], spec["points"], spec["channels"]
    points = np.concatenate([C.sphere(n, seed=i) for i in range(b)])
    rng = np.random.default_rng(1)
    return {
        "points": points,
        "offsets": np.arange(b + 1, dtype=np.int64) * n,
        "feats": rng.standard_normal((b * n, c)).astype(np.float32),
        "weight": (rng.standard_normal((3, 3, 3, c, c)) * 0.1).astype(np.float32),
        "grad_out": rng.standard_normal((b * n, c)).astype(np.float32),
        "voxel": spec["voxel"],
    }


def function_path(convert, block=lambda r: r):
    """The package's functions on arrays made by `convert` (identity for NumPy)."""
    def build(d):
        p, f, w, g = (convert(d[k]) for k in ("points", "feats", "weight", "grad_out"))
        offs, v = d["offsets"], d["voxel"]

        def forward():
            return block(pwconv_cy.pointwise_conv(p, f, w, v, offsets=offs))

        def forward_backward():
            km = pwconv_cy.kernel_map(p, v, offsets=offs)
            y = pwconv_cy.pointwise_conv(p, f, w, v, offsets=offs, kernel_map=km)
            grads = pwconv_cy.pointwise_conv_backward(g, p, f, w, v, offsets=offs,
                                                      kernel_map=km)
            return block(y), tuple(block(a) for a in grads)

        return forward, forward_backward
    return build


def torch_op_path(d):
    import torch

    import pwconv_cy.torch as pct

    p, g = torch.from_numpy(d["points"]), torch.from_numpy(d["grad_out"])
    f = torch.from_numpy(d["feats"]).requires_grad_()
    w = torch.from_numpy(d["weight"]).requires_grad_()
    offs, v = d["offsets"], d["voxel"]

    def forward():
        with torch.no_grad():
            return pct.pointwise_conv(p, f, w, v, offsets=offs)

    def forward_backward():
        f.grad = w.grad = None
        y = pct.pointwise_conv(p, f, w, v, offsets=offs)
        y.backward(g)
        return y.detach(), (f.grad, w.grad)

    return forward, forward_backward


def jax_op_path(d):
    import jax
    import jax.numpy as jnp

    import pwconv_cy.jax as pcj

    p, f, w, g = (jnp.asarray(d[k]) for k in ("points", "feats", "weight", "grad_out"))
    offs, v = jnp.asarray(d["offsets"]), d["voxel"]
    fwd = jax.jit(lambda f_, w_: pcj.pointwise_conv(p, f_, w_, v, offsets=offs))

    def loss(f_, w_):
        return jnp.vdot(pcj.pointwise_conv(p, f_, w_, v, offsets=offs), g)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    # The op keeps maps for the same points between calls; dropped here so that every path
    # builds its map inside the timed region.
    def forward():
        pcj.clear_map_cache()
        return fwd(f, w).block_until_ready()

    def forward_backward():
        pcj.clear_map_cache()
        _, grads = grad(f, w)
        return None, tuple(a.block_until_ready() for a in grads)

    return forward, forward_backward


def paths():
    import jax
    import torch

    return {
        "numpy": function_path(lambda a: a),
        "torch tensors": function_path(torch.from_numpy),
        "jax arrays": function_path(jax.numpy.asarray, lambda r: r.block_until_ready()),
        "pwconv_cy.torch": torch_op_path,
        "pwconv_cy.jax": jax_op_path,
    }


def check(name: str, forward, forward_backward, reference) -> None:
    """The path's outputs equal the NumPy path's (bit for bit: the same kernels run)."""
    y = np.asarray(forward())
    np.testing.assert_array_equal(y, reference["y"], err_msg=f"{name}: forward")
    _, grads = forward_backward()
    for got, want, what in zip(grads, reference["grads"], ("d_feats", "d_weight")):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name}: {what}")


def time_interleaved(fns: dict, budget_s: float, min_rounds: int = 5, max_rounds: int = 30):
    """Median wall time of each fn, timed round-robin (one call of each per round, after one
    untimed warm-up round; round r starts with the r-th fn), so that load from other processes
    and the after-effects of the previous call fall on every path alike."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    spent, rounds = 0.0, 0
    while rounds < max_rounds:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            spent += times[name][-1]
        rounds += 1
        if rounds >= min_rounds and spent >= budget_s:
            break
    return {name: (statistics.median(t), t) for name, t in times.items()}


def run(threads: int, budget_s: float) -> tuple[list, list]:
    import threadpoolctl
    import torch

    torch.set_num_threads(threads)
    rows, records = [], []
    with threadpoolctl.threadpool_limits(threads):
        for size, spec in SIZES.items():
            d = make_input(size)
            ref_y = pwconv_cy.pointwise_conv(d["points"], d["feats"], d["weight"], d["voxel"],
                                             offsets=d["offsets"])
            ref_grads = pwconv_cy.pointwise_conv_backward(
                d["grad_out"], d["points"], d["feats"], d["weight"], d["voxel"],
                offsets=d["offsets"])
            built = {name: build(d) for name, build in paths().items()}
            for name, (forward, forward_backward) in built.items():
                check(name, forward, forward_backward, {"y": ref_y, "grads": ref_grads})
            timed = {stage: time_interleaved({n: fns[i] for n, fns in built.items()}, budget_s)
                     for i, stage in enumerate(("forward", "forward_backward"))}
            for name in built:
                record = {"threads": threads, "size": size, "path": name, **spec}
                for stage, medians in timed.items():
                    median, runs = medians[name]
                    record[f"{stage}_s"], record[f"{stage}_runs_s"] = median, runs
                    record[f"{stage}_overhead_s"] = median - medians["numpy"][0]
                    record[f"{stage}_ratio"] = median / medians["numpy"][0]
                records.append(record)
                rows.append([threads, size, name, C.fmt_s(record["forward_s"]),
                             _overhead(record, "forward"), C.fmt_s(record["forward_backward_s"]),
                             _overhead(record, "forward_backward")])
                C.print_row(rows[-1], [3, 6, 16, 9, 18, 9, 18])
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="OpenMP thread counts (all paths; threadpoolctl limits)")
    parser.add_argument("--budget-s", type=float, default=6.0,
                        help="timed seconds per stage and size, all paths together (at least "
                             "5 rounds)")
    args = parser.parse_args()
    print(C.machine_info()["cpu_model"])
    rows, records = [], []
    for threads in args.threads:
        r, rec = run(threads, args.budget_s)
        rows += r
        records += rec
    print()
    C.print_table(["thr", "size", "path", "forward", "overhead", "fwd+bwd", "overhead"], rows)
    path = C.write_json("adapters", {"machine": C.machine_info(), "threads": args.threads,
                                     "sizes": SIZES, "results": records})
    print(f"\nwrote {path}")


def _overhead(record: dict, stage: str) -> str:
    extra = record[f"{stage}_overhead_s"]
    if record["path"] == "numpy":
        return "(baseline)"
    sign = "+" if extra >= 0 else "-"
    return f"{sign}{C.fmt_s(abs(extra))} ({record[f'{stage}_ratio']:.2f}x)"


if __name__ == "__main__":
    main()
