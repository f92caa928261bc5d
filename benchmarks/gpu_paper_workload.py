"""The paper workload (SPEC §7) on the GPU: pwconv's CUDA path side by side with plain PyTorch.

128 clouds x 2,048 points uniformly on the unit sphere (seeded), the paper's four layers 3->9 (s=1),
9->9 (s=2), 9->9 (s=3), 9->9 (s=4), v = 0.1, K = 3, float32, SELU after each layer, outputs
concatenated (n x 36); the backward pass starts from a seeded normal gradient of that output.
Timed with CUDA events after a warm-up, medians of several runs, per stage:

* kernel maps -- pwconv: one shared GPU grid (``pwconv_cy.cuda.NeighborIndex``) + four
  ``.kernel_map`` calls; PyTorch: brute force per cloud, 8 clouds at a time (candidates from
  the float32 per-axis differences of all pairs, then SPEC §1's exact binning in float64), as
  benchmarks/peers.py does on the CPU;
* forward -- the four layers (pwconv builds whatever it caches on a map here: map caches are
  dropped before every run); PyTorch: ``index_add_`` of scaled neighbour features + one matmul
  per layer;
* backward -- input and weight gradients of the four layers (pwconv builds its transposed maps
  here); PyTorch: autograd.

pwconv's forward and backward are timed with each GPU operator scheme ("entries", the default for
these channel counts, "rows" and "by cell": PWCONV_CUDA_OPERATOR), the default (one thread per
row, transposed maps by per-point sorts) also with the opt-in atomic input gradient
(PWCONV_CUDA_DETERMINISTIC=0), with the lanes of a row loading each value
(PWCONV_CUDA_ENTRIES_LOADS=broadcast; =tile: each cloud's source rows in shared memory), with the
weight gradient by chunks of rows sorted by cell in shared memory (PWCONV_CUDA_WEIGHT_GRAD=chunks)
and with the transposed maps by one radix sort (PWCONV_CUDA_TRANSPOSE=sort); the kernel maps
also by count + fill passes (PWCONV_CUDA_MAP_PASSES=two), with the fill threads sorting their own
rows (PWCONV_CUDA_ROW_SORT=thread), with the row table as (key, cells) pairs
(PWCONV_CUDA_ROW_SLOTS=1) and with each cloud's coordinates (and cells) in shared memory too
(PWCONV_CUDA_MAP_TILES=1, 2), each cloud's coordinates, cells and grid rows there
(PWCONV_CUDA_MAP_TILES=3), with the one pass's scratch sized from a sample count every time
(PWCONV_CUDA_MAP_CAPACITY=sample) and with the grid by flatnonzero (PWCONV_CUDA_GRID_BUILD=
nonzero) -- the defaults before 2026-11-28 -- and a breakdown times the grid (both ways), each
map, the per-call checks and each kernel stage of every layer (the rows scheme's beside them).

Both are checked first: identical pair counts per layer and outputs / weight gradients equal
within float32 rounding.  Also timed: the kernel map of one 1,000,000-point sphere-surface cloud
(dilation 1, v = 0.005: about 20-30 neighbours per point), grid included, and the
classifier's maps of 32 ModelNet40 shapes (a training batch, where $PWCONV_SHARED_DATA or
../shared/data has them), as shipped and by count + fill passes, and the radius search of the
paper's clouds both ways.

Writes ``$OUT/gpu_results.json`` when $OUT is set, else
``benchmarks/results/gpu_paper_workload.json``, with the GPU, driver, CUDA/CuPy/PyTorch versions
and the date, and prints a table.

    python benchmarks/gpu_paper_workload.py            # about a minute on an H100
    python benchmarks/gpu_paper_workload.py --quick    # 16 clouds, fewer runs
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYERS = [(3, 9, 1), (9, 9, 2), (9, 9, 3), (9, 9, 4)]  # (c_in, c_out, dilation)
VOXEL = 0.1
K = 3
SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772
BIG_N = 1_000_000
BIG_VOXEL = 0.005
MARGIN = 1e-5  # candidate slack of the brute-force peer, relative (the exact rule decides)


def sphere(n: int, seed: int) -> np.ndarray:
    """n points uniformly on the unit sphere (as benchmarks/_common.sphere)."""
    p = np.random.default_rng(seed).standard_normal((n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p.astype(np.float32)


def glorot(rng, c_in: int, c_out: int) -> np.ndarray:
    fan_in, fan_out = K ** 3 * c_in, K ** 3 * c_out
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(K, K, K, c_in, c_out)).astype(np.float32)


# --- timing ---------------------------------------------------------------------------------


def _summary(times) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
            "all_s": times}


def time_cuda(fn, warmup: int, runs: int) -> dict:
    """Median / min / all of `runs` CUDA-event timings (seconds) of fn() after `warmup` calls,
    on CuPy's current stream; host_median_s: the median time fn() took to return (Python, the
    launches and any synchronisation inside fn).  Near the event time, the host sets the pace:
    the device waits for launches."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times, host = [], []
    for _ in range(runs):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return {**_summary(times), "host_median_s": statistics.median(host)}


def time_torch(fn, warmup: int, runs: int) -> dict:
    """As time_cuda, with torch.cuda events on PyTorch's current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return _summary(times)


# --- pwconv on the GPU ----------------------------------------------------------------------


_SELU = {}


def _selu_kernels(cupy):
    """SELU, and the gradient through it, as one fused CuPy elementwise kernel each (PyTorch's
    selu is one kernel too; cupy.where over expm1 and a comparison took four)."""
    if not _SELU:
        _SELU["f"] = cupy.ElementwiseKernel(
            "T z", "T y", f"y = z > 0 ? (T){SELU_LAMBDA!r} * z : "
            f"(T){SELU_LAMBDA * SELU_ALPHA!r} * expm1(z)", "pwconv_bench_selu")
        _SELU["d"] = cupy.ElementwiseKernel(  # the output gradient g times SELU'(z)
            "T g, T z", "T y", f"y = g * (z > 0 ? (T){SELU_LAMBDA!r} : "
            f"(T){SELU_LAMBDA * SELU_ALPHA!r} * exp(z))", "pwconv_bench_selu_grad")
    return _SELU["f"], _SELU["d"]


class PwconvGPU:
    name = "pwconv (CUDA)"

    def __init__(self, points, offsets, weights, grad):
        import cupy

        self.cp = cupy
        self.points = cupy.asarray(points)
        self.offsets = offsets
        self.weights = [cupy.asarray(w) for w in weights]
        self.grad = cupy.asarray(grad)
        self.first_input_grad = False  # the first layer's input gradient too (earlier figures)

    def kernel_maps(self):
        """The grid and the four layers' maps, made together (one launch per search pass)."""
        from pwconv_cy import cuda

        index = cuda.NeighborIndex(self.points, VOXEL, offsets=self.offsets)
        return index.kernel_maps(K, [s for _, _, s in LAYERS])

    def kernel_maps_one_by_one(self):
        """As kernel_maps, one map after the other (the figures before 2026-11-26 21:00)."""
        from pwconv_cy import cuda

        index = cuda.NeighborIndex(self.points, VOXEL, offsets=self.offsets)
        return [index.kernel_map(K, s) for _, _, s in LAYERS]

    def _selu(self, z):
        try:
            return _selu_kernels(self.cp)[0](z)
        except Exception:  # noqa: BLE001 - a CuPy that cannot compile it: the plain expression
            cp = self.cp
            return SELU_LAMBDA * cp.where(z > 0, z, SELU_ALPHA * cp.expm1(z))

    def _selu_backward(self, g, z):
        try:
            return _selu_kernels(self.cp)[1](g, z)
        except Exception:  # noqa: BLE001 - as _selu
            cp = self.cp
            return cp.ascontiguousarray(
                g * (SELU_LAMBDA * cp.where(z > 0, cp.float32(1), SELU_ALPHA * cp.exp(z))))

    def forward(self, kms):
        from pwconv_cy import cuda

        xs, zs = [self.points], []
        for (_, _, s), w, km in zip(LAYERS, self.weights, kms):
            # the maps were made from these points: no fingerprint (a device sync) per call
            z = cuda.pointwise_conv(self.points, xs[-1], w, VOXEL, dilation=s,
                                    offsets=self.offsets, kernel_map=km, check_finite=False,
                                    check_map=False)
            zs.append(z)
            xs.append(self._selu(z))
        return xs, zs

    def output(self, xs):
        return self.cp.concatenate(xs[1:], axis=1)

    def backward(self, kms, xs, zs):
        from pwconv_cy import cuda

        c = [c_out for _, c_out, _ in LAYERS]
        splits = np.cumsum([0] + c)
        d_h = [self.grad[:, splits[i]:splits[i + 1]] for i in range(len(LAYERS))]
        d_w = [None] * len(LAYERS)
        for i in reversed(range(len(LAYERS))):
            dz = self._selu_backward(d_h[i], zs[i])  # C-contiguous
            # no input gradient for the first layer, whose input is the coordinates: PyTorch's
            # autograd computes none there either, nor does training (models' input_grad=False)
            dx, d_w[i] = cuda.pointwise_conv_backward(
                dz, self.points, xs[i], self.weights[i], VOXEL, dilation=LAYERS[i][2],
                offsets=self.offsets, kernel_map=kms[i], check_finite=False, check_map=False,
                feats_grad=i > 0 or self.first_input_grad)
            if i > 0:
                d_h[i - 1] = d_h[i - 1] + dx
        return d_w


def breakdown(pw, kms, state, warmup: int, runs: int) -> dict:
    """Where the time goes: the grid, each kernel map, the checks of a call, and each kernel
    stage of every layer (called directly, caches as the stage needs them)."""
    import cupy

    from pwconv_cy import cuda
    from pwconv_cy.cuda import _conv, _search
    from pwconv_cy.cuda._backend import get_backend

    be = get_backend()
    out = {}
    points64 = pw.points.astype(cupy.float64)
    out["grid (NeighborIndex)"] = time_cuda(
        lambda: cuda.NeighborIndex(pw.points, VOXEL, offsets=pw.offsets), warmup, runs)
    with _env(_search.GRID_BUILD_ENV, "nonzero"):  # flatnonzero and a search (before)
        out["grid (NeighborIndex), flatnonzero"] = time_cuda(
            lambda: cuda.NeighborIndex(pw.points, VOXEL, offsets=pw.offsets), warmup, runs)
    index = cuda.NeighborIndex(pw.points, VOXEL, offsets=pw.offsets)
    for (_, _, s), km in zip(LAYERS, kms):
        out[f"kernel map s={s} ({km.n_pairs:,} pairs)"] = time_cuda(
            lambda s=s: index.kernel_map(K, s), warmup, runs)
    out["kernel maps s=1-4 together"] = time_cuda(
        lambda: index.kernel_maps(K, [s for _, _, s in LAYERS]), warmup, runs)
    with _env(_search.MAP_PASSES_ENV, "two"):
        out["kernel maps s=1-4 together, count + fill passes"] = time_cuda(
            lambda: index.kernel_maps(K, [s for _, _, s in LAYERS]), warmup, runs)
    out["points digest (float32 points)"] = time_cuda(
        lambda: _search.points_digest(be, pw.points, pw.offsets), warmup, runs)
    out["points digest (float64 points)"] = time_cuda(
        lambda: _search.points_digest(be, points64, pw.offsets), warmup, runs)
    xs, zs = state["xs"], state["zs"]
    for i, ((c_in, c_out, s), w, km) in enumerate(zip(LAYERS, pw.weights, kms)):
        x = xs[i]
        tag = f"layer {i + 1} {c_in}->{c_out} s={s}"
        out[f"{tag}: pointwise_conv call"] = time_cuda(
            lambda x=x, w=w, km=km, s=s: cuda.pointwise_conv(
                pw.points, x, w, VOXEL, dilation=s, offsets=pw.offsets, kernel_map=km,
                check_finite=False), warmup, runs)
        out[f"{tag}: pointwise_conv call, check_map=False"] = time_cuda(
            lambda x=x, w=w, km=km, s=s: cuda.pointwise_conv(
                pw.points, x, w, VOXEL, dilation=s, offsets=pw.offsets, kernel_map=km,
                check_finite=False, check_map=False), warmup, runs)
        dy = cupy.ascontiguousarray(zs[i])
        kernels = {  # each stage's kernels, called directly (caches as the stage needs them)
            "forward kernel":
                lambda x=x, w=w, km=km, c_out=c_out: _conv.forward(be, km, x, w, c_out, False),
            "input gradient kernel":
                lambda dy=dy, w=w, km=km, c_in=c_in: _conv.backward_input(be, km, dy, w, c_in,
                                                                          False),
            "weight gradient kernels":
                lambda x=x, dy=dy, km=km, c_out=c_out: _conv.backward_weight(be, km, x, dy,
                                                                             c_out, False),
        }
        out[f"{tag}: forward kernel"] = time_cuda(kernels["forward kernel"], warmup, runs)

        def fresh_weights(km=km):
            km._cache.pop("cuda_entry_weights_float32", None)
            _conv.entry_weights(be, km, cupy.float32)

        out[f"{tag}: entry weights 1 / n_i(f)"] = time_cuda(fresh_weights, warmup, runs)

        def fresh_transposed(km=km):  # as one thread per row reads it: counts, no weights
            km._cache.pop("cuda_transposed_counts", None)
            km._cache.pop("cuda_row_of", None)
            _conv.transposed_counts(be, km)

        out[f"{tag}: transposed map"] = time_cuda(fresh_transposed, warmup, runs)
        with _env(_conv.TRANSPOSE_ENV, "sort"):
            out[f"{tag}: transposed map, one radix sort"] = time_cuda(fresh_transposed, warmup,
                                                                      runs)

        def fresh_cell_entries(km=km):
            km._cache.pop("cuda_cell_entries_float32", None)
            _conv.cell_entries(be, km, cupy.float32)

        out[f"{tag}: by-cell entries (weight gradient)"] = time_cuda(fresh_cell_entries, warmup,
                                                                     runs)
        for what in ("input gradient kernel", "weight gradient kernels"):
            out[f"{tag}: {what}"] = time_cuda(kernels[what], warmup, runs)
        with _env(_conv.DETERMINISTIC_ENV, "0"):
            out[f"{tag}: input gradient, opt-in atomics (no transposed map)"] = time_cuda(
                kernels["input gradient kernel"], warmup, runs)
        with _env(_conv.INPUT_GRAD_ENV, "fixed"):
            out[f"{tag}: input gradient, opt-in fixed point (no transposed map)"] = time_cuda(
                kernels["input gradient kernel"], warmup, runs)
        with _env(_conv.ENTRIES_LOADS_ENV, "broadcast"):  # conv_entries, weights cached
            for what in ("forward kernel", "input gradient kernel"):
                out[f"{tag}: {what}, a row's lanes loading each value"] = time_cuda(
                    kernels[what], warmup, runs)
        with _env(_conv.ENTRIES_LOADS_ENV, "tile"):  # conv_entries_tile, same caches
            for what in ("forward kernel", "input gradient kernel"):
                out[f"{tag}: {what}, one thread per row, clouds in shared memory"] = \
                    time_cuda(kernels[what], warmup, runs)
        with _env(_conv.WEIGHT_GRAD_ENV, "chunks"):  # conv_weight_chunks (entry weights cached)
            out[f"{tag}: weight gradient kernels (chunks sorted by cell)"] = time_cuda(
                kernels["weight gradient kernels"], warmup, runs)
        with _env(_conv.WEIGHT_GRAD_ENV, "warps"):  # conv_weight_warps (entry counts cached)
            out[f"{tag}: weight gradient kernels (by warps)"] = time_cuda(
                kernels["weight gradient kernels"], warmup, runs)
        with _env(_conv.WEIGHT_GRAD_ENV, "cells"):  # by cell, its sorted entries cached
            out[f"{tag}: weight gradient kernels (by cell)"] = time_cuda(
                kernels["weight gradient kernels"], warmup, runs)
        with _env(_conv.OPERATOR_ENV, "rows"):  # the rows scheme's kernels, same caches
            for what, fn in kernels.items():
                out[f"{tag}: {what} (rows scheme)"] = time_cuda(fn, warmup, runs)
    return out


@contextlib.contextmanager
def _env(name: str, value: str):
    """Sets environment variable `name` to `value` for the block, then restores it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --- plain PyTorch on the same GPU ----------------------------------------------------------


class TorchGPU:
    name = "PyTorch (same GPU)"

    def __init__(self, points, offsets, weights, grad, chunk_clouds=8):
        import torch

        self.torch = torch
        self.dev = torch.device("cuda")
        self.points64 = torch.as_tensor(points, device=self.dev).to(torch.float64)
        self.points = torch.as_tensor(points, device=self.dev)
        self.offsets = [int(o) for o in offsets]
        self.weights = [torch.as_tensor(w, device=self.dev).requires_grad_(True) for w in weights]
        self.grad = torch.as_tensor(grad, device=self.dev)
        self.chunk = chunk_clouds

    def kernel_map(self, dilation):
        """(slot = row * K^3 + cell, cols, scale = 1 / n_i(f), n_pairs) for equal-size clouds."""
        torch = self.torch
        s, span, n_cells = dilation, dilation * (K - 1) + 1, K ** 3
        h = span * VOXEL / 2
        n_per = self.offsets[1] - self.offsets[0]
        n_clouds = len(self.offsets) - 1
        p_all = self.points64.view(n_clouds, n_per, 3)
        rows, cols, cells = [], [], []
        p32_all = self.points.view(n_clouds, n_per, 3)
        # candidates from float32 differences (their rounding is far below the MARGIN slack);
        # the float64 rule below decides.  (torch.cdist(p=inf) in float64, used before
        # 2026-11-27, took ~0.75 s per map on the H200: a slow generic path.)
        slack = h * (1 + MARGIN)
        for c0 in range(0, n_clouds, self.chunk):
            p = p_all[c0:c0 + self.chunk]
            p32 = p32_all[c0:c0 + self.chunk]
            cand = ((p32[:, :, None, :] - p32[:, None, :, :]).abs() <= slack).all(dim=3)
            b, i, j = torch.nonzero(cand, as_tuple=True)
            t = (p[b, j] - (p[b, i] - h)) / VOXEL  # SPEC §1: subtract h, subtract, divide
            inside = ((t >= 0) & (t <= span)).all(dim=1)
            b, i, j, t = b[inside], i[inside], j[inside], t[inside]
            c = torch.clamp(torch.floor(t), max=s * (K - 1)).to(torch.int64)
            keep = (c % s == 0).all(dim=1)
            c = c[keep] // s
            base = (b[keep] + c0) * n_per
            rows.append(base + i[keep])
            cols.append(base + j[keep])
            cells.append((c[:, 2] * K + c[:, 1]) * K + c[:, 0])
        rows, cols, cells = torch.cat(rows), torch.cat(cols), torch.cat(cells)
        slot = rows * n_cells + cells
        n = self.points.shape[0]
        counts = torch.bincount(slot, minlength=n * n_cells)
        scale = (1.0 / counts[slot].to(torch.float64)).to(torch.float32)
        return slot, cols, scale, int(rows.shape[0])

    def kernel_maps(self):
        return [self.kernel_map(s) for _, _, s in LAYERS]

    def forward(self, kms):
        torch = self.torch
        n = self.points.shape[0]
        x = self.points
        outs = []
        for (c_in, c_out, _), w, (slot, cols, scale, _) in zip(LAYERS, self.weights, kms):
            msg = x.index_select(0, cols) * scale[:, None]
            sums = torch.zeros(n * K ** 3, c_in, device=self.dev).index_add_(0, slot, msg)
            x = torch.selu(sums.view(n, K ** 3 * c_in) @ w.reshape(K ** 3 * c_in, c_out))
            outs.append(x)
        return torch.cat(outs, dim=1)

    def backward(self, out):
        for w in self.weights:
            w.grad = None
        out.backward(self.grad)
        return [w.grad for w in self.weights]


# --- records ---------------------------------------------------------------------------------


def machine_record() -> dict:
    import cupy

    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(),
           "cupy": cupy.__version__, "cpu_count": os.cpu_count()}
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        rec["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        rec["gpu_memory_bytes"] = int(props["totalGlobalMem"])
        rec["compute_capability"] = f"{props['major']}.{props['minor']}"
        rec["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()
        rec["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as exc:  # noqa: BLE001 - record what failed rather than die
        rec["gpu_error"] = repr(exc)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                             check=False)
        rec["nvidia_smi"] = smi.stdout.strip()
    except Exception as exc:  # noqa: BLE001
        rec["nvidia_smi"] = repr(exc)
    try:
        import torch

        rec["torch"] = torch.__version__
        rec["torch_cuda"] = torch.version.cuda
    except Exception as exc:  # noqa: BLE001
        rec["torch"] = f"unavailable: {exc!r}"
    try:
        import pwconv_cy

        rec["pwconv_cy"] = pwconv_cy.__version__
    except Exception as exc:  # noqa: BLE001
        rec["pwconv_cy"] = f"unavailable: {exc!r}"
    return rec


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def fmt_ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:9.2f} ms"


def results_path() -> Path:
    out = os.environ.get("OUT")
    if out:
        return Path(out) / "gpu_results.json"
    return Path(__file__).resolve().parent / "results" / "gpu_paper_workload.json"


def sphere_1m(cuda, cupy, big_n: int, big_voxel: float, seed: int, runs: int) -> dict:
    """Grid and kernel map (K = 3, s = 1) of one big_n-point sphere-surface cloud, timed."""
    from pwconv_cy.cuda import _search

    big = cupy.asarray(sphere(big_n, seed + 7))
    holder = {}

    def big_grid():
        holder["index"] = cuda.NeighborIndex(big, big_voxel)

    def big_map():
        holder["km"] = holder["index"].kernel_map(K, 1)

    def big_both():
        cuda.NeighborIndex(big, big_voxel).kernel_map(K, 1)

    big_runs = max(3, runs // 2)
    out = {
        "points": big_n, "voxel_size": big_voxel, "kernel_size": K, "dilation": 1,
        "grid_build": time_cuda(big_grid, 1, big_runs),
        "kernel_map": time_cuda(big_map, 1, big_runs),
        "grid_plus_kernel_map": time_cuda(big_both, 1, big_runs),
    }
    with _env(_search.MAP_PASSES_ENV, "two"):  # at 19:42 (two passes) this map took 2.18 ms
        out["kernel_map_two_passes"] = time_cuda(big_map, 1, big_runs)
    with _env(_search.GRID_BUILD_ENV, "nonzero"):  # flatnonzero and a search (before)
        out["grid_build_nonzero"] = time_cuda(big_grid, 1, big_runs)
    km = holder["km"]
    out["pairs"] = km.n_pairs
    out["mean_neighbours"] = km.n_pairs / big_n
    out["map_bytes"] = km.nbytes
    out["pool_used_bytes"] = int(cupy.get_default_memory_pool().used_bytes())
    return out


def modelnet_maps(cuda, cupy, runs: int, n_shapes: int = 32) -> dict | None:
    """The classifier's kernel maps of a training batch: grid + maps s = 1-4 (v = 0.1, K = 3)
    of the first n_shapes ModelNet40 training shapes (1,024 points each), as
    pwconv_cy.models builds them, timed as shipped (one pass; rows over SHORT_ROW entries,
    which most shapes have, searched again alone) and by count + fill passes (all rows twice,
    as such maps were made before 2026-11-27).  None where the data is absent
    ($PWCONV_SHARED_DATA, else ../shared/data)."""
    from pwconv_cy.cuda import _search

    shared = Path(os.environ.get("PWCONV_SHARED_DATA", Path(__file__).resolve().parents[2]
                                 / "shared" / "data"))
    path = shared / "modelnet40_1024" / "train.npz"
    if not path.exists():
        print(f"(ModelNet40 maps skipped: {path} not found)")
        return None
    with np.load(path) as z:
        shapes = np.ascontiguousarray(z["points"][:n_shapes], dtype=np.float32)
    points = cupy.asarray(shapes.reshape(-1, 3))
    offsets = np.arange(len(shapes) + 1, dtype=np.int64) * shapes.shape[1]

    def maps():
        return cuda.NeighborIndex(points, VOXEL, offsets=offsets).kernel_maps(K, [1, 2, 3, 4])

    lengths = [cupy.asnumpy(cupy.diff(km.splits)) for km in maps()]
    out = {"shapes": len(shapes), "points": int(points.shape[0]),
           "pairs_per_map": [int(n.sum()) for n in lengths],
           "rows_over_short_row": [int((n > _search.SHORT_ROW).sum()) for n in lengths],
           "grid_plus_maps": time_cuda(maps, 3, runs)}
    with _env(_search.MAP_PASSES_ENV, "two"):
        out["grid_plus_maps_two_passes"] = time_cuda(maps, 3, runs)
    return out


def radius_timing(cuda, cupy, points: np.ndarray, offsets: np.ndarray, runs: int) -> dict:
    """The radius search (grid included; r = 1.5 v, Chebyshev, ~10-20 neighbours a point) of the
    paper workload's clouds, searched once (shipped) and by count + fill passes (as before
    2026-11-27)."""
    from pwconv_cy.cuda import _search

    pts = cupy.asarray(points)
    radius = 1.5 * VOXEL

    def search():
        return cuda.radius_search(pts, radius, offsets=offsets)

    out = {"radius": radius, "pairs": int(search()[0][-1]),
           "one_pass": time_cuda(search, 3, runs)}
    with _env(_search.MAP_PASSES_ENV, "two"):
        out["two_passes"] = time_cuda(search, 3, runs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 clouds, fewer runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--big-points", type=int, default=BIG_N,
                        help="points of the single sphere-surface cloud (default 1,000,000)")
    parser.add_argument("--clouds", type=int, default=None,
                        help="clouds of the paper workload (default 128, 16 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--modelnet-shapes", type=int, default=32,
                        help="ModelNet40 shapes of the classifier's maps (default 32)")
    opts = parser.parse_args(argv)

    import pwconv_cy
    from pwconv_cy import cuda

    if not cuda.is_available():
        print(f"GPU path unavailable: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    import cupy
    n_clouds = opts.clouds or (16 if opts.quick else 128)
    n_points = 2048
    runs = opts.runs or (5 if opts.quick else 20)
    warmup = opts.warmup if opts.warmup is not None else (2 if opts.quick else 3)
    record = {"workload": {"clouds": n_clouds, "points_per_cloud": n_points, "layers": LAYERS,
                           "voxel_size": VOXEL, "kernel_size": K, "dtype": "float32",
                           "runs": runs, "warmup": warmup, "seed": opts.seed},
              "machine": machine_record(), "stages": {}, "checks": {}}
    print("machine:", json.dumps({k: v for k, v in record["machine"].items()}, default=str))

    points = sphere(n_clouds * n_points, opts.seed)
    offsets = np.arange(n_clouds + 1, dtype=np.int64) * n_points
    rng = np.random.default_rng(opts.seed + 1)
    weights = [glorot(rng, c_in, c_out) for c_in, c_out, _ in LAYERS]
    grad = rng.standard_normal((points.shape[0], sum(c for _, c, _ in LAYERS))).astype(np.float32)

    t0 = time.perf_counter()
    cuda.compile_kernels()
    record["compile_or_cache_load_s"] = time.perf_counter() - t0

    pw = PwconvGPU(points, offsets, weights, grad)
    impls = [pw]
    torch_peer = None
    if not opts.no_torch:
        try:
            import torch

            if torch.cuda.is_available():
                torch_peer = TorchGPU(points, offsets, weights, grad)
                impls.append(torch_peer)
            else:
                record["torch_skipped"] = "torch.cuda.is_available() is False"
        except Exception as exc:  # noqa: BLE001
            record["torch_skipped"] = repr(exc)

    # --- correctness first ------------------------------------------------------------------
    kms = pw.kernel_maps()
    xs, zs = pw.forward(kms)
    d_w = pw.backward(kms, xs, zs)
    pairs = [km.n_pairs for km in kms]
    record["checks"]["pairs_per_layer"] = pairs
    record["checks"]["mean_neighbours_per_layer"] = [e / points.shape[0] for e in pairs]
    cpu_km = pwconv_cy.kernel_map(points[:4 * n_points], VOXEL, kernel_size=K, dilation=2,
                                  offsets=offsets[:5])
    gpu_km = cuda.kernel_map(cupy.asarray(points[:4 * n_points]), VOXEL, kernel_size=K,
                             dilation=2, offsets=offsets[:5])
    same = all(np.array_equal(cupy.asnumpy(getattr(gpu_km, a)), getattr(cpu_km, a))
               for a in ("splits", "index", "cell", "counts"))
    record["checks"]["kernel_map_identical_to_cpu_4_clouds_s2"] = bool(same)
    if torch_peer is not None:
        try:
            tkms = torch_peer.kernel_maps()
            record["checks"]["torch_pairs_per_layer"] = [t[3] for t in tkms]
            record["checks"]["pairs_match_torch"] = [t[3] for t in tkms] == pairs
            out_t = torch_peer.forward(tkms)
            tdw = torch_peer.backward(out_t)
            record["checks"]["forward_rel_err_vs_torch"] = rel_err(
                cupy.asnumpy(pw.output(xs)), out_t.detach().cpu().numpy())
            record["checks"]["d_weight_rel_err_vs_torch"] = [
                rel_err(cupy.asnumpy(a), b.cpu().numpy()) for a, b in zip(d_w, tdw)]
            del tkms, out_t, tdw
        except Exception as exc:  # noqa: BLE001 - keep pwconv's results
            record["torch_error"] = f"{type(exc).__name__}: {exc}"
            print(f"PyTorch peer failed, timing pwconv alone: {record['torch_error']}")
            torch_peer = None
    print("checks:", json.dumps(record["checks"]))
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(stage: str) -> None:
        """Write what is measured so far: a step cut short by its time limit, or a section
        that fails, keeps the figures taken before it."""
        record["completed_through"] = stage
        path.write_text(json.dumps(record, indent=1, default=str))

    save("checks")

    # --- timings ----------------------------------------------------------------------------
    from pwconv_cy.cuda import ENTRY_COUNTS_KEY

    def clear_derived(km):
        """Drop what the operator derives from a map (weights, orders, transposed maps): they
        are built per batch, so the stages include them.  The entry counts stay: the map's row
        sort makes them with the map (the kernel-map stage)."""
        for key in [k for k in km._cache if k != ENTRY_COUNTS_KEY]:
            del km._cache[key]

    def pw_forward_fresh():
        for km in kms:
            clear_derived(km)
        pw.forward(kms)

    state = {}

    def pw_backward_fresh():
        for km in kms:  # the transposed maps are built per batch: include them
            for key in [k for k in km._cache
                        if k.startswith(("cuda_transposed", "cuda_row_of", "cuda_cell_entries"))]:
                del km._cache[key]
        pw.backward(kms, state["xs"], state["zs"])

    from pwconv_cy.cuda import _conv, _search

    stages = {}
    schemes = {}
    # the operator's GPU schemes side by side, the opt-in atomic input gradient, the entries'
    # weight gradient by cell, the default with the first layer's input gradient (as the
    # figures before 2026-11-26 21:00 were taken), the deterministic fixed-point input
    # gradient, the defaults before 2026-11-28 (broadcast+sort: conv_entries, one radix sort)
    # and each apart, each cloud's rows in shared memory (tile) and the weight gradient by
    # chunks of rows sorted by cell (PWCONV_CUDA_WEIGHT_GRAD=chunks)
    for scheme in ("bycell", "rows", "auto", "auto-broadcast+sort", "auto-broadcast",
                   "auto-sort", "auto-tile", "auto-chunks", "auto-warps", "auto-tile+chunks",
                   "auto-atomic", "auto-cells", "auto-dx1", "auto-fixed", "auto-warps+fixed"):
        variants = set(scheme.partition("-")[2].split("+"))
        os.environ[_conv.OPERATOR_ENV] = scheme.split("-")[0]
        os.environ[_conv.DETERMINISTIC_ENV] = "0" if "atomic" in variants else "1"
        os.environ[_conv.WEIGHT_GRAD_ENV] = next(
            (mode for mode in ("cells", "chunks", "warps") if mode in variants), "rows")
        os.environ[_conv.ENTRIES_LOADS_ENV] = next(
            (mode for mode in ("broadcast", "tile") if mode in variants), "thread")
        os.environ[_conv.INPUT_GRAD_ENV] = "fixed" if "fixed" in variants else "gather"
        os.environ[_conv.TRANSPOSE_ENV] = "sort" if "sort" in variants else "rank"
        pw.first_input_grad = "dx1" in variants
        try:
            for km in kms:
                clear_derived(km)
            state["xs"], state["zs"] = pw.forward(kms)
            schemes[scheme] = {"forward": time_cuda(pw_forward_fresh, warmup, runs),
                               "backward": time_cuda(pw_backward_fresh, warmup, runs)}
        except Exception as exc:  # noqa: BLE001 - keep the other scheme's figures
            record[f"scheme_{scheme}_error"] = f"{type(exc).__name__}: {exc}"
            print(f"scheme {scheme} failed: {record[f'scheme_{scheme}_error']}")
        record["schemes"] = schemes
        save(f"scheme {scheme}")
    os.environ.pop(_conv.OPERATOR_ENV)
    os.environ.pop(_conv.DETERMINISTIC_ENV)
    os.environ.pop(_conv.WEIGHT_GRAD_ENV)
    os.environ.pop(_conv.ENTRIES_LOADS_ENV)
    os.environ.pop(_conv.INPUT_GRAD_ENV)
    os.environ.pop(_conv.TRANSPOSE_ENV)
    pw.first_input_grad = False
    if "auto" not in schemes:
        schemes["auto"] = schemes["bycell"]
        os.environ[_conv.OPERATOR_ENV] = "bycell"  # the breakdown and the rest: the scheme that ran
    stages["pwconv"] = {"kernel_maps": time_cuda(pw.kernel_maps, warmup, runs),
                        **schemes["auto"]}
    record["schemes"] = schemes
    record["kernel_maps_one_by_one"] = time_cuda(pw.kernel_maps_one_by_one, warmup, runs)
    with _env(_search.MAP_PASSES_ENV, "two"):  # count pass, scan, fill pass, as before
        record["kernel_maps_two_passes"] = time_cuda(pw.kernel_maps, warmup, runs)
    with _env(_search.ROW_SORT_ENV, "thread"):  # each fill thread sorts its row, as before
        record["kernel_maps_thread_sort"] = time_cuda(pw.kernel_maps, warmup, runs)
    with _env(_search.MAP_CAPACITY_ENV, "sample"):  # a sample counted every time (before)
        record["kernel_maps_sampled_capacity"] = time_cuda(pw.kernel_maps, warmup, runs)
    with _env(_search.MAP_CAPACITY_ENV, "sample"), _env(_search.GRID_BUILD_ENV, "nonzero"):
        record["kernel_maps_before"] = time_cuda(pw.kernel_maps, warmup, runs)  # both as before
    with _env(_search.ROW_SLOTS_ENV, "1"):  # the row table as (key, cells) pairs (opt-in)
        record["kernel_maps_row_slots"] = time_cuda(pw.kernel_maps, warmup, runs)
        with _env(_search.MAP_TILES_ENV, "1"):  # and the clouds in shared memory (opt-in)
            record["kernel_maps_tiles_slots"] = time_cuda(pw.kernel_maps, warmup, runs)
        with _env(_search.MAP_TILES_ENV, "2"):  # their cells too
            record["kernel_maps_tiles2_slots"] = time_cuda(pw.kernel_maps, warmup, runs)
    with _env(_search.MAP_TILES_ENV, "3"):  # their cells and grid rows too (opt-in)
        record["kernel_maps_tiles3"] = time_cuda(pw.kernel_maps, warmup, runs)
    with _env(_search.ROW_TABLE_ENV, "0"):  # the grid rows found by binary search, as before
        record["kernel_maps_without_row_table"] = time_cuda(pw.kernel_maps, warmup, runs)
    # the previous GPU code's schemes: by-cell operator, rows found by binary search
    stages["pwconv_before"] = {"kernel_maps": record["kernel_maps_without_row_table"],
                               **schemes.get("bycell", schemes["auto"])}
    try:
        record["breakdown"] = breakdown(pw, kms, state, warmup, runs)
    except Exception as exc:  # noqa: BLE001 - keep the stage timings
        record["breakdown_error"] = f"{type(exc).__name__}: {exc}"
        record["breakdown"] = {}
        print(f"breakdown failed: {record['breakdown_error']}")
    if torch_peer is not None:
        try:
            tkms = torch_peer.kernel_maps()

            def torch_forward():
                torch_peer.forward(tkms)

            def torch_backward():
                torch_peer.backward(torch_peer.forward(tkms))

            t_runs = max(3, runs // 2)
            fwd = time_torch(torch_forward, warmup, t_runs)
            fwd_bwd = time_torch(torch_backward, warmup, t_runs)
            stages["pytorch"] = {
                # ~3 s a pass and 250x pwconv's time: three passes say enough
                "kernel_maps": time_torch(torch_peer.kernel_maps, 0, 3),
                "forward": fwd,
                # autograd needs its own forward: backward = (forward + backward) - forward
                "backward": {"median_s": max(0.0, fwd_bwd["median_s"] - fwd["median_s"]),
                             "forward_plus_backward_median_s": fwd_bwd["median_s"],
                             "runs": fwd_bwd["runs"]},
            }
            del tkms
        except Exception as exc:  # noqa: BLE001 - keep pwconv's results
            record["torch_error"] = f"{type(exc).__name__}: {exc}"
            print(f"PyTorch peer failed while timing: {record['torch_error']}")
    for st in stages.values():
        st["total_median_s"] = sum(st[k]["median_s"] for k in ("kernel_maps", "forward",
                                                                "backward"))
    record["stages"] = stages
    save("stages")

    # --- one 1M-point cloud ---------------------------------------------------------------
    big_n = opts.big_points
    big_voxel = BIG_VOXEL * (BIG_N / big_n) ** 0.5  # the same neighbour count
    try:
        record["sphere_1m"] = sphere_1m(cuda, cupy, big_n, big_voxel, opts.seed, runs)
    except Exception as exc:  # noqa: BLE001 - keep the paper workload's figures
        record["sphere_1m_error"] = f"{type(exc).__name__}: {exc}"
        print(f"1M-point sphere failed: {record['sphere_1m_error']}")
    save("sphere_1m")
    try:
        record["modelnet_maps"] = modelnet_maps(cuda, cupy, runs, opts.modelnet_shapes)
    except Exception as exc:  # noqa: BLE001 - keep the figures above
        record["modelnet_maps_error"] = f"{type(exc).__name__}: {exc}"
        print(f"ModelNet40 maps failed: {record['modelnet_maps_error']}")
    save("modelnet_maps")
    try:
        record["radius_search"] = radius_timing(cuda, cupy, points, offsets, runs)
    except Exception as exc:  # noqa: BLE001 - keep the figures above
        record["radius_search_error"] = f"{type(exc).__name__}: {exc}"
        print(f"radius search failed: {record['radius_search_error']}")
    save("radius_search")

    # --- report ---------------------------------------------------------------------------
    print()
    print(f"paper workload on {record['machine'].get('gpu', '?')}: {n_clouds} clouds x "
          f"{n_points} points, 4 layers, float32; median of {runs} runs (CUDA events)")
    header = f"{'stage':<14}{'pwconv (CUDA)':>16}{'PyTorch':>16}{'PyTorch/pwconv':>16}"
    print(header)
    print("-" * len(header))
    for key in ("kernel_maps", "forward", "backward", "total"):
        a = stages["pwconv"]["total_median_s"] if key == "total" else \
            stages["pwconv"][key]["median_s"]
        old = stages["pwconv_before"]["total_median_s"] if key == "total" else \
            stages["pwconv_before"][key]["median_s"]
        b = None
        if "pytorch" in stages:
            b = stages["pytorch"]["total_median_s"] if key == "total" else \
                stages["pytorch"][key]["median_s"]
        ratio = f"{b / a:15.1f}x" if b is not None and a > 0 else f"{'-':>16}"
        print(f"{key:<14}{fmt_ms(a):>16}{fmt_ms(b):>16}{ratio}   (before: by-cell scheme, "
              f"binary-searched rows {fmt_ms(old).strip()})")
    host = {key: stages["pwconv"][key].get("host_median_s")
            for key in ("kernel_maps", "forward", "backward")}
    if None not in host.values():
        print("host time to issue each stage (Python, launches, synchronisations): " +
              ", ".join(f"{key} {fmt_ms(t).strip()}" for key, t in host.items()))
    print(f"kernel maps by count + fill passes (PWCONV_CUDA_MAP_PASSES=two): "
          f"{fmt_ms(record['kernel_maps_two_passes']['median_s'])}")
    print(f"kernel maps with the fill threads sorting their rows (PWCONV_CUDA_ROW_SORT=thread): "
          f"{fmt_ms(record['kernel_maps_thread_sort']['median_s'])}")
    print(f"kernel maps with the scratch sized from a sample every time (PWCONV_CUDA_MAP_CAPACITY="
          f"sample): {fmt_ms(record['kernel_maps_sampled_capacity']['median_s'])}; also with "
          f"the grid by flatnonzero (GRID_BUILD=nonzero), as before 2026-11-28: "
          f"{fmt_ms(record['kernel_maps_before']['median_s'])}")
    print(f"kernel maps with the row table as (key, cells) pairs (PWCONV_CUDA_ROW_SLOTS=1): "
          f"{fmt_ms(record['kernel_maps_row_slots']['median_s'])}; and each cloud in shared "
          f"memory (PWCONV_CUDA_MAP_TILES=1): "
          f"{fmt_ms(record['kernel_maps_tiles_slots']['median_s'])}, with their cells (=2): "
          f"{fmt_ms(record['kernel_maps_tiles2_slots']['median_s'])}; cells and grid rows in "
          f"shared memory (PWCONV_CUDA_MAP_TILES=3): "
          f"{fmt_ms(record['kernel_maps_tiles3']['median_s'])}")
    print(f"kernel maps one after the other (kernel_map per layer): "
          f"{fmt_ms(record['kernel_maps_one_by_one']['median_s'])}")
    for name, sch in schemes.items():
        maps = f"  kernel maps {fmt_ms(sch['kernel_maps']['median_s'])}" \
            if "kernel_maps" in sch else ""
        print(f"scheme {name:<8} forward {fmt_ms(sch['forward']['median_s'])}  backward "
              f"{fmt_ms(sch['backward']['median_s'])}{maps}")
    print("\nbreakdown (pwconv, default scheme; medians, CUDA events):")
    for name, t in record["breakdown"].items():
        print(f"  {name:<44}{fmt_ms(t['median_s'])}")
    s1m = record.get("sphere_1m")
    if s1m is not None:
        print(f"\n{big_n:,}-point sphere, v={big_voxel:.4g}, K=3, s=1: "
              f"{s1m['mean_neighbours']:.1f} neighbours per point; grid "
              f"{fmt_ms(s1m['grid_build']['median_s']).strip()}, kernel map "
              f"{fmt_ms(s1m['kernel_map']['median_s']).strip()}, both "
              f"{fmt_ms(s1m['grid_plus_kernel_map']['median_s']).strip()}; the map by count + "
              f"fill passes {fmt_ms(s1m['kernel_map_two_passes']['median_s']).strip()}; the "
              f"grid by flatnonzero (PWCONV_CUDA_GRID_BUILD=nonzero) "
              f"{fmt_ms(s1m['grid_build_nonzero']['median_s']).strip()}")
    mn = record.get("modelnet_maps")
    if mn:
        print(f"ModelNet40, {mn['shapes']} shapes x 1,024 points (a training batch): grid + maps "
              f"s=1-4 {fmt_ms(mn['grid_plus_maps']['median_s']).strip()} (one pass, rows over "
              f"SHORT_ROW searched again alone: {mn['rows_over_short_row']}); by count + fill "
              f"{fmt_ms(mn['grid_plus_maps_two_passes']['median_s']).strip()}")
    rs = record.get("radius_search")
    if rs:
        print(f"radius search of the paper's clouds (r = {rs['radius']:g}, Chebyshev, grid "
              f"included, {rs['pairs']:,} pairs): one pass "
              f"{fmt_ms(rs['one_pass']['median_s']).strip()}, count + fill "
              f"{fmt_ms(rs['two_passes']['median_s']).strip()}")
    print("paper (CPU, 16 threads): forward 1272 ms, backward 2423 ms")

    save("report")
    print(f"\nwrote {path}")
    ok = record["checks"]["kernel_map_identical_to_cpu_4_clouds_s2"] and \
        record["checks"].get("pairs_match_torch", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
