"""A stand-in for CuPy, for tests only: "device" arrays in host memory, kernels run by the host
emulation of kernels.cu (tests/test_cuda.py), so that the GPU path's Python code -- the public
functions of pwconv_cy.cuda, the array interop, the layers, the paper's networks and the
training commands on ``--device cuda`` -- runs in CI, where there is no GPU.

It is not a GPU and says nothing about speed; the real GPU tests still skip without one and run
on one (benchmarks/gpu_check.sh).  What it checks is the Python side, and it is strict where
CuPy is, so that the mistakes CuPy would refuse fail here too:

* a device array never turns into a host array implicitly (``np.asarray(x)``, ``float()`` of a
  non-0-d array, ``operator.index``: TypeError, as in CuPy), and host arrays are refused by the
  array functions and operators (``cupy.concatenate([numpy_array])``, ``device + host``);
* reductions and scalar indexing return 0-d device arrays (CuPy has no scalars);
* every array lives on the device that was current when it was made; using it while another
  device is current raises (CuPy raises, or enables peer access with a warning, and
  ``cupy.asarray`` copies it to the current device: either way a bug here), kernels included;
* ``empty`` is filled with garbage (NaN, 0xA5 bytes), not zeros;
* ``lexsort`` takes 2-D keys and no ``axis`` (CuPy's); sorts are stable, as CuPy's;
* a launch checks its arguments (device arrays C-contiguous and on the current device, scalars
  as NumPy scalars) and its dynamic shared memory against the kernel's opt-in limit.

Devices: ``CUPY_STANDIN_DEVICES`` (default 2, so that ``cuda:1`` paths run).  The emulator
library: ``CUPY_STANDIN_EMULATOR`` (a prebuilt one), else it is built on the first RawModule
(with ``CUPY_STANDIN_COUNT=1``, the memory-request counting build: benchmarks/gpu_load_model.py).
"""
from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "14.0.0+standin"

_N_DEVICES = int(os.environ.get("CUPY_STANDIN_DEVICES", "2"))
_current_stack = [0]
_MEMORY_BYTES = 16 << 30
_OPTIN_SHARED_BYTES = 227 * 1024
_DEFAULT_SHARED_BYTES = 48 * 1024

#: What the code under test asked of the "device", counted (tests read and reset it): raw kernel
#: launches by name ("launch:<name>"), library calls that run kernels on a GPU ("library:<name>":
#: functions, ufuncs, computing methods, advanced indexing), device -> host copies ("to_host"),
#: host -> device copies ("to_device") and explicit synchronisations ("sync").  A device -> host
#: copy is a synchronisation on a GPU: the host waits for every queued kernel.  CuPy's functions
#: whose output size depends on the data (nonzero, boolean-mask indexing, ...) copy a count to
#: the host, and are counted as "to_host" too.
tally: collections.Counter = collections.Counter()
#: CuPy functions that bring a count to the host to size their output.
_SIZE_FROM_DATA = {"nonzero", "flatnonzero", "argwhere", "unique", "extract", "compress",
                   "trim_zeros"}
#: Functions that read host data by design (explicit transfers, metadata).
_HOST_OK = {"asarray", "array", "asanyarray", "ascontiguousarray", "asnumpy", "get_array_module"}


def _current() -> int:
    return _current_stack[-1]


class ndarray(NDArrayOperatorsMixin):
    """A device array: a NumPy array that only explicit transfers turn into host data."""

    __slots__ = ("_a", "_dev")

    def __init__(self, shape=None, dtype=float, *, _array=None, _device=None):
        self._a = np.empty(shape, dtype) if _array is None else _array
        self._dev = _current() if _device is None else _device

    # -- what CuPy exposes ----------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)

    @property
    def device(self):
        return cuda.Device(self._dev)

    @property
    def data(self):
        return _Pointer(self._a.ctypes.data, self._dev)

    @property
    def T(self):
        return _wrap(self._a.T, self._dev)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "version": 3,
                "data": (self._a.ctypes.data, False),
                "strides": None if self._a.flags.c_contiguous else self._a.strides}

    def __dlpack_device__(self):
        return (2, self._dev)  # kDLCUDA

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("the CuPy stand-in cannot export device memory through DLPack")

    def get(self, stream=None, order="C", out=None):
        """An explicit device -> host copy."""
        tally["to_host"] += 1
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        self._a[...] = np.asarray(arr)

    def item(self):
        tally["to_host"] += 1
        return self._a.item()

    def tolist(self):
        tally["to_host"] += 1
        return self._a.tolist()

    # -- implicit conversions: refused as CuPy refuses them -------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def _scalar(self, kind):
        if self._a.ndim != 0:
            raise TypeError(f"only 0-dimensional arrays can be converted to Python scalars "
                            f"(CuPy), got shape {self._a.shape}")
        tally["to_host"] += 1
        return kind(self._a)

    def __int__(self):
        return self._scalar(int)

    def __float__(self):
        return self._scalar(float)

    def __complex__(self):
        return self._scalar(complex)

    def __bool__(self):
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous.")
        tally["to_host"] += 1
        return bool(self._a.reshape(()))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        _check_device(self)
        return (_wrap(a, self._dev) for a in self._a)

    def __repr__(self):
        return f"standin_cupy.array({self._a!r}, device={self._dev})"

    def __reduce__(self):
        return (_rebuild, (self.get(), self._dev))

    # -- NumPy protocols: device arrays in, device arrays out -----------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        tally[f"library:{ufunc.__name__}"] += 1
        args = _unwrap(inputs, ufunc.__name__)
        kwargs = {k: _unwrap(v, ufunc.__name__) for k, v in kwargs.items()}
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        tally[f"library:{func.__name__}"] += 1
        return _wrap(func(*_unwrap(args, func.__name__),
                          **{k: _unwrap(v, func.__name__) for k, v in kwargs.items()}))

    def __getitem__(self, key):
        if _has_arrays(key):  # advanced indexing runs a kernel; basic indexing makes a view
            _check_device(self)
            tally["library:take"] += 1
            if _has_masks(key):  # the output's size is the mask's count: brought to the host
                tally["to_host"] += 1
        return _wrap(self._a[_unwrap(key, "__getitem__", host_ok=True)], self._dev)

    def __setitem__(self, key, value):
        _check_device(self)
        tally["library:setitem"] += 1
        self._a[_unwrap(key, "__setitem__", host_ok=True)] = _unwrap(value, "__setitem__",
                                                                      host_ok=True)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__, __array_struct__, buffer: no
            raise AttributeError(name)  # implicit host view of device memory
        attr = getattr(self._a, name)  # methods: astype, reshape, sum, max, copy, view, ...
        if not callable(attr):
            return _wrap(attr, self._dev)

        def method(*args, **kwargs):
            if name not in _VIEWS:
                _check_device(self)
                tally[f"library:{name}"] += 1
                if name in _SIZE_FROM_DATA:
                    tally["to_host"] += 1
            return _wrap(attr(*_unwrap(args, name),
                              **{k: _unwrap(v, name) for k, v in kwargs.items()}), self._dev)

        return method


#: Methods that make views (no kernel runs, so CuPy does not check the current device).
_VIEWS = {"reshape", "view", "transpose", "swapaxes", "squeeze"}


def _has_masks(key) -> bool:
    if isinstance(key, tuple):
        return any(_has_masks(k) for k in key)
    return isinstance(key, (ndarray, np.ndarray)) and key.dtype == np.bool_


def _has_arrays(key) -> bool:
    if isinstance(key, tuple):
        return any(_has_arrays(k) for k in key)
    return isinstance(key, (ndarray, np.ndarray, list))


def _rebuild(host, device):
    with cuda.Device(device):
        return asarray(host)


class _Pointer:
    def __init__(self, ptr, device_id):
        self.ptr = ptr
        self.device_id = device_id


def _check_device(arr) -> None:
    if arr._dev != _current():
        raise ValueError(f"The device where the array resides ({arr._dev}) is different from the "
                         f"current device ({_current()}) (CuPy stand-in: pwconv must run with "
                         "the arrays' device current)")


def _unwrap(obj, what: str, host_ok: bool = False):
    """Device arrays to their NumPy data (on the current device), host arrays refused."""
    if isinstance(obj, ndarray):
        _check_device(obj)
        return obj._a
    if isinstance(obj, np.ndarray):
        if host_ok:
            return obj
        raise TypeError(f"Unsupported type {type(obj)} (CuPy stand-in: {what} got a host array "
                        "among device arrays)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, what, host_ok) for o in obj)
    return obj


def _wrap(obj, device=None):
    if isinstance(obj, np.ndarray):
        return ndarray(_array=obj, _device=_current() if device is None else device)
    if isinstance(obj, np.generic):  # CuPy has no scalars: 0-d arrays
        return ndarray(_array=np.asarray(obj), _device=_current() if device is None else device)
    if isinstance(obj, tuple):
        return tuple(_wrap(o, device) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o, device) for o in obj]
    return obj


def _garbage(a: np.ndarray) -> np.ndarray:
    """What uninitialised device memory may hold."""
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    elif a.dtype.kind == "b":
        a.fill(True)
    elif a.size:
        a.view(np.uint8).fill(0xA5)
    return a


# --- array functions ---------------------------------------------------------------------------

def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data copied to the current device; a device array kept (or cast).  CuPy copies an
    array of another device to the current one; the stand-in refuses, since pwconv must never
    move data between devices implicitly."""
    if isinstance(a, ndarray):
        if a._dev != _current():
            raise ValueError(f"cupy.asarray of an array on device {a._dev} while device "
                             f"{_current()} is current: CuPy would copy it across devices "
                             "(CuPy stand-in: pwconv must run with the arrays' device current)")
        out = a._a if dtype is None else a._a.astype(dtype, copy=False)
        return a if out is a._a else ndarray(_array=out)
    if hasattr(a, "__cuda_array_interface__") or (
            hasattr(a, "__dlpack_device__") and a.__dlpack_device__()[0] == 2):
        raise TypeError("the CuPy stand-in reads only its own device arrays")
    tally["to_device"] += 1
    return ndarray(_array=np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    out = asarray(obj, dtype=dtype)
    if copy and out is obj:
        out = ndarray(_array=obj._a.copy())
    if ndmin > out.ndim:
        out = ndarray(_array=out._a.reshape((1,) * (ndmin - out.ndim) + out.shape))
    return out


asanyarray = asarray


def ascontiguousarray(a, dtype=None):
    out = asarray(a, dtype=dtype)
    return out if out._a.flags.c_contiguous else ndarray(_array=np.ascontiguousarray(out._a))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """An explicit device -> host copy (host data passes through)."""
    if isinstance(a, ndarray):
        return a.get(order=order)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def empty(shape, dtype=float, order="C"):
    return ndarray(_array=_garbage(np.empty(shape, dtype=dtype, order=order)))


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return ndarray(_array=_garbage(np.empty_like(_unwrap(a, "empty_like"), dtype=dtype,
                                                 order=order, shape=shape)))


def argsort(a, axis=-1, kind=None):
    """Stable, as CuPy's (radix) sort."""
    tally["library:argsort"] += 1
    return _wrap(np.argsort(_unwrap(a, "argsort"), axis=axis, kind="stable"))


def sort(a, axis=-1, kind=None):
    tally["library:sort"] += 1
    return _wrap(np.sort(_unwrap(a, "sort"), axis=axis, kind="stable"))


def lexsort(keys):
    """CuPy's: (k, N) keys, the last the primary one; no axis argument."""
    tally["library:lexsort"] += 1
    k = _unwrap(keys, "lexsort")
    if not isinstance(k, np.ndarray) or k.ndim != 2:
        raise NotImplementedError("Keys with the rank of other than 2 are not supported (CuPy)")
    return _wrap(np.lexsort(k))


def from_dlpack(x):
    if isinstance(x, ndarray):
        return x
    raise TypeError("the CuPy stand-in reads only its own device arrays")


def __getattr__(name):
    """Everything else: NumPy's function of that name on device arrays (host arrays refused),
    NumPy's constants and types as they are."""
    target = getattr(np, name)
    if isinstance(target, type) or not callable(target):
        return target

    def function(*args, **kwargs):
        tally[f"library:{name}"] += 1
        if name in _SIZE_FROM_DATA:
            tally["to_host"] += 1
        return _wrap(target(*_unwrap(args, name),
                            **{k: _unwrap(v, name) for k, v in kwargs.items()}))

    function.__name__ = name
    return function


class _RandomModule:
    def __getattr__(self, name):
        target = getattr(np.random, name)

        def function(*args, **kwargs):
            return _wrap(target(*_unwrap(args, name),
                                **{k: _unwrap(v, name) for k, v in kwargs.items()}))

        return function


random = _RandomModule()


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _MemoryPool()


def get_default_pinned_memory_pool():
    return _MemoryPool()


# --- kernels: the host emulation of kernels.cu ---------------------------------------------------

_emulators: dict = {}


def _emulated_backend(defines: tuple, names: tuple):
    """tests/test_cuda.py's EmulatedBackend over an emulator library with the kernels `names`
    compiled with the -D options `defines`: CUPY_STANDIN_EMULATOR (prebuilt) when it has them
    and there are no options, else one built here (once per set of options; again when a module
    asks for instantiations it lacks, e.g. with PWCONV_CUDA_SPECIALISE_K set in this process).
    CUPY_STANDIN_COUNT=1: the libraries built here count memory requests (build_emulator's
    count; the backend's ``memory``)."""
    backend = _emulators.get(defines)
    if backend is not None and all(backend.has(n) for n in names):
        return backend
    tests = Path(__file__).resolve().parents[2]
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import test_cuda

    prebuilt = os.environ.get("CUPY_STANDIN_EMULATOR")
    backend = test_cuda.EmulatedBackend(prebuilt) if prebuilt and not defines else None
    if backend is None or not all(backend.has(n) for n in names):
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="cupy_standin_"))
        count = os.environ.get("CUPY_STANDIN_COUNT", "").strip() == "1"
        backend = test_cuda.EmulatedBackend(test_cuda.build_emulator(folder, defines,
                                                                     count=count))
    _emulators[defines] = backend
    return backend


class RawModule:
    """NVRTC's place: the kernels come from the emulator library (built from the installed
    kernels.cu), looked up by the same names."""

    def __init__(self, code=None, options=(), name_expressions=None, **kwargs):
        if not code or "__global__" not in code:
            raise ValueError("RawModule needs the CUDA source")
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        # NVRTC's -DNAME=VALUE options (tuning knobs) go to the emulator's build
        self.defines = tuple(o[2:] for o in self.options if o.startswith("-D"))
        self._backend = None

    def compile(self, log_stream=None):
        if self._backend is None:
            self._backend = _emulated_backend(self.defines, self.name_expressions)
        return self._backend

    def get_function(self, name):
        if self.name_expressions and name not in self.name_expressions \
                and "<" in name:  # NVRTC knows only the instantiations it was asked for
            raise RuntimeError(f"cuModuleGetFunction: {name} is not among the name expressions")
        return RawKernel(name, self.compile())


class RawKernel:
    def __init__(self, name, backend):
        self.name = name
        self.backend = backend
        self.max_dynamic_shared_size_bytes = _DEFAULT_SHARED_BYTES

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise RuntimeError(f"cudaErrorInvalidValue: kernel {self.name} launched with "
                               f"{shared_mem} bytes of dynamic shared memory, its limit is "
                               f"{self.max_dynamic_shared_size_bytes} (opt in first)")
        if self.max_dynamic_shared_size_bytes > _OPTIN_SHARED_BYTES:
            raise RuntimeError("cudaErrorInvalidValue: max_dynamic_shared_size_bytes above the "
                               "device's opt-in limit")
        tally[f"launch:{self.name}"] += 1
        host_args = []
        for k, a in enumerate(args):
            if isinstance(a, ndarray):
                _check_device(a)
                if not a._a.flags.c_contiguous:
                    raise ValueError(f"argument {k} of {self.name} is not C-contiguous")
                host_args.append(a._a)
            elif isinstance(a, np.generic):
                host_args.append(a)
            else:
                raise TypeError(f"argument {k} of {self.name}: {type(a).__name__} {a!r} is "
                                "neither a device array nor a NumPy scalar")
        self.backend.launch(self.name, grid, block, host_args, shared_mem)


class _Cuda:
    """cupy.cuda: devices, streams, the runtime."""

    class Device:
        def __init__(self, device=None):
            self.id = _current() if device is None else int(getattr(device, "id", device))

        def _check(self):
            if not 0 <= self.id < _N_DEVICES:
                raise _Cuda.runtime.CUDARuntimeError(
                    "cudaErrorInvalidDevice: invalid device ordinal")

        def __enter__(self):
            self._check()
            _current_stack.append(self.id)
            return self

        def __exit__(self, *exc):
            _current_stack.pop()
            return False

        def use(self):
            self._check()
            _current_stack[0] = self.id

        def synchronize(self):
            tally["sync"] += 1

        @property
        def mem_info(self):
            return (_MEMORY_BYTES, _MEMORY_BYTES)

        @property
        def attributes(self):
            return {"MaxSharedMemoryPerBlockOptin": _OPTIN_SHARED_BYTES,
                    "MultiProcessorCount": 4}

        @property
        def compute_capability(self):
            return "90"

        def __eq__(self, other):
            return isinstance(other, _Cuda.Device) and other.id == self.id

        def __hash__(self):
            return hash(self.id)

        def __repr__(self):
            return f"<CUDA Device {self.id}>"

    class Stream:
        null = None

        def __init__(self, null=False, non_blocking=False, ptr=0):
            self.ptr = ptr

        def synchronize(self):
            tally["sync"] += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @classmethod
        def from_external(cls, stream):
            return cls(ptr=getattr(stream, "cuda_stream", 0))

    class ExternalStream(Stream):
        def __init__(self, ptr, device_id=-1):
            super().__init__(ptr=ptr)

    class Event:
        def record(self, stream=None):
            import time

            self.t = time.perf_counter()

        def synchronize(self):
            tally["sync"] += 1

    class runtime:
        class CUDARuntimeError(RuntimeError):
            pass

        @staticmethod
        def getDeviceCount():
            return _N_DEVICES

        @staticmethod
        def getDevice():
            return _current()

        @staticmethod
        def deviceGetAttribute(attr, device):
            return _OPTIN_SHARED_BYTES if attr == 97 else 0

        @staticmethod
        def getDeviceProperties(device):
            return {"name": b"CuPy stand-in (host emulation)", "totalGlobalMem": _MEMORY_BYTES,
                    "major": 9, "minor": 0, "multiProcessorCount": 4}

        @staticmethod
        def profilerStart():
            pass

        @staticmethod
        def profilerStop():
            pass

        @staticmethod
        def runtimeGetVersion():
            return 13000

        @staticmethod
        def driverGetVersion():
            return 13000

    @staticmethod
    def get_current_stream():
        return _Cuda.Stream()

    @staticmethod
    def get_elapsed_time(start, end):
        return (end.t - start.t) * 1e3


cuda = _Cuda()
