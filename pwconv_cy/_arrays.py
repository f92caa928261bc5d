"""Array interop: what kind of array a caller passed, where it lives, a zero-copy view of it in the
array module the kernels use (NumPy on the host, CuPy on a CUDA device), and the results converted
back to the caller's kind.

Kinds: ``numpy`` (NumPy arrays and anything ``np.asarray`` reads: lists, scalars, ``__array__``
objects), ``cupy``, ``torch``, ``jax``, and ``dlpack`` (any other ``__dlpack__`` producer).
Devices: ``"cpu"`` (DLPack CPU, CUDA-pinned and ROCm-pinned host memory) or ``"cuda:<id>"``
(DLPack CUDA and CUDA-managed memory, or ``__cuda_array_interface__``); other DLPack devices are
refused.  GPU data is never copied to the host, nor host data to the GPU: a call whose arrays sit
on different devices is an error naming two of them, and a non-contiguous GPU tensor is refused
(host arrays may be copied to C order on the host, as the NumPy path always did).

Results take the kind of the call's torch/JAX/CuPy arguments (NumPy arrays, array-likes and
unknown DLPack producers fit with any kind); with none, NumPy on the host and CuPy on a device.
Results convert without a copy (``torch.from_numpy``, ``torch.from_dlpack``,
``jax.dlpack.from_dlpack``; JAX copies host buffers that are not 64-byte aligned, and with
``jax_enable_x64`` off it holds int64/float64 results as int32/float32, its own rule).  A
KernelMap takes the caller's kind too (torch tensors for torch input; NumPy for JAX, see
:func:`export`) and is accepted back by every ``kernel_map=`` argument.  PyTorch and JAX are
imported only when an argument came from them.
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "CallArrays",
    "cupy_device_context",
    "describe",
    "device_of",
    "export",
    "kind_of",
    "to_device",
    "to_host",
]

CPU = "cpu"
#: DLPack device types (dlpack.h DLDeviceType) readable by the CPU path, and by the CUDA path.
_HOST_TYPES = {1: "CPU", 3: "CUDA host (pinned)", 11: "ROCm host (pinned)"}
_CUDA_TYPES = {2: "CUDA", 13: "CUDA managed"}
_OTHER_TYPES = {4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 12: "ext_dev",
                14: "oneAPI", 15: "WebGPU", 16: "Hexagon", 17: "MAIA"}
#: Kinds that decide the kind of the results (the others fit with any).
_DECIDING = ("torch", "jax", "cupy")


def kind_of(x) -> str:
    """'numpy', 'cupy', 'torch', 'jax' or 'dlpack' (see the module docstring).  Never imports."""
    if isinstance(x, np.ndarray):
        return "numpy"
    package = type(x).__module__.partition(".")[0]
    if package == "cupy":
        return "cupy"
    if package == "torch":
        return "torch"
    if package in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        return "dlpack"
    return "numpy"


def cupy_device_context(*objs):
    """The CuPy device (a context manager) of the first CuPy array found in `objs` (arrays, and
    lists, tuples or dict values of them), else a no-op context.  Layers and optimisers run
    under it, so that arrays on cuda:1 are computed on there whatever device is current (CuPy
    would otherwise allocate on the current device, copy inputs to it, or refuse them)."""
    import contextlib

    stack = list(objs)
    while stack:
        obj = stack.pop(0)
        if isinstance(obj, (list, tuple)):
            stack[:0] = obj
        elif isinstance(obj, dict):
            stack[:0] = obj.values()
        elif hasattr(obj, "__cuda_array_interface__"):
            device = getattr(obj, "device", None)  # cupy.cuda.Device (a torch.device has no id)
            if hasattr(device, "__enter__") and hasattr(device, "id"):
                return device
    return contextlib.nullcontext()


def host_scalars(values: list) -> list:
    """0-d arrays as host NumPy values: CuPy ones of one device stacked and brought back in one
    transfer (each transfer waits for every kernel queued before it); host ones as they are."""
    def on_host(v):
        return isinstance(v, (np.ndarray, np.generic, float, int))

    if all(on_host(v) for v in values):
        return list(values)
    first = next(v for v in values if not on_host(v))
    if all(type(v) is type(first) and getattr(v, "device", None) == first.device
           for v in values) and hasattr(first, "get"):
        import sys

        xp = sys.modules[type(first).__module__.partition(".")[0]]
        return list(xp.stack(values).get())
    return [v if on_host(v) else np.asarray(v.get() if hasattr(v, "get") else v) for v in values]


def describe(x) -> str:
    """The argument's type for messages, with its dtype where it has one."""
    cls = type(x)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
    dtype = getattr(x, "dtype", None)
    return f"{name} of dtype {dtype}" if dtype is not None else name


class Described:
    """describe(x), made when an error message is formatted (not on every call)."""

    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x

    def __str__(self) -> str:
        return describe(self.x)


def device_of(x, name: str) -> str:
    """'cpu' or 'cuda:<id>' ('cuda:?' when only __cuda_array_interface__ tells); TypeError for
    memory pwconv cannot read (ROCm, Metal, ...) and for values an autodiff framework tracks."""
    if isinstance(x, np.ndarray) or x is None:
        return CPU
    cupy = sys.modules.get("cupy")
    if cupy is not None and type(x) is cupy.ndarray:  # the GPU path's own arrays: no probing
        return f"cuda:{x.device.id}"
    _refuse_tracked(x, name)
    probe = getattr(x, "__dlpack_device__", None)
    if probe is not None and not isinstance(x, type):
        try:
            dev_type, dev_id = probe()
        except Exception as exc:  # noqa: BLE001 - e.g. a JAX array sharded over devices
            raise TypeError(f"{name}: cannot tell which device {describe(x)} lives on ({exc})") \
                from None
        dev_type = int(dev_type)
        if dev_type in _HOST_TYPES:
            return CPU
        if dev_type in _CUDA_TYPES:
            return f"cuda:{int(dev_id)}"
        where = _OTHER_TYPES.get(dev_type, f"DLPack device type {dev_type}")
        raise TypeError(f"{name} lives on a {where} device ({describe(x)}); pwconv reads host "
                        "memory and CUDA devices only: move it to the CPU or a CUDA device first")
    try:
        on_gpu = hasattr(x, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - a CUDA torch.Tensor that requires grad raises here
        on_gpu = True
    return "cuda:?" if on_gpu else CPU


def _where(device: str) -> str:
    return "the CPU" if device == CPU else device


def _refuse_tracked(x, name: str) -> None:
    """Values an autodiff framework tracks cannot be read (a torch tensor that requires grad: its
    gradient would be lost; a JAX tracer: it has no data yet)."""
    kind = kind_of(x)
    if kind == "torch" and getattr(x, "requires_grad", False):
        raise TypeError(f"{name} is a torch.Tensor that requires grad; the functions of pwconv_cy "
                        "do not record gradients: use pwconv_cy.torch.pointwise_conv (autograd), "
                        f"or pass {name}.detach()")
    if kind == "jax" and type(x).__name__.endswith("Tracer"):
        raise TypeError(f"{name} is a traced JAX value (inside jit, grad or vmap); the functions "
                        "of pwconv_cy read concrete arrays: use pwconv_cy.jax.pointwise_conv, "
                        "which works under jit and grad")


def _unreadable(x, name: str, where: str, exc: Exception) -> TypeError:
    return TypeError(f"{name}: cannot read {describe(x)} through DLPack {where} ({exc}); pwconv "
                     "takes float16/32/64 coordinates, float32/float64 features and weights and "
                     "integer offsets")


def to_host(x, name: str) -> np.ndarray:
    """A NumPy view of a host array (NumPy, array-likes, CPU DLPack producers: torch CPU tensors,
    JAX CPU arrays...) without copying.  GPU arrays are refused, never copied to the host."""
    if isinstance(x, np.ndarray):
        return x
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    device = device_of(x, name)
    if device != CPU:
        raise TypeError(f"{name} is in GPU memory ({describe(x)}) but this call runs on the CPU; "
                        "pwconv never copies GPU data to the host behind your back: pass all the "
                        f"call's arrays on one device (or move {name} to the host yourself)")
    kind = kind_of(x)
    if kind == "torch":
        try:
            return x.numpy()  # zero-copy, and cheaper than a DLPack round trip
        except (TypeError, RuntimeError) as exc:
            raise _unreadable(x, name, "on the CPU", exc) from None
    if kind != "numpy":
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError) as exc:
            raise _unreadable(x, name, "on the CPU", exc) from None
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - report whatever the conversion said
        raise TypeError(f"{name} must be an array, got {type(x).__name__} ({exc})") from None


def _gpu_unavailable(name: str, x) -> RuntimeError | None:
    from pwconv_cy import cuda

    reason = cuda._unavailable_until_usable()
    if reason is None:
        return None
    return RuntimeError(f"{name} is in GPU memory ({describe(x)}), so the call runs on the GPU, but "
                        f"the GPU path of pwconv is not available: {reason}; install CuPy "
                        "(pip install pwconv[cuda12] or [cuda13]), or move the call's arrays to "
                        "the host yourself")


def to_device(x, name: str):
    """A CuPy view of a CUDA array (CuPy, DLPack CUDA producers: torch CUDA tensors, JAX GPU
    arrays..., or __cuda_array_interface__ objects) without copying.  Host arrays are refused;
    a non-contiguous framework tensor is refused (reading it in place is not possible, and a
    device copy behind the caller's back is not made either)."""
    error = _gpu_unavailable(name, x)
    if error is not None:
        raise error
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    if x is None:
        raise TypeError(f"{name} must be a CuPy array, got None")
    device = device_of(x, name)
    if device == CPU:
        raise TypeError(f"{name} must be a CuPy array (GPU memory), got {describe(x)}; pwconv "
                        "never copies host data to the GPU behind your back: pass all the call's "
                        f"arrays on one device (e.g. cupy.asarray({name}))")
    try:
        if hasattr(x, "__dlpack__"):
            arr = cupy.from_dlpack(x)
        else:
            arr = cupy.asarray(x)
    except Exception as exc:  # noqa: BLE001 - say what failed
        raise _unreadable(x, name, "on the GPU", exc) from None
    if arr.size > 1 and not arr.flags.c_contiguous:
        raise ValueError(f"{name} is a non-contiguous GPU array ({describe(x)}, shape "
                         f"{tuple(arr.shape)}, strides {tuple(arr.strides)} bytes); pwconv reads "
                         f"GPU memory in place: pass {name}.contiguous() (PyTorch) or a "
                         "C-contiguous copy")
    return arr


def export(result, kind: str):
    """`result` (a NumPy/CuPy array, a tuple of them, a KernelMap, or None) as arrays of `kind`,
    without copying where the target allows it.  'numpy', 'cupy' and 'dlpack' results are
    returned as they are (NumPy on the host, CuPy on a device).  A KernelMap for JAX keeps NumPy
    arrays: JAX's default 32-bit mode cannot hold its int64 indices, and JAX code passes maps as
    Python constants anyway."""
    if kind in ("numpy", "cupy", "dlpack") or result is None:
        return result
    if isinstance(result, tuple):
        return tuple(export(r, kind) for r in result)
    if hasattr(result, "_with_arrays"):
        return result if kind == "jax" else result._with_arrays(lambda a, _: export(a, kind))
    if kind == "torch":
        import torch

        if isinstance(result, np.ndarray):
            return torch.from_numpy(result)
        return torch.from_dlpack(result)
    if kind == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(result)
    raise ValueError(f"unknown array kind {kind!r}")


class CallArrays:
    """The arrays of one call: checked to sit on one device, viewed (zero-copy) in the kernels'
    array module, and the kind its results take.

    Parameters
    ----------
    data : dict name -> array or None
        Arrays the kernels read (points, features, weights, queries, grad_out): all on one device.
    meta : dict name -> array or None
        Small host metadata (offsets): host arrays fit with any device; a GPU array with a CPU
        call is an error.  Passed on unchanged (the callee reads them).
    kernel_map : KernelMap or None
        Its arrays count as data; :attr:`kernel_map` is its view in the kernels' array module.
    bound : (name, device, kind, description) or None
        Arrays the call is bound to already (a NeighborIndex's points): they take part in the
        device and kind decisions.
    """

    __slots__ = ("arrays", "device", "kernel_map", "kind")

    def __init__(self, data: dict, meta: dict | None = None, kernel_map=None, bound=None):
        if bound is None and (kernel_map is None
                              or type(getattr(kernel_map, "splits", None)) is np.ndarray) \
                and all(type(a) is np.ndarray or a is None for a in data.values()):
            # The common case, kept cheap: NumPy arrays in, NumPy arrays out.
            self.device, self.kind, self.arrays, self.kernel_map = CPU, "numpy", data, kernel_map
            self._check_meta(meta)
            return
        is_map = kernel_map is not None and hasattr(kernel_map, "_with_arrays")
        # name -> (device, kind, description)
        entries = {} if bound is None else {bound[0]: tuple(bound[1:])}
        for name, a in data.items():
            if a is not None:
                entries[name] = (device_of(a, name), kind_of(a), Described(a))
        if is_map:
            entries["kernel_map"] = (device_of(kernel_map.splits, "kernel_map"),
                                     kind_of(kernel_map.splits),
                                     f"a KernelMap of {describe(kernel_map.splits)}")
        on_gpu = [n for n, e in entries.items() if e[0] != CPU and n in data]
        if on_gpu:  # first the reason a GPU call cannot run at all, when there is one
            error = _gpu_unavailable(on_gpu[0], data[on_gpu[0]])
            if error is not None:
                raise error
        self.device = self._common_device(entries)
        self.kind = self._common_kind(entries, self.device)
        self._check_meta(meta)
        convert = to_host if self.device == CPU else to_device
        self.arrays = {n: (None if a is None else convert(a, n)) for n, a in data.items()}
        self.kernel_map = kernel_map  # not a KernelMap: the callee says what it must be
        if is_map:
            self.kernel_map = kernel_map._with_arrays(lambda a, n: convert(a, f"kernel_map.{n}"))

    @property
    def on_gpu(self) -> bool:
        return self.device != CPU

    def __getitem__(self, name: str):
        return self.arrays[name]

    def export(self, result):
        """The callee's result(s) in the kind of the call's arrays."""
        return export(result, self.kind)

    @staticmethod
    def _common_device(entries: dict) -> str:
        first = device = None
        for name, (dev, _, what) in entries.items():
            if first is None:
                first, device = name, dev
                continue
            same = dev == device or ("cuda:?" in (dev, device) and CPU not in (dev, device))
            if not same:
                raise TypeError(
                    f"all arrays of one call must be on the same device, got {first} on "
                    f"{_where(device)} ({entries[first][2]}) and {name} on {_where(dev)} ({what}); "
                    "pwconv never copies between devices behind your back: move one of them")
            if device == "cuda:?":
                device = dev
        return CPU if device is None else device

    @staticmethod
    def _common_kind(entries: dict, device: str) -> str:
        chosen = None
        for name, (_, kind, what) in entries.items():
            if kind not in _DECIDING:
                continue
            if chosen is None:
                chosen = name
            elif entries[chosen][1] != kind:
                raise TypeError(
                    f"the arrays of one call must come from one framework, got {chosen} as "
                    f"{entries[chosen][2]} and {name} as {what}; convert one of them (NumPy "
                    "arrays mix with any)")
        if chosen is not None:
            return entries[chosen][1]
        return "numpy" if device == CPU else "cupy"

    def _check_meta(self, meta: dict | None) -> None:
        if not meta or self.device != CPU:
            return
        for name, value in meta.items():
            if value is not None and not isinstance(value, (np.ndarray, list, tuple)) \
                    and device_of(value, name) != CPU:
                raise TypeError(f"{name} is in GPU memory ({describe(value)}) but this call runs "
                                "on the CPU (its points are host arrays); pass the offsets as a "
                                "host array (NumPy, a list) or all the call's arrays on the GPU")
