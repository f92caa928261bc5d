"""Type stubs of pwconv_cy._core, the compiled bindings of the C++ core (_core.pyx).

Internal API: arguments arrive validated and canonical (C-contiguous, the dtypes named here) from
neighbors.py and functional.py.  tests/test_stubs.py keeps these stubs in step with the module.
"""
from types import TracebackType

import numpy as np
from numpy.typing import DTypeLike, NDArray
from typing_extensions import Self, TypeAlias

_Real: TypeAlias = np.float32 | np.float64
_Cell: TypeAlias = np.uint8 | np.int16 | np.int32
_Index: TypeAlias = np.int32 | np.int64

COMPILER: bytes
"""Compiler id and version of the build, e.g. b"GNU 12.2.0"."""
OPENMP_VERSION: bytes
"""OpenMP version the core was built with (b"" for a serial build)."""
NATIVE_BUILD: bool
"""True when built with -march=native (PWCONV_NATIVE=ON)."""
INTERRUPTED_MESSAGE: str
"""Message of the RuntimeError the core raises when a call is interrupted."""

def has_openmp() -> bool: ...
def omp_default_threads() -> int: ...
def fingerprint_(data: NDArray[np.uint8] | memoryview, threads: int) -> int: ...
def simd_state() -> tuple[bool, bool]: ...
def set_simd(enabled: bool) -> bool: ...
def avx2_state() -> tuple[bool, bool]: ...
def set_avx512(allowed: bool) -> bool: ...
def _request_interrupt() -> None: ...

class interruptible:
    """Context manager around a long call of the core: Ctrl-C raises KeyboardInterrupt."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

class SearchIndex:
    """A grid or kd-tree over a packed batch of clouds; points (n, 3), offsets (B+1,)."""

    @property
    def method(self) -> str: ...
    @property
    def n_points(self) -> int: ...
    @property
    def n_clouds(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def n_cells(self) -> int: ...
    def __init__(
        self, points: NDArray[_Real], offsets: NDArray[np.int64], cell_size: float, method: str,
        leaf_size: int, threads: int,
    ) -> None: ...
    def radius_gather(
        self, queries: NDArray[np.float64] | None, query_offsets: NDArray[np.int64],
        radius: float, metric: int, max_pairs: int, threads: int,
    ) -> Pairs: ...
    def kernel_gather(
        self, queries: NDArray[np.float64] | None, query_offsets: NDArray[np.int64],
        voxel_size: float, kernel_size: int, dilation: int, max_pairs: int, threads: int,
    ) -> Pairs: ...

class Pairs:
    """Gathered neighbour pairs (pass 1), emitted into exactly-sized arrays (pass 2)."""

    @property
    def n_pairs(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def memory_bytes(self) -> int: ...
    def splits(self) -> NDArray[np.int64]: ...
    def emit_radius(self, splits: NDArray[np.int64], threads: int) -> NDArray[np.int64]: ...
    def emit_kernel(
        self, splits: NDArray[np.int64], cell_dtype: DTypeLike, index_dtype: DTypeLike,
        threads: int,
    ) -> tuple[NDArray[_Index], NDArray[_Cell]]: ...

def kernel_map_counts_(
    splits: NDArray[np.int64], cell: NDArray[_Cell], kernel_size: int, threads: int,
) -> NDArray[np.int32]: ...

# The kernel map in CSR form (splits, index, cell and, where needed, counts) comes first in each
# of these (conv_forward_ and conv_backward_by_cloud_ tally each row's counts themselves).
def transpose_map(
    splits: NDArray[np.int64], index: NDArray[_Index], cell: NDArray[_Cell],
    counts: NDArray[np.int32], n_points: int, kernel_size: int,
    offsets: NDArray[np.int64] | None, query_offsets: NDArray[np.int64] | None,
    with_counts: bool, threads: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64], int]: ...
def conv_forward_(
    splits: NDArray[np.int64], index: NDArray[_Index], cell: NDArray[_Cell], kernel_size: int,
    x: NDArray[_Real], weight: NDArray[_Real], c_out: int, depthwise: bool, y: NDArray[_Real],
    threads: int,
) -> None: ...
def conv_backward_(
    splits: NDArray[np.int64], index: NDArray[_Index], cell: NDArray[_Cell],
    counts: NDArray[np.int32], kernel_size: int, tsplits: NDArray[np.int64],
    tkeys: NDArray[np.int64], count_bits: int, x: NDArray[_Real],
    grad_y: NDArray[_Real], weight: NDArray[_Real], depthwise: bool,
    grad_x: NDArray[_Real] | None, grad_weight: NDArray[_Real], threads: int,
) -> None: ...
def conv_backward_by_cloud_(
    splits: NDArray[np.int64], index: NDArray[_Index], cell: NDArray[_Cell], kernel_size: int,
    offsets: NDArray[np.int64], query_offsets: NDArray[np.int64], x: NDArray[_Real], grad_y: NDArray[_Real],
    weight: NDArray[_Real], depthwise: bool, grad_x: NDArray[_Real] | None,
    grad_weight: NDArray[_Real], threads: int,
) -> bool: ...

# Optimiser updates, in place on flat C-contiguous arrays of one dtype.
def sgd_update_(
    param: NDArray[_Real], grad: NDArray[_Real], momentum_buffer: NDArray[_Real] | None,
    lr: float, momentum: float, weight_decay: float, nesterov: bool, threads: int,
) -> None: ...
def adam_update_(
    param: NDArray[_Real], grad: NDArray[_Real], exp_avg: NDArray[_Real],
    exp_avg_sq: NDArray[_Real], step_size: float, bias_correction2_sqrt: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, decay_factor: float, decoupled: bool,
    threads: int,
) -> None: ...
