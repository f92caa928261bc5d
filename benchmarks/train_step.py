"""Where one training step of the paper's classifier spends its time (issue 4).

One batch of 32 real ModelNet40 shapes (the first 32 of a seeded permutation of the train split,
1,024 points, normalised like ``pwconv_cy.data.load``), the classifier that
``python -m pwconv_cy.train`` builds at 1,024 points (v = 0.1 * sqrt(2), dilations 1-4, FC
36,864 -> 512 -> 40, 18.9 M parameters, float32, dropout on).  Stages, each timed alone
(medians after a warm-up):

* ``kernel maps``: the shared grid and the four kernel maps (``NeighborIndex`` + ``kernel_map``);
* ``forward``: ``model.forward`` (kernel maps included) and the loss;
* ``backward``: ``model.backward`` without the input gradient (what training does) and, for
  comparison, with it (``input_grad=True``: one more transposed map and gather);
* ``optimiser``: one Adam update of all parameters, in place through the fused C++ kernel (what
  training does), functional through the same kernel (new arrays), and functional through the
  NumPy array expressions (the pure-Python form, the only one before the fused kernel);
* ``step``: ``pwconv_cy.train.train_step`` (forward, loss, backward, in-place Adam).

Writes ``benchmarks/results/train_step.json`` and prints a table.

    python benchmarks/train_step.py                # 1 and 2 threads, about 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import math

import _common as C
import numpy as np

from pwconv_cy import NeighborIndex, data, models, nn, optim
from pwconv_cy import train as train_module

BATCH = 32
N_POINTS = 1024


def load_batch():
    path = C.DATA_DIR / "modelnet40_1024" / "train.npz"
    with np.load(path, allow_pickle=False) as f:
        pick = np.sort(np.random.default_rng(0).permutation(len(f["labels"]))[:BATCH])
        points = data.normalize_clouds(f["points"][pick].astype(np.float32))
        labels = f["labels"][pick]
    return points, labels


def make_model():
    return models.PointwiseCNNClassifier(n_points=N_POINTS, n_classes=40,
                                         voxel_size=0.1 * math.sqrt(2048 / N_POINTS), seed=0)


def run(threads: int, budget_s: float):
    C.limit_threads(threads)
    points, labels = load_batch()
    model = make_model().train()
    loss_fn = nn.SoftmaxCrossEntropy()
    adam = optim.Adam(1e-3)
    timings = {}

    def maps():
        index = NeighborIndex(points.reshape(-1, 3), model.voxel_size,
                              offsets=np.arange(BATCH + 1) * N_POINTS)
        return [index.kernel_map(3, s) for s in model.dilations]

    def forward():
        return float(loss_fn.forward(model.forward(points), labels))

    timings["kernel maps"] = C.time_calls(maps, budget_s=budget_s)[0]
    timings["forward (maps included)"] = C.time_calls(forward, budget_s=budget_s)[0]
    forward()
    d_logits = loss_fn.backward()
    for with_input in (False, True):
        name = "backward" + (" with input gradient" if with_input else "")
        timings[name] = C.time_calls(lambda w=with_input: model.backward(d_logits, input_grad=w),
                                     budget_s=budget_s)[0]
    grads = model.backward(d_logits, input_grad=False)
    params = {k: v.copy() for k, v in model.params.items()}
    state = adam.init(params)
    timings["Adam, in place (fused)"] = C.time_calls(
        lambda: adam.update(params, grads, state, inplace=True), budget_s=budget_s)[0]
    timings["Adam, functional (fused)"] = C.time_calls(
        lambda: adam.update(params, grads, state), budget_s=budget_s)[0]
    real = optim._fused_operands
    optim._fused_operands = lambda *a: None
    try:
        timings["Adam, functional (array expressions)"] = C.time_calls(
            lambda: adam.update(params, grads, state), budget_s=budget_s)[0]
    finally:
        optim._fused_operands = real
    opt_state = adam.init(model.params)
    timings["train step"] = C.time_calls(
        lambda: train_module.train_step(model, loss_fn, adam, opt_state, points, labels),
        budget_s=budget_s)[0]
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget-s", type=float, default=4.0,
                        help="timed seconds per stage (at least 3 runs)")
    parser.add_argument("--quick", action="store_true",
                        help="0.3 s per stage (still at least 3 runs)")
    args = parser.parse_args()
    if args.quick:
        args.budget_s = 0.3
    print(C.machine_info()["cpu_model"])
    results = {t: run(t, args.budget_s) for t in args.threads}
    stages = list(next(iter(results.values())))
    rows = [[stage] + [C.fmt_s(results[t][stage]) for t in args.threads] for stage in stages]
    step = {t: results[t]["train step"] for t in args.threads}
    rows.append(["shapes/s (train step)"] + [f"{BATCH / step[t]:.0f}" for t in args.threads])
    C.print_table(["stage (batch of 32 x 1,024 points)"] + [f"{t} thr" for t in args.threads],
                  rows)
    path = C.write_json("train_step_quick" if args.quick else "train_step", {"machine": C.machine_info(), "threads": args.threads,
                                       "batch": BATCH, "n_points": N_POINTS,
                                       "seconds": {str(t): r for t, r in results.items()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
