"""Process-wide settings: the memory budget of variable-size results; what the process's other
thread pools do to pwconv's threads (blas_spin_note)."""
from __future__ import annotations

import functools
import numbers
import os

import numpy as np

__all__ = [
    "OPENBLAS_THREAD_TIMEOUT_ADVICE",
    "MemoryBudgetError",
    "blas_spin_note",
    "check_budget",
    "get_memory_budget",
    "max_pairs_within",
    "resolve_budget",
    "set_memory_budget",
]

_budget_bytes: int | None = None

#: OPENBLAS_THREAD_TIMEOUT that lets OpenBLAS's idle workers sleep after 2^4 cycles of waiting
#: instead of the default 2^28 (about 0.1 s).
OPENBLAS_THREAD_TIMEOUT_ADVICE = "4"


def blas_spin_note() -> str | None:
    """Why pwconv may run slower right after NumPy's matrix products in this process, or None.

    OpenBLAS's pthreads build (NumPy's and SciPy's wheels) keeps its idle worker threads spinning
    for 2^28 cycles (about 0.1 s) after every multi-threaded call: pwconv's OpenMP threads that
    start meanwhile share their cores with them (measured: a backward pass right after a large
    matmul took twice as long).  ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment, read when
    OpenBLAS loads (with NumPy), lets them sleep at once.  Process-wide, so pwconv only says so:
    the note names the library, its threads and the variable; None when the variable is set or
    no such OpenBLAS is loaded."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return None
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
    except Exception:  # noqa: BLE001 - a diagnostic: never fail because of it
        return None
    for pool in pools:
        if pool.get("internal_api") == "openblas" and pool.get("threading_layer") == "pthreads" \
                and int(pool.get("num_threads", 1)) > 1:
            return (f"OpenBLAS {pool.get('version', '')} ({pool['num_threads']} threads, "
                    f"{os.path.basename(pool.get('filepath', ''))}) keeps its idle threads "
                    "spinning for about 0.1 s after each matrix product, which slows the pwconv "
                    "calls that follow one (up to 2x); set OPENBLAS_THREAD_TIMEOUT="
                    f"{OPENBLAS_THREAD_TIMEOUT_ADVICE} in the environment before Python starts "
                    "to let them sleep at once")
    return None


class MemoryBudgetError(MemoryError):
    """A result would need more memory than the budget allows (nothing was allocated)."""


@functools.cache  # read once: every call's default budget needs it, and it is two file reads
def _physical_memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # A container's cgroup limit is what the OS enforces, when it is lower.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total


def get_memory_budget() -> int:
    """Bytes a single result (kernel map, neighbour list) may occupy.

    Defaults to half of the machine's memory (or of the container's limit)."""
    if _budget_bytes is not None:
        return _budget_bytes
    return _physical_memory_bytes() // 2


def set_memory_budget(nbytes: int | None) -> None:
    """Set the process-wide budget in bytes (a positive int), or ``None`` for the default."""
    global _budget_bytes
    _budget_bytes = None if nbytes is None else _check_bytes(nbytes, "memory budget")


def _check_bytes(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer number of bytes or None, got "
                        f"{value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes or None, got {value!r}")
    return int(value)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def resolve_budget(budget) -> int:
    """The per-call budget in bytes: `budget` when given (a positive int), else the global one."""
    if budget is None:
        return get_memory_budget()
    return _check_bytes(budget, "memory_budget")


def max_pairs_within(budget_bytes: int, bytes_per_pair: int) -> int:
    """How many pairs fit in the budget (at least 0)."""
    return max(0, budget_bytes // bytes_per_pair)


def check_budget(what: str, n_pairs: int, nbytes: int, budget: int, remedy: str,
                 complete: bool = True) -> None:
    """Raise MemoryBudgetError when a result of `nbytes` exceeds the budget (or was not kept)."""
    if nbytes > budget or not complete:
        raise MemoryBudgetError(
            f"{what} needs {n_pairs:,} neighbour pairs = {_fmt_bytes(nbytes)}, over the memory "
            f"budget of {_fmt_bytes(budget)}; {remedy}, or raise the budget with "
            f"pwconv_cy.set_memory_budget(nbytes) or memory_budget=...")
