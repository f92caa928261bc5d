"""One training step of the paper's classifier on a CUDA device, side by side with the same step
on the host in the same process (issue 5: the networks on the GPU, ``model.to("cuda")``).

The batch and model of ``benchmarks/train_step.py`` (its ``load_batch`` and ``make_model``): 32
ModelNet40 training shapes of 1,024 points ($PWCONV_SHARED_DATA, else ../shared/data; on a GPU
machine, the 32 that gpu_data.py carries), the classifier ``python -m pwconv_cy.train`` builds
at 1,024 points (v = 0.1 * sqrt(2), dilations 1-4, FC 36,864 -> 512 -> 40, 18.9 M parameters,
float32, dropout on) and the paper's optimiser (SGD, momentum 0.9).  On the GPU, each stage
synchronised, medians after warm-up calls:

* ``forward``: ``model.forward`` (grid and the four kernel maps included) and the loss;
* ``backward``: ``model.backward`` without the input gradient (what training does);
* ``optimiser``: the in-place SGD update of every parameter;
* ``train step``: ``pwconv_cy.train.train_step`` with the host batch copied to the device (the
  step ``python -m pwconv_cy.train --device cuda`` takes).

The host's ``train step`` uses every core (OpenMP and BLAS defaults), on the same machine.  The
first step's loss on each device (fresh models, the same seed and dropout masks) is printed next
to the other's: equal up to float32 rounding.

    python benchmarks/gpu_train_step.py [--runs 20]

Writes ``benchmarks/results/gpu_train_step.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common as C
from train_step import N_POINTS, load_batch, make_model


def timed(fn, sync, warmup: int, runs: int) -> dict:
    """Median / min / all wall times (seconds) of fn() followed by sync(), after warm-ups."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times}


def run_device(device: str, points, labels, warmup: int, runs: int) -> dict:
    from pwconv_cy import nn, optim, train

    model = make_model().to(device).train()
    xp = model.array_module
    sync = (lambda: None) if device == "cpu" else xp.cuda.Device().synchronize
    loss_fn = nn.SoftmaxCrossEntropy()
    opt = optim.SGD(1e-3, momentum=0.9)
    state = opt.init(model.params)
    stages, losses = {}, []

    def step():  # first, on the fresh model: the first losses of both devices compare
        nonlocal state
        loss, _, state = train.train_step(model, loss_fn, opt, state, points, labels)
        losses.append(loss)

    stages["train step"] = timed(step, sync, warmup, runs)
    if device != "cpu":
        x, y = model.device_array(points), model.device_array(labels)

        def forward():
            return loss_fn.forward(model.forward(x), y)

        stages["forward"] = timed(forward, sync, warmup, runs)
        forward()
        d_logits = loss_fn.backward()
        stages["backward"] = timed(lambda: model.backward(d_logits, input_grad=False), sync,
                                   warmup, runs)
        grads = model.backward(d_logits, input_grad=False)
        stages["optimiser"] = timed(lambda: opt.update(model.params, grads, state, inplace=True),
                                    sync, warmup, runs)
    return {"stages": stages, "first_loss": losses[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed GPU runs per stage")
    parser.add_argument("--host-runs", type=int, default=5, help="timed host train steps")
    opts = parser.parse_args(argv)

    from pwconv_cy import cuda

    if not cuda.is_available():
        print(f"GPU path unavailable: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    path = C.DATA_DIR / "modelnet40_1024" / "train.npz"
    if not path.exists():
        print(f"ModelNet40 not found at {path}: set PWCONV_SHARED_DATA", file=sys.stderr)
        return 2
    import cupy

    points, labels = load_batch()
    shapes, _, warmup, _ = C.gpu_sizes(len(points), 0, 3, 0)  # the smoke test: 2 shapes
    points, labels = points[:shapes], labels[:shapes]
    gpu = run_device("cuda", points, labels, warmup=warmup, runs=opts.runs)
    host = run_device("cpu", points, labels, warmup=min(warmup, 1), runs=opts.host_runs)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": props["name"].decode() if isinstance(props["name"], bytes)
              else str(props["name"]),
              "host_cpus": os.cpu_count(), "batch": len(points), "n_points": N_POINTS,
              "gpu": gpu, "host": host}
    print(f"{record['device']}, host: {record['host_cpus']} CPUs; batch {len(points)} x {N_POINTS}"
          " points, float32, paper classifier (18.9 M parameters), SGD momentum")
    print(f"{'stage':<14} {'GPU median':>11} {'GPU min':>9} {'host median':>12}")
    for name, t in gpu["stages"].items():
        h = host["stages"].get(name)
        print(f"{name:<14} {t['median_s'] * 1e3:>9.2f}ms {t['min_s'] * 1e3:>7.2f}ms "
              + (f"{h['median_s'] * 1e3:>10.1f}ms" if h else f"{'-':>12}"))
    step_gpu = gpu["stages"]["train step"]["median_s"]
    step_host = host["stages"]["train step"]["median_s"]
    print(f"train step: {len(points) / step_gpu:.0f} shapes/s on the GPU, "
          f"{len(points) / step_host:.0f} on "
          f"the host ({step_host / step_gpu:.1f}x); first loss GPU {gpu['first_loss']:.6f}, "
          f"host {host['first_loss']:.6f}")
    print(f"wrote {C.write_json('gpu_train_step', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
