"""Loading and launching the CUDA kernels of ``kernels.cu`` through CuPy (NVRTC at run time).

The module is compiled once per device on first use (``cupy.RawModule``; CuPy also keeps the
binary in its on-disk kernel cache) and every launch goes through :meth:`CupyBackend.launch`.
Setting the environment variable ``PWCONV_CUDA_DEBUG=1`` synchronises after each launch so that a
failing kernel is reported, by name, where it ran.

The search and convolution code (``_search.py``, ``_conv.py``) only talks to a backend object:
its array module ``xp``, ``launch`` and a few sorting / transfer helpers.  That keeps the data flow
in one place and lets the test suite run the very same orchestration with the kernels compiled
for the host (tests/test_cuda.py, no GPU needed).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = [
    "NAME_EXPRESSIONS",
    "CudaKernelError",
    "CupyBackend",
    "compile_options",
    "debug_enabled",
    "env_choice",
    "env_flag",
    "get_backend",
    "include_dir",
    "kernel_source",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels.cu"
HEADER = Path("pwconv") / "binning.hpp"

#: Largest kernel size of the GPU kernel map (per-thread bound arrays in kernels.cu).
MAX_KERNEL_SIZE = 15
#: Kernel sizes whose kernel-map kernels are compiled with K as a constant (0: any other size).
SPECIALISE_ENV = "PWCONV_CUDA_SPECIALISE_K"


def specialised_kernel_sizes(value: str | None = None) -> tuple:
    """The kernel sizes named by PWCONV_CUDA_SPECIALISE_K (comma-separated, e.g. "3"), none by
    default.  Opt-in: on an H200 (CUDA 13.0) the fill pass compiled with K = 3 as a constant once
    stopped with an illegal address on a 300-point cloud while the runtime-K kernel ran correctly
    and compute-sanitizer saw no error (the map kernel has been rewritten since; the host
    emulation of the K = 3 kernels, under AddressSanitizer too, finds nothing).  The variable lets
    a GPU session test and time that path (benchmarks/gpu_search_tuning.py) before it becomes
    the default."""
    text = os.environ.get(SPECIALISE_ENV, "") if value is None else value
    sizes = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= MAX_KERNEL_SIZE:
            raise ValueError(f"{SPECIALISE_ENV} must list kernel sizes from 1 to "
                             f"{MAX_KERNEL_SIZE} separated by commas, got {text!r}")
        sizes.append(int(part))
    return tuple(sorted(set(sizes)))


SPECIALISED_K = specialised_kernel_sizes()
#: Rows up to this length are sorted in the kernel-map and radius fill (sort_rows_by_rank after
#: it, or the fill thread itself: _search.row_sort_mode); longer rows by one global sort.
SHORT_ROW = 64
CELL_CTYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short",
               np.dtype(np.int32): "int"}
FLOAT_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_map_name(kernel_size: int, fill: bool) -> str:
    k = kernel_size if kernel_size in SPECIALISED_K else 0
    return f"kernel_map_pass<{k}, {int(fill)}>"


def kernel_map_once_name(kernel_size: int) -> str:
    k = kernel_size if kernel_size in SPECIALISED_K else 0
    return f"kernel_map_once<{k}>"


def kernel_map_tiled_name(kernel_size: int) -> str:
    k = kernel_size if kernel_size in SPECIALISED_K else 0
    return f"kernel_map_tiled<{k}>"


def radius_name(fill: bool) -> str:
    return f"radius_pass<{int(fill)}>"


def split_name(cell_dtype) -> str:
    return f"split_kernel_keys<{CELL_CTYPES[np.dtype(cell_dtype)]}>"


def counts_name(cell_dtype) -> str:
    return f"row_cell_counts<{CELL_CTYPES[np.dtype(cell_dtype)]}>"


def entry_counts_name(cell_dtype) -> str:
    return f"entry_cell_counts<{CELL_CTYPES[np.dtype(cell_dtype)]}>"


def order_name(cell_dtype) -> str:
    return f"order_rows_by_cell<{CELL_CTYPES[np.dtype(cell_dtype)]}>"


def sort_into_name(cell_dtype) -> str:
    return f"sort_segments_into<{CELL_CTYPES[np.dtype(cell_dtype)]}>"


def conv_name(kernel: str, dtype) -> str:
    return f"{kernel}<{FLOAT_CTYPES[np.dtype(dtype)]}>"


#: Outputs per thread (BM) of the one-thread-per-row kernels (conv_entries_thread,
#: conv_weight_chunks): the smallest that holds the channels is used.
THREAD_OUTPUTS = (8, 16, 32)


def thread_name(kernel: str, dtype, outputs: int) -> str:
    """A one-thread-per-row kernel (map cells uint8), templated on the float and BM."""
    return f"{kernel}<{FLOAT_CTYPES[np.dtype(dtype)]}, unsigned char, {int(outputs)}>"


def rows_name(kernel: str, dtype, cell_dtype) -> str:
    """A kernel of the "rows" operator scheme, templated on the float and the cell type."""
    return f"{kernel}<{FLOAT_CTYPES[np.dtype(dtype)]}, {CELL_CTYPES[np.dtype(cell_dtype)]}>"


DIGEST_TYPES = (np.dtype(np.float32), np.dtype(np.float64))


def digest_name(dtype) -> str:
    return f"points_digest<{FLOAT_CTYPES[np.dtype(dtype)]}>"


CONV_KERNELS = ("conv_gather_dense", "conv_gather_depthwise", "conv_weight_partial_dense",
                "conv_weight_partial_depthwise", "sum_partials", "conv_weight_cells",
                "weights_from_counts", "fixed_bounds", "fixed_to_float", "pad_rows")
ROWS_KERNELS = ("conv_rows", "conv_weight_rows", "permute_entries", "conv_entries",
                "conv_entries_scatter", "conv_entries_fixed", "conv_weight_warps")

#: Dynamic shared memory a launch may use without opting in (cudaFuncSetAttribute).
DEFAULT_SHARED_BYTES = 48 * 1024

#: Template instantiations requested from NVRTC (get_function needs these exact strings).
NAME_EXPRESSIONS = tuple(
    [kernel_map_name(k, fill) for k in SPECIALISED_K + (0,) for fill in (False, True)]
    + [kernel_map_once_name(k) for k in SPECIALISED_K + (0,)]
    + [kernel_map_tiled_name(k) for k in SPECIALISED_K + (0,)]
    + [radius_name(fill) for fill in (False, True)]
    + [split_name(dt) for dt in CELL_CTYPES]
    + [order_name(dt) for dt in CELL_CTYPES]
    + [sort_into_name(dt) for dt in CELL_CTYPES]
    + [counts_name(dt) for dt in CELL_CTYPES]
    + [entry_counts_name(dt) for dt in CELL_CTYPES]
    + [conv_name(k, dt) for k in CONV_KERNELS for dt in FLOAT_CTYPES]
    + [rows_name(k, dt, ct) for k in ROWS_KERNELS for dt in FLOAT_CTYPES for ct in CELL_CTYPES]
    + [thread_name(k, dt, bm) for k in ("conv_entries_thread", "conv_entries_tile",
                                        "conv_weight_chunks")
       for dt in FLOAT_CTYPES for bm in THREAD_OUTPUTS]
    + [digest_name(dt) for dt in DIGEST_TYPES])

#: Kernels declared extern "C" (looked up by their plain name).
PLAIN_KERNELS = ("cloud_lower_corner", "cloud_lower_corner_merge", "grid_cell_coords",
                 "grid_cell_keys", "grid_sorted_points", "grid_cells", "grid_cells_scanned",
                 "build_row_table", "expand_rows", "count_per_point", "kernel_axis_diffs",
                 "sort_rows_by_rank", "scatter_by_point", "scatter_rows_by_point",
                 "sort_segments", "radius_once")

#: Kernels that use __syncthreads / __syncwarp / __shfl_sync / __ballot_sync (the host
#: emulation runs them with real threads).
BARRIER_KERNELS = ("cloud_lower_corner", "cloud_lower_corner_merge", "grid_cell_coords",
                   "conv_gather_dense", "conv_weight_partial_dense", "conv_rows",
                   "conv_weight_rows", "conv_weight_cells", "points_digest", "sum_partials",
                   "kernel_map_once", "conv_entries_thread", "conv_entries_tile",
                   "conv_weight_chunks", "kernel_map_tiled", "radius_once", "sort_segments",
                   "sort_segments_into", "scatter_rows_by_point", "conv_weight_warps")


class CudaKernelError(RuntimeError):
    """A CUDA kernel of pwconv failed to compile, to launch or to run."""


#: Parsed environment switches by (name, raw value, choices, default): the switches are read on
#: every call (a test or benchmark may change them between calls), parsed once per raw value.
_SWITCHES: dict = {}


def env_choice(name: str, choices: tuple, default: str) -> str:
    """The value of environment switch `name` (trimmed, lower case; unset or empty: `default`),
    which must be one of `choices`; ValueError naming the variable otherwise."""
    key = (name, os.environ.get(name), choices, default)
    value = _SWITCHES.get(key)
    if value is not None:
        return value
    value = (key[1] or default).strip().lower() or default
    if value not in choices:
        allowed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    _SWITCHES[key] = value
    return value


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment switch `name`: 1 / true / yes / on or 0 / false / no / off (any
    case, trimmed; unset or empty: `default`); ValueError naming the variable otherwise."""
    fallback = "1" if default else "0"
    value = os.environ.get(name, fallback).strip().lower() or fallback
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"{name} must be {fallback} (the default) or {1 - int(fallback)}, "
                         f"got {value!r}")
    return value in ("1", "true", "yes", "on")


def debug_enabled() -> bool:
    """True when ``PWCONV_CUDA_DEBUG`` is set to a true value (1, true, yes, on)."""
    raw = os.environ.get("PWCONV_CUDA_DEBUG")  # read at every launch: unset is the quick case
    return raw is not None and raw.strip().lower() in ("1", "true", "yes", "on")


def include_dir() -> Path:
    """The folder holding ``pwconv/binning.hpp``: the installed copy next to kernels.cu
    (``pwconv_cy/cuda/include``), else the source tree's ``cpp/include``."""
    for candidate in (HERE / "include", HERE.parent.parent / "cpp" / "include"):
        if (candidate / HEADER).is_file():
            return candidate
    raise CudaKernelError(
        f"cannot find {HEADER} for the CUDA kernels: looked in {HERE / 'include'} (installed "
        f"package) and {HERE.parent.parent / 'cpp' / 'include'} (source tree); reinstall pwconv")


def kernel_source() -> str:
    """kernels.cu, preceded by a comment with the hash of binning.hpp: CuPy's kernel cache is keyed
    by the source text, so a changed header must change the text."""
    if not SOURCE.is_file():
        raise CudaKernelError(f"the CUDA source {SOURCE} is missing from the installed package; "
                              "reinstall pwconv (kernels.cu is package data)")
    header = (include_dir() / HEADER).read_bytes()
    digest = hashlib.sha256(header).hexdigest()
    return f"// binning.hpp sha256 {digest}\n" + SOURCE.read_text()


def compile_options() -> tuple:
    """NVRTC options: C++17, no FMA contraction (SPEC §1's binning), the shared header's folder;
    line information for compute-sanitizer when PWCONV_CUDA_DEBUG is set."""
    options = ("--std=c++17", "--fmad=false", f"-I{include_dir()}")
    return options + ("--generate-line-info",) if debug_enabled() else options


#: Kernel arguments refused by launch(): a Python number's C type would be a guess (NumPy scalars
#: are subclasses of none of these types' exact type), None a missing array.
_LOOSE_ARGUMENTS = frozenset((bool, int, float, type(None)))


@functools.cache
def _device_memory_bytes(device_id: int) -> int:
    import cupy

    with cupy.cuda.Device(device_id) as device:
        return int(device.mem_info[1])


@functools.cache
def _max_shared_bytes(device_id: int) -> int:
    import cupy

    device = cupy.cuda.Device(device_id)
    try:
        return int(device.attributes["MaxSharedMemoryPerBlockOptin"])
    except KeyError:
        pass
    try:
        return int(cupy.cuda.runtime.deviceGetAttribute(97, device_id))
    except Exception:  # noqa: BLE001 - any failure: the limit every device has
        return DEFAULT_SHARED_BYTES


class CupyBackend:
    """CuPy arrays and the kernels of kernels.cu on the current device."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy
        self._cupy = cupy

    # --- compilation ------------------------------------------------------------------------

    @staticmethod
    @functools.cache
    def _module(device_id: int):
        import cupy

        code, options = kernel_source(), compile_options()
        try:
            module = cupy.RawModule(code=code, options=options, name_expressions=NAME_EXPRESSIONS)
            if hasattr(module, "compile"):  # else compiled by the first get_function
                module.compile()
        except Exception as exc:  # noqa: BLE001 - CompileException, NVRTCError, driver errors
            raise CudaKernelError(
                f"NVRTC could not compile {SOURCE} for device {device_id} (options {options}):\n"
                f"{type(exc).__name__}: {exc}") from None
        return module

    @functools.cache  # noqa: B019 - one backend object per process
    def _function(self, device_id: int, name: str):
        module = self._module(device_id)
        try:
            return module.get_function(name)
        except Exception as exc:  # noqa: BLE001 - report which kernel and why
            raise CudaKernelError(f"kernel {name!r} not found in the compiled module of {SOURCE}: "
                                  f"{type(exc).__name__}: {exc}") from None

    def compile(self) -> None:
        """Compile (or load from CuPy's cache) the module for the current device now."""
        self._module(self._cupy.cuda.Device().id)

    # --- launching --------------------------------------------------------------------------

    def launch(self, name: str, grid, block, args, shared_mem: int = 0) -> None:
        """Launch kernel `name` on the current stream.  Every argument must be a CuPy array or a
        NumPy scalar of the kernel parameter's exact type (a Python int would be ambiguous)."""
        # The host's cost of a launch counts (the paper workload's stages were bound by the host
        # issuing them): these checks are kept to a few C-level passes.
        grid = tuple(map(int, grid))
        block = tuple(map(int, block))
        if 0 in grid:
            return  # nothing to do (empty input)
        if grid[0] > 2**31 - 1 or max(grid[1:], default=1) > 65535:
            raise CudaKernelError(f"kernel {name}: grid {grid} exceeds CUDA's limits; the input is "
                                  "too large for one launch")
        if not _LOOSE_ARGUMENTS.isdisjoint(map(type, args)):
            k, a = next((k, a) for k, a in enumerate(args) if type(a) in _LOOSE_ARGUMENTS)
            raise TypeError(f"internal error: argument {k} of kernel {name} is "
                            f"{type(a).__name__} {a!r}; pass a NumPy scalar of the exact type")
        fn = self._function(self._cupy.cuda.runtime.getDevice(), name)
        try:
            if shared_mem > DEFAULT_SHARED_BYTES and fn.max_dynamic_shared_size_bytes < shared_mem:
                fn.max_dynamic_shared_size_bytes = shared_mem  # beyond the default: opt in
            fn(grid, block, tuple(args), shared_mem=shared_mem)
        except Exception as exc:
            raise CudaKernelError(f"launching kernel {name} (grid {grid}, block {block}) failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if debug_enabled():
            self.synchronize(f"kernel {name} (grid {grid}, block {block})")

    def synchronize(self, what: str = "the GPU work") -> None:
        try:
            self._cupy.cuda.get_current_stream().synchronize()
        except Exception as exc:
            raise CudaKernelError(f"{what} failed on the device: {type(exc).__name__}: {exc}") \
                from exc

    # --- helpers ----------------------------------------------------------------------------

    def argsort(self, a):
        """Stable argsort (CuPy sorts with Thrust's stable sort)."""
        return self._cupy.argsort(a)

    def sort(self, a):
        return self._cupy.sort(a)

    def lexsort(self, keys):
        """Indices sorting by keys[-1], then keys[-2], ... ((k, N) array)."""
        return self._cupy.lexsort(keys)

    def to_host(self, a) -> np.ndarray:
        """An explicit device -> host copy (only ever used for small metadata)."""
        return self._cupy.asnumpy(a)

    def to_device(self, a):
        """An explicit host -> device copy (small metadata: offsets)."""
        return self._cupy.asarray(a)

    def device_memory_bytes(self) -> int:
        """The current device's memory in bytes (asked once per device: it does not change)."""
        return _device_memory_bytes(self._cupy.cuda.runtime.getDevice())

    def max_shared_bytes(self) -> int:
        """Dynamic shared memory a block of the current device can opt into
        (cudaDevAttrMaxSharedMemoryPerBlockOptin; 48 KiB where it cannot be read).  Asked once
        per device: CuPy reads every attribute of the device to answer."""
        return _max_shared_bytes(self._cupy.cuda.runtime.getDevice())

    def check_status(self, status, what: str) -> None:
        """Raise when a kernel flagged an inconsistency in its status word."""
        code = int(self.to_host(status)[0])
        if code != 0:
            raise CudaKernelError(f"{what}: a kernel reported an internal inconsistency (status "
                                  f"{code}); please report this with the input that caused it")


@functools.cache
def get_backend() -> CupyBackend:
    return CupyBackend()
