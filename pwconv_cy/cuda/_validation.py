"""Input checks of the GPU path: the CPU helpers' rules and messages (pwconv_cy/_validation.py)
for CuPy arrays.  Device data is never copied to the host: shapes and dtypes are read from the
array objects; the NaN/Inf checks reduce on the device and bring back one boolean.  Offsets are
small host metadata (NumPy, lists, or device arrays copied explicitly) checked by the CPU helper."""
from __future__ import annotations

from pwconv_cy import _arrays
from pwconv_cy import _validation as _host

__all__ = [
    "DeferredChecks",
    "DeviceBatch",
    "as_device",
    "check_features",
    "check_grad_out",
    "check_points",
    "check_queries",
    "check_weight",
    "float64_coordinates",
    "host_offsets",
    "raise_nonfinite",
]


def _cupy():
    import cupy

    return cupy


def as_device(x, name: str):
    """A CuPy view of `x` (CuPy arrays, CUDA DLPack producers such as torch CUDA tensors and JAX
    GPU arrays, __cuda_array_interface__ objects), without copying.  Host arrays are refused, not
    copied (pwconv_cy._arrays.to_device)."""
    return _arrays.to_device(x, name)


def host_offsets(offsets, name: str = "offsets"):
    """Offsets as host metadata: device arrays (CuPy, CUDA tensors) are copied to the host
    explicitly (B + 1 integers)."""
    if offsets is None or isinstance(offsets, (list, tuple)):
        return offsets
    if _arrays.device_of(offsets, name) != _arrays.CPU:
        return _cupy().asnumpy(_arrays.to_device(offsets, name))
    return offsets


#: A validated batch on the device: the CPU's PointBatch with CuPy float64 coordinates.
DeviceBatch = _host.PointBatch


def _first_bad_row(arr):
    cupy = _cupy()
    rows = arr.reshape(arr.shape[0], -1)
    bad = int(cupy.flatnonzero(~cupy.isfinite(rows).all(axis=1))[0])
    return bad, cupy.asnumpy(rows[bad]).tolist()


def raise_nonfinite(arr, name: str):
    """Raise the CPU's ValueError for coordinates with a NaN or infinite value, naming the first
    such row of `arr` (n, 3)."""
    bad, row = _first_bad_row(arr.reshape(-1, 3))
    raise ValueError(f"{name} must be finite, got NaN or infinite coordinates (first at row "
                     f"{bad}: {row})")


def _check_coordinate_dtype(arr, name: str):
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), "
                        f"got {arr.dtype}")
    return _cupy().ascontiguousarray(arr)


def _float64_coordinates_unscanned(arr, name: str):
    _check_coordinate_dtype(arr, name)
    return _cupy().ascontiguousarray(arr, dtype=_cupy().float64)  # exact for float16/float32


def _check_coordinates(arr, name: str):
    arr = _float64_coordinates_unscanned(arr, name)
    if arr.size and not bool(_cupy().isfinite(arr).all()):
        raise_nonfinite(arr, name)
    return arr


def float64_coordinates(batch: DeviceBatch) -> DeviceBatch:
    """A batch from check_points(..., finite=False) with C-contiguous float64 coordinates, not
    scanned: for the grid build, which counts NaN / infinite values in its own transfer
    (pwconv_cy.cuda._search.build_grid; the caller raises raise_nonfinite's error)."""
    points = _cupy().ascontiguousarray(batch.points, dtype=_cupy().float64)
    return DeviceBatch(points, batch.offsets, batch.dense_shape)


def check_points(points, offsets=None, name: str = "points", offsets_name: str = "offsets",
                 what: str = "points", finite: bool = True) -> DeviceBatch:
    """Coordinates (n, 3) packed with `offsets`, or dense (B, n, 3) with offsets=None: the CPU's
    rules and messages (pwconv_cy._validation.check_points) on CuPy arrays, binned in float64.
    finite=False: the coordinates keep their dtype and are not scanned (see
    float64_coordinates)."""
    return _host.check_points(points, host_offsets(offsets, offsets_name), name, offsets_name,
                              what, to_array=as_device,
                              coordinates=_check_coordinates if finite else _check_coordinate_dtype)


def check_queries(queries, query_offsets, batch: DeviceBatch, finite: bool = True):
    """(queries float64 (m, 3) on the device or None, host query offsets or None, dense shape or
    None), as the CPU's check_queries.  finite=False: the queries are not scanned for NaN /
    infinite values; the caller counts them with their fingerprint, in one transfer
    (pwconv_cy.cuda._search.points_digest), and raises raise_nonfinite's error."""
    return _host.check_queries(queries, host_offsets(query_offsets, "query_offsets"), batch,
                               to_array=as_device, xp=_cupy(),
                               coordinates=(_check_coordinates if finite
                                            else _float64_coordinates_unscanned))


class DeferredChecks:
    """The device-side verdicts of one call's checks (the NaN scans of features, weights and
    gradients, the kernel map's fingerprint), brought to the host in one transfer by run()
    instead of one each: every transfer waits for the kernels queued before it.  Each check is
    one launch of the digest kernel (pwconv_cy.cuda._search.launch_digest: two sums and the count
    of NaN / infinite values, no temporary array) into its slot of a shared buffer.  run() then
    settles them in the order they were added, raising the same errors as the immediate checks.
    The host-side checks (shapes, dtypes) are not deferred, so where a call has several wrong
    inputs, a shape error may come before a NaN error that an immediate check would raise
    first."""

    #: Slots per buffer: an operator call scans at most four arrays (features, weight, output
    #: gradient, the map's points); more take another buffer.
    SLOTS = 4

    def __init__(self):
        self._buffers = []  # (3 * SLOTS,) uint64 device arrays, zeroed
        self._settle = []   # settle(slot on the host: (3,) uint64), in order

    def scan(self, values, settle) -> None:
        """Launches the digest kernel over `values` (a non-empty device array of floats) into
        the next slot; settle(its sums and NaN count, on the host) is called by run()."""
        from pwconv_cy.cuda._backend import get_backend
        from pwconv_cy.cuda._search import launch_digest

        cupy = _cupy()
        k = len(self._settle) % self.SLOTS
        if k == 0:
            self._buffers.append(cupy.zeros(3 * self.SLOTS, dtype=cupy.uint64))
        launch_digest(get_backend(), values, self._buffers[-1][3 * k:3 * k + 3])
        self._settle.append(settle)

    def finite(self, arr, name: str) -> None:
        """The check of pwconv_cy._validation._check_finite_values, deferred."""
        if not arr.size:
            return

        def settle(slot, arr=arr):
            if slot[2]:  # the immediate check finds the first bad value and raises
                _host._check_finite_values(arr, name, _cupy())

        self.scan(arr, settle)

    def run(self) -> None:
        """One transfer for every verdict, then each settled in order (the first failing one
        raises).  Nothing to transfer, nothing transferred."""
        if not self._settle:
            return
        cupy = _cupy()
        used = 3 * len(self._settle)
        whole = self._buffers[0] if len(self._buffers) == 1 else cupy.concatenate(self._buffers)
        host = cupy.asnumpy(whole[:used])
        settles, self._buffers, self._settle = self._settle, [], []
        for k, settle in enumerate(settles):
            settle(host[3 * k:3 * k + 3])


def check_features(feats, batch: DeviceBatch, name: str = "feats", check_finite: bool = True,
                   checks: DeferredChecks | None = None):
    """Per-point features (n, c) packed, or (B, n, c) for dense points -> C-contiguous (n, c);
    the CPU's rules and messages (pwconv_cy._validation.check_features) on CuPy arrays.  With
    `checks`, the NaN scan is deferred to checks.run()."""
    arr = _host.check_features(feats, batch, name, check_finite and checks is None,
                               to_array=as_device, xp=_cupy())
    if check_finite and checks is not None:
        checks.finite(arr, name)
    return arr


def check_weight(weight, c_in: int, dtype, depthwise: bool, check_finite: bool = True,
                 checks: DeferredChecks | None = None):
    """Weight (K, K, K, c_in, c_out), or (K, K, K, c) when depthwise -> (weight, K, c_out).  With
    `checks`, the NaN scan is deferred to checks.run()."""
    arr, k, c_out = _host.check_weight(weight, c_in, dtype, depthwise,
                                       check_finite and checks is None, to_array=as_device,
                                       xp=_cupy())
    if check_finite and checks is not None:
        checks.finite(arr, "weight")
    return arr, k, c_out


def check_grad_out(grad_out, m: int, c_out: int, dtype, dense_shape, check_finite: bool = True,
                   checks: DeferredChecks | None = None):
    """Gradient of the output: (m, c_out), or (B, m, c_out) for dense outputs.  With `checks`,
    the NaN scan is deferred to checks.run()."""
    arr = _host.check_grad_out(grad_out, m, c_out, dtype, dense_shape,
                               check_finite and checks is None, to_array=as_device, xp=_cupy())
    if check_finite and checks is not None:
        checks.finite(arr, "grad_out")
    return arr
