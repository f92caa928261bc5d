"""The GPU path (pwconv_cy.cuda): CUDA kernels compiled by CuPy, results identical to the CPU.

Three layers of checks, so that CI (nvcc, no GPU) catches most mistakes before a GPU sees them:

* ``test_kernels_compile_with_nvcc`` compiles kernels.cu with nvcc (PTX only), instantiating every
  kernel the loader asks NVRTC for: a syntax or type error fails here; and
  ``test_kernels_compile_with_nvrtc`` compiles it with NVRTC itself (the nvidia-cuda-nvrtc wheel,
  no GPU needed) exactly as the CuPy backend does.
* ``test_emulated_*`` compile kernels.cu *for the host* (g++, an emulation of the CUDA thread model:
  threads one after the other, or cooperative fibers where kernels synchronise) and run the real orchestration
  (pwconv_cy.cuda._search / _conv, with NumPy as the array module) against the float64 oracles:
  kernel maps identical, operator values within rounding.  Each runs in a subprocess (a kernel bug
  may crash or hang it: the test then fails with the output instead of taking pytest down).
* ``@pytest.mark.gpu`` tests run on a CUDA device with CuPy (skipped otherwise, with the reason):
  kernel maps and radius search identical to the CPU library, forward and both gradients equal to
  the CPU within 1e-5 (float32) / 1e-12 (float64) norm-wise, bit-identical across two GPU runs.
  Without a GPU, test_gpu_standin.py runs them (and test_models_gpu.py's) on a CuPy stand-in
  over the host emulation, with two devices: the GPU path's Python code is tested in CI too.

Also ``test_memory_counter_...``: the emulation's counting build (``build_emulator(count=True)``,
benchmarks/gpu_load_model.py's load model) counts a warp's memory requests as a GPU's L1 serves
them, checked on kernels whose counts are known.

Run the emulation by hand: ``python tests/test_cuda.py --emulate all``.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pwconv_cy.cuda import _backend as _installed

TESTS = Path(__file__).resolve().parent
# The installed package's copies, i.e. what the wheel ships (also when tests/ runs outside the
# checkout, as CI does against the installed wheel).
KERNELS_CU = _installed.SOURCE
INCLUDE = _installed.include_dir()

if str(TESTS) not in sys.path:  # oracles.py, also when run as a script
    sys.path.insert(0, str(TESTS))


def _names():
    from pwconv_cy.cuda._backend import NAME_EXPRESSIONS, PLAIN_KERNELS

    return list(PLAIN_KERNELS) + list(NAME_EXPRESSIONS)


# =============================================================================================
# 1. compile checks: nvcc, and NVRTC as CuPy uses it (CI has both, no GPU)
# =============================================================================================


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_compile_with_nvcc(tmp_path):
    """kernels.cu compiles to PTX with every kernel the loader requests instantiated."""
    wrapper = tmp_path / "all_kernels.cu"
    refs = ",\n".join(f"    (void*)&{name}" for name in _names())
    wrapper.write_text(f'#include "{KERNELS_CU}"\nvoid* pwconv_all_kernels[] = {{\n{refs}\n}};\n')
    cmd = ["nvcc", "-std=c++17", "--ptx", "-fmad=false", f"-I{INCLUDE}", str(wrapper), "-o",
           str(tmp_path / "all_kernels.ptx")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    ptx = (tmp_path / "all_kernels.ptx").read_text()
    assert ptx.count(".entry") == len(_names()), "a kernel is missing from the PTX"


def _nvrtc_library():
    """libnvrtc: from the nvidia-cuda-nvrtc wheel (CI installs it; NVRTC needs no GPU), else the
    system's (a CUDA toolkit), else None."""
    import ctypes.util
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).glob("*/lib/libnvrtc.so*")) + sorted(
            Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))
        if found:
            return str(found[0])
    return ctypes.util.find_library("nvrtc")


@pytest.mark.skipif(_nvrtc_library() is None,
                    reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc; CI does)")
def test_kernels_compile_with_nvrtc():
    """kernels.cu compiles under NVRTC exactly as the CuPy backend compiles it on a GPU machine:
    the same source text (with the header's hash), options and name expressions, every template
    instantiation lowered to a symbol.  NVRTC has no standard headers and its own builtins, so
    this catches what the nvcc check cannot."""
    from pwconv_cy.cuda import _backend

    lib = ctypes.CDLL(_nvrtc_library())
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), _backend.kernel_source().encode(),
                                  b"kernels.cu", 0, None, None) == 0
    try:
        for name in _backend.NAME_EXPRESSIONS:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        options = [o.encode() for o in _backend.compile_options()] + [b"-arch=compute_90"]
        rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(1, size.value))
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed ({rc}):\n{log.value.decode(errors='replace')[-6000:]}"
        for name in _backend.NAME_EXPRESSIONS:
            lowered = ctypes.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0, name
            assert lowered.value, name
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_loader_imports_without_cupy_and_finds_sources():
    """pwconv_cy.cuda imports without CuPy or a GPU; the source and the shared header are found;
    is_available() answers without raising."""
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _backend

    assert isinstance(cuda.is_available(), bool)
    source = _backend.kernel_source()
    assert "binning.hpp sha256" in source.splitlines()[0]
    assert (_backend.include_dir() / "pwconv" / "binning.hpp").is_file()
    options = _backend.compile_options()
    assert "--fmad=false" in options and "--std=c++17" in options
    for name in _backend.NAME_EXPRESSIONS + _backend.PLAIN_KERNELS:
        assert name.split("<")[0] in source, name


def test_rows_scheme_capacities_match_kernels():
    """The "rows" scheme's shared-array capacities in _conv.py are kernels.cu's own: a mismatch
    would let the planner pick blocks whose sums overrun the shared arrays."""
    import re

    from pwconv_cy.cuda import _conv, _search

    source = KERNELS_CU.read_text()
    for define, value in (("SUMS_BYTES", _conv.ROWS_SUMS_BYTES),
                          ("TALLY_CAP", _conv.ROWS_TALLY_CAP),
                          ("ACC_BYTES", _conv.ROWS_ACC_BYTES),
                          ("ROW_THREADS", _conv.ROWS_THREADS),
                          ("WEIGHTS_TALLY_CAP", _search.WEIGHTS_TALLY_CAP),
                          ("SUM_SLICES", _conv.SUM_SLICES)):
        found = re.search(rf"#define PWCONV_CUDA_{define} (\d+)", source)
        assert found is not None, f"PWCONV_CUDA_{define} is not defined in kernels.cu"
        assert int(found.group(1)) == value, define
    # the plan never asks for more than the arrays hold
    for n_cells in (1, 27, 125, 343):
        for a in (1, 3, 9, 17, 32):
            for b in (1, 9, 32):
                for itemsize in (4, 8):
                    plan = _conv.rows_plan(n_cells, a, b, itemsize, n_cells * a * b)
                    if plan is None:
                        continue
                    group, per_block = plan
                    assert group >= max(a, b) and group * per_block <= _conv.ROWS_THREADS
                    assert per_block * n_cells * a * itemsize <= _conv.ROWS_SUMS_BYTES
                    assert per_block * n_cells <= _conv.ROWS_TALLY_CAP
                    assert n_cells * a * b * itemsize <= _conv.ROWS_ACC_BYTES
    assert _conv.rows_plan(27, 9, 9, 4, 27 * 81) == (16, 16)  # the paper's layers: 256 threads
    assert _conv.rows_plan(27, 33, 9, 4) is None


# =============================================================================================
# 2. Host emulation of the kernels (g++), driven by the real orchestration code
# =============================================================================================

EMULATOR_CPP = r"""
// Host emulation of the CUDA thread model for pwconv's kernels.cu (tests only).  Kernels without
// barriers run their threads one after the other; kernels with __syncthreads / __syncwarp run
// each block's threads as cooperative fibers that yield at every barrier: the schedule is
// deterministic, and a barrier that can never be passed is reported, not hung on.  On x86-64 a
// fiber switch is a few instructions (emu_switch below); elsewhere, or with -DPWCONV_EMU_UCONTEXT
// (sanitizers know ucontext), swapcontext, which costs a system call per switch.
#if defined(__x86_64__) && !defined(PWCONV_EMU_UCONTEXT)
#define PWCONV_EMU_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif
// PWCONV_EMU_SANITIZE (built with -fsanitize=address,undefined): the fiber switches are announced
// to AddressSanitizer (each fiber's stack bounds), and the dynamic shared memory is a heap block
// of exactly the launch's size, so that a kernel reading or writing past what it asked for is
// caught as on a GPU under compute-sanitizer.
#ifdef PWCONV_EMU_SANITIZE
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// The counting build (build_emulator(count=True), COUNTER_CPP first) keeps the emulator's own
// state in a section of its own, so that the kernels' accesses to it are not counted.
#ifndef PWCONV_EMU_COUNT
#define EMU_RUNTIME
#define EMU_COUNT_ENTER(tid, stack, bytes)
#define EMU_COUNT_LEAVE()
#define EMU_COUNT_END_BLOCK()
#define EMU_COUNT_KERNEL_FRAME()
#define EMU_COUNT_ATOMIC(p)
#define EMU_NO_COUNT
#define EMU_VECTOR_COPY(T)
#endif

struct dim3 { unsigned x = 1, y = 1, z = 1; };
EMU_RUNTIME static dim3 threadIdx, blockIdx, blockDim, gridDim;

[[noreturn]] static void emu_fail(const char* what) {
    std::fprintf(stderr, "pwconv CUDA emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what,
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::abort();
}

#ifdef PWCONV_EMU_FAST_SWITCH
// emu_switch(save, load): pushes the callee-saved registers (System V ABI) and the SSE / x87
// control words, stores the stack pointer in *save, loads `load` and pops the same from there.
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden emu_switch
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
struct FiberContext { void* sp = nullptr; };
#else
using FiberContext = ucontext_t;
#endif

struct Fiber {
    FiberContext ctx;
    std::vector<char> stack;
    dim3 idx;
    bool done = false;
    int wait = 0;  // 0 running, 1 __syncthreads, 2 __syncwarp, 3 a counted access
    unsigned mask = 0;
    void* fake_stack = nullptr;  // AddressSanitizer's, across the fiber's switches
};
EMU_RUNTIME static FiberContext scheduler;
EMU_RUNTIME static Fiber* current = nullptr;
EMU_RUNTIME static std::function<void(void**)>* current_fn = nullptr;
EMU_RUNTIME static void** current_params = nullptr;
#ifdef PWCONV_EMU_SANITIZE
static const void* scheduler_stack = nullptr;  // the scheduler's stack, as the sanitizer saw it
static size_t scheduler_stack_size = 0;
static void* scheduler_fake_stack = nullptr;
#endif

static void switch_to(FiberContext& from, FiberContext& to) {
#ifdef PWCONV_EMU_FAST_SWITCH
    emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from, &to);
#endif
}

// The scheduler resumes fiber f.
static void enter_fiber(Fiber& f) {
#ifdef PWCONV_EMU_SANITIZE
    __sanitizer_start_switch_fiber(&scheduler_fake_stack, f.stack.data(), f.stack.size());
#endif
    EMU_COUNT_ENTER(f.idx.x + blockDim.x * (f.idx.y + blockDim.y * f.idx.z), f.stack.data(),
                    f.stack.size());
    switch_to(scheduler, f.ctx);
    EMU_COUNT_LEAVE();
#ifdef PWCONV_EMU_SANITIZE
    __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
}

// The current fiber gives the scheduler back control (for good when it has finished).
static void leave_fiber(bool finished) {
    Fiber* self = current;
#ifdef PWCONV_EMU_SANITIZE
    __sanitizer_start_switch_fiber(finished ? nullptr : &self->fake_stack, scheduler_stack,
                                   scheduler_stack_size);
#endif
    switch_to(self->ctx, scheduler);
#ifdef PWCONV_EMU_SANITIZE
    __sanitizer_finish_switch_fiber(self->fake_stack, &scheduler_stack, &scheduler_stack_size);
#endif
}

static void yield_on(int kind, unsigned mask) {
    if (!current) emu_fail("a barrier in a kernel not listed in BARRIER_KERNELS");
    current->wait = kind;
    current->mask = mask;
    leave_fiber(false);
}
inline void __syncthreads() { yield_on(1, 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (!((mask >> (tid % 32)) & 1u)) emu_fail("__syncwarp(mask): the calling lane is not in mask");
    yield_on(2, mask);
}
// __shfl_sync: each lane leaves its value in its slot, the warp's lanes of the mask meet at a
// barrier, each reads its source lane's slot, and they meet again before the slots are reused.
EMU_RUNTIME static std::vector<unsigned long long> shfl_slots;  // one per thread of the block
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a 64-bit value at most");
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (tid >= shfl_slots.size()) emu_fail("__shfl_sync outside a threaded kernel");
    if (src_lane < 0 || src_lane >= 32 || !((mask >> src_lane) & 1u))
        emu_fail("__shfl_sync: the source lane is not in the mask");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    shfl_slots[tid] = bits;
    __syncwarp(mask);
    T out;
    std::memcpy(&out, &shfl_slots[tid / 32 * 32 + (unsigned)src_lane], sizeof(T));
    __syncwarp(mask);
    return out;
}
// __match_any_sync: as __shfl_sync, each lane leaves its value in its slot; the lanes of the mask
// holding the same bits as the caller's form the result.
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a 64-bit value at most");
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (tid >= shfl_slots.size()) emu_fail("__match_any_sync outside a threaded kernel");
    if (!((mask >> (tid % 32)) & 1u)) emu_fail("__match_any_sync: the calling lane is not in mask");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    shfl_slots[tid] = bits;
    __syncwarp(mask);
    unsigned peers = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && tid / 32 * 32 + l < shfl_slots.size() &&
            shfl_slots[tid / 32 * 32 + l] == bits)
            peers |= 1u << l;
    __syncwarp(mask);
    return peers;
}
// __ballot_sync: the lanes of the mask whose predicate is non-zero (slots as __shfl_sync's).
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (tid >= shfl_slots.size()) emu_fail("__ballot_sync outside a threaded kernel");
    if (!((mask >> (tid % 32)) & 1u)) emu_fail("__ballot_sync: the calling lane is not in mask");
    shfl_slots[tid] = predicate != 0;
    __syncwarp(mask);
    unsigned votes = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && tid / 32 * 32 + l < shfl_slots.size() &&
            shfl_slots[tid / 32 * 32 + l] != 0)
            votes |= 1u << l;
    __syncwarp(mask);
    return votes;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
struct alignas(16) float4 { float x, y, z, w; EMU_VECTOR_COPY(float4) };
struct alignas(16) double2 { double x, y; EMU_VECTOR_COPY(double2) };
struct alignas(16) ulonglong2 { unsigned long long x, y; EMU_VECTOR_COPY(ulonglong2) };
static void trampoline() {
#ifdef PWCONV_EMU_SANITIZE
    __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_size);
#endif
    (*current_fn)(current_params);
    current->done = true;
    leave_fiber(true);
    emu_fail("a finished fiber was resumed");
}

// A fiber's first switch enters trampoline on its own stack.
static void start_fiber(Fiber& f) {
#ifdef PWCONV_EMU_SANITIZE
    // the stack's last fiber never returned from trampoline: its frames' redzones are stale
    ASAN_UNPOISON_MEMORY_REGION(f.stack.data(), f.stack.size());
    f.fake_stack = nullptr;
#endif
#ifdef PWCONV_EMU_FAST_SWITCH
    // emu_switch pops, from the new stack pointer up: the control words (SSE 0x1F80, x87 0x037F:
    // the defaults), r15, r14, r13, r12, rbx, rbp, then returns into trampoline with the stack
    // aligned as after a call (a dummy return address above it, never used).
    auto top = reinterpret_cast<std::uintptr_t>(f.stack.data() + f.stack.size());
    top &= ~std::uintptr_t(15);
    auto* slot = reinterpret_cast<std::uint64_t*>(top);
    *--slot = 0;                                                 // trampoline's return address
    *--slot = reinterpret_cast<std::uint64_t>(&trampoline);      // emu_switch's ret
    for (int r = 0; r < 6; ++r) *--slot = 0;                     // rbp rbx r12 r13 r14 r15
    *--slot = 0x1F80ull | (0x037Full << 32);                     // mxcsr, x87 control word
    f.ctx.sp = slot;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
#endif
}

// Threads run one after the other or yield only at barriers: an atomic is a plain update (the
// counting build: counted as one request, then done with no other thread in between).
template <class T>
EMU_NO_COUNT inline T atomicAdd(T* p, T v) {
    EMU_COUNT_ATOMIC(p);
    const T old = *p;
    *p += v;
    return old;
}
template <class T>
EMU_NO_COUNT inline T atomicSub(T* p, T v) {
    static_assert(sizeof(T) == 4, "CUDA's atomicSub takes int or unsigned int");
    EMU_COUNT_ATOMIC(p);
    const T old = *p;
    *p -= v;
    return old;
}
template <class T>
EMU_NO_COUNT inline T atomicMax(T* p, T v) {
    EMU_COUNT_ATOMIC(p);
    const T old = *p;
    if (v > old) *p = v;
    return old;
}
EMU_NO_COUNT inline unsigned long long atomicCAS(unsigned long long* p,
                                                 unsigned long long compare,
                                                 unsigned long long value) {
    EMU_COUNT_ATOMIC(p);
    const unsigned long long old = *p;
    if (old == compare) *p = value;
    return old;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline long long __double_as_longlong(double v) {
    long long bits;
    std::memcpy(&bits, &v, sizeof bits);
    return bits;
}
inline double __longlong_as_double(long long bits) {
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
inline long long __double2ll_rn(double v) { return std::llrint(v); }  // the default: to nearest
using std::frexp;
using std::ldexp;

// Dynamic shared memory: one buffer, big enough for any launch the tests make (blocks run one
// after the other; EmulatedBackend checks the size asked for).  Sanitized: a heap block of the
// launch's size exactly (emu_set_dynamic_shared, before each launch; malloc aligns to 16).
#ifdef PWCONV_EMU_SANITIZE
static unsigned char* emu_dynamic_shared = nullptr;
extern "C" void emu_set_dynamic_shared(unsigned long long bytes) {
    std::free(emu_dynamic_shared);
    emu_dynamic_shared = static_cast<unsigned char*>(std::malloc(bytes ? bytes : 1));
}
#else
alignas(16) static unsigned char emu_dynamic_shared[EMU_DYNAMIC_SHARED_BYTES];
#endif
#define PWCONV_CUDA_DYNAMIC_SHARED(type, name) \
    type* name = reinterpret_cast<type*>(emu_dynamic_shared)

// 16-byte vector loads must be 16-byte aligned on a GPU: checked here
#define PWCONV_CUDA_CHECK_ALIGNED(p) \
    if (reinterpret_cast<unsigned long long>(p) % 16 != 0) emu_fail("misaligned 16-byte load")

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __host__
#ifdef PWCONV_EMU_COUNT  // inlined as nvcc inlines them: their locals may then live in registers
#define __forceinline__ inline __attribute__((always_inline))
#else
#define __forceinline__ inline
#endif
#define __shared__ static

#include "KERNELS_CU"

template <class... A, std::size_t... I>
EMU_NO_COUNT static void call_impl(void (*k)(A...), void** p, std::index_sequence<I...>) {
    EMU_COUNT_KERNEL_FRAME();  // the kernel's frames lie below here
    k(*static_cast<typename std::remove_cv<typename std::remove_reference<A>::type>::type*>(p[I])...);
}
template <class... A>
static void call(void (*k)(A...), void** p) { call_impl(k, p, std::index_sequence_for<A...>{}); }

static std::map<std::string, std::function<void(void**)>>& registry() {
    static std::map<std::string, std::function<void(void**)>> r;
    return r;
}
static void register_all() {
REGISTRY
}

static void run_block_fibers(std::vector<Fiber>& fibers) {
    const unsigned n = (unsigned)fibers.size();
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        f.done = false;
        f.wait = 0;
        start_fiber(f);
    }
    while (true) {
        bool ran = false;
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = fibers[t];
            if (f.done || f.wait) continue;
            current = &f;
            threadIdx = f.idx;
            enter_fiber(f);
            ran = true;
        }
        current = nullptr;
        bool alive = false, released = false;
        for (auto& f : fibers) alive |= !f.done;
        if (!alive) return;
#ifdef PWCONV_EMU_COUNT
        // every live lane has stopped: in each warp, the lanes stopped at an access at the
        // lowest code address issue it together and go on
        for (unsigned w = 0; w * 32 < n; ++w) {
            unsigned lanes[32], n_lanes = 0;
            std::uintptr_t lowest = ~std::uintptr_t(0);
            for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t)
                if (!fibers[t].done && fibers[t].wait == 3)
                    lowest = std::min(lowest, emu_count::pending[t].pc);
            for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t)
                if (!fibers[t].done && fibers[t].wait == 3 && emu_count::pending[t].pc == lowest)
                    lanes[n_lanes++] = t;
            if (!n_lanes) continue;
            emu_count::issue(lanes, n_lanes);
            for (unsigned i = 0; i < n_lanes; ++i) fibers[lanes[i]].wait = 0;
            released = true;
        }
#endif
        // __syncthreads: passes once every live thread of the block waits there.
        bool all_block = true;
        for (auto& f : fibers)
            if (!f.done && f.wait != 1) all_block = false;
        if (all_block) {
            for (auto& f : fibers) f.wait = 0;
            released = true;
        }
        // __syncwarp(mask): passes once every live lane of the mask waits with that mask.
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = fibers[t];
            if (f.done || f.wait != 2) continue;
            const unsigned warp = t / 32;
            bool ready = true;
            for (unsigned l = 0; l < 32; ++l) {
                if (!((f.mask >> l) & 1u)) continue;
                const unsigned u = warp * 32 + l;
                if (u >= n) continue;
                const Fiber& g = fibers[u];
                if (!g.done && !(g.wait == 2 && g.mask == f.mask)) ready = false;
            }
            if (!ready) continue;
            for (unsigned l = 0; l < 32; ++l) {
                const unsigned u = warp * 32 + l;
                if (((f.mask >> l) & 1u) && u < n && fibers[u].wait == 2) fibers[u].wait = 0;
            }
            released = true;
        }
        if (!ran && !released) emu_fail("deadlock: threads wait at barriers that cannot pass");
    }
}

// 1 when kernel `name` is registered (compiled in), else 0.
extern "C" int emu_has(const char* name) {
    if (registry().empty()) register_all();
    return registry().count(name) ? 1 : 0;
}

// reversed != 0: kernels without barriers run their blocks and threads last to first, kernels
// with barriers their blocks: another legal schedule (what integer atomics hand out then
// changes, the results must not).
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, int threaded, int reversed, void** params) {
    if (registry().empty()) register_all();
    auto it = registry().find(name);
    if (it == registry().end()) return 1;
    std::function<void(void**)>& fn = it->second;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned n_threads = bx * by * bz;
#ifdef PWCONV_EMU_COUNT
    threaded = 1;  // every kernel's threads in lock step, stopping at each access
    emu_count::stop = [] { yield_on(3, 0); };
#endif
    static std::vector<Fiber> fibers;
    if (threaded) shfl_slots.assign(n_threads, 0);
    if (threaded && fibers.size() < n_threads) {
        fibers.resize(n_threads);
        for (auto& f : fibers)
            if (f.stack.empty()) f.stack.resize(256 * 1024);
    }
    std::vector<Fiber> block_fibers;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                if (!threaded) {
                    current = nullptr;
                    if (reversed) blockIdx = {gx - 1 - x, gy - 1 - y, gz - 1 - z};
                    for (unsigned u = 0; u < n_threads; ++u) {
                        const unsigned t = reversed ? n_threads - 1 - u : u;
                        threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                        fn(params);
                    }
                    continue;
                }
                if (reversed) blockIdx = {gx - 1 - x, gy - 1 - y, gz - 1 - z};
                current_fn = &fn;
                current_params = params;
                if (block_fibers.size() != n_threads) {
                    block_fibers.clear();
                    block_fibers.resize(n_threads);
                    for (unsigned t = 0; t < n_threads; ++t)
                        block_fibers[t].stack.swap(fibers[t].stack);
                }
                for (unsigned t = 0; t < n_threads; ++t)
                    block_fibers[t].idx = {t % bx, (t / bx) % by, t / (bx * by)};
                run_block_fibers(block_fibers);
                EMU_COUNT_END_BLOCK();
            }
    for (unsigned t = 0; t < block_fibers.size(); ++t) fibers[t].stack.swap(block_fibers[t].stack);
    return 0;
}
"""


COUNTER_CPP = r"""
// Memory-request counter for the host emulation (build_emulator(count=True)).  g++ instruments
// every load and store (-fsanitize=address in outline mode: each access calls a hook defined
// here; no ASan runtime is linked).  Every kernel then runs its block's threads as fibers in
// lock step: a thread stops at each access it makes to the kernel's memory, and once every live
// lane of a warp has stopped (at an access, a barrier or its end), the lanes stopped at the
// lowest code address issue their accesses together as one request and go on -- the lowest
// address first makes lanes that leave a loop early wait for the others, as a GPU's warp
// reconverges after the loop.  Each request is costed as a GPU's L1 serves it:
//   global (the launch's array arguments): 32-byte sectors and 128-byte lines touched (offsets
//     from the array's start: GPU allocations are 256-byte aligned);
//   shared (__shared__ and dynamic shared memory): wavefronts, the most distinct 4-byte words
//     any of the 32 banks is asked for;
//   local (a thread's arrays in memory, on its stack below the kernel's first frame): lines in
//     the GPU's layout (word w of lane l at w * 128 + 4 * l: lanes at one offset share a line).
// Accesses to anything else (the emulator's own state, scalars, constant tables) are not counted
// and do not stop the thread.  As nvcc compiles them, the build inlines __forceinline__
// functions and unrolls `#pragma unroll` loops (build_emulator), and a 16-byte vector is read
// in one access (EMU_VECTOR_COPY); each instruction's requests and wavefronts are kept too
// (emu_count_sites: where in kernels.cu the traffic comes from).
#include <dlfcn.h>
#include <link.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

#define EMU_RUNTIME __attribute__((section("emu_runtime")))
#define EMU_NO_COUNT __attribute__((no_sanitize_address, noinline))  // not instrumented
extern "C" char __start_emu_runtime[] __attribute__((visibility("hidden")));
extern "C" char __stop_emu_runtime[] __attribute__((visibility("hidden")));

namespace emu_count {
enum Space { GLOBAL = 0, SHARED = 1, LOCAL = 2 };
// totals[space][store][field]
enum Field { REQUESTS = 0, SECTORS, LINES, WAVEFRONTS, BYTES, N_FIELDS };
EMU_RUNTIME static unsigned long long totals[3][2][N_FIELDS];

struct Range { std::uintptr_t lo, hi; };
struct Access { std::uintptr_t pc, address; unsigned width; unsigned char space, store; };
EMU_RUNTIME static std::vector<Range> globals;           // the launch's array arguments
EMU_RUNTIME static std::uintptr_t writable_lo, writable_hi;  // this library's static data
EMU_RUNTIME static std::uintptr_t stack_lo, stack_hi;   // the running thread's local memory
EMU_RUNTIME static std::uintptr_t stack_top;  // its stack's top, where its first frame starts
EMU_RUNTIME static bool active;                          // a kernel thread runs
EMU_RUNTIME static bool busy;                            // note() runs (its calls are counted too)
EMU_RUNTIME static unsigned tid;                         // the running thread, in its block
EMU_RUNTIME static std::vector<Access> pending;          // per thread: the access it stopped at
EMU_RUNTIME static std::vector<std::uintptr_t> frame_top;  // per thread: its kernel frame's top
EMU_RUNTIME static void (*stop)() = nullptr;             // the emulator's: the thread yields
// per instruction (its code address, with space << 56 and store << 55): requests, wavefronts
struct Site { unsigned long long requests = 0, wavefronts = 0; };
EMU_RUNTIME static std::unordered_map<std::uintptr_t, Site> sites;

static int find_segment(struct dl_phdr_info* info, std::size_t, void* self) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_W)) continue;
        const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
        const auto at = reinterpret_cast<std::uintptr_t>(self);
        if (at >= lo && at < hi) {
            writable_lo = lo;
            writable_hi = hi;
            return 1;
        }
    }
    return 0;
}

EMU_NO_COUNT static void locate_static_data() {
    if (!writable_hi) dl_iterate_phdr(find_segment, (void*)&totals);
}

// An access of the running thread: kept, and the thread stops until its warp issues it.
EMU_NO_COUNT static void note(std::uintptr_t a, std::size_t width, bool store, std::uintptr_t pc) {
    if (!active || busy) return;
    busy = true;  // the containers below are instrumented too
    unsigned char space = 0xFF;
    if (a >= stack_lo && a < stack_hi) {
        space = LOCAL;
        a = stack_top - a;  // the same offset in every thread's frame (a multiple of 4 from a
                            // 4-byte aligned access)
    } else if (a >= writable_lo && a < writable_hi) {
        if (a < reinterpret_cast<std::uintptr_t>(__start_emu_runtime) ||
            a >= reinterpret_cast<std::uintptr_t>(__stop_emu_runtime))
            space = SHARED;  // else the emulator's own state
    } else {
        for (std::size_t r = 0; r < globals.size(); ++r)
            if (a >= globals[r].lo && a < globals[r].hi) {
                a = a - globals[r].lo + (std::uintptr_t(r + 1) << 40);  // the arrays kept apart
                space = GLOBAL;
                break;
            }
    }
    if (space != 0xFF) {
        if (tid >= pending.size()) pending.resize(tid + 1);
        pending[tid] = Access{pc, a, (unsigned)width, space, (unsigned char)store};
    }
    busy = false;
    if (space != 0xFF) stop();
}

EMU_NO_COUNT static void unique(std::vector<std::uintptr_t>& v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
}

// The warp's lanes `tids`, stopped at the same instruction, issue their accesses: one request.
EMU_NO_COUNT static void issue(const unsigned* tids, unsigned n) {
    const Access& first = pending[tids[0]];
    unsigned long long* t = totals[first.space][first.store];
    t[REQUESTS] += 1;
    std::vector<std::uintptr_t> words, lines, sectors;
    for (unsigned i = 0; i < n; ++i) {
        const Access& x = pending[tids[i]];
        t[BYTES] += x.width;
        const unsigned lane = tids[i] % 32;
        for (std::uintptr_t w = x.address >> 2; w <= (x.address + x.width - 1) >> 2; ++w) {
            if (first.space == SHARED) words.push_back(w);
            if (first.space == LOCAL) {
                lines.push_back(w);
                sectors.push_back(w * 4 + lane / 8);
            }
        }
        if (first.space == GLOBAL) {
            for (std::uintptr_t s = x.address >> 5; s <= (x.address + x.width - 1) >> 5; ++s)
                sectors.push_back(s);
            for (std::uintptr_t l = x.address >> 7; l <= (x.address + x.width - 1) >> 7; ++l)
                lines.push_back(l);
        }
    }
    unsigned long long waves;
    if (first.space == SHARED) {
        unique(words);
        unsigned per_bank[32] = {0}, most = 0;
        for (std::uintptr_t w : words) most = std::max(most, ++per_bank[w % 32]);
        waves = most;
    } else {
        unique(lines);
        unique(sectors);
        t[LINES] += lines.size();
        t[SECTORS] += sectors.size();
        waves = lines.size();
    }
    t[WAVEFRONTS] += waves;
    Site& site = sites[first.pc | (std::uintptr_t(first.space) << 56) |
                       (std::uintptr_t(first.store) << 55)];
    site.requests += 1;
    site.wavefronts += waves;
}

// A fiber of the block resumes (linear_tid: its thread; lo, size: its stack).
EMU_NO_COUNT static void enter(unsigned linear_tid, const void* lo, std::size_t size) {
    tid = linear_tid;
    stack_lo = reinterpret_cast<std::uintptr_t>(lo);
    stack_top = (stack_lo + size) & ~std::uintptr_t(15);  // as start_fiber aligns it
    // local memory: from the stack's bottom up to the kernel's first frame, once it is known
    // (kernel_frame: the emulator's calls into the kernel are not the kernel's)
    stack_hi = linear_tid < frame_top.size() ? frame_top[linear_tid] : 0;
    active = true;
}
EMU_NO_COUNT static void kernel_frame(const char* top) {
    if (tid >= frame_top.size()) frame_top.resize(tid + 1, 0);
    frame_top[tid] = stack_hi = reinterpret_cast<std::uintptr_t>(top);
}
EMU_NO_COUNT static void leave() { active = false; }
EMU_NO_COUNT static void end_block() { frame_top.assign(frame_top.size(), 0); }
}  // namespace emu_count

#define EMU_COUNT_ENTER(tid, stack, bytes) emu_count::enter((tid), (stack), (bytes))
#define EMU_COUNT_LEAVE() emu_count::leave()
#define EMU_COUNT_END_BLOCK() emu_count::end_block()
#define EMU_COUNT_KERNEL_FRAME()                                                                  \
    char emu_kernel_frame = 0;                                                                   \
    emu_count::kernel_frame(&emu_kernel_frame)
// An emulated atomic is a load and a store that no other thread may come between: counted as
// one request (a store), before it, its own accesses not instrumented.
#define EMU_COUNT_ATOMIC(p)                                                                       \
    emu_count::note(reinterpret_cast<std::uintptr_t>(p), sizeof(*(p)), true,                    \
                    (std::uintptr_t)__builtin_return_address(0))

// A 16-byte vector read whole (a GPU's one 16-byte load; g++ would copy it field by field).
#define EMU_VECTOR_COPY(T)                                                                        \
    T() = default;                                                                               \
    EMU_NO_COUNT T(const T& other) {                                                             \
        emu_count::note(reinterpret_cast<std::uintptr_t>(&other), sizeof(T), false,              \
                        (std::uintptr_t)__builtin_return_address(0));                            \
        std::memcpy(static_cast<void*>(this), &other, sizeof(T));                                \
    }                                                                                            \
    T& operator=(const T&) = default;

#define EMU_COUNT_HOOKS(N)                                                                        \
    extern "C" EMU_NO_COUNT void __asan_load##N##_noabort(std::uintptr_t a) {                    \
        emu_count::note(a, N, false, (std::uintptr_t)__builtin_return_address(0));               \
    }                                                                                            \
    extern "C" EMU_NO_COUNT void __asan_store##N##_noabort(std::uintptr_t a) {                   \
        emu_count::note(a, N, true, (std::uintptr_t)__builtin_return_address(0));                \
    }
EMU_COUNT_HOOKS(1)
EMU_COUNT_HOOKS(2)
EMU_COUNT_HOOKS(4)
EMU_COUNT_HOOKS(8)
EMU_COUNT_HOOKS(16)
extern "C" EMU_NO_COUNT void __asan_loadN_noabort(std::uintptr_t a, std::size_t n) {
    emu_count::note(a, n, false, (std::uintptr_t)__builtin_return_address(0));
}
extern "C" EMU_NO_COUNT void __asan_storeN_noabort(std::uintptr_t a, std::size_t n) {
    emu_count::note(a, n, true, (std::uintptr_t)__builtin_return_address(0));
}
// What the instrumented code also calls: nothing to do without the ASan runtime.
extern "C" void __asan_init() {}
extern "C" void __asan_version_mismatch_check_v8() {}
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}

// The Python side: the next launch's array arguments (pointers and sizes in bytes) ...
extern "C" EMU_NO_COUNT void emu_count_arrays(int n, const unsigned long long* lo,
                                              const unsigned long long* bytes) {
    emu_count::locate_static_data();
    emu_count::globals.clear();
    for (int i = 0; i < n; ++i)
        emu_count::globals.push_back({(std::uintptr_t)lo[i], (std::uintptr_t)(lo[i] + bytes[i])});
}
// ... and the counts since the last call (3 spaces x 2 (load, store) x 5 fields), then zeroed;
extern "C" EMU_NO_COUNT void emu_count_take(unsigned long long* out) {
    std::memcpy(out, emu_count::totals, sizeof emu_count::totals);
    std::memset(emu_count::totals, 0, sizeof emu_count::totals);
}
// ... and the instructions that made them: how many, then each as (code address from the
// library's start, space, store, requests, wavefronts), then forgotten.
extern "C" EMU_NO_COUNT long long emu_count_n_sites() {
    return (long long)emu_count::sites.size();
}
extern "C" EMU_NO_COUNT void emu_count_sites(unsigned long long* out) {
    Dl_info self;
    dladdr(reinterpret_cast<void*>(&emu_count_take), &self);
    const auto base = reinterpret_cast<std::uintptr_t>(self.dli_fbase);
    for (const auto& kv : emu_count::sites) {
        out[0] = (kv.first & ((std::uintptr_t(1) << 55) - 1)) - base;
        out[1] = (kv.first >> 56) & 0xFF;
        out[2] = (kv.first >> 55) & 1;
        out[3] = kv.second.requests;
        out[4] = kv.second.wavefronts;
        out += 5;
    }
    emu_count::sites.clear();
}
"""

#: The emulator's dynamic shared memory (and what EmulatedBackend.max_shared_bytes reports: an
#: H100's opt-in limit per block).
EMU_DYNAMIC_SHARED_BYTES = 227 * 1024


#: The sanitizers' build of the emulator (build_emulator(sanitize=True)) and how to run it:
#: Python started with the ASan runtime preloaded, leaks not reported (the interpreter's own).
SANITIZE_FLAGS = ("-fsanitize=address,undefined,float-cast-overflow",
                  "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
SANITIZE_OPTIONS = "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0"


def sanitizer_runtime() -> str | None:
    """LD_PRELOAD for a Python that loads the sanitized emulator: the ASan runtime, first, and
    libstdc++ (loaded later, its __cxa_throw escapes ASan's interceptor, which then aborts on any
    C++ exception); None where the compiler has no ASan runtime."""
    cxx = os.environ.get("CXX", "g++")
    paths = []
    for name in ("libasan.so", "libstdc++.so.6"):
        try:
            path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True,
                                  text=True, timeout=60, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not (path and os.path.isabs(path) and os.path.isfile(path)):
            return None
        paths.append(path)
    return " ".join(paths)


#: The counting build (build_emulator(count=True)): g++'s AddressSanitizer instrumentation in
#: outline mode, every access a call to a hook COUNTER_CPP defines, linked without the ASan
#: runtime; no stack or global redzones (the layout is the plain build's).  At -O2 (small arrays
#: indexed by unrolled loops in registers, as nvcc keeps them) without the loop copies that
#: vectorising or unswitching makes (each copy of a load is a request of its own).
COUNT_FLAGS = ("-O2", "-fno-tree-vectorize", "-fno-unswitch-loops",
               "-fsanitize=address", "-fsanitize-recover=address",
               "--param", "asan-instrumentation-with-call-threshold=0", "--param", "asan-stack=0",
               "--param", "asan-globals=0", "--param", "asan-use-after-return=0",
               "-DPWCONV_EMU_COUNT")


#: EmulatedBackend.memory[kernel]'s axes: space (global, shared, local) x (load, store) x
#: (requests, sectors, lines, wavefronts, bytes), as COUNTER_CPP's totals.
MEMORY_COUNT_SHAPE = (3, 2, 5)


def _gcc_unroll(source: str) -> str:
    """kernels.cu with its ``#pragma unroll [N]`` as g++'s ``#pragma GCC unroll``: N times, or
    without a count 64 (kernels.cu asks so only of loops of known trip count, which nvcc then
    unrolls fully); a count that is not a number (a template's) is left to g++.  Line for line:
    a line number of the copy is kernels.cu's."""
    import re

    def gcc(match) -> str:
        count = match.group(2).strip()
        if count and not count.isdigit():
            return f"{match.group(1)}// (#pragma unroll {count}: left to g++)"
        return f"{match.group(1)}#pragma GCC unroll {count or '64'}"

    return re.sub(r"^([ \t]*)#pragma unroll\b([^\n]*)$", gcc, source, flags=re.MULTILINE)


def build_emulator(out_dir: Path, defines=(), sanitize: bool = False,
                   count: bool = False, extra_kernels: str = "", extra_names=()) -> Path:
    """Compile kernels.cu for the host with the emulator around it (plus -D`defines`, the tuning
    knobs NVRTC may be given); returns the shared library.  sanitize: with AddressSanitizer and
    UBSan (SANITIZE_FLAGS; load it into a Python started with sanitizer_runtime() preloaded).
    count: with COUNTER_CPP's memory-access counter (EmulatedBackend.memory then holds each
    kernel's requests, sectors and wavefronts as a GPU's L1 would see them).  extra_kernels:
    more source after kernels.cu, whose kernels `extra_names` are registered too (tests)."""
    if sanitize and count:
        raise ValueError("build_emulator: sanitize and count both instrument the accesses; "
                         "ask for one")
    registry = "\n".join(
        f'    registry().emplace("{name}", [](void** p) {{ call(&{name}, p); }});'
        for name in [*_names(), *extra_names])
    kernels = KERNELS_CU
    if count:  # nvcc unrolls where kernels.cu asks it to: g++ is asked the same
        kernels = out_dir / "kernels_unrolled.cu"
        kernels.write_text(_gcc_unroll(KERNELS_CU.read_text()))
    source = (EMULATOR_CPP.replace('#include "KERNELS_CU"',
                                   f'#include "{kernels}"\n{extra_kernels}').replace("REGISTRY", registry)
              .replace("EMU_DYNAMIC_SHARED_BYTES", str(EMU_DYNAMIC_SHARED_BYTES)))
    if count:
        source = COUNTER_CPP + source
    stem = "pwconv_cuda_emulator" + ("_sanitized" if sanitize else "_counting" if count else "")
    cpp = out_dir / f"{stem}.cpp"
    lib = out_dir / f"{stem}.so"
    cpp.write_text(source)
    cxx = os.environ.get("CXX", "g++")
    extra = (*SANITIZE_FLAGS, "-DPWCONV_EMU_SANITIZE") if sanitize else ()
    common = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", "-fPIC", f"-I{INCLUDE}",
              *(f"-D{d}" for d in defines)]
    if count:  # compiled instrumented, linked without the ASan runtime (COUNTER_CPP's hooks)
        obj = out_dir / f"{stem}.o"
        cmds = [[cxx, *common, *COUNT_FLAGS, "-c", str(cpp), "-o", str(obj)],
                [cxx, "-shared", str(obj), "-o", str(lib)]]
    else:
        cmds = [[cxx, *common, "-shared", *extra, str(cpp), "-o", str(lib)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    return lib


class EmulatedBackend:
    """The backend interface of pwconv_cy.cuda._backend.CupyBackend over NumPy arrays, with the
    kernels run by the host emulation (same argument marshalling as cuLaunchKernel)."""

    name = "emulator"

    def __init__(self, lib_path):
        self.xp = np
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.emu_has.restype = ctypes.c_int
        self.lib.emu_has.argtypes = [ctypes.c_char_p]
        # the sanitized build: each launch's dynamic shared memory sized exactly
        self.set_shared = getattr(self.lib, "emu_set_dynamic_shared", None)
        if self.set_shared is not None:
            self.set_shared.restype = None
            self.set_shared.argtypes = [ctypes.c_ulonglong]
        # the counting build: each kernel's memory requests (COUNTER_CPP), summed by name
        self.counting = hasattr(self.lib, "emu_count_take")
        if self.counting:
            self.lib.emu_count_arrays.restype = None
            self.lib.emu_count_arrays.argtypes = [ctypes.c_int] + [
                ctypes.POINTER(ctypes.c_ulonglong)] * 2
            self.lib.emu_count_take.restype = None
            self.lib.emu_count_take.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
            self.lib.emu_count_n_sites.restype = ctypes.c_longlong
            self.lib.emu_count_sites.restype = None
            self.lib.emu_count_sites.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
        self.memory: dict[str, np.ndarray] = {}
        # kernel -> {(code offset, space, store): [requests, wavefronts]}: where they come from
        self.sites: dict[str, dict] = {}
        self.launches = []
        self.tiled_row_launches = 0  # kernel_map_tiled launches with the rows in shared memory
        self.reversed = False  # run barrier-free kernels last thread first (see emu_launch)

    def launch(self, name, grid, block, args, shared_mem=0):
        from pwconv_cy.cuda._backend import BARRIER_KERNELS

        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if min(grid) == 0:
            return
        holders = []
        params = (ctypes.c_void_p * max(1, len(args)))()
        for k, a in enumerate(args):
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"argument {k} of {name} is not C-contiguous")
                ptr = ctypes.c_void_p(a.ctypes.data)
                holders.append(ptr)
                params[k] = ctypes.cast(ctypes.pointer(ptr), ctypes.c_void_p)
            elif isinstance(a, np.generic):
                box = np.array(a)
                holders.append(box)
                params[k] = box.ctypes.data
            else:
                raise TypeError(f"argument {k} of {name} is {type(a).__name__} {a!r}: pass "
                                "NumPy scalars of the kernel parameter's type")
        threaded = int(name.split("<")[0] in BARRIER_KERNELS)
        if shared_mem > EMU_DYNAMIC_SHARED_BYTES:
            raise AssertionError(f"{name}: {shared_mem} bytes of dynamic shared memory, more than "
                                 f"the emulator's {EMU_DYNAMIC_SHARED_BYTES}")
        self.launches.append(name)
        if name.startswith("kernel_map_tiled<") and int(args[-1]) > 0:  # its tile_row_bits
            self.tiled_row_launches += 1
        if self.set_shared is not None:
            self.set_shared(int(shared_mem))
        if self.counting:  # the array arguments are the launch's global memory
            arrays = [a for a in args if isinstance(a, np.ndarray)]
            lo = np.array([a.ctypes.data for a in arrays] or [0], dtype=np.uint64)
            size = np.array([a.nbytes for a in arrays] or [0], dtype=np.uint64)
            self.lib.emu_count_arrays(len(arrays), lo.ctypes.data_as(
                ctypes.POINTER(ctypes.c_ulonglong)), size.ctypes.data_as(
                ctypes.POINTER(ctypes.c_ulonglong)))
        rc = self.lib.emu_launch(name.encode(), *grid, *block, threaded, int(self.reversed),
                                 params)
        if rc != 0:
            raise AssertionError(f"kernel {name!r} is not registered in the emulator")
        if self.counting:
            counts = np.zeros(MEMORY_COUNT_SHAPE, dtype=np.uint64)
            self.lib.emu_count_take(counts.ctypes.data_as(ctypes.POINTER(ctypes.c_ulonglong)))
            self.memory[name] = self.memory.get(name, 0) + counts
            rows = np.zeros((max(1, self.lib.emu_count_n_sites()), 5), dtype=np.uint64)
            self.lib.emu_count_sites(rows.ctypes.data_as(ctypes.POINTER(ctypes.c_ulonglong)))
            mine = self.sites.setdefault(name, {})
            for pc, space, store, requests, waves in rows.tolist():
                if not requests:
                    continue
                cell = mine.setdefault((pc, space, store), [0, 0])
                cell[0] += requests
                cell[1] += waves

    def has(self, name: str) -> bool:
        """Whether the emulator library has kernel `name` compiled in."""
        return bool(self.lib.emu_has(name.encode()))

    def synchronize(self, what=""):
        pass

    def compile(self):
        pass

    def argsort(self, a):
        return np.argsort(a, kind="stable")

    def sort(self, a):
        return np.sort(a)

    def lexsort(self, keys):
        return np.lexsort(keys)

    def to_host(self, a):
        return np.asarray(a)

    def to_device(self, a):
        return np.asarray(a)

    def device_memory_bytes(self):
        return 1 << 34

    def max_shared_bytes(self):
        return EMU_DYNAMIC_SHARED_BYTES

    def check_status(self, status, what):
        assert int(status[0]) == 0, f"{what}: status {int(status[0])}"


# --- scenarios shared by the emulation and the GPU tests ----------------------------------------


def lattice_cloud(rng, n, spacing=0.05, extent=6):
    """Points on a dyadic lattice: many of them exactly on kernel-cell faces (v = 2 * spacing)."""
    return (rng.integers(0, extent, size=(n, 3)) * spacing).astype(np.float64)


def scenario_clouds(name, rng):
    """(points float64 (n, 3), offsets, queries or None, query_offsets or None, v, K, s)."""
    if name == "random":
        p = rng.random((300, 3))
        return p, None, None, None, 0.15, 3, 1
    if name == "lattice_s2":
        return lattice_cloud(rng, 250), None, None, None, 0.1, 3, 2
    if name == "lattice_s3_k5":
        return lattice_cloud(rng, 250, extent=9), None, None, None, 0.05, 5, 3
    if name == "lattice_s4":
        return lattice_cloud(rng, 300, extent=10), None, None, None, 0.05, 3, 4
    if name == "k1":
        return lattice_cloud(rng, 200), None, None, None, 0.1, 1, 1
    if name == "batch_empty_clouds":
        p = rng.random((260, 3)) * 0.6
        offsets = np.array([0, 0, 100, 100, 180, 260, 260])
        return p, offsets, None, None, 0.12, 3, 2
    if name == "queries":
        p = rng.random((240, 3))
        q = np.concatenate([rng.random((70, 3)), lattice_cloud(rng, 30, spacing=0.1)])
        offsets = np.array([0, 120, 120, 240])
        q_offsets = np.array([0, 40, 60, 100])
        return p, offsets, q, q_offsets, 0.15, 3, 2
    if name == "long_rows":  # rows far longer than SHORT_ROW: the global row sort
        p = np.repeat(rng.random((30, 3)) * 0.2, 6, axis=0)
        return p, None, None, None, 0.1, 3, 1
    if name == "wide_coordinates":  # cell keys that do not fit 64 bits: the lexsort grid
        p = rng.random((150, 3)) * 0.5
        p[:3] += np.array([[1e13, 0, 0], [0, 1e13, 0], [0, 0, 1e13]])
        return p, None, None, None, 0.1, 3, 1
    if name == "k7_runtime":  # a kernel size compiled at run time
        return rng.random((150, 3)), None, None, None, 0.1, 7, 1
    raise KeyError(name)


SCENARIOS = ["random", "lattice_s2", "lattice_s3_k5", "lattice_s4", "k1", "batch_empty_clouds",
             "queries", "long_rows", "wide_coordinates", "k7_runtime"]


def conv_oracle(om, x, w, depthwise, dy):
    """float64 forward, input and weight gradients from an oracle kernel map (SPEC §1)."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    dy = dy.astype(np.float64)
    n_cells = om.counts.shape[1]
    m = len(om.splits) - 1
    rows = np.repeat(np.arange(m), np.diff(om.splits))
    scale = 1.0 / om.counts[rows, om.cell]
    w_f = w.reshape(n_cells, *w.shape[3:])
    if depthwise:
        contrib = x[om.index] * w_f[om.cell] * scale[:, None]
        y = np.zeros((m, x.shape[1]))
        np.add.at(y, rows, contrib)
        dx = np.zeros_like(x)
        np.add.at(dx, om.index, dy[rows] * w_f[om.cell] * scale[:, None])
        dw = np.zeros_like(w_f)
        np.add.at(dw, om.cell, x[om.index] * dy[rows] * scale[:, None])
    else:
        contrib = np.einsum("ec,eco->eo", x[om.index], w_f[om.cell]) * scale[:, None]
        y = np.zeros((m, w_f.shape[2]))
        np.add.at(y, rows, contrib)
        dx = np.zeros_like(x)
        np.add.at(dx, om.index, np.einsum("eo,eco->ec", dy[rows], w_f[om.cell]) * scale[:, None])
        dw = np.zeros_like(w_f)
        np.add.at(dw, om.cell, np.einsum("ec,eo->eco", x[om.index] * scale[:, None], dy[rows]))
    return y, dx, dw.reshape(w.shape)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(b), 1e-300)
    return float(np.linalg.norm(a - b) / scale)


#: The operator's switches the emulated scenarios run with: (PWCONV_CUDA_OPERATOR, atomic
#: input gradient, _WEIGHT_GRAD, _ENTRIES_LOADS, _INPUT_GRAD, _TRANSPOSE); the defaults since
#: 2026-11-28 ("thread", "rank") and those before ("broadcast", "sort": also the wide layers').
OPERATOR_VARIANTS = (
    ("auto", False, "rows", "thread", "gather", "rank"),
    ("bycell", False, "rows", "broadcast", "gather", "sort"),
    ("rows", False, "rows", "broadcast", "gather", "rank"),
    ("auto", False, "rows", "broadcast", "gather", "sort"),
    ("auto", False, "cells", "broadcast", "fixed", "sort"),
    ("auto", False, "chunks", "thread", "gather", "rank"),
    ("auto", False, "warps", "thread", "gather", "rank"),
    ("auto", False, "rows", "tile", "gather", "sort"),
    ("auto", True, "rows", "broadcast", "gather", "sort"))


def _host(a):
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _assert_same_grid(a, b, what):
    """Two grids of the same points hold the same arrays (the row tables' slots aside: where
    colliding keys land depends on the schedule)."""
    for field in ("x", "y", "z", "order", "cell_start", "cell_x", "cell_y", "cell_z",
                  "cloud_cell_begin", "origin", "row_cell_begin"):
        np.testing.assert_array_equal(_host(getattr(a, field)), _host(getattr(b, field)),
                                      err_msg=f"{what}: grid {field}")
    assert (a.cmax, a.table_bits, a.table_slots) == (b.cmax, b.table_bits, b.table_slots), what


def _other_grid_build(be, points, offsets, cell_size):
    """The grid built the other way (PWCONV_CUDA_GRID_BUILD: scan <-> nonzero)."""
    from pwconv_cy.cuda import _search

    other = "nonzero" if _search.grid_build_mode() == "scan" else "scan"
    before = os.environ.get(_search.GRID_BUILD_ENV)
    os.environ[_search.GRID_BUILD_ENV] = other
    try:
        return _search.build_grid(be, points, offsets, cell_size)
    finally:
        if before is None:
            os.environ.pop(_search.GRID_BUILD_ENV)
        else:
            os.environ[_search.GRID_BUILD_ENV] = before


def _assert_lower_corners(grid, points, offsets, what):
    """The grid's origin is each cloud's per-axis minimum (0 for an empty cloud), exactly."""
    p = np.asarray(points, dtype=np.float64)
    want = np.array([p[a:b].min(axis=0) if b > a else np.zeros(3)
                     for a, b in zip(offsets[:-1], offsets[1:])]).reshape(-1, 3)
    np.testing.assert_array_equal(_host(grid.origin), want, err_msg=f"{what}: origin")


def _emulate_scenario(be, name, operator=True, variants=OPERATOR_VARIANTS):
    """Runs one scenario through the GPU orchestration on the emulator (the operator too, with
    each of `variants`, unless operator=False: the searches only); returns a report."""
    import oracles

    from pwconv_cy.cuda import _conv, _search
    from pwconv_cy.neighbors import KernelMap, _cell_dtype

    rng = np.random.default_rng(sum(map(ord, name)))
    p, offsets, q, q_offsets, v, k, s = scenario_clouds(name, rng)
    offsets = np.array([0, len(p)]) if offsets is None else np.asarray(offsets)
    first_launch = len(be.launches)  # this scenario's launches start here
    first_tiled_rows = be.tiled_row_launches
    grid = _search.build_grid(be, np.ascontiguousarray(p), offsets.astype(np.int64), v)
    _assert_lower_corners(grid, p, offsets, name)
    _assert_same_grid(grid, _other_grid_build(be, np.ascontiguousarray(p),
                                              offsets.astype(np.int64), v), name)
    splits, index, cell = _search.kernel_map_arrays(
        be, grid, v, k, s, _cell_dtype(k), 1 << 40, None if q is None else np.ascontiguousarray(q),
        q_offsets)
    counts = _search.kernel_map_counts(be, splits, cell, k ** 3)
    om = oracles.kernel_map(p, v, k, s, offsets, q, q_offsets)
    report = {"scenario": name, "pairs": int(splits[-1]), "oracle_pairs": int(om.splits[-1])}
    np.testing.assert_array_equal(splits, om.splits, err_msg=f"{name}: splits")
    np.testing.assert_array_equal(index, om.index, err_msg=f"{name}: index")
    np.testing.assert_array_equal(cell.astype(np.int64), om.cell, err_msg=f"{name}: cell")
    np.testing.assert_array_equal(counts, om.counts, err_msg=f"{name}: counts")
    assert cell.dtype == _cell_dtype(k)
    # another legal schedule: the row hash table's colliding keys land in other slots, the
    # map stays the same
    be.reversed = True
    grid_r = _search.build_grid(be, np.ascontiguousarray(p), offsets.astype(np.int64), v)
    again = _search.kernel_map_arrays(
        be, grid_r, v, k, s, _cell_dtype(k), 1 << 40, None if q is None else np.ascontiguousarray(q),
        q_offsets)
    be.reversed = False
    for a, b in zip(again, (splits, index, cell)):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: reversed schedule")
    report["row_table_slots"] = 1 << grid.table_bits if grid.table_bits else 0
    ran = {n.split("<")[0] for n in be.launches[first_launch:]}
    report["tiled_search"] = "kernel_map_tiled" in ran
    report["once_search"] = "kernel_map_once" in ran
    report["tiled_rows"] = be.tiled_row_launches > first_tiled_rows
    assert grid.table_slots == (grid.table_bits > 0 and _search.row_slots_mode()), \
        "the row table's layout is not the one PWCONV_CUDA_ROW_SLOTS asks for"
    # several maps of one grid made together (one launch per pass, map d = grid row d): each
    # the oracle's, the same dilation twice included
    dils = (s, 1, s + 1, s)
    multi = _search.kernel_maps_arrays(
        be, grid, v, k, dils, _cell_dtype(k), 1 << 40,
        None if q is None else np.ascontiguousarray(q), q_offsets)
    assert len(multi) == len(dils)
    for d, (ms, mi, mc, me) in zip(dils, multi):
        od = om if d == s else oracles.kernel_map(p, v, k, d, offsets, q, q_offsets)
        np.testing.assert_array_equal(ms, od.splits, err_msg=f"{name}: maps, s={d}: splits")
        np.testing.assert_array_equal(mi, od.index, err_msg=f"{name}: maps, s={d}: index")
        np.testing.assert_array_equal(mc.astype(np.int64), od.cell,
                                      err_msg=f"{name}: maps, s={d}: cell")
        # n_i(f) of every entry, as the row sort (or, for long rows, entry_cell_counts) counts it
        rows_d = np.repeat(np.arange(len(od.splits) - 1), np.diff(od.splits))
        np.testing.assert_array_equal(me, od.counts[rows_d, od.cell],
                                      err_msg=f"{name}: maps, s={d}: entry counts")
    assert _search.kernel_maps_arrays(be, grid, v, k, (), _cell_dtype(k), 1 << 40) == []
    _check_map_passes(be, name, grid, v, k, dils, q, q_offsets, multi)

    # radius search (both metrics) against brute force
    r = v * 1.5
    for euclidean in (False, True):
        rs, ri = _search.radius_search_arrays(
            be, _search.build_grid(be, np.ascontiguousarray(p), offsets.astype(np.int64), r), r,
            euclidean, 1 << 40, None if q is None else np.ascontiguousarray(q), q_offsets)
        o_splits, o_index = oracles.radius_search(p, r, q, offsets, q_offsets,
                                                  "euclidean" if euclidean else "chebyshev")
        np.testing.assert_array_equal(rs, o_splits, err_msg=f"{name}: radius splits")
        np.testing.assert_array_equal(ri, o_index, err_msg=f"{name}: radius index")
        _check_radius_passes(be, f"{name}, euclidean={euclidean}", p, offsets, q, q_offsets, r,
                             euclidean, (rs, ri))
    if not operator:
        return report

    # the operator, dense and depthwise, float32 and float64
    m = len(splits) - 1
    km = KernelMap(splits=splits, index=index, cell=cell, counts=counts, voxel_size=v,
                   kernel_size=k, dilation=s, n_points=len(p), offsets=offsets,
                   query_offsets=offsets if q is None else np.asarray(q_offsets))
    errors = {}
    # conv_entries_tile (PWCONV_CUDA_ENTRIES_LOADS=tile) in small blocks: several blocks a cloud,
    # several rows a thread, and quick to emulate
    _conv.TILE_THREADS, _conv.TILE_ROWS = 32, 80
    configs = ((False, (3, 5)), (False, (9, 9)), (False, (32, 17)), (False, (40, 3)),
               (True, (6, 6)), (True, (33, 33)))
    for scheme, atomic, wgrad, loads, igrad, transpose in variants:
        os.environ[_conv.TRANSPOSE_ENV] = transpose
        os.environ[_conv.OPERATOR_ENV] = scheme
        os.environ[_conv.DETERMINISTIC_ENV] = "0" if atomic else "1"
        os.environ[_conv.WEIGHT_GRAD_ENV] = wgrad
        os.environ[_conv.ENTRIES_LOADS_ENV] = loads
        os.environ[_conv.INPUT_GRAD_ENV] = igrad
        # the opt-in switches of "auto" act up to 32 channels; wider layers run the "by cell"
        # kernels whatever they say, which the plain "auto" and "bycell" variants cover
        opt_in = scheme == "auto" and (atomic, wgrad, loads, igrad, transpose) != (
            False, "rows", "broadcast", "gather", "sort")
        for dtype in (np.float32, np.float64):
            for depthwise, (c_in, c_out) in configs:
                if opt_in and max(c_in, c_out) > _conv.LANE_CHANNELS:
                    continue
                km._cache.clear()
                x = rng.standard_normal((len(p), c_in)).astype(dtype)
                w_shape = (k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out)
                w = rng.standard_normal(w_shape).astype(dtype)
                dy = rng.standard_normal((m, c_out)).astype(dtype)
                start = len(be.launches)
                y = _conv.forward(be, km, x, w, c_out, depthwise)
                dx = _conv.backward_input(be, km, dy, w, c_in, depthwise)
                dw = _conv.backward_weight(be, km, x, dy, c_out, depthwise).reshape(w.shape)
                ran = {name.split("<")[0] for name in be.launches[start:]}
                # "auto" takes the entries scheme up to 32 channels; "rows" runs where its shared
                # arrays allow (per-cell sums, (weight gradient) accumulators); else "by cell"
                lanes = max(c_in, c_out) <= _conv.LANE_CHANNELS
                rows_ok = (_conv.rows_plan(k ** 3, c_in, c_out, x.itemsize) is not None,
                           _conv.rows_plan(k ** 3, c_out, c_in, x.itemsize) is not None,
                           _conv.rows_plan(k ** 3, c_in, c_out, x.itemsize, w.size) is not None)
                if scheme == "rows" and max(c_in, c_out) <= 12 and k <= 3:
                    assert all(rows_ok), (c_in, c_out, k)
                want = {"bycell": (False, False, False), "rows": rows_ok,
                        "auto": (lanes, lanes, lanes)}[scheme]
                # PWCONV_CUDA_ENTRIES_LOADS=thread (or tile): one thread per row where the cell
                # matrices fit its shared copy (forward, input gradient), else conv_entries;
                # with tile, the clouds' source rows in shared memory where they fit
                by_thread = [loads in ("thread", "tile") and scheme == "auto" and lanes
                             and _conv.thread_plan(k ** 3, a, b, x.itemsize, depthwise,
                                                   cell.dtype) is not None
                             for a, b in ((c_in, c_out), (c_out, c_in))]
                by_thread[1] = by_thread[1] and not atomic and igrad == "gather"
                by_tile = [t and _conv.tile_plan(be, rows_by, src_by, k ** 3, a, b, x.itemsize,
                                                 depthwise) is not None
                           for t, (a, b), rows_by, src_by in zip(
                               by_thread, ((c_in, c_out), (c_out, c_in)),
                               (km.query_offsets, km.offsets), (km.offsets, km.query_offsets))]
                assert ("conv_entries_tile" in ran) == any(by_tile), (c_in, c_out, ran)
                assert ("conv_entries_thread" in ran) == any(
                    t and not u for t, u in zip(by_thread, by_tile)), (c_in, c_out, ran)
                assert ("conv_entries" in ran) == (scheme == "auto" and lanes
                                                   and not all(by_thread)), (scheme, loads, ran)
                # the entries scheme's weight gradient: the rows kernel where it holds the
                # weight (PWCONV_CUDA_WEIGHT_GRAD=rows, the default), else by cell;
                # "chunks": conv_weight_chunks where its block holds every (cell, channel)
                chunked = (wgrad == "chunks" and scheme == "auto" and lanes and
                           _conv.chunks_plan(k ** 3, c_in, c_out, depthwise, cell.dtype)
                           is not None)
                assert ("conv_weight_chunks" in ran) == chunked, (wgrad, c_in, c_out, ran)
                # "warps": conv_weight_warps where a warp's shared sums hold the weight
                warped = (wgrad == "warps" and scheme == "auto" and lanes and
                          _conv.warps_plan(k ** 3, c_in, c_out, x.itemsize, depthwise)
                          is not None)
                assert ("conv_weight_warps" in ran) == warped, (wgrad, c_in, c_out, ran)
                by_rows = (wgrad == "rows" or (wgrad in ("chunks", "warps") and not chunked
                                               and not warped)) and rows_ok[2]
                assert ("conv_weight_cells" in ran) == (scheme == "auto" and lanes and not by_rows
                                                        and not chunked and not warped), \
                    (scheme, wgrad, ran)
                # PWCONV_CUDA_DETERMINISTIC=0: the entries' input gradient by atomics, no
                # transposed map
                assert ("conv_entries_scatter" in ran) == (atomic and lanes), (scheme, ran)
                # PWCONV_CUDA_INPUT_GRAD=fixed: integer atomics over the map, no transposed map
                assert ("conv_entries_fixed" in ran) == (igrad == "fixed" and lanes), (igrad, ran)
                if (atomic or igrad == "fixed") and lanes:
                    want = (True, False, True)
                if scheme == "rows":
                    assert ("conv_rows" in ran) == (want[0] or want[1]), (scheme, c_in, ran)
                    assert ("conv_weight_rows" in ran) == want[2], (scheme, c_in, c_out, ran)
                else:
                    assert "conv_rows" not in ran, (scheme, ran)
                    assert ("conv_weight_rows" in ran) == (scheme == "auto" and lanes
                                                           and by_rows), (scheme, wgrad, ran)
                if not any(want):
                    assert "conv_gather_dense" in ran or "conv_gather_depthwise" in ran, ran
                # the one-thread-per-row input gradient reads the transposed map's counts
                cached = f"cuda_transposed_rows_{np.dtype(dtype).name}" in km._cache
                assert cached == (want[1] and not by_thread[1]), (scheme, c_in, c_out, ran)
                assert ("cuda_transposed_counts" in km._cache) == by_thread[1], (c_in, c_out, ran)
                ry, rdx, rdw = conv_oracle(om, x, w, depthwise, dy)
                tol = 1e-5 if dtype == np.float32 else 1e-12
                key = (f"{scheme}{' atomic' if atomic else ''} {wgrad} {loads} {igrad} "
                       f"{transpose} "
                       f"{np.dtype(dtype).name} "
                       f"{'depthwise' if depthwise else 'dense'} {c_in}->{c_out}")
                errors[key] = [rel_err(y, ry), rel_err(dx, rdx), rel_err(dw, rdw)]
                assert y.dtype == dx.dtype == dw.dtype == dtype
                assert max(errors[key]) <= tol, f"{name} {key}: relative errors {errors[key]} > {tol}"
    for env in (_conv.OPERATOR_ENV, _conv.DETERMINISTIC_ENV, _conv.WEIGHT_GRAD_ENV,
                _conv.ENTRIES_LOADS_ENV, _conv.INPUT_GRAD_ENV, _conv.TRANSPOSE_ENV):
        os.environ.pop(env, None)
    # the rows scheme's transposed map: each point's entries by ascending row (a row names a
    # point once), whatever the schedule, with weights 1 / n_i(f); by one radix sort or by rank
    # (the long-rows scenario's points are named by more than SHORT_ROW rows)
    rows = np.repeat(np.arange(m), np.diff(splits))
    order = np.lexsort((rows, index))
    for dtype, transpose in ((np.float32, "sort"), (np.float64, "sort"), (np.float32, "rank")):
        os.environ[_conv.TRANSPOSE_ENV] = transpose
        km._cache.pop(f"cuda_transposed_rows_{np.dtype(dtype).name}", None)
        tr = _conv.transposed_rows(be, km, dtype)
        be.reversed = True  # threads run in another order
        km._cache.pop(f"cuda_transposed_rows_{np.dtype(dtype).name}")
        tr_reversed = _conv.transposed_rows(be, km, dtype)
        be.reversed = False
        os.environ.pop(_conv.TRANSPOSE_ENV)
        for key in tr:
            np.testing.assert_array_equal(tr_reversed[key], tr[key], err_msg=f"{transpose} {key}")
        np.testing.assert_array_equal(tr["splits"][1:],
                                      np.cumsum(np.bincount(index, minlength=len(p))))
        np.testing.assert_array_equal(tr["row"], rows[order])
        np.testing.assert_array_equal(tr["cell"], cell[order].astype(np.int32))
        np.testing.assert_array_equal(
            tr["weight"], (1 / om.counts[rows[order], cell[order]].astype(dtype)).astype(dtype))
    # the public transposed map: rows ascending within each point
    tsplits, tkeys = _conv.transposed(be, km)
    bits = _search.cell_bits_for(k)
    np.testing.assert_array_equal(tsplits[1:], np.cumsum(np.bincount(index, minlength=len(p))))
    np.testing.assert_array_equal(tkeys, (rows[order] << bits) | cell[order].astype(np.int64))
    report["max_rel_error"] = max(max(e) for e in errors.values())
    _check_fixed_input_grad(be, km, om, rng, name)
    _check_points_digest(be, p, offsets)
    return report


@contextlib.contextmanager
def _fill_flags(be, pass_kernel: str):
    """While the block runs, the only_missing flag (1: the rows a one pass did not keep, alone)
    of every fill pass of pass_kernel ("kernel_map_pass", any K: <K, 1>; "radius_pass": <1>), in
    order."""
    flags = []
    launch = be.launch

    def spy(name, grid_dim, block, args, shared_mem=0):
        if name.startswith(pass_kernel + "<") and name.endswith("1>"):
            flags.append(int(args[-1]))
        return launch(name, grid_dim, block, args, shared_mem)

    be.launch = spy
    try:
        yield flags
    finally:
        be.launch = launch


def _check_map_passes(be, name, grid, v, k, dils, q, q_offsets, want):
    """The maps `want` (made the default way) again: by count + fill; in one pass with the scratch
    sized from a sample of the queries (a stride over them), under the reversed schedule (other
    warps claim the scratch first); and with a scratch estimate far too small, which must fall
    back to the fill pass (the reversed one with 3 threads per row in sort_rows_by_rank instead
    of 32).  Always the same maps, and the passes each way claims to run."""
    from pwconv_cy.cuda import _search
    from pwconv_cy.neighbors import _cell_dtype

    defaults = (_search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK)
    q = None if q is None else np.ascontiguousarray(q)
    n_pairs = sum(int(w[0][-1]) for w in want)
    long_rows = max((int(np.diff(w[0]).max()) for w in want if len(w[0]) > 1), default=0) \
        > _search.SHORT_ROW
    ways = (("two", defaults, False, 32), ("one", (3, defaults[1], defaults[2]), False, 32),
            ("one", (3, defaults[1], defaults[2]), True, 3),
            ("one", (defaults[0], 0.25, 0), False, 32))
    sort_lanes = _search.SORT_LANES
    capacity_mode = os.environ.get(_search.MAP_CAPACITY_ENV)
    os.environ[_search.MAP_CAPACITY_ENV] = "sample"  # the ways below size it from the sample
    try:
        for passes, (sample, margin, slack), reverse, lanes in ways:
            os.environ[_search.MAP_PASSES_ENV] = passes
            _search.SORT_LANES = lanes
            _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = \
                sample, margin, slack
            start = len(be.launches)
            be.reversed = reverse
            capacities = []
            search_once = _search._search_once

            def spy(be, k, head, grid_dim, rows, capacity, *rest, _capacities=capacities,
                    _search_once=search_once):
                _capacities.append(capacity)
                return _search_once(be, k, head, grid_dim, rows, capacity, *rest)

            _search._search_once = spy
            try:
                with _fill_flags(be, "kernel_map_pass") as fills:
                    got = _search.kernel_maps_arrays(be, grid, v, k, dils, _cell_dtype(k),
                                                     1 << 40, q, q_offsets)
            finally:
                be.reversed = False
                _search._search_once = search_once
            ran = [n.split("<")[0] for n in be.launches[start:]]
            what = f"{name}: {passes} pass(es), capacity {(sample, margin, slack)}"
            for g, w in zip(got, want):
                for a, b in zip(g, w):
                    np.testing.assert_array_equal(a, b, err_msg=what)
            if grid.n_points == 0:
                continue
            if capacities:  # the estimate: the sampled queries' rows that the one pass keeps
                m = len(want[0][0]) - 1  # (at most SHORT_ROW entries), scaled to all queries
                stride = max(1, m // sample)
                qrow = np.arange(m) if q is not None else np.asarray(grid.order)
                sampled = qrow[::stride]
                lengths = [np.diff(w[0])[sampled] for w in want]
                total = sum(int(n[n <= _search.SHORT_ROW].sum()) for n in lengths)
                estimate = total * (m / len(sampled))
                assert capacities == [int(estimate * float(margin)) + int(slack)], \
                    (what, capacities, total, stride)
            once = ran.count("kernel_map_once") + ran.count("kernel_map_tiled")
            if passes == "two":
                assert once == 0 and len(fills) == 1, (what, ran)
            elif long_rows:  # one pass, then a fill of the long rows (or of all, short scratch)
                assert once == 1 and len(fills) == 1, (what, ran)
                if margin >= 1 and sample == defaults[0]:  # the scratch holds every short row
                    assert fills == [1], (what, fills)
                elif margin < 1:
                    assert fills == [0], (what, fills)
            elif margin < 1 and n_pairs:  # the scratch falls short: fill pass after all
                assert once == 1 and len(fills) == 1, (what, ran)
            elif margin >= 1:
                assert once == 1 and not fills, (what, ran)
    finally:
        os.environ.pop(_search.MAP_PASSES_ENV, None)
        _search.SORT_LANES = sort_lanes
        _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = defaults
        if capacity_mode is None:
            os.environ.pop(_search.MAP_CAPACITY_ENV)
        else:
            os.environ[_search.MAP_CAPACITY_ENV] = capacity_mode


def _check_radius_passes(be, name, p, offsets, q, q_offsets, r, euclidean, want):
    """The radius search `want` (made the default way: one pass) again by count + fill, in one
    pass with a 3-query sample under the reversed schedule, and with a scratch estimate far too
    small (the fill pass over every row after all); the launches each way claims to run: the
    one pass, and a fill of the rows over SHORT_ROW alone where the scratch holds the others."""
    from pwconv_cy.cuda import _search

    defaults = (_search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK)
    q = None if q is None else np.ascontiguousarray(q)
    lengths = np.diff(want[0])
    long_rows = len(lengths) > 0 and int(lengths.max()) > _search.SHORT_ROW
    short_pairs = int(lengths[lengths <= _search.SHORT_ROW].sum())
    ways = (("one", defaults, False), ("two", defaults, False),
            ("one", (3, defaults[1], defaults[2]), True), ("one", (defaults[0], 0.25, 0), False))
    try:
        for passes, (sample, margin, slack), reverse in ways:
            os.environ[_search.MAP_PASSES_ENV] = passes
            _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = \
                sample, margin, slack
            be.reversed = reverse
            start = len(be.launches)
            try:
                with _fill_flags(be, "radius_pass") as flags:
                    grid = _search.build_grid(be, np.ascontiguousarray(p),
                                              offsets.astype(np.int64), r)
                    got = _search.radius_search_arrays(be, grid, r, euclidean, 1 << 40, q,
                                                       q_offsets)
            finally:
                be.reversed = False
            what = f"{name}: radius, {passes} pass(es), capacity {(sample, margin, slack)}"
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b, err_msg=what)
            once = be.launches[start:].count("radius_once")
            if len(lengths) == 0 or grid.n_points == 0:
                continue
            if passes == "two":
                assert once == 0 and flags == [0], (what, flags)
            elif margin < 1 and short_pairs:  # the scratch falls short: every row filled
                assert once == 1 and flags == [0], (what, flags)
            elif sample == defaults[0]:  # the scratch holds every short row
                assert once == 1 and flags == ([1] if long_rows else []), (what, flags)
    finally:
        os.environ.pop(_search.MAP_PASSES_ENV, None)
        _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = defaults


def _check_fixed_input_grad(be, km, om, rng, name):
    """PWCONV_CUDA_INPUT_GRAD=fixed on nasty output gradients: a row 1e30 (float64) / 1e15
    (float32) times the others, within rounding of the oracle norm-wise; a NaN makes exactly the
    points it reaches NaN (every channel), as the gather does; points no row names get 0."""
    from pwconv_cy.cuda import _conv

    m, n = km.n_queries, km.n_points
    if m == 0 or n == 0:
        return
    os.environ[_conv.INPUT_GRAD_ENV] = "fixed"
    try:
        for dtype, big in ((np.float64, 1e30), (np.float32, 1e15)):
            for depthwise, (c_in, c_out) in ((False, (5, 7)), (True, (4, 4))):
                km._cache.clear()
                x = rng.standard_normal((n, c_in)).astype(dtype)
                w_shape = (km.kernel_size,) * 3 + ((c_in,) if depthwise else (c_in, c_out))
                w = rng.standard_normal(w_shape).astype(dtype)
                dy = rng.standard_normal((m, c_out)).astype(dtype)
                dy[m // 2] *= dtype(big)
                dx = _conv.backward_input(be, km, dy, w, c_in, depthwise)
                rdx = conv_oracle(om, x, w, depthwise, dy)[1]
                tol = 1e-5 if dtype == np.float32 else 1e-12
                err = rel_err(dx, rdx)
                assert err <= tol, f"{name} fixed {np.dtype(dtype).name}: outlier error {err:.3g}"
                named = np.bincount(om.index, minlength=n) > 0
                assert not dx[~named].any(), f"{name}: points no row names must get 0"
                # the worst case for the grid: every contribution of the same sign and as large
                # as the bound allows (constant positive gradient and weights)
                ones_dx = _conv.backward_input(be, km, np.ones_like(dy), np.ones_like(w), c_in,
                                               depthwise)
                ones_rdx = conv_oracle(om, x, np.ones_like(w), depthwise, np.ones_like(dy))[1]
                err = rel_err(ones_dx, ones_rdx)
                assert err <= tol, f"{name} fixed {np.dtype(dtype).name}: same-sign error {err:.3g}"
                dy[m // 3, 0] = np.nan
                dx = _conv.backward_input(be, km, dy, w, c_in, depthwise)
                rdx = conv_oracle(om, x, w, depthwise, dy)[1]
                want_nan = np.isnan(rdx).any(axis=1)
                np.testing.assert_array_equal(np.isnan(dx).all(axis=1), want_nan,
                                              err_msg=f"{name}: NaN points")
                np.testing.assert_array_equal(np.isnan(dx).any(axis=1), want_nan)
    finally:
        os.environ.pop(_conv.INPUT_GRAD_ENV)


def _digest_reference(points, offsets):
    """points_digest's fingerprint computed with NumPy: the definition the kernel implements."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(points.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    if points.size:
        bits = np.ascontiguousarray(points, dtype=np.float64).reshape(-1).view(np.uint64)
        pos = np.arange(bits.shape[0], dtype=np.uint64)
        mixed = (bits ^ (bits >> np.uint64(29))) * np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            sums = np.array([(bits * (pos * np.uint64(2) + np.uint64(1))).sum(dtype=np.uint64),
                             (mixed * (pos + np.uint64(0x632BE59BD9B4E019))).sum(dtype=np.uint64)])
        h.update(sums.tobytes())
    return "cuda:" + h.hexdigest()


def _check_points_digest(be, p, offsets):
    """The digest kernel: NumPy's definition, float32 == float64 of the same values, one changed
    value changes it, NaN and infinities counted."""
    from pwconv_cy.cuda import _search
    from pwconv_cy.cuda._search import points_digest

    p32 = p.astype(np.float32)
    d64, bad = points_digest(be, np.ascontiguousarray(p), offsets)
    assert (d64, bad) == (_digest_reference(p, offsets), 0)
    d32, _ = points_digest(be, p32, offsets)
    assert d32 == points_digest(be, p32.astype(np.float64), offsets)[0] == \
        _digest_reference(p32, offsets)
    if np.abs(p).max() < 6e4:  # within float16's range
        assert points_digest(be, p.astype(np.float16), offsets)[0] == \
            _digest_reference(p.astype(np.float16), offsets)
    q = p.copy()
    q[len(q) // 2, 1] = np.nextafter(q[len(q) // 2, 1], 2.0)
    assert points_digest(be, q, offsets)[0] != d64
    q[0, 0], q[-1, 2], q[1, 1] = np.nan, np.inf, -np.inf
    assert points_digest(be, q, offsets)[1] == 3
    # the grid takes the same digest and NaN count in the transfer of its largest cells, and
    # builds nothing more from non-finite points (the caller raises)
    grid = _search.build_grid(be, np.ascontiguousarray(p), offsets, 0.1)
    assert (grid.points_digest, grid.n_nonfinite) == (d64, 0)
    bad_grid = _search.build_grid(be, q, offsets, 0.1)
    assert (bad_grid.points_digest, bad_grid.n_nonfinite) == points_digest(be, q, offsets)
    assert bad_grid.x is None and bad_grid.n_nonfinite == 3


def _emulate_property(be, max_examples: int = 80):
    """Hypothesis: random packed batches of every cloud kind (empty clouds, duplicates, points on
    cell faces), queries or not, K in {1, 3}, dilations 1-3, 1-12 channels, float32/64, dense or
    depthwise, either sort of the filled rows, one or several weight-gradient chunks per cell, the
    maps searched once (scratch estimates exact, sampled or short) or twice: the GPU
    orchestration on the emulator gives the oracle's kernel map and the operator within
    rounding, with each scheme; the default scheme's forward and gradients also under a reversed
    schedule, bit for bit."""
    import oracles
    import strategies
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pwconv_cy.cuda import _conv, _search
    from pwconv_cy.neighbors import KernelMap, _cell_dtype

    @st.composite
    def cases(draw):
        batch = draw(strategies.batches(max_clouds=3, max_points=40))
        queries = draw(st.one_of(st.none(), strategies.queries_for(batch, max_per_cloud=15)))
        k = draw(st.sampled_from([1, 3]))
        s = draw(st.integers(1, 3))
        voxel = draw(st.sampled_from([0.125, 0.25, 0.3, 0.5]))
        c_in, c_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        depthwise = draw(st.booleans())
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        # short rows: most rows of the map go through the global sort of long rows too
        short = draw(st.sampled_from([_search.SHORT_ROW, 3]))
        # the weight gradient's chunks: one per cell, or many (each cell's sum over several)
        chunk = draw(st.sampled_from([_conv.CELL_CHUNK, 1, 3]))
        # who sorts the filled short rows ("rank" twice as often: only it takes the one pass, and
        # with it the tiled searches)
        row_sort = draw(st.sampled_from(["rank", "rank", "thread"]))
        # the entries' weight-gradient kernels
        wgrad = draw(st.sampled_from(["rows", "cells", "chunks", "warps"]))
        # conv_entries' source loads, or one thread per row (conv_entries_thread), also with the
        # clouds' rows in shared memory (conv_entries_tile: a cloud's rows in blocks of 1,024,
        # 5 or 64, its threads 32 or 64, the block's rows longest first or in map order)
        loads = draw(st.sampled_from(["broadcast", "thread", "tile"]))
        tile = (draw(st.sampled_from([_conv.TILE_ROWS, 5, 64])), draw(st.sampled_from([32, 64])),
                draw(st.booleans()))
        igrad = draw(st.sampled_from(["gather", "fixed"]))  # the deterministic input gradient
        transpose = draw(st.sampled_from(["sort", "rank"]))  # how the transposed map is made
        slots = draw(st.sampled_from(["0", "1"]))  # the grid's row table: split, or pairs
        # the one pass with clouds' coordinates (1), cells (2) and grid rows (3) in shared memory
        # (3, which runs the most code, twice as often)
        tiles = draw(st.sampled_from(["0", "1", "2", "3", "3"]))
        # its queries per block: each cloud's in one block, or in several
        tile_queries = draw(st.sampled_from([_search.TILE_QUERIES, 5, 64]))
        # features and gradients in arrays whose first element is not 16-byte aligned
        misaligned = draw(st.booleans())
        # the one pass's scratch from a sample, or from the last maps of the kind (another
        # example's: often short, then the fill pass)
        capacity_mode = draw(st.sampled_from(["sample", "last"]))
        # the map alone, or made after another dilation's in the same launches
        before = draw(st.sampled_from([(), (1,), (3, 2)]))
        # the maps' search: count + fill, or one pass with its scratch sized from every query,
        # from a sample (every second or third), or too small (the fill pass after all)
        passes = draw(st.sampled_from(["one", "one", "two"]))
        sort_lanes = draw(st.sampled_from([32, 8, 3]))  # sort_rows_by_rank's threads per row
        # points per block of cloud_lower_corner: one block a cloud, or several and a merge
        corner_chunk = draw(st.sampled_from([_search.LOWER_CORNER_CHUNK, 4, 33]))
        grid_build = draw(st.sampled_from(["nonzero", "scan"]))  # the cells by which way
        capacity = draw(st.sampled_from([(_search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, 0),
                                         (7, _search.CAPACITY_MARGIN, 0),
                                         (_search.CAPACITY_SAMPLE, 0.5, 0)]))
        return batch, queries, k, s, voxel, c_in, c_in if depthwise else c_out, depthwise, dtype, \
            short, chunk, (row_sort, slots, tiles, tile_queries, misaligned, capacity_mode), \
            (wgrad, loads, igrad, transpose, tile), before, \
            (passes, capacity, sort_lanes, corner_chunk, grid_build), draw(strategies.seeds)

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case):
        (batch, queries, k, s, v, c_in, c_out, depthwise, dtype, short, chunk,
         (row_sort, slots, tiles, tile_queries, misaligned, capacity_mode),
         (wgrad, loads, igrad, transpose, (tile_rows, tile_threads, by_length)), before,
         (passes, capacity, sort_lanes, corner_chunk, grid_build), seed) = case
        _search.SHORT_ROW, _conv.CELL_CHUNK = short, chunk
        _conv.TILE_ROWS, _conv.TILE_THREADS = tile_rows, tile_threads
        _conv.TILE_BY_LENGTH = by_length
        os.environ[_search.MAP_PASSES_ENV] = passes
        _search.SORT_LANES = sort_lanes
        _search.LOWER_CORNER_CHUNK = corner_chunk
        _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = capacity
        os.environ[_search.ROW_SORT_ENV] = row_sort
        os.environ[_conv.WEIGHT_GRAD_ENV] = wgrad
        os.environ[_conv.ENTRIES_LOADS_ENV] = loads
        os.environ[_conv.INPUT_GRAD_ENV] = igrad
        os.environ[_conv.TRANSPOSE_ENV] = transpose
        os.environ[_search.ROW_SLOTS_ENV] = slots
        os.environ[_search.MAP_TILES_ENV] = tiles
        os.environ[_search.MAP_CAPACITY_ENV] = capacity_mode
        os.environ[_search.GRID_BUILD_ENV] = grid_build
        _search.TILE_QUERIES = tile_queries
        p, offsets = batch.points, batch.offsets
        q = None if queries is None else queries.points
        q_off = None if queries is None else queries.offsets
        grid = _search.build_grid(be, np.ascontiguousarray(p), offsets, v)
        _assert_lower_corners(grid, p, offsets, "property")
        _assert_same_grid(grid, _other_grid_build(be, np.ascontiguousarray(p), offsets, v),
                          "property")
        splits, index, cell, entry_counts = _search.kernel_maps_arrays(
            be, grid, v, k, before + (s,), _cell_dtype(k), 1 << 40,
            None if q is None else np.ascontiguousarray(q), q_off)[-1]
        om = oracles.kernel_map(p, v, k, s, offsets, q, q_off)
        np.testing.assert_array_equal(splits, om.splits)
        np.testing.assert_array_equal(index, om.index)
        np.testing.assert_array_equal(cell.astype(np.int64), om.cell)
        rows = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
        np.testing.assert_array_equal(entry_counts, om.counts[rows, om.cell])
        m = len(splits) - 1
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((len(p), c_in)).astype(dtype)
        w = rng.standard_normal((k, k, k, c_in) if depthwise else (k, k, k, c_in, c_out))
        w = w.astype(dtype)
        dy = rng.standard_normal((m, c_out)).astype(dtype)
        if misaligned:  # C-contiguous views one element into a buffer (vector loads must not)
            x, dy = (np.frombuffer(np.concatenate([np.zeros(1, dtype), a.ravel()]).data,
                                   dtype=dtype)[1:].reshape(a.shape) for a in (x, dy))
        ry, rdx, rdw = conv_oracle(om, x, w, depthwise, dy)
        # the sums of the terms' magnitudes: the scale of any float sum's rounding error (a
        # one-channel K = 1 weight gradient is one sum of random signs, which can cancel far
        # below its terms' float32 rounding)
        scale = [np.linalg.norm(a) for a in
                 conv_oracle(om, np.abs(x), np.abs(w), depthwise, np.abs(dy))]
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for scheme in ("auto", "rows", "bycell"):
            os.environ[_conv.OPERATOR_ENV] = scheme
            km = KernelMap(splits=splits, index=index, cell=cell, counts=om.counts.astype(np.int32),
                           voxel_size=v, kernel_size=k, dilation=s, n_points=len(p),
                           offsets=offsets, query_offsets=offsets if q is None else q_off)
            km._cache["cuda_entry_counts"] = entry_counts  # as the map's row sort counted them
            y = _conv.forward(be, km, x, w, c_out, depthwise)
            dx = _conv.backward_input(be, km, dy, w, c_in, depthwise)
            dw = _conv.backward_weight(be, km, x, dy, c_out, depthwise).reshape(w.shape)
            for what, got, want, abs_norm in (("y", y, ry, scale[0]), ("dx", dx, rdx, scale[1]),
                                              ("dw", dw, rdw, scale[2])):
                err = rel_err(got, want)
                err_abs = float(np.linalg.norm(np.asarray(got, np.float64) - want)) / max(
                    abs_norm, 1e-300)
                assert err_abs <= tol, \
                    f"{scheme} {what}: relative error {err:.3g} ({err_abs:.3g} of |terms|) > {tol}"
            if scheme == "auto":
                km._cache.clear()
                be.reversed = True
                try:
                    y_r = _conv.forward(be, km, x, w, c_out, depthwise)
                    dx_r = _conv.backward_input(be, km, dy, w, c_in, depthwise)
                    dw_r = _conv.backward_weight(be, km, x, dy, c_out, depthwise)
                finally:
                    be.reversed = False
                assert y_r.tobytes() == y.tobytes()
                assert dx_r.tobytes() == dx.tobytes()
                assert dw_r.tobytes() == dw.tobytes()
                # the other ways of loading the source rows: the same products, the same bits
                for other in {"broadcast", "thread", "tile"} - {loads}:
                    os.environ[_conv.ENTRIES_LOADS_ENV] = other
                    y_o = _conv.forward(be, km, x, w, c_out, depthwise)
                    dx_o = _conv.backward_input(be, km, dy, w, c_in, depthwise)
                    assert y_o.tobytes() == y.tobytes(), other
                    assert dx_o.tobytes() == dx.tobytes(), other
                os.environ[_conv.ENTRIES_LOADS_ENV] = loads
                tr = _conv.transposed_rows(be, km, dtype)  # (point, row) ascending, any length
                point = np.repeat(np.arange(len(p)), np.diff(tr["splits"]))
                assert (np.diff(point * (m + 1) + tr["row"]) > 0).all()
                # the other way of making it, on another schedule (the rank sort's atomic
                # cursors then hand out other places): the same transposed map
                other = {"sort": "rank", "rank": "sort"}[transpose]
                os.environ[_conv.TRANSPOSE_ENV] = other
                km._cache.pop(f"cuda_transposed_rows_{np.dtype(dtype).name}")
                be.reversed = True
                try:
                    tr_o = _conv.transposed_rows(be, km, dtype)
                finally:
                    be.reversed = False
                os.environ[_conv.TRANSPOSE_ENV] = transpose
                for part in ("splits", "row", "cell", "weight"):
                    assert tr_o[part].tobytes() == tr[part].tobytes(), (other, part)
                # the one-thread-per-row kernels' version: counts n_i(f) in place of weights
                km._cache.pop("cuda_transposed_counts", None)
                tc = _conv.transposed_counts(be, km)
                for part in ("splits", "row", "cell"):
                    assert tc[part].tobytes() == tr[part].tobytes(), part
                assert (dtype(1) / tc["count"].astype(dtype)).tobytes() == tr["weight"].tobytes()
        os.environ.pop(_conv.OPERATOR_ENV)

    default, default_chunk = _search.SHORT_ROW, _conv.CELL_CHUNK
    default_tile = (_conv.TILE_ROWS, _conv.TILE_THREADS, _conv.TILE_BY_LENGTH)
    default_capacity = (_search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK)
    default_sort_lanes = _search.SORT_LANES
    default_corner_chunk = _search.LOWER_CORNER_CHUNK
    default_tile_queries = _search.TILE_QUERIES
    try:
        check()
    finally:
        _search.TILE_QUERIES = default_tile_queries
        _search.SHORT_ROW, _conv.CELL_CHUNK = default, default_chunk
        _conv.TILE_ROWS, _conv.TILE_THREADS, _conv.TILE_BY_LENGTH = default_tile
        _search.CAPACITY_SAMPLE, _search.CAPACITY_MARGIN, _search.CAPACITY_SLACK = \
            default_capacity
        _search.SORT_LANES = default_sort_lanes
        _search.LOWER_CORNER_CHUNK = default_corner_chunk
        os.environ.pop(_search.MAP_PASSES_ENV, None)
        os.environ.pop(_search.ROW_SORT_ENV, None)
        os.environ.pop(_conv.WEIGHT_GRAD_ENV, None)
        os.environ.pop(_conv.ENTRIES_LOADS_ENV, None)
        os.environ.pop(_conv.INPUT_GRAD_ENV, None)
        os.environ.pop(_conv.TRANSPOSE_ENV, None)
        os.environ.pop(_search.ROW_SLOTS_ENV, None)
        os.environ.pop(_search.MAP_TILES_ENV, None)
        os.environ.pop(_search.MAP_CAPACITY_ENV, None)
        os.environ.pop(_search.GRID_BUILD_ENV, None)
    return {"scenario": "property", "examples": max_examples,
            "tiled_row_launches": be.tiled_row_launches}


def _run_emulation(names, lib=None, defines=(), operator=True, variants=OPERATOR_VARIANTS):
    with tempfile.TemporaryDirectory() as tmp:
        lib = lib or build_emulator(Path(tmp), defines)
        be = EmulatedBackend(lib)
        for name in names:
            report = _emulate_property(be) if name == "property" else \
                _emulate_scenario(be, name, operator=operator, variants=variants)
            print(json.dumps(report), flush=True)


class TightBackend(EmulatedBackend):
    """The emulator with a block's shared memory limited to `room` bytes (the plans' fallbacks)."""

    room = 0

    def max_shared_bytes(self):
        return self.room


@pytest.fixture(scope="module")
def emulator_lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to emulate the kernels")
    return build_emulator(tmp_path_factory.mktemp("emulator"))


def _sanitized_env(runtime: str) -> dict:
    return dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS=SANITIZE_OPTIONS,
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


@pytest.fixture(scope="module")
def sanitized_emulator(tmp_path_factory, emulator_lib):
    """(library, environment) of the emulator built with AddressSanitizer and UBSan, run in a
    Python with the ASan runtime preloaded; (the plain library, None) where the compiler has no
    ASan runtime (the tests then check the results alone; test_sanitizers_catch_... skips)."""
    runtime = sanitizer_runtime()
    if runtime is None:
        return emulator_lib, None
    return build_emulator(tmp_path_factory.mktemp("sanitized"), sanitize=True), \
        _sanitized_env(runtime)


@pytest.mark.parametrize("scenario", SCENARIOS + ["property"])
def test_emulated_kernels_match_oracles(sanitized_emulator, scenario):
    """The GPU orchestration + kernels (run on the host) reproduce the float64 oracles: kernel map
    and radius search identical, forward/backward within rounding -- every operator variant, the
    opt-in ones too.  Under AddressSanitizer and UBSan (where the compiler has them): no kernel
    reads or writes outside its arrays or its shared memory, no undefined behaviour."""
    lib, env = sanitized_emulator
    cmd = [sys.executable, str(Path(__file__).resolve()), "--emulate", scenario, "--lib",
           str(lib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(TESTS),
                              check=False, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"emulation of {scenario} hung (deadlock in a kernel barrier?):\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, (f"emulation of {scenario} failed (rc {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    if scenario == "property":  # the draws reach the opt-in search with the rows in shared memory
        assert json.loads(proc.stdout.splitlines()[-1])["tiled_row_launches"] > 0, proc.stdout


_SHORT_PLAN = r"""
import os, sys
sys.path.insert(0, {tests!r})
import test_cuda
from pwconv_cy.cuda import _search
planned = _search._tile_bytes
_search._tile_bytes = lambda *a: planned(*a) - 8  # the plan 8 bytes short of the kernel's use
os.environ["PWCONV_CUDA_MAP_TILES"] = "3"
test_cuda._run_emulation(["random"], sys.argv[1], operator=False)
print("no error")
"""


def test_sanitizers_catch_what_results_miss(sanitized_emulator, emulator_lib):
    """Why the emulation runs under the sanitizers: a shared-memory plan 8 bytes short of what
    kernel_map_tiled uses gives the right maps on the plain emulator (its shared memory is one
    big buffer), while the sanitized one, whose shared memory is exactly the launch's, stops at
    the overflow, as compute-sanitizer would on a GPU.  Also: the searches with each cloud's
    coordinates, cells and rows in shared memory over the row table's pairs (PWCONV_CUDA_MAP_TILES
    = 3, ROW_SLOTS = 1) run clean."""
    lib, env = sanitized_emulator
    if env is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan)")
    script = _SHORT_PLAN.format(tests=str(TESTS))
    plain = subprocess.run([sys.executable, "-c", script, str(emulator_lib)], cwd=str(TESTS),
                           capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 0 and "no error" in plain.stdout, plain.stdout + plain.stderr
    caught = subprocess.run([sys.executable, "-c", script, str(lib)], cwd=str(TESTS), env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert caught.returncode != 0 and "no error" not in caught.stdout, caught.stdout
    assert "heap-buffer-overflow" in caught.stderr and "kernel_map_tiled" in caught.stderr, \
        caught.stderr[-4000:]
    tiles = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--emulate",
         "random,lattice_s2,lattice_s3_k5,lattice_s4,queries,batch_empty_clouds,long_rows",
         "--searches-only", "--tile-queries", "7", "--corner-chunk", "5", "--lib", str(lib)],
        cwd=str(TESTS), capture_output=True, text=True, timeout=600, check=False,
        env=dict(env, PWCONV_CUDA_MAP_TILES="3", PWCONV_CUDA_ROW_SLOTS="1"))
    assert tiles.returncode == 0 and tiles.stdout.count('"scenario"') == 7, \
        tiles.stdout[-3000:] + tiles.stderr[-6000:]


#: Kernels whose memory requests are known (test_memory_counter_...): a strided copy, 16-byte
#: loads, a strided read of shared memory, a dynamically indexed local array.
_COUNTED_KERNELS = r"""
extern "C" __global__ void toy_copy(const float* src, float* dst, long long n, int stride) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[(i * stride) % n];
}
extern "C" __global__ void toy_vector(const float* src, float* dst, long long n) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) {
        const float4 q = *reinterpret_cast<const float4*>(src + 4 * i);
        dst[i] = q.x + q.y + q.z + q.w;
    }
}
extern "C" __global__ void toy_shared(const float* src, float* dst, int stride) {
    __shared__ float tile[1024];
    tile[threadIdx.x] = src[threadIdx.x];
    __syncthreads();
    dst[threadIdx.x] = tile[(threadIdx.x * stride) % 1024];
}
extern "C" __global__ void toy_local(const int* which, float* dst) {
    float buf[64];
    for (int k = 0; k < 64; ++k) buf[k] = 0.5f * k;
    dst[threadIdx.x] = buf[which[threadIdx.x] % 64];
}
"""


def test_memory_counter_counts_what_a_gpu_l1_serves(tmp_path, monkeypatch):
    """build_emulator(count=True) (benchmarks/gpu_load_model.py's counts) groups a warp's
    accesses into requests and costs them as a GPU's L1 does: a warp's 32 consecutive floats
    are 4 sectors on 1 line, 32 floats 32 bytes apart 32 sectors on 8 lines, 16-byte loads one
    request of 16 sectors; shared memory read at a stride of 2 words takes 2 wavefronts, 32
    words 32 (every lane in one bank), 33 one; a local array read at one offset by all lanes
    is 1 line, at 32 offsets 32 lines.  The kernels' results stay right, and accesses outside
    the kernels' memory (the emulator's own) are not counted."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to emulate the kernels")
    lib = build_emulator(tmp_path, count=True, extra_kernels=_COUNTED_KERNELS,
                         extra_names=("toy_copy", "toy_vector", "toy_shared", "toy_local"))
    monkeypatch.setattr(_installed, "BARRIER_KERNELS",
                        frozenset(_installed.BARRIER_KERNELS) | {"toy_shared"})
    be = EmulatedBackend(lib)
    assert be.counting

    def counts(name, grid, block, args):
        be.memory.clear()
        be.sites.clear()
        be.launch(name, grid, block, args)
        assert list(be.memory) == [name]
        # the same requests and wavefronts, instruction by instruction
        by_site = np.zeros((3, 2, 2), dtype=np.int64)
        for (_, space, store), (requests, waves) in be.sites[name].items():
            by_site[space, store] += (requests, waves)
        np.testing.assert_array_equal(by_site, be.memory[name][:, :, [0, 3]])
        return be.memory[name]

    n = 1024  # 32 warps
    src = np.arange(4 * n, dtype=np.float32)
    dst = np.zeros(n, dtype=np.float32)
    for stride, sectors, lines in ((1, 4, 1), (2, 8, 2), (8, 32, 8), (32, 32, 32)):
        m = counts("toy_copy", (8,), (128,), (src[:n], dst, np.int64(n), np.int32(stride)))
        assert m[0, 0, :3].tolist() == [32, 32 * sectors, 32 * lines], (stride, m[0, 0])
        assert m[0, 1, :3].tolist() == [32, 32 * 4, 32], m[0, 1]  # the stores: coalesced
        assert not m[1:].any(), m  # no shared or local memory
        np.testing.assert_array_equal(dst, src[(np.arange(n) * stride) % n])
        # one load and one store instruction
        assert sorted((sp, st, r) for (_, sp, st), (r, _) in be.sites["toy_copy"].items()) == \
            [(0, 0, 32), (0, 1, 32)]
    m = counts("toy_vector", (8,), (128,), (src, dst, np.int64(n)))
    assert m[0, 0, :3].tolist() == [32, 32 * 16, 32 * 4], m[0, 0]
    np.testing.assert_array_equal(dst, src.reshape(n, 4).sum(axis=1))
    for stride, waves in ((1, 1), (2, 2), (32, 32), (33, 1)):
        m = counts("toy_shared", (1,), (1024,), (src[:n], dst, np.int32(stride)))
        assert m[1, 0, [0, 3]].tolist() == [32, 32 * waves], (stride, m[1, 0])
        assert m[1, 1, [0, 3]].tolist() == [32, 32], m[1, 1]
        np.testing.assert_array_equal(dst, src[(np.arange(n) * stride) % n])
    for which, lines in ((np.zeros(128, np.int32), 1), (np.arange(128, dtype=np.int32), 32)):
        m = counts("toy_local", (1,), (128,), (which, dst))
        assert m[2, 0, :3].tolist() == [4, 4 * 4 if lines == 1 else 4 * 32, 4 * lines], m[2, 0]
        assert m[2, 1, :3].tolist() == [4 * 64, 4 * 64 * 4, 4 * 64], m[2, 1]
        np.testing.assert_array_equal(dst[:128], 0.5 * (which % 64))


@pytest.mark.parametrize("batch,slots,tiles", [(4, "0", "0"), (3, "1", "1"), (8, "0", "2"),
                                               (1, "1", "2"), (1, "0", "3"), (4, "1", "3")])
def test_emulated_searches_with_other_row_batches(batch, slots, tiles):
    """The grid rows a query visits are looked up PWCONV_CUDA_ROW_BATCH at a time (a tuning knob
    given to NVRTC as -D; 1 shipped): 4, 3 (batches cut mid-range) and 8 at a time give the
    oracle's maps too, in the same order, and so does the row table laid out as (key, cells)
    pairs (PWCONV_CUDA_ROW_SLOTS=1), one row or three at a time, and the one pass with each
    cloud's coordinates, its cells, and its grid rows in shared memory (PWCONV_CUDA_MAP_TILES=1,
    2, 3) (the scenarios' searches, in a fresh process; the clouds' lower corners from blocks of
    a few points each and a merge, checked too)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to emulate the kernels")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--emulate",
           "random,lattice_s2,lattice_s3_k5,lattice_s4,queries,batch_empty_clouds",
           "--searches-only", "--define", f"PWCONV_CUDA_ROW_BATCH={batch}",
           "--tile-queries", str(7 * batch),  # several blocks per cloud
           "--corner-chunk", str(5 * batch)]  # its lower corner from several blocks' minima
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(TESTS),
                          check=False, env=dict(os.environ, PWCONV_CUDA_ROW_SLOTS=slots,
                                                PWCONV_CUDA_MAP_TILES=tiles))
    assert proc.returncode == 0, (f"emulation with row batches of {batch} failed "
                                  f"(rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-8000:]}")
    assert proc.stdout.count('"scenario"') == 6, proc.stdout
    # every scenario here has a row table and small clouds: where asked, the one pass (where a
    # scenario's maps take it) is the tiled search, and some do
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if tiles != "0":
        assert any(r["tiled_search"] for r in reports), reports
        assert not any(r["once_search"] for r in reports), reports
    else:
        assert not any(r["tiled_search"] for r in reports), reports
    # the rows go to shared memory where asked (3), and only there
    assert [r["tiled_rows"] for r in reports] == [r["tiled_search"] and tiles == "3"
                                                  for r in reports], reports


def test_emulated_maps_sized_from_the_last(emulator_lib, monkeypatch):
    """PWCONV_CUDA_MAP_CAPACITY=last: the first maps of a kind count a sample to size the one
    pass's scratch, the next ones use the pairs per query of the last (no sample count), and a
    short estimate (the last maps' batch was sparser) falls back to the fill pass: the same maps
    every time."""
    import oracles

    from pwconv_cy.cuda import _search
    from pwconv_cy.neighbors import _cell_dtype

    be = EmulatedBackend(emulator_lib)
    monkeypatch.setenv(_search.MAP_CAPACITY_ENV, "last")
    monkeypatch.setattr(_search, "_LAST_PAIRS_PER_QUERY", {})
    rng = np.random.default_rng(3)
    # about 16 and 2 neighbours per point (rows within SHORT_ROW: the one pass applies)
    dense, sparse = (np.ascontiguousarray(rng.random((600, 3)) * side) for side in (2.0, 4.0))
    offsets = np.array([0, 600], dtype=np.int64)
    for points, want_sample, want_fill in ((sparse, True, False), (sparse, False, False),
                                           (dense, False, True), (dense, False, False)):
        start = len(be.launches)
        grid = _search.build_grid(be, points, offsets, 0.2)
        (splits, index, cell, _), = _search.kernel_maps_arrays(
            be, grid, 0.2, 3, (1,), _cell_dtype(3), 1 << 40)
        ran = be.launches[start:]
        counts = [n for n in ran if n.startswith("kernel_map_pass<") and n.endswith(", 0>")]
        fills = [n for n in ran if n.startswith("kernel_map_pass<") and n.endswith(", 1>")]
        assert bool(counts) == want_sample, ran
        assert bool(fills) == want_fill, ran
        om = oracles.kernel_map(points, 0.2, 3, 1, offsets)
        np.testing.assert_array_equal(splits, om.splits)
        np.testing.assert_array_equal(index, om.index)
        np.testing.assert_array_equal(cell.astype(np.int64), om.cell)


def _packed_transposition(be, km, cell, counts):
    """transposed_counts of a bare map (index, splits, cells, entry counts) by rank: the
    one-pass way (scatter_rows_by_point + sort_segments_into), asserted to run."""
    from types import SimpleNamespace

    from pwconv_cy.cuda import ENTRY_COUNTS_KEY, _conv

    splits = np.searchsorted(km.rows, np.arange(int(km.rows.max(initial=-1)) + 2))
    full = SimpleNamespace(index=km.index, n_points=km.n_points, splits=splits,
                           n_queries=len(splits) - 1, cell=cell,
                           _cache={ENTRY_COUNTS_KEY: counts})
    before = be.launches.count("sort_segments_into<unsigned char>")
    got = _conv.transposed_counts(be, full)
    assert be.launches.count("sort_segments_into<unsigned char>") == before + 1
    return got


def test_emulated_transposition_sorts_long_segments(emulator_lib, monkeypatch):
    """The transposed map by rank (scatter_by_point + sort_segments, the default): each point's
    entries in ascending order, as one stable sort by point puts them, whatever the schedule and
    whichever way each segment is sorted -- by rank up to SEGMENT_RANK_MAX entries, by the
    warp's radix sort beyond (points named 0, 1, 2, 63-65 and 5,000 times; the radix sort for
    every segment, for none), and on a real map of a cluster of 300 duplicate points.  The same
    for the one-pass way of the input gradient's transposed map (scatter_rows_by_point +
    sort_segments_into: (row, entry) keys, unpacked into rows, cells and counts)."""
    from types import SimpleNamespace

    import oracles

    from pwconv_cy.cuda import _conv

    be = EmulatedBackend(emulator_lib)
    rng = np.random.default_rng(11)
    # rows naming distinct points in ascending order; point 0 in every row, point p in 1..5 in
    # rows p-1 ... -- named by 63, 64, 65, 2, 1 rows -- and points 6..39 at random
    named = {1: 63, 2: 64, 3: 65, 4: 2, 5: 1}
    rows = []
    for i in range(5000):
        row = {0} | {p for p, times in named.items() if i < times}
        row |= set(rng.choice(np.arange(6, 40), size=int(rng.integers(0, 4)), replace=False))
        rows.append(sorted(row))
    index = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    row_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    km = SimpleNamespace(index=index, n_points=42, rows=row_of)  # 40, 41: named by no row
    cell = rng.integers(0, 27, len(index)).astype(np.uint8)
    counts = rng.integers(1, 1000, len(index)).astype(np.int32)
    want = np.argsort(index, kind="stable")
    for rank_max in (_conv.SEGMENT_RANK_MAX, 0, 1 << 40):
        monkeypatch.setattr(_conv, "SEGMENT_RANK_MAX", rank_max)
        for reverse in (False, True):
            be.reversed = reverse
            try:
                got = _conv._order_by_point_rank(be, km, *_conv._point_counts_splits(be, km)[::-1])
                packed = _packed_transposition(be, km, cell, counts)
            finally:
                be.reversed = False
            np.testing.assert_array_equal(got, want, err_msg=f"rank_max {rank_max}")
            for name, values in (("row", row_of), ("cell", cell), ("count", counts)):
                np.testing.assert_array_equal(packed[name], values[want],
                                              err_msg=f"{name}, rank_max {rank_max}")
            np.testing.assert_array_equal(packed["splits"],
                                          np.r_[0, np.cumsum(np.bincount(index, minlength=42))])
    assert "sort_segments" in be.launches

    points = np.concatenate([np.full((300, 3), 0.5), rng.random((200, 3))])
    offsets = np.array([0, 500], dtype=np.int64)
    om = oracles.kernel_map(points, 0.1, 3, 1, offsets)
    assert np.bincount(om.index).max() >= 300  # segments of the radix sort
    rows = np.repeat(np.arange(len(om.splits) - 1), np.diff(om.splits))
    km = SimpleNamespace(index=om.index, n_points=500, rows=rows)
    monkeypatch.setattr(_conv, "SEGMENT_RANK_MAX", 64)
    got = _conv._order_by_point_rank(be, km, *_conv._point_counts_splits(be, km)[::-1])
    want = np.argsort(om.index, kind="stable")
    np.testing.assert_array_equal(got, want)
    counts = np.arange(len(om.index), dtype=np.int32)  # any values: they are carried along
    packed = _packed_transposition(be, km, om.cell.astype(np.uint8), counts)
    np.testing.assert_array_equal(packed["row"], rows[want])
    np.testing.assert_array_equal(packed["cell"], om.cell[want])
    np.testing.assert_array_equal(packed["count"], counts[want])


def test_emulated_operator_tile_plan(emulator_lib, monkeypatch):
    """conv_entries_tile's plan (PWCONV_CUDA_ENTRIES_LOADS=tile): blocks per cloud from the most
    rows of a cloud, shared memory for the cell matrices (padded to 16 bytes) and the largest
    cloud's source rows (padded to 16 bytes); None where that is beyond a block, or not asked
    for.  Where it is beyond a block, the forward and input gradient run conv_entries_thread
    instead, with the same bits as conv_entries_tile where that fits."""
    from pwconv_cy.cuda import _conv, _search
    from pwconv_cy.neighbors import KernelMap, _cell_dtype

    monkeypatch.setenv(_conv.ENTRIES_LOADS_ENV, "tile")
    monkeypatch.setattr(_conv, "TILE_ROWS", 100)
    monkeypatch.setattr(_conv, "TILE_THREADS", 32)
    rows_by = np.array([0, 250, 250, 251])  # queries per cloud: 250, 0, 1
    src_by = np.array([0, 10, 310, 320])  # points per cloud: 10, 300, 10
    be = EmulatedBackend(emulator_lib)
    # 27 cells x 9 x 9 float32 = 2,187 values (2,188 padded); 300 rows of 9 channels padded to
    # 12; the row order of 100 rows (400 bytes, already a multiple of 16)
    want_bytes = (2188 + 300 * 12) * 4 + 400
    assert _conv.tile_plan(be, rows_by, src_by, 27, 9, 9, 4, False) == (3, want_bytes)
    # depthwise float64: 27 x 6 = 162 values; rows of 6 padded to 6 (two doubles a vector)
    assert _conv.tile_plan(be, rows_by, src_by, 27, 6, 6, 8, True) == \
        (3, (162 + 300 * 6) * 8 + 400)
    monkeypatch.setattr(_conv, "TILE_ROWS", 101)  # 404 bytes of order, rounded up to 416
    assert _conv.tile_plan(be, rows_by, src_by, 27, 9, 9, 4, False) == (3, want_bytes + 16)
    monkeypatch.setattr(_conv, "TILE_BY_LENGTH", False)  # rows in map order: no order array
    assert _conv.tile_plan(be, rows_by, src_by, 27, 9, 9, 4, False) == (3, want_bytes - 400)
    monkeypatch.setattr(_conv, "TILE_BY_LENGTH", True)
    monkeypatch.setattr(_conv, "TILE_ROWS", 100)
    tight = TightBackend(emulator_lib)
    tight.room = want_bytes
    assert _conv.tile_plan(tight, rows_by, src_by, 27, 9, 9, 4, False) == (3, want_bytes)
    tight.room -= 1
    assert _conv.tile_plan(tight, rows_by, src_by, 27, 9, 9, 4, False) is None
    monkeypatch.setenv(_conv.ENTRIES_LOADS_ENV, "thread")
    assert _conv.tile_plan(be, rows_by, src_by, 27, 9, 9, 4, False) is None

    # a map of 3 clouds, the forward and input gradient with the tiles, then without room
    rng = np.random.default_rng(3)
    points = rng.random((320, 3))
    grid = _search.build_grid(be, points, src_by.astype(np.int64), 0.3)
    splits, index, cell = _search.kernel_map_arrays(be, grid, 0.3, 3, 1, _cell_dtype(3), 1 << 40)
    counts = np.zeros((320, 27), dtype=np.int32)
    rows = np.repeat(np.arange(320), np.diff(splits))
    np.add.at(counts, (rows, cell.astype(np.int64)), 1)
    km = KernelMap(splits=splits, index=index, cell=cell, counts=counts, voxel_size=0.3,
                   kernel_size=3, dilation=1, n_points=320, offsets=src_by,
                   query_offsets=src_by)
    x = rng.standard_normal((320, 9)).astype(np.float32)
    w = rng.standard_normal((27, 9, 9)).astype(np.float32)
    dy = rng.standard_normal((320, 9)).astype(np.float32)
    results = {}
    for loads, backend, by_length in (("tile", be, True), ("tile", be, False),
                                      ("tile", tight, True), ("thread", be, True)):
        monkeypatch.setenv(_conv.ENTRIES_LOADS_ENV, loads)
        monkeypatch.setattr(_conv, "TILE_BY_LENGTH", by_length)
        km._cache.clear()
        start = len(backend.launches)
        y = _conv.forward(backend, km, x, w, 9, False)
        dx = _conv.backward_input(backend, km, dy, w, 9, False)
        ran = {n.split("<")[0] for n in backend.launches[start:]}
        tiled = loads == "tile" and backend is be
        assert ("conv_entries_tile" in ran) == tiled, (loads, ran)
        assert ("conv_entries_thread" in ran) == (not tiled), (loads, ran)
        results[(loads, backend is be, by_length)] = (y.tobytes(), dx.tobytes())
    assert len(results) == 4
    assert len(set(results.values())) == 1  # the same bits every way


def test_emulated_tile_plan_fits_shared_memory(emulator_lib, monkeypatch):
    """kernel_map_tiled's plan (PWCONV_CUDA_MAP_TILES): with 3, each cloud's first grid row and
    the most rows of a cloud as the grid's rows say, and a table at least twice as big; where the
    rows do not fit a block's shared memory, the cells still go (2); where the cells do not, no
    tiles at all; none without the row table.  The shared memory asked for is what the kernel
    lays out (the pairs from an even 64-bit word)."""
    from pwconv_cy.cuda import _search

    be = EmulatedBackend(emulator_lib)
    rng = np.random.default_rng(5)
    sizes = [300, 0, 450, 20]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    points = np.ascontiguousarray(rng.random((offsets[-1], 3)) * 2.0)
    grid = _search.build_grid(be, points, offsets, 0.2)
    # the rows per cloud, from the cells: a row starts where (cloud, cz, cy) changes
    key = np.stack([np.searchsorted(grid.cloud_cell_begin, np.arange(grid.n_cells), "right") - 1,
                    grid.cell_z, grid.cell_y], axis=1)
    starts = np.ones(grid.n_cells, dtype=bool)
    starts[1:] = np.any(key[1:] != key[:-1], axis=1)
    rows_per_cloud = np.bincount(key[starts, 0], minlength=len(sizes))
    largest = max(sizes)

    monkeypatch.setenv(_search.MAP_TILES_ENV, "3")
    plan = _search._tile_plan(be, grid, offsets)
    np.testing.assert_array_equal(plan.cloud_row_begin,
                                  np.concatenate([[0], np.cumsum(rows_per_cloud)]))
    assert (1 << plan.row_bits) >= 2 * rows_per_cloud.max() > (1 << plan.row_bits) // 2
    assert (plan.tile_points, plan.cells) == (largest, True)
    # x, y, z, cell x, first points (one more), the order as 32-bit offsets
    words = 5 * largest + 1 + (largest + 1) // 2
    assert plan.shared_bytes == 8 * (words + words % 2) + 16 * (1 << plan.row_bits)

    tight = TightBackend(emulator_lib)  # a block's shared memory: just the cells, or less
    tight.room = _search._tile_bytes(largest, True)
    plan = _search._tile_plan(tight, grid, offsets)
    assert (plan.cells, plan.row_bits, plan.shared_bytes) == (True, 0, tight.room)
    tight.room -= 1
    assert _search._tile_plan(tight, grid, offsets) is None
    monkeypatch.setenv(_search.MAP_TILES_ENV, "2")
    assert _search._tile_plan(be, grid, offsets).row_bits == 0
    monkeypatch.setenv(_search.MAP_TILES_ENV, "3")
    monkeypatch.setenv(_search.ROW_TABLE_ENV, "0")
    assert _search._tile_plan(be, _search.build_grid(be, points, offsets, 0.2), offsets) is None


def test_emulated_weight_chunks_in_pieces():
    """conv_weight_chunks sorts a chunk's entries by cell PWCONV_CUDA_CHUNK_ENTRIES at a time (a
    -D knob, 1,024 shipped): 32 at a time, every chunk of the scenarios' maps in many pieces, the
    weight gradient stays the oracle's (the one-thread-per-row variants, in a fresh process)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to emulate the kernels")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--emulate",
           "random,long_rows", "--loads", "thread", "--define", "PWCONV_CUDA_CHUNK_ENTRIES=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(TESTS),
                          check=False)
    assert proc.returncode == 0, (f"emulation with pieces of 32 entries failed "
                                  f"(rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-8000:]}")
    assert proc.stdout.count('"scenario"') == 2, proc.stdout


def test_gpu_switches_are_validated(monkeypatch):
    """The GPU path's environment switches take their documented values and refuse others with
    an error naming the variable (no GPU needed)."""
    from pwconv_cy.cuda import _conv, _search

    for env, fn, good, default in (
            (_conv.OPERATOR_ENV, _conv.operator_scheme, {"rows": "rows", " ENTRIES ": "entries"},
             "auto"),
            (_conv.DETERMINISTIC_ENV, _conv.deterministic, {"0": False, "off": False, "1": True},
             True),
            (_search.ROW_SORT_ENV, _search.row_sort_mode, {"thread": "thread", "rank": "rank"},
             "rank"),
            (_search.MAP_PASSES_ENV, _search.map_passes_mode, {"two": "two", " One": "one"},
             "one"),
            (_conv.WEIGHT_GRAD_ENV, _conv.weight_grad_mode,
             {"cells": "cells", " Rows ": "rows", "CHUNKS": "chunks", "Warps": "warps"}, "rows"),
            (_conv.ENTRIES_LOADS_ENV, _conv.entries_loads,
             {"broadcast": "broadcast", "Thread": "thread", " TILE": "tile"}, "thread"),
            (_conv.INPUT_GRAD_ENV, _conv.input_grad_mode, {"fixed": "fixed", "GATHER": "gather"},
             "gather"),
            (_conv.TRANSPOSE_ENV, _conv.transpose_mode, {"rank": "rank", "SORT": "sort"},
             "rank"),
            (_search.ROW_SLOTS_ENV, _search.row_slots_mode, {"1": True, "off": False}, False),
            (_search.MAP_TILES_ENV, _search.map_tiles_mode, {"1": 1, " 2 ": 2, "3": 3}, 0),
            (_search.MAP_CAPACITY_ENV, _search.map_capacity_mode,
             {"LAST": "last", "sample": "sample"}, "last"),
            (_search.GRID_BUILD_ENV, _search.grid_build_mode,
             {"Scan": "scan", "nonzero": "nonzero"}, "scan")):
        monkeypatch.delenv(env, raising=False)
        assert fn() == default, env
        for value, want in good.items():
            monkeypatch.setenv(env, value)
            assert fn() == want, (env, value)
        monkeypatch.setenv(env, "sometimes")
        with pytest.raises(ValueError, match=env):
            fn()
        monkeypatch.delenv(env)


def test_specialised_kernel_sizes_are_opt_in_and_validated():
    """PWCONV_CUDA_SPECIALISE_K names the kernel sizes compiled as constants: none by default,
    a clear error naming the variable for anything but sizes from 1 to 15."""
    from pwconv_cy.cuda import _backend

    assert _backend.specialised_kernel_sizes("") == ()
    assert _backend.specialised_kernel_sizes("3") == (3,)
    assert _backend.specialised_kernel_sizes(" 5,3,3 ") == (3, 5)
    for bad in ("x", "0", "16", "3;5", "-3"):
        with pytest.raises(ValueError, match="PWCONV_CUDA_SPECIALISE_K must list kernel sizes"):
            _backend.specialised_kernel_sizes(bad)


def test_emulated_kernel_map_with_k3_specialised():
    """With PWCONV_CUDA_SPECIALISE_K=3 the K = 3 maps run the kernels compiled for K = 3 (the
    emulator built with those instantiations, in a fresh process), and stay identical to the
    oracle: random clouds, lattices with s = 2 and 4, queries, huge coordinates, long rows."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to emulate the kernels")
    script = textwrap.dedent("""
        import sys, tempfile
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        import test_cuda as T
        from pwconv_cy.cuda import _backend
        assert _backend.SPECIALISED_K == (3,), _backend.SPECIALISED_K
        with tempfile.TemporaryDirectory() as tmp:
            be = T.EmulatedBackend(T.build_emulator(Path(tmp)))
            for name in ("random", "lattice_s2", "lattice_s4", "queries", "wide_coordinates",
                         "long_rows"):
                T._emulate_scenario(be, name, operator=False)  # the K = 3 search kernels
        ran = {name for name in be.launches if name.startswith("kernel_map_")}
        assert ran == {"kernel_map_pass<3, 0>", "kernel_map_pass<3, 1>",
                       "kernel_map_once<3>"}, ran
        print("ok")
    """)
    env = dict(os.environ, PWCONV_CUDA_SPECIALISE_K="3")
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS)], capture_output=True,
                          text=True, timeout=600, cwd=str(TESTS), env=env, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


# =============================================================================================
# 3. On a CUDA device
# =============================================================================================


def _gpu_skip_reason():
    try:
        from pwconv_cy import cuda
    except Exception as exc:  # noqa: BLE001
        return f"pwconv_cy.cuda does not import ({exc})"
    return cuda.unavailable_reason()


_GPU_REASON = _gpu_skip_reason()
gpu = pytest.mark.skipif(_GPU_REASON is not None, reason=f"needs CuPy and a CUDA device: "
                                                          f"{_GPU_REASON}")


def _assert_same_map(gk, ck, what):
    import cupy

    np.testing.assert_array_equal(cupy.asnumpy(gk.splits), ck.splits, err_msg=f"{what}: splits")
    np.testing.assert_array_equal(cupy.asnumpy(gk.index), ck.index, err_msg=f"{what}: index")
    np.testing.assert_array_equal(cupy.asnumpy(gk.cell), ck.cell, err_msg=f"{what}: cell")
    assert gk._stored_counts() is None  # made on first access, on the device
    np.testing.assert_array_equal(cupy.asnumpy(gk.counts), ck.counts, err_msg=f"{what}: counts")
    assert isinstance(gk.counts, cupy.ndarray) and gk._stored_counts() is gk.counts
    assert gk.cell.dtype == ck.cell.dtype and gk.counts.dtype == ck.counts.dtype


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("row_sort", ["rank", "thread", "rank+tiles+slots", "rank+tiles3"])
def test_gpu_kernel_map_identical_to_cpu(scenario, row_sort, monkeypatch):
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _search

    monkeypatch.setenv(_search.ROW_SORT_ENV, row_sort.split("+")[0])
    if "tiles" in row_sort:  # the opt-in search kernel and row table layout (3: the clouds'
        # cells and rows in shared memory too, over the grid's split table)
        monkeypatch.setenv(_search.MAP_TILES_ENV, "3" if "tiles3" in row_sort else "1")
        monkeypatch.setenv(_search.ROW_SLOTS_ENV, "0" if "tiles3" in row_sort else "1")

    rng = np.random.default_rng(sum(map(ord, scenario)))
    p, offsets, q, q_offsets, v, k, s = scenario_clouds(scenario, rng)
    for dtype in (np.float32, np.float64):
        pd = p.astype(dtype)
        qd = None if q is None else q.astype(dtype)
        cpu = pwconv_cy.kernel_map(pd, v, kernel_size=k, dilation=s, offsets=offsets, queries=qd,
                                   query_offsets=q_offsets)
        dev = cuda.kernel_map(cupy.asarray(pd), v, kernel_size=k, dilation=s, offsets=offsets,
                              queries=None if qd is None else cupy.asarray(qd),
                              query_offsets=q_offsets)
        _assert_same_map(dev, cpu, f"{scenario} {np.dtype(dtype).name}")
        # with another dilation's map made in the same launches
        index = cuda.NeighborIndex(cupy.asarray(pd), v, offsets=offsets)
        both = index.kernel_maps(k, (s + 1, s), queries=None if qd is None else cupy.asarray(qd),
                                 query_offsets=q_offsets)
        _assert_same_map(both[1], cpu, f"{scenario} {np.dtype(dtype).name} kernel_maps")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_gpu_kernel_map_identical_on_dyadic_lattice(kernel_size, dilation):
    """Points exactly on cell faces (dyadic coordinates, v a power of two) in a packed batch with
    empty clouds: the hardest case for the binning rule."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    rng = np.random.default_rng(100 * kernel_size + dilation)
    p = (rng.integers(-8, 8, size=(900, 3)) * 0.125).astype(np.float32)
    offsets = np.array([0, 300, 300, 700, 900, 900])
    cpu = pwconv_cy.kernel_map(p, 0.25, kernel_size=kernel_size, dilation=dilation,
                               offsets=offsets)
    dev = cuda.kernel_map(cupy.asarray(p), 0.25, kernel_size=kernel_size, dilation=dilation,
                          offsets=cupy.asarray(offsets))
    _assert_same_map(dev, cpu, f"lattice K={kernel_size} s={dilation}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_grid_by_one_scan_is_the_same(scenario, monkeypatch):
    """PWCONV_CUDA_GRID_BUILD=scan (the default: the cells, rows and clouds' first cells from one
    scan) builds the same grid as "nonzero" (flatnonzero and a search, the default before),
    array for array, and the maps of each are the CPU's."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _backend, _search

    be = _backend.get_backend()
    rng = np.random.default_rng(sum(map(ord, scenario)))
    p, offsets, q, q_offsets, v, k, s = scenario_clouds(scenario, rng)
    packed = np.array([0, len(p)]) if offsets is None else np.asarray(offsets, dtype=np.int64)
    points = cupy.asarray(np.ascontiguousarray(p, dtype=np.float64))
    grid = _search.build_grid(be, points, packed, v)
    scanned = _other_grid_build(be, points, packed, v)
    _assert_same_grid(grid, scanned, scenario)
    cpu = pwconv_cy.kernel_map(p, v, kernel_size=k, dilation=s, offsets=offsets, queries=q,
                               query_offsets=q_offsets)
    for mode in ("scan", "nonzero"):
        monkeypatch.setenv(_search.GRID_BUILD_ENV, mode)
        dev = cuda.kernel_map(points, v, kernel_size=k, dilation=s, offsets=offsets,
                              queries=None if q is None else cupy.asarray(q),
                              query_offsets=q_offsets)
        _assert_same_map(dev, cpu, f"{scenario}, grid by {mode}")


@pytest.mark.gpu
@gpu
def test_gpu_grid_lower_corners_of_long_clouds():
    """Each cloud's lower corner (the grid's origin) is its exact per-axis minimum, also for a
    cloud long enough to be split over many blocks (cloud_lower_corner, then its merge): the
    minima of x, y and z in different blocks' chunks, one far outlier, empty clouds around; and
    the map of the long cloud is still the CPU's."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _search

    rng = np.random.default_rng(11)
    n_long = 5 * _search.LOWER_CORNER_CHUNK + 123
    long_cloud = rng.uniform(-1.0, 1.0, size=(n_long, 3))
    long_cloud[n_long - 1, 0] = -1.5  # x's minimum in the last chunk
    long_cloud[_search.LOWER_CORNER_CHUNK + 7, 1] = -1.25  # y's in the second
    long_cloud[3, 2] = -1e6  # a far outlier: z's minimum in the first
    short = rng.uniform(2.0, 3.0, size=(50, 3))
    p = np.concatenate([short, long_cloud, short[:10]])
    offsets = np.array([0, 0, 50, 50, 50 + n_long, 60 + n_long, 60 + n_long])
    index = cuda.NeighborIndex(cupy.asarray(p), 0.03, offsets=cupy.asarray(offsets))  # ~8 pairs
    _assert_lower_corners(index._grid, p, offsets, "long cloud with an outlier")     # a point
    cpu = pwconv_cy.NeighborIndex(p, 0.03, offsets=offsets)
    _assert_same_map(index.kernel_map(3, 1), cpu.kernel_map(3, 1), "long cloud with an outlier")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("way", ["one pass", "one pass, scratch short", "two passes",
                                 "thread sort", "one pass, tiles and slots",
                                 "one pass, rows in shared memory"])
def test_gpu_kernel_map_identical_on_sphere_batch(way, monkeypatch):
    """The paper's layers on a batch of sphere clouds (one shared GPU index), the maps searched
    once (the scratch sized from a sample of every 4th query: 32,768 queries; or sized far too
    small, falling back to the fill pass) or twice (count + fill; the fill threads sorting their
    own rows); and by the opt-in tiled search, each cloud's coordinates and cells in shared memory
    over the table's pairs, or its rows there too."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _search

    monkeypatch.setenv(_search.ROW_SORT_ENV, "thread" if way == "thread sort" else "rank")
    monkeypatch.setenv(_search.MAP_PASSES_ENV, "two" if way == "two passes" else "one")
    if way == "one pass, scratch short":
        monkeypatch.setattr(_search, "CAPACITY_MARGIN", 0.5)
    if way == "one pass, tiles and slots":  # kernel_map_tiled (cells too) over the table's pairs
        monkeypatch.setenv(_search.MAP_TILES_ENV, "2")
        monkeypatch.setenv(_search.ROW_SLOTS_ENV, "1")
    plans = []
    if way == "one pass, rows in shared memory":  # kernel_map_tiled: each cloud's rows too
        monkeypatch.setenv(_search.MAP_TILES_ENV, "3")
        plan_tiles = _search._tile_plan
        monkeypatch.setattr(_search, "_tile_plan", lambda *a: plans.append(plan_tiles(*a))
                            or plans[-1])

    rng = np.random.default_rng(7)
    p = rng.standard_normal((16 * 2048, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    p = p.astype(np.float32)
    offsets = np.arange(17) * 2048
    index = cuda.NeighborIndex(cupy.asarray(p), 0.1, offsets=offsets)
    cpu_index = pwconv_cy.NeighborIndex(p, 0.1, offsets=offsets)
    for s in (1, 2, 3, 4):
        _assert_same_map(index.kernel_map(3, s), cpu_index.kernel_map(3, s), f"sphere s={s}")
    # the four maps made together (one launch per pass), as the paper's network asks for them
    for s, km in zip((1, 2, 3, 4), index.kernel_maps(3, (1, 2, 3, 4))):
        assert km.dilation == s
        _assert_same_map(km, cpu_index.kernel_map(3, s), f"sphere kernel_maps s={s}")
    if way == "one pass, rows in shared memory":  # it ran so, not the fallback
        assert plans and all(plan is not None and plan.row_bits > 0 for plan in plans), plans


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_gpu_radius_search_identical_to_cpu(metric):
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    rng = np.random.default_rng(3)
    p = rng.random((5000, 3)).astype(np.float32)
    q = rng.random((700, 3)).astype(np.float32)
    offsets = np.array([0, 2000, 2000, 5000])
    q_offsets = np.array([0, 300, 400, 700])
    for queries, qo in ((None, None), (q, q_offsets)):
        cs, ci = pwconv_cy.radius_search(p, 0.07, queries, offsets=offsets, query_offsets=qo,
                                         metric=metric)
        gs, gi = cuda.radius_search(cupy.asarray(p), 0.07,
                                    None if queries is None else cupy.asarray(queries),
                                    offsets=offsets, query_offsets=qo, metric=metric)
        np.testing.assert_array_equal(cupy.asnumpy(gs), cs)
        np.testing.assert_array_equal(cupy.asnumpy(gi), ci)


def _conv_case(rng, dtype, depthwise, c_in, c_out, queries):
    p = rng.random((3000, 3)).astype(np.float32)
    offsets = np.array([0, 1000, 1000, 2200, 3000])
    q = q_off = None
    if queries:
        q = rng.random((500, 3)).astype(np.float32)
        q_off = np.array([0, 100, 250, 400, 500])
    m = len(p) if q is None else len(q)
    x = rng.standard_normal((len(p), c_in)).astype(dtype)
    w = rng.standard_normal((3, 3, 3, c_in) if depthwise else (3, 3, 3, c_in, c_out)).astype(dtype)
    dy = rng.standard_normal((m, c_in if depthwise else c_out)).astype(dtype)
    return p, offsets, q, q_off, x, w, dy


def _set_scheme(monkeypatch, scheme: str) -> None:
    """The GPU operator's switches for a test's scheme name: "auto", "rows", "bycell", or "auto-"
    with atomic (PWCONV_CUDA_DETERMINISTIC=0), cells (PWCONV_CUDA_WEIGHT_GRAD), fixed
    (PWCONV_CUDA_INPUT_GRAD), broadcast, thread or tile (PWCONV_CUDA_ENTRIES_LOADS; thread by
    default), chunks or warps (PWCONV_CUDA_WEIGHT_GRAD), sort or rank (PWCONV_CUDA_TRANSPOSE; rank
    by default), several joined by "+"."""
    from pwconv_cy.cuda import _conv

    base, _, variants = scheme.partition("-")
    monkeypatch.setenv(_conv.OPERATOR_ENV, base)
    env = {"atomic": (_conv.DETERMINISTIC_ENV, "0"), "cells": (_conv.WEIGHT_GRAD_ENV, "cells"),
           "fixed": (_conv.INPUT_GRAD_ENV, "fixed"),
           "broadcast": (_conv.ENTRIES_LOADS_ENV, "broadcast"),
           "thread": (_conv.ENTRIES_LOADS_ENV, "thread"),
           "tile": (_conv.ENTRIES_LOADS_ENV, "tile"),
           "chunks": (_conv.WEIGHT_GRAD_ENV, "chunks"),
           "warps": (_conv.WEIGHT_GRAD_ENV, "warps"),
           "sort": (_conv.TRANSPOSE_ENV, "sort"),
           "rank": (_conv.TRANSPOSE_ENV, "rank")}
    for variant in filter(None, variants.split("+")):
        monkeypatch.setenv(*env[variant])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depthwise,c_in,c_out,queries", [
    (False, 3, 9, False), (False, 9, 9, False), (False, 64, 48, False), (False, 5, 7, True),
    (True, 9, 9, False), (True, 40, 40, True)])
@pytest.mark.parametrize("dilation", [1, 3])
@pytest.mark.parametrize("scheme", ["auto", "rows", "bycell", "auto-atomic", "auto-cells",
                                    "auto-fixed", "auto-chunks", "auto-warps", "auto-tile",
                                    "auto-broadcast+sort"])
def test_gpu_conv_matches_cpu(dtype, depthwise, c_in, c_out, queries, dilation, scheme,
                              monkeypatch):
    """Forward, input and weight gradients equal to the CPU within rounding (norm-wise), with
    each operator scheme (auto takes "entries" up to 32 channels), with the opt-in atomic input
    gradient (PWCONV_CUDA_DETERMINISTIC=0), with the entries' weight gradient by cell
    (PWCONV_CUDA_WEIGHT_GRAD=cells), the fixed-point input gradient, the weight gradient by
    chunks of rows sorted by cell or by warps, one thread per row with the clouds' source rows in shared
    memory, and the defaults before 2026-11-28: conv_entries' lanes loading each value and the
    transposed map by one radix sort (_set_scheme)."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    _set_scheme(monkeypatch, scheme)

    rng = np.random.default_rng(c_in * 31 + c_out + dilation)
    p, offsets, q, q_off, x, w, dy = _conv_case(rng, dtype, depthwise, c_in, c_out, queries)
    v = 0.09
    kw = {"dilation": dilation, "offsets": offsets, "queries": q, "query_offsets": q_off,
          "depthwise": depthwise}
    y_cpu = pwconv_cy.pointwise_conv(p, x, w, v, **kw)
    dx_cpu, dw_cpu = pwconv_cy.pointwise_conv_backward(dy, p, x, w, v, **kw)
    g = cupy.asarray
    gkw = dict(kw, queries=None if q is None else g(q))
    y = cuda.pointwise_conv(g(p), g(x), g(w), v, **gkw)
    dx, dw = cuda.pointwise_conv_backward(g(dy), g(p), g(x), g(w), v, **gkw)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for what, a, b in (("forward", y, y_cpu), ("d_feats", dx, dx_cpu), ("d_weight", dw, dw_cpu)):
        assert a.dtype == dtype and a.shape == b.shape, what
        err = rel_err(cupy.asnumpy(a), b)
        assert err <= tol, f"{what}: norm-wise relative difference {err:.3g} > {tol}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("scheme", ["auto", "rows", "bycell", "auto-cells", "auto-fixed",
                                    "auto-chunks", "auto-warps", "auto-tile",
                                    "auto-broadcast+sort"])
def test_gpu_results_bit_identical_across_runs(depthwise, scheme, monkeypatch):
    """Two runs (fresh kernel maps, fresh caches) give the same bits."""
    import cupy

    from pwconv_cy import cuda

    _set_scheme(monkeypatch, scheme)

    rng = np.random.default_rng(11)
    p, offsets, _, _, x, w, dy = _conv_case(rng, np.float32, depthwise, 9, 9, False)
    g = cupy.asarray
    runs = []
    for _ in range(2):
        km = cuda.kernel_map(g(p), 0.09, kernel_size=3, dilation=2, offsets=offsets)
        y = cuda.pointwise_conv(g(p), g(x), g(w), 0.09, dilation=2, offsets=offsets,
                                kernel_map=km, depthwise=depthwise)
        dx, dw = cuda.pointwise_conv_backward(g(dy), g(p), g(x), g(w), 0.09, dilation=2,
                                              offsets=offsets, kernel_map=km, depthwise=depthwise)
        runs.append([cupy.asnumpy(a) for a in (km.index, km.cell, km.counts, y, dx, dw)])
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_tiled_operator_on_paper_sized_clouds(dtype, monkeypatch):
    """PWCONV_CUDA_ENTRIES_LOADS=tile on clouds of the paper's size (2,048 points on a sphere, 9
    channels): each block's shared memory is beyond the 48 KiB a launch gets without opting in,
    the tiled kernel runs (forward and input gradient), and its bits are conv_entries_thread's
    and the default's."""
    import cupy

    from pwconv_cy import cuda
    from pwconv_cy.cuda import _conv
    from pwconv_cy.cuda._backend import DEFAULT_SHARED_BYTES, get_backend

    rng = np.random.default_rng(17)
    n, b = 2048, 4
    p = rng.standard_normal((b * n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    offsets = np.arange(b + 1) * n
    x = rng.standard_normal((b * n, 9)).astype(dtype)
    w = rng.standard_normal((3, 3, 3, 9, 9)).astype(dtype)
    dy = rng.standard_normal((b * n, 9)).astype(dtype)
    g = cupy.asarray
    km = cuda.kernel_map(g(p), 0.1, dilation=2, offsets=offsets)
    be = get_backend()
    launched = []
    launch = be.launch

    def spy(name, *args, **kwargs):
        launched.append(name.split("<")[0])
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(be, "launch", spy)
    results = {}
    for loads in ("tile", "thread", "broadcast"):
        monkeypatch.setenv(_conv.ENTRIES_LOADS_ENV, loads)
        if loads == "tile":
            plan = _conv.tile_plan(be, offsets, offsets, 27, 9, 9, np.dtype(dtype).itemsize,
                                   False)
            assert plan is not None and plan[1] > DEFAULT_SHARED_BYTES, plan
        km._cache.clear()
        del launched[:]
        y = cuda.pointwise_conv(g(p), g(x), g(w), 0.1, dilation=2, offsets=offsets,
                                kernel_map=km)
        dx, _ = cuda.pointwise_conv_backward(g(dy), g(p), g(x), g(w), 0.1, dilation=2,
                                             offsets=offsets, kernel_map=km)
        want = {"tile": "conv_entries_tile", "thread": "conv_entries_thread",
                "broadcast": "conv_entries"}[loads]
        assert launched.count(want) == 2, (loads, launched)  # the forward, the input gradient
        results[loads] = (cupy.asnumpy(y).tobytes(), cupy.asnumpy(dx).tobytes())
    assert results["tile"] == results["thread"] == results["broadcast"]


@pytest.mark.gpu
@gpu
def test_gpu_dense_batch_and_shared_map():
    """Dense (B, n, 3) input keeps its shape; a map built once serves forward and backward."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    rng = np.random.default_rng(5)
    p = rng.random((4, 500, 3)).astype(np.float32)
    x = rng.standard_normal((4, 500, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 3, 9)).astype(np.float32)
    g = cupy.asarray
    km = cuda.kernel_map(g(p), 0.1, dilation=2)
    y = cuda.pointwise_conv(g(p), g(x), g(w), 0.1, dilation=2, kernel_map=km)
    assert y.shape == (4, 500, 9)
    y_cpu = pwconv_cy.pointwise_conv(p, x, w, 0.1, dilation=2)
    assert rel_err(cupy.asnumpy(y), y_cpu) <= 1e-5
    dx, dw = cuda.pointwise_conv_backward(g(y), g(p), g(x), g(w), 0.1, dilation=2, kernel_map=km)
    assert dx.shape == x.shape and dw.shape == w.shape
    c_t = pwconv_cy.kernel_map(p, 0.1, dilation=2).transposed()
    for a, b in zip(cuda.transpose_map(km), c_t):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)


def _second_device_reason():
    """None where CuPy sees two CUDA devices, else why a test of the second one skips."""
    if _GPU_REASON is not None:
        return _GPU_REASON
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    return None if n >= 2 else f"one CUDA device only ({n}); the test needs two"


@pytest.mark.gpu
@pytest.mark.skipif(_second_device_reason() is not None,
                    reason=f"needs two CUDA devices: {_second_device_reason()}")
def test_gpu_calls_run_on_the_inputs_device():
    """Arrays on cuda:1 while cuda:0 is current: every call validates, computes and returns on
    cuda:1 (CuPy would copy the inputs to the current device if pwconv did not switch), with the
    results of the same call on cuda:0; arrays on two devices are refused, naming them."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    rng = np.random.default_rng(11)
    p = rng.random((2, 300, 3)).astype(np.float32)
    x = rng.standard_normal((2, 300, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal((2, 300, 5)).astype(np.float32)

    def run(device_id):
        with cupy.cuda.Device(device_id):
            pd, xd, wd, dyd, qd = (cupy.asarray(a) for a in (p, x, w, dy, p[:, :50] + 0.01))
        assert cupy.cuda.Device().id == 0
        index = cuda.NeighborIndex(pd, 0.1)
        km = index.kernel_map(3, 2)
        out = {"splits": km.splits, "index": km.index, "cell": km.cell, "counts": km.counts,
               "maps": index.kernel_maps(3, (1, 3))[1].index,
               "radius": cuda.radius_search(pd, 0.15, qd, metric="euclidean")[1],
               "transposed": cuda.transpose_map(km)[1],
               "y_map": cuda.pointwise_conv(pd, xd, wd, 0.1, dilation=2, kernel_map=km),
               "y": pwconv_cy.pointwise_conv(pd, xd, wd, 0.1, dilation=2)}
        out["dx"], out["dw"] = cuda.pointwise_conv_backward(dyd, pd, xd, wd, 0.1, dilation=2,
                                                            kernel_map=km)
        assert cupy.cuda.Device().id == 0
        return out, (pd, wd)

    on0, _ = run(0)
    on1, (pd, wd) = run(1)
    for name, a in on1.items():
        assert a.device.id == 1, f"{name} came back on device {a.device.id}, not the inputs' 1"
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(on0[name]), err_msg=name)
    with cupy.cuda.Device(0):
        x0 = cupy.asarray(x)
    with pytest.raises(TypeError, match="same device.*points on cuda:1.*feats on cuda:0"):
        cuda.pointwise_conv(pd, x0, wd, 0.1)
    with pytest.raises(TypeError, match="same device.*points on cuda:1.*queries on cuda:0"):
        cuda.kernel_map(pd, 0.1, queries=cupy.asarray(p))


@pytest.mark.gpu
@gpu
def test_gpu_empty_inputs():
    """No points, empty clouds only, no queries: empty results shaped like the CPU's."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    for p, offsets in ((np.zeros((0, 3), np.float32), None),
                       (np.zeros((0, 3), np.float32), np.array([0, 0, 0]))):
        cpu = pwconv_cy.kernel_map(p, 0.1, dilation=2, offsets=offsets)
        dev = cuda.kernel_map(cupy.asarray(p), 0.1, dilation=2, offsets=offsets)
        _assert_same_map(dev, cpu, f"empty, offsets={offsets}")
    p = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    q = np.zeros((0, 3), np.float32)
    dev = cuda.kernel_map(cupy.asarray(p), 0.1, queries=cupy.asarray(q))
    assert dev.n_queries == 0 and dev.n_pairs == 0
    x = cupy.ones((0, 4), cupy.float32)
    w = cupy.ones((3, 3, 3, 4, 2), cupy.float32)
    y = cuda.pointwise_conv(cupy.zeros((0, 3), cupy.float32), x, w, 0.1)
    dx, dw = cuda.pointwise_conv_backward(cupy.zeros((0, 2), cupy.float32),
                                          cupy.zeros((0, 3), cupy.float32), x, w, 0.1)
    assert y.shape == (0, 2) and dx.shape == (0, 4) and dw.shape == w.shape
    assert not cupy.asnumpy(dw).any()


@pytest.mark.gpu
@gpu
def test_gpu_errors_are_clear():
    import cupy

    from pwconv_cy import cuda

    p = cupy.random.random((100, 3)).astype(cupy.float32)
    host = cupy.asnumpy(p)
    if not isinstance(host, cupy.ndarray):  # host arrays are refused, never copied
        with pytest.raises(TypeError, match="must be a CuPy array"):
            cuda.kernel_map(host, 0.1)
    with pytest.raises(ValueError, match="at most 15 on the GPU"):
        cuda.kernel_map(p, 0.1, kernel_size=17)
    bad = p.copy()
    bad[7, 1] = cupy.nan
    with pytest.raises(ValueError, match="first at row 7"):
        cuda.kernel_map(bad, 0.1)
    with pytest.raises(ValueError, match="kdtree"):
        cuda.kernel_map(p, 0.1, method="kdtree")
    x = cupy.ones((100, 3), cupy.float32)
    w = cupy.ones((3, 3, 3, 3, 4), cupy.float64)
    with pytest.raises(TypeError, match="same dtype"):
        cuda.pointwise_conv(p, x, w, 0.1)
    with pytest.raises(pwconv_cy_memory_error()):
        cuda.kernel_map(p, 0.5, memory_budget=1000)


def _error_cases(rng):
    """Inputs a user gets wrong, each (function, positional arrays, scalars and options)."""
    p = rng.random((50, 3))
    x = rng.random((50, 4)).astype(np.float32)
    w = rng.random((3, 3, 3, 4, 5)).astype(np.float32)
    nan_p = p.copy()
    nan_p[7, 1] = np.nan
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    two = np.array([0, 25, 50])
    conv = "pointwise_conv"
    return {
        "points (n, 2)": ("kernel_map", [rng.random((50, 2))], {"voxel_size": 0.1}),
        "points (n,)": ("kernel_map", [p[:, 0]], {"voxel_size": 0.1}),
        "integer points": ("kernel_map", [np.ones((5, 3), int)], {"voxel_size": 0.1}),
        "NaN point": ("kernel_map", [nan_p], {"voxel_size": 0.1}),
        "voxel 0": ("kernel_map", [p], {"voxel_size": 0.0}),
        "voxel NaN": ("kernel_map", [p], {"voxel_size": float("nan")}),
        "voxel str": ("kernel_map", [p], {"voxel_size": "a"}),
        "even K": ("kernel_map", [p], {"voxel_size": 0.1, "kernel_size": 2}),
        "dilation 0": ("kernel_map", [p], {"voxel_size": 0.1, "dilation": 0}),
        "dilation 1.5": ("kernel_map", [p], {"voxel_size": 0.1, "dilation": 1.5}),
        "offsets short": ("kernel_map", [p], {"voxel_size": 0.1, "offsets": [0, 10, 40]}),
        "offsets falling": ("kernel_map", [p], {"voxel_size": 0.1, "offsets": [0, 30, 20, 50]}),
        "offsets float": ("kernel_map", [p], {"voxel_size": 0.1, "offsets": np.array([0., 50.])}),
        "dense + offsets": ("kernel_map", [p.reshape(2, 25, 3)],
                            {"voxel_size": 0.1, "offsets": [0, 50]}),
        "queries (m, 2)": ("kernel_map", [p], {"voxel_size": 0.1, "queries": p[:5, :2]}),
        "query offsets": ("kernel_map", [p], {"voxel_size": 0.1, "offsets": two, "queries": p[:5],
                                                   "query_offsets": [0, 5]}),
        "NaN query": ("kernel_map", [p], {"voxel_size": 0.1, "queries": nan_p[:10]}),
        "NaN query, radius": ("radius_search", [p], {"radius": 0.1, "queries": nan_p[5:]}),
        "NaN query, conv": (conv, [p, x, w], {"voxel_size": 0.1, "queries": nan_p[:10]}),
        "method": ("kernel_map", [p], {"voxel_size": 0.1, "method": "brute"}),
        "radius < 0": ("radius_search", [p], {"radius": -0.1}),
        "metric": ("radius_search", [p], {"radius": 0.1, "metric": "l1"}),
        "feats rows": (conv, [p, x[:40], w], {"voxel_size": 0.1}),
        "feats (n,)": (conv, [p, x[:, 0], w], {"voxel_size": 0.1}),
        "integer feats": (conv, [p, x.astype(int), w.astype(int)], {"voxel_size": 0.1}),
        "weight c_in": (conv, [p, x, w[..., :3, :]], {"voxel_size": 0.1}),
        "weight 4-d": (conv, [p, x, w[..., 0]], {"voxel_size": 0.1}),
        "weight not cubic": (conv, [p, x, w[:, :, :1]], {"voxel_size": 0.1}),
        "weight dtype": (conv, [p, x, w.astype(np.float64)], {"voxel_size": 0.1}),
        "NaN feature": (conv, [p, nan_x, w], {"voxel_size": 0.1}),
        "depthwise weight": (conv, [p, x, w], {"voxel_size": 0.1, "depthwise": True}),
        "depthwise str": (conv, [p, x, w], {"voxel_size": 0.1, "depthwise": "yes"}),
        "grad_out shape": ("pointwise_conv_backward", [np.ones((50, 4), np.float32), p, x, w],
                           {"voxel_size": 0.1}),
        "grad_out dtype": ("pointwise_conv_backward", [np.ones((50, 5)), p, x, w],
                           {"voxel_size": 0.1}),
        "budget": ("kernel_map", [p], {"voxel_size": 0.5, "memory_budget": 100}),
    }


@pytest.mark.gpu
@gpu
def test_gpu_errors_are_the_cpus():
    """Every input a user gets wrong raises on the GPU what it raises on the CPU: the same
    exception and the same message (the memory budget's byte count aside: a GPU pair takes
    more bytes)."""
    import cupy

    import pwconv_cy

    def outcome(fn, arrays, kwargs):
        try:
            getattr(pwconv_cy, fn)(*arrays, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compared below
            return type(exc), str(exc)
        return None, "no error"

    for what, (fn, arrays, kwargs) in _error_cases(np.random.default_rng(3)).items():
        on_cpu = outcome(fn, arrays, kwargs)
        gpu_kwargs = {k: cupy.asarray(v) if k == "queries" else v for k, v in kwargs.items()}
        on_gpu = outcome(fn, [cupy.asarray(a) for a in arrays], gpu_kwargs)
        assert on_cpu[0] is not None, f"{what}: no error on the CPU"
        if what == "budget":
            assert on_gpu[0] is on_cpu[0], (what, on_gpu, on_cpu)
        else:
            assert on_gpu == on_cpu, f"{what}:\n  GPU {on_gpu}\n  CPU {on_cpu}"


@pytest.mark.gpu
@gpu
def test_gpu_reused_map_checks_points():
    """A map passed back is checked against the call's points in one pass, without converting
    them: float32 and float64 copies of the same values are the same points; a moved point is
    "other points"; a NaN is reported as a NaN (row named), with and without a map;
    check_map=False skips the fingerprint only."""
    import cupy

    from pwconv_cy import cuda

    rng = np.random.default_rng(8)
    p32 = cupy.asarray(rng.random((400, 3)).astype(np.float32))
    x = cupy.asarray(rng.standard_normal((400, 3)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((3, 3, 3, 3, 4)).astype(np.float32))
    km = cuda.kernel_map(p32.astype(cupy.float64), 0.1)
    y = cuda.pointwise_conv(p32, x, w, 0.1, kernel_map=km)
    assert cupy.asnumpy(y).tobytes() == cupy.asnumpy(cuda.pointwise_conv(p32, x, w, 0.1)).tobytes()
    moved = p32.copy()
    moved[123, 2] += 0.01
    with pytest.raises(ValueError, match="other points"):
        cuda.pointwise_conv(moved, x, w, 0.1, kernel_map=km)
    nan = p32.copy()
    nan[31, 0] = cupy.nan
    for kw in ({"kernel_map": km}, {}):
        with pytest.raises(ValueError, match="first at row 31"):
            cuda.pointwise_conv(nan, x, w, 0.1, **kw)
    # check_map=False: no fingerprint (no pass, no synchronisation), same results; the sizes are
    # still checked
    y_trusted = cuda.pointwise_conv(p32, x, w, 0.1, kernel_map=km, check_map=False)
    assert cupy.asnumpy(y_trusted).tobytes() == cupy.asnumpy(y).tobytes()
    dy = cupy.ones_like(y)
    for a, b in zip(cuda.pointwise_conv_backward(dy, p32, x, w, 0.1, kernel_map=km),
                    cuda.pointwise_conv_backward(dy, p32, x, w, 0.1, kernel_map=km,
                                                 check_map=False)):
        assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()
    cuda.pointwise_conv(moved, x, w, 0.1, kernel_map=km, check_map=False)  # trusted, as said
    with pytest.raises(ValueError, match="other points"):
        cuda.pointwise_conv(p32[:300], x[:300], w, 0.1, kernel_map=km, check_map=False)
    with pytest.raises(TypeError, match="check_map must be True or False"):
        cuda.pointwise_conv(p32, x, w, 0.1, kernel_map=km, check_map=1)


@pytest.mark.gpu
@gpu
def test_gpu_backward_without_feats_grad_skips_it(monkeypatch):
    """feats_grad=False: d_feats is None and never computed (through the public function too);
    d_weight has the bits of the full backward's."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    from pwconv_cy.cuda import _conv

    rng = np.random.default_rng(4)
    p, offsets, _, _, x, w, dy = _conv_case(rng, np.float32, False, 3, 9, False)
    g = cupy.asarray
    km = cuda.kernel_map(g(p), 0.09, offsets=offsets)
    _, dw_full = cuda.pointwise_conv_backward(g(dy), g(p), g(x), g(w), 0.09, offsets=offsets,
                                              kernel_map=km)

    def refuse(*args, **kwargs):
        raise AssertionError("the input gradient was computed")

    monkeypatch.setattr(_conv, "backward_input", refuse)
    for fn in (cuda.pointwise_conv_backward, pwconv_cy.pointwise_conv_backward):
        dx, dw = fn(g(dy), g(p), g(x), g(w), 0.09, offsets=offsets, kernel_map=km,
                    feats_grad=False)
        assert dx is None
        assert cupy.asnumpy(dw).tobytes() == cupy.asnumpy(dw_full).tobytes()


@pytest.mark.gpu
@gpu
def test_gpu_real_lidar_tile_map_identical_to_cpu(shared_data):
    """The full 0.7 M-point airborne LiDAR tile at v = 0.5 m (about 13 M pairs), and s = 2: the
    GPU's kernel maps are the CPU's, bit for bit (float64 coordinates, large extents)."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda

    with np.load(shared_data / "lidar_als_labelled" / "ign_lambert93_tile_698k.npz") as z:
        points = z["points"]
    index = cuda.NeighborIndex(cupy.asarray(points), 0.5)
    cpu_index = pwconv_cy.NeighborIndex(points, 0.5)
    for s in (1, 2):
        _assert_same_map(index.kernel_map(3, s), cpu_index.kernel_map(3, s), f"LiDAR tile s={s}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scheme", ["auto", "rows", "bycell", "auto-chunks", "auto-tile",
                                    "auto-broadcast+sort"])
def test_gpu_real_modelnet_layers_match_cpu(shared_data, scheme, monkeypatch):
    """32 real ModelNet40 shapes (float16 as stored, dense (B, 1024, 3)) through the paper's four
    layers on the GPU: forward and both gradients equal to the CPU's within float32 rounding."""
    import cupy

    import pwconv_cy
    from pwconv_cy import cuda
    _set_scheme(monkeypatch, scheme)
    with np.load(shared_data / "modelnet40_1024" / "train.npz") as z:
        shapes = z["points"][:32]
    rng = np.random.default_rng(2)
    x = shapes.astype(np.float32)
    for c_in, c_out, s in ((3, 9, 1), (9, 9, 2), (9, 9, 3), (9, 9, 4)):
        w = rng.standard_normal((3, 3, 3, c_in, c_out)).astype(np.float32)
        dy = rng.standard_normal((32, 1024, c_out)).astype(np.float32)
        y_cpu = pwconv_cy.pointwise_conv(shapes, x, w, 0.14, dilation=s)
        dx_cpu, dw_cpu = pwconv_cy.pointwise_conv_backward(dy, shapes, x, w, 0.14, dilation=s)
        g = cupy.asarray
        y = cuda.pointwise_conv(g(shapes), g(x), g(w), 0.14, dilation=s)
        dx, dw = cuda.pointwise_conv_backward(g(dy), g(shapes), g(x), g(w), 0.14, dilation=s)
        for what, a, b in (("forward", y, y_cpu), ("d_feats", dx, dx_cpu), ("d_weight", dw, dw_cpu)):
            assert a.shape == b.shape, what
            err = rel_err(cupy.asnumpy(a), b)
            assert err <= 1e-5, f"s={s} {what}: relative difference {err:.3g}"
        x = np.tanh(y_cpu)


def pwconv_cy_memory_error():
    from pwconv_cy import MemoryBudgetError

    return MemoryBudgetError


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulate", required=True, help="scenario name, or 'all'")
    parser.add_argument("--lib", default=None, help="a prebuilt emulator library")
    parser.add_argument("--define", action="append", default=[],
                        help="NAME=VALUE given to the emulator's build as -D (tuning knobs)")
    parser.add_argument("--searches-only", action="store_true",
                        help="the scenarios' searches, not their operator")
    parser.add_argument("--loads", default=None,
                        help="only the operator variants with this PWCONV_CUDA_ENTRIES_LOADS")
    parser.add_argument("--tile-queries", type=int, default=None,
                        help="queries per block of kernel_map_tiled (_search.TILE_QUERIES)")
    parser.add_argument("--corner-chunk", type=int, default=None,
                        help="points per block of cloud_lower_corner (_search.LOWER_CORNER_CHUNK)")
    opts = parser.parse_args()
    from pwconv_cy.cuda import _search

    if opts.tile_queries is not None:
        _search.TILE_QUERIES = opts.tile_queries
    if opts.corner_chunk is not None:
        _search.LOWER_CORNER_CHUNK = opts.corner_chunk
    _run_emulation(SCENARIOS if opts.emulate == "all" else opts.emulate.split(","), opts.lib,
                   opts.define, operator=not opts.searches_only,
                   variants=tuple(v for v in OPERATOR_VARIANTS
                                  if opts.loads in (None, v[3])))
