"""pwconv next to NumPy's OpenBLAS: what OpenBLAS's spinning idle threads cost (issue 6, threads).

OpenBLAS's pthreads build (NumPy's wheels) keeps its worker threads spinning for 2^28 cycles
(about 0.1 s) after every multi-threaded call; pwconv's OpenMP threads that start meanwhile share
their cores with them.  Measured in fresh processes, alternating, with OPENBLAS_THREAD_TIMEOUT unset
(the default) and set to 4 (idle workers sleep at once), at 2 threads:

* ``after matmul``: three ``pointwise_conv_backward`` calls (32 sphere clouds x 1,024 points,
  9 -> 9 channels, s = 2, map given) right after a (32 x 36,864) @ (36,864 x 512) float32 matmul
  -- the shape of the classifier's first fully connected layer -- and, for reference, the same
  calls with no matmul before them, and (with PyTorch installed) after the same matmul by
  PyTorch;
* ``train step``: ``pwconv_cy.train.train_step`` of the paper's classifier on 32 real ModelNet40
  shapes (as benchmarks/train_step.py), medians of 20 steps after 2.

    python benchmarks/blas_spin.py          # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

import _common as C

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=int(sys.argv[2]))
    what = sys.argv[1]
    if what == "train_step":
        sys.path.insert(0, sys.argv[3])
        import train_step as T
        from pwconv_cy import nn, optim
        from pwconv_cy import train as train_module
        points, labels = T.load_batch()
        model = T.make_model().train()
        loss_fn = nn.SoftmaxCrossEntropy()
        adam = optim.Adam(1e-3)
        state = adam.init(model.params)
        times = []
        for _ in range(22):
            t = time.perf_counter()
            _, _, state = train_module.train_step(model, loss_fn, adam, state, points, labels)
            times.append(time.perf_counter() - t)
    else:
        import pwconv_cy
        rng = np.random.default_rng(0)
        p = rng.standard_normal((32 * 1024, 3))
        p = (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)
        offsets = np.arange(33) * 1024
        x = rng.standard_normal((len(p), 9)).astype(np.float32)
        w = rng.standard_normal((3, 3, 3, 9, 9)).astype(np.float32)
        dy = rng.standard_normal((len(p), 9)).astype(np.float32)
        km = pwconv_cy.kernel_map(p, 0.14, dilation=2, offsets=offsets)
        a = rng.standard_normal((32, 36864)).astype(np.float32)
        b = rng.standard_normal((36864, 512)).astype(np.float32)
        if what == "after_torch_matmul":
            import torch
            torch.set_num_threads(int(sys.argv[2]))
            a, b = torch.from_numpy(a), torch.from_numpy(b)
        times = []
        for _ in range(32):
            if what in ("after_matmul", "after_torch_matmul"):
                a @ b
            t = time.perf_counter()
            for _ in range(3):
                pwconv_cy.pointwise_conv_backward(dy, p, x, w, 0.14, dilation=2, offsets=offsets,
                                                  kernel_map=km)
            times.append(time.perf_counter() - t)
    print(json.dumps(times[2:]))
""")


def run_child(what: str, threads: int, timeout_var: str | None) -> list:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if timeout_var is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout_var
    proc = subprocess.run([sys.executable, "-c", CHILD, what, str(threads), str(C.BENCH_DIR)],
                          capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating processes per case")
    opts = parser.parse_args(argv)
    cases = [("no_matmul", None), ("after_matmul", None), ("after_matmul", "4"),
             ("train_step", None), ("train_step", "4")]
    try:
        import torch  # noqa: F401 - the same matmul by PyTorch (its own BLAS and OpenMP)

        cases.insert(3, ("after_torch_matmul", None))
    except ImportError:
        pass
    medians = {f"{w} timeout={t or 'default'}": [] for w, t in cases}
    for _ in range(opts.rounds):
        for what, var in cases:
            times = run_child(what, opts.threads, var)
            medians[f"{what} timeout={var or 'default'}"].append(statistics.median(times))
    rows = [[name, ", ".join(f"{1e3 * m:.1f}" for m in ms) + " ms",
             f"{1e3 * statistics.median(ms):.1f} ms"] for name, ms in medians.items()]
    C.print_table(["case", "median of each process", "median"], rows)
    path = C.write_json("blas_spin", {"machine": C.machine_info(), "threads": opts.threads,
                                      "rounds": opts.rounds, "medians_s": medians})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
