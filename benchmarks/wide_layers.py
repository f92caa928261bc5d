"""Wider layers than the paper's: the operator at 9, 32, 64 and 128 channels on the CPU.

32 clouds x 2,048 points uniformly on the unit sphere (seeded), v = 0.1, K = 3, s = 1 (about 18
neighbours per point), float32, the kernel map built once and passed in (the operator alone).
Side by side in one run, per channel count c (c -> c):

* pwconv with each family of loops this CPU has: AVX-512 (the default where the CPU has it),
  AVX2 (what CPUs without AVX-512 run) and portable (``set_simd_enabled(False)``: the code
  before the wide-layer loops); the results are the same bits;
* the NumPy/SciPy peer (``sum_f A_f X W_f`` with one sparse matrix per kernel cell) and the
  PyTorch peer (``index_add_`` into per-(point, cell) sums, one matmul, autograd) of
  ``benchmarks/peers.py``, on the same pairs.

Forward, and forward + backward (input and weight gradients); medians of 5 rounds after a warm-up
round (pwconv's loop families alternating in each round, each peer timed in its own block).
Outputs are checked against the peers first.  Writes ``results/wide_layers.json``.

    python benchmarks/wide_layers.py              # about 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C
import numpy as np
from peers import ScipyPeer, TorchPeer

import pwconv_cy
from pwconv_cy import _core

CLOUDS, POINTS, VOXEL = 32, 2048, 0.1


def set_loops(mode: str) -> None:
    """pwconv's loop family: 'avx512', 'avx2' (AVX-512 not allowed) or 'portable'."""
    _core.set_simd(mode != "portable")
    _core.set_avx512(mode == "avx512")


def round_robin_ms(cases: dict, runs: int) -> dict:
    """{name: (forward ms, forward + backward ms)}: medians of `runs` rounds, each round timing
    every case once in turn (after one warm-up round), so that the machine's drifts hit all."""
    times = {name: ([], []) for name in cases}
    for r in range(runs + 1):
        for name, (mode, fns) in cases.items():
            set_loops(mode)
            for k, fn in enumerate(fns):
                t = time.perf_counter()
                fn()
                if r:
                    times[name][k].append(time.perf_counter() - t)
    set_loops("avx512")
    return {name: tuple(1e3 * statistics.median(t) for t in ts) for name, ts in times.items()}


def layer_calls(points, offsets, km, tmap, mats, x, w, dy) -> dict:
    """{implementation: (forward, forward + backward)} for one layer's arrays."""
    import torch

    kw = {"offsets": offsets, "kernel_map": km}
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def fwd():
        return pwconv_cy.pointwise_conv(points, x, w, VOXEL, **kw)

    def fwd_bwd():
        fwd()
        return pwconv_cy.pointwise_conv_backward(dy, points, x, w, VOXEL, **kw)

    def torch_fwd():
        return TorchPeer.forward(tmap, xt, wt).detach().numpy()

    def torch_fwd_bwd():
        xt.grad = wt.grad = None
        TorchPeer.forward(tmap, xt, wt).backward(dyt)

    def scipy_fwd():
        return ScipyPeer.forward(mats, x, w)

    def scipy_fwd_bwd():
        scipy_fwd()
        return ScipyPeer.backward(mats, x, w, dy)

    return {"pwconv": (fwd, fwd_bwd), "pytorch": (torch_fwd, torch_fwd_bwd),
            "numpy/scipy": (scipy_fwd, scipy_fwd_bwd)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[9, 32, 64, 128])
    opts = parser.parse_args(argv)
    C.limit_threads(opts.threads)
    import torch

    torch.set_num_threads(opts.threads)
    points = C.sphere(CLOUDS * POINTS, seed=0)
    offsets = np.arange(CLOUDS + 1, dtype=np.int64) * POINTS
    km = pwconv_cy.kernel_map(points, VOXEL, offsets=offsets)
    peer_map = ScipyPeer.kernel_map(points, offsets, VOXEL)
    mats = ScipyPeer.operator(peer_map, len(points))
    tmap = TorchPeer.kernel_map(torch.from_numpy(points.astype(np.float64)),
                                torch.from_numpy(offsets), VOXEL)
    assert tmap.slot.shape[0] == km.n_pairs == peer_map.rows.shape[0]
    modes = (["avx512"] if _core.simd_state()[0] else []) + (
        ["avx2"] if _core.avx2_state()[0] else []) + ["portable"]
    rng = np.random.default_rng(1)
    rows, record = [], []
    for c in opts.channels:
        x = rng.standard_normal((len(points), c)).astype(np.float32)
        w = (rng.standard_normal((3, 3, 3, c, c)) / np.sqrt(27 * c)).astype(np.float32)
        dy = rng.standard_normal((len(points), c)).astype(np.float32)
        calls = layer_calls(points, offsets, km, tmap, mats, x, w, dy)
        y = calls["pwconv"][0]()
        scale = np.linalg.norm(y)
        for name in ("pytorch", "numpy/scipy"):
            other = np.asarray(calls[name][0]())
            err = np.linalg.norm(other - y) / scale
            assert err < 1e-5, f"{c} channels: pwconv and {name} differ by {err:.2g}"
        # pwconv's loop families alternate; each peer is timed in its own block: interleaving the
        # libraries would time their thread pools' interference (OpenBLAS keeps its threads
        # spinning after each call, see blas_spin.py), not the operators
        names = {"avx512": "pwconv (AVX-512)", "avx2": "pwconv (AVX2)",
                 "portable": "pwconv (portable)"}
        times = round_robin_ms({names[m]: (m, calls["pwconv"]) for m in modes}, opts.runs)
        for peer in ("pytorch", "numpy/scipy"):
            times.update(round_robin_ms({peer: (modes[0], calls[peer])}, opts.runs))
        best = times[names[modes[0]]]
        for name, (tf, tfb) in times.items():
            rows.append([f"{c} -> {c}", name, f"{tf:.1f} ms", f"{tfb:.1f} ms",
                         f"{tfb / best[1]:.2f}x"])
        record.append({"channels": c, "ms": times})
    C.print_table(["layer", "implementation", "forward", "forward + backward",
                   "vs pwconv (fwd + bwd)"], rows)
    path = C.write_json("wide_layers", {
        "machine": C.machine_info(), "threads": opts.threads, "clouds": CLOUDS,
        "points_per_cloud": POINTS, "voxel_size": VOXEL, "pairs": km.n_pairs,
        "loops": modes, "results": record})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
