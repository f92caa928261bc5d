"""Diagnostics of the GPU kernel map's count and fill passes, launched one by one on a 300-point
cloud (run on a GPU machine): python gpu_diag.py MODE
MODE: base (K = 3 compiled as a constant) | stack (the same with a 32 KiB stack limit) |
generic (runtime K) | block32 (32-thread blocks) | nosort (rows left unsorted)"""
import os
import sys

os.environ.setdefault("PWCONV_CUDA_SPECIALISE_K", "3")  # before pwconv_cy.cuda is imported

import cupy
import numpy as np

import pwconv_cy
from pwconv_cy.cuda import _search as S
from pwconv_cy.cuda._backend import SHORT_ROW, get_backend

mode = sys.argv[1] if len(sys.argv) > 1 else "base"
if mode == "stack":
    rt = cupy.cuda.runtime
    print("stack limit before", rt.deviceGetLimit(rt.cudaLimitStackSize))
    rt.deviceSetLimit(rt.cudaLimitStackSize, 32768)
rng = np.random.default_rng(0)
p = rng.random((300, 3))
cpu = pwconv_cy.kernel_map(p, 0.1)
be = get_backend()
grid = S.build_grid(be, cupy.asarray(p), np.array([0, 300]), 0.1)
m, qrow, qx, qy, qz, q_off = S._queries(be, grid, None, None)
k, s, bits = 3, 1, S.cell_bits_for(3)
axis_d = cupy.empty(2 * k, dtype=cupy.float64)
dil = cupy.asarray([s], dtype=cupy.int32)  # one map, of dilation s
be.launch("kernel_axis_diffs", (1,), (1,), (S.f64(0.1), S.i32(k), S.i64(1), dil, axis_d))
head = (S.i64(m), qrow, qx, qy, qz, q_off, S.i64(grid.n_clouds)) + grid.grid_args() + (
    S.f64(0.1), S.i32(k), dil, S.i32(bits), axis_d)
kc = 0 if mode == "generic" else 3
threads = 32 if mode == "block32" else S.SEARCH_THREADS
short = 0 if mode == "nosort" else SHORT_ROW
row_len = cupy.zeros(m, dtype=cupy.int64)
status = cupy.zeros(1, dtype=cupy.int32)
dummy = cupy.zeros(1, dtype=cupy.int64)
be.launch(f"kernel_map_pass<{kc}, 0>", (S.blocks(m, threads),), (threads,),
          head + (row_len, dummy, dummy, S.i64(short), status, dummy, S.i32(0)))
splits, n_pairs, longest = S._scan(be, row_len)
keys = cupy.zeros(max(n_pairs, 1), dtype=cupy.int64)
fn = be._function(0, f"kernel_map_pass<{kc}, 1>")
for attr in ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block"):
    print("  fill", attr, getattr(fn, attr, "?"))
fn0 = be._function(0, f"kernel_map_pass<{kc}, 0>")
for attr in ("num_regs", "local_size_bytes"):
    print("  count", attr, getattr(fn0, attr, "?"))
try:
    be.launch(f"kernel_map_pass<{kc}, 1>", (S.blocks(m, threads),), (threads,),
              head + (dummy, splits, keys, S.i64(short), status, dummy, S.i32(0)))
    cupy.cuda.get_current_stream().synchronize()
    print(mode, "FILL OK status", int(status.get()[0]))
    same = np.array_equal(cupy.asnumpy(splits), cpu.splits) and np.array_equal(
        np.sort(cupy.asnumpy(keys[:n_pairs])), np.sort((cpu.index << bits) | cpu.cell))
    print(mode, "map equal to the CPU's:", same)
except Exception as exc:  # noqa: BLE001
    print(mode, "FILL FAILED", type(exc).__name__, str(exc)[:200])
    sys.exit(1)
