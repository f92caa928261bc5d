"""pwconv: exact, fast pointwise convolution for point clouds (Hua, Tran & Yeung, CVPR 2018)."""
from __future__ import annotations

__version__ = "0.1.0"

from pwconv_cy import cuda, data, metrics, models, nn, optim
from pwconv_cy._config import MemoryBudgetError, get_memory_budget, set_memory_budget
from pwconv_cy.functional import pointwise_conv, pointwise_conv_backward
from pwconv_cy.neighbors import KernelMap, NeighborIndex, kernel_map, radius_search

__all__ = [
    "KernelMap",
    "MemoryBudgetError",
    "NeighborIndex",
    "__version__",
    "cuda",
    "data",
    "get_memory_budget",
    "kernel_map",
    "metrics",
    "models",
    "nn",
    "optim",
    "pointwise_conv",
    "pointwise_conv_backward",
    "radius_search",
    "set_memory_budget",
    "show_config",
]


def __getattr__(name: str):
    """``pwconv_cy.torch`` and ``pwconv_cy.jax`` import their framework on first use only."""
    if name in ("torch", "jax"):
        import importlib

        return importlib.import_module(f"pwconv_cy.{name}")
    raise AttributeError(f"module 'pwconv_cy' has no attribute {name!r}")


def _cuda_status() -> str:
    from pwconv_cy import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        return f"GPU path unavailable: {reason}"
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return f"CuPy {cupy.__version__}, {n} CUDA device(s) ({name})"


def _simd_status() -> str:
    from pwconv_cy import _core

    (avx512, avx512_on), (avx2, avx2_on) = _core.simd_state(), _core.avx2_state()
    if avx512_on:
        return "AVX-512 (kernel-map filters, operator loops)"
    if avx2_on:
        return "AVX2 (kernel-map filters, operator loops)"
    if avx512 or avx2:
        return "portable loops (SIMD turned off by set_simd_enabled)"
    return "portable loops (no AVX2 or AVX-512 on this CPU)"


def show_config(file=None) -> dict:
    """Print (and return) the build and runtime configuration: version, compiler, OpenMP and
    thread count, SIMD filters, CUDA/CuPy status, and a note when the process's OpenBLAS keeps
    idle threads spinning (see pwconv_cy._config.blas_spin_note)."""
    import platform
    import sys

    from pwconv_cy import _config, _core
    from pwconv_cy._validation import default_num_threads

    info = {
        "pwconv_cy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "compiler": _core.COMPILER.decode() if isinstance(_core.COMPILER, bytes) else _core.COMPILER,
        "openmp": (f"yes (OpenMP {_core.OPENMP_VERSION.decode()})" if _core.has_openmp()
                   else "NO - serial build"),
        "threads": default_num_threads(),
        "native_build": _core.NATIVE_BUILD,
        "simd": _simd_status(),
        "memory_budget_bytes": get_memory_budget(),
        "cuda": _cuda_status(),
        "blas_note": _config.blas_spin_note() or "-",
    }
    out = file if file is not None else sys.stdout
    for key, value in info.items():
        print(f"{key:>20}: {value}", file=out)
    return info
