"""The networks of the paper (SPEC §1): a pointwise-CNN classifier and a segmenter.

Both stack four :class:`~pwconv_cy.nn.PointwiseConv` layers (``in_channels -> channels`` at
à-trous stride 1, then ``channels -> channels`` at strides 2, 3 and 4, all with voxel size v and
no bias), each followed by SELU, and concatenate the four outputs (n x 4*channels).  The first
layer's input features are the xyz coordinates unless other features are given.

* :class:`PointwiseCNNClassifier`: points sorted by x, then y, then z; flatten n*4*channels ->
  FC ``hidden`` (SELU) -> alpha-dropout -> FC ``n_classes`` (optionally SELU on the logits, as
  the paper does; off by default) -> logits for a softmax cross-entropy.
* :class:`PointwiseCNNSegmenter`: a fifth pointwise layer ``4*channels -> n_classes`` (stride 1)
  gives per-point logits.

One :class:`~pwconv_cy.neighbors.NeighborIndex` is built per forward call and one kernel map is
computed per distinct dilation, shared by every layer with that geometry.

Models expose ``params`` (flat dict ``"conv0.weight"`` -> the layer's own array), ``set_params``
(writes an optimiser's new values back), ``forward``/``backward`` (backward returns a dict of
gradients keyed like ``params``; the gradient with respect to the input features is kept as
``model.input_grad``), ``train()``/``eval()``, ``n_params`` and ``summary()``.

:func:`save` / :func:`load` store the parameters, the configuration (JSON) and a format version in
an ``.npz`` file that is read back without pickle; the file is written atomically (a temporary
file in the same folder, then ``os.replace``), so an interrupted save never leaves a truncated
file.  Extra arrays (a training checkpoint's optimiser and random-generator state) ride along
under ``extra/`` and are read back by :func:`load_checkpoint`.

:meth:`PointwiseCNNClassifier.predict` classifies clouds of any size: each is normalised like the
training data and resampled to the model's ``n_points`` (:mod:`pwconv_cy.data`).

A network lives on one device, the CPU (NumPy weights, the default) or a CUDA device (CuPy
weights, the GPU path of :mod:`pwconv_cy.cuda`): ``model.to("cuda")`` moves it, ``model.device``
says where it is.  Its inputs must be on that device -- CuPy arrays or other CUDA arrays (read in
place) for a GPU network, host arrays for a CPU one: an array on another device is refused with
an error naming the argument, never copied behind the caller's back.  The explicit transfers are
:meth:`~_PointwiseNet.device_array` (the caller's request), :func:`save` (parameters written from
the host) and :meth:`PointwiseCNNClassifier.predict` (host clouds in, host probabilities out).
Dropout masks are drawn on the host by the model's NumPy Generator on either device, so a
network trained on the GPU follows the CPU's trajectory up to rounding.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from pwconv_cy import data, nn
from pwconv_cy._arrays import CPU, describe, device_of, kind_of, to_device
from pwconv_cy._atomic import atomic_open
from pwconv_cy._validation import check_bool
from pwconv_cy.neighbors import NeighborIndex

__all__ = ["PointwiseCNNClassifier", "PointwiseCNNSegmenter", "format_version", "load",
           "load_checkpoint", "save"]

format_version = 1

_PARAM_PREFIX = "param/"
_CONFIG_KEY = "__config__"
_VERSION_KEY = "__format_version__"
_EXTRA_PREFIX = "extra/"


def _parse_device(device) -> str:
    """'cpu' or 'cuda:<index>' from 'cpu', 'cuda' (device 0) or 'cuda:<index>'; checks that the
    GPU path can run and that the device exists."""
    text = device.strip().lower() if isinstance(device, str) else None
    if text == CPU:
        return CPU
    head, sep, index = (text or "").partition(":")
    if head != "cuda" or (index and not index.isdigit()) or (sep and not index):
        raise (TypeError if text is None else ValueError)(
            f"device must be 'cpu', 'cuda' or 'cuda:<index>', got "
            f"{type(device).__name__} {device!r}")
    from pwconv_cy import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"device={device!r}: the GPU path of pwconv is not available: "
                           f"{reason}; install CuPy (pip install pwconv[cuda12] or [cuda13])")
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if int(index or 0) >= n:
        raise ValueError(f"device={device!r}: there {'is' if n == 1 else 'are'} {n} CUDA "
                         f"device{'' if n == 1 else 's'} (cuda:0 to cuda:{n - 1})")
    return f"cuda:{int(index or 0)}"


def _cupy():
    import cupy

    return cupy


def _to_host(x) -> np.ndarray:
    """A parameter or result as a NumPy array: CuPy arrays copied to the host (an explicit
    transfer: save, to('cpu'), predict), NumPy arrays as they are."""
    return x.get() if kind_of(x) == "cupy" else np.asarray(x)


def _check_host_clouds(x, name: str) -> None:
    """predict reads and resamples clouds on the host: GPU arrays are refused, naming `name`."""
    if x is None or isinstance(x, np.ndarray):
        return
    if device_of(x, name) != CPU:
        raise TypeError(
            f"{name} is in GPU memory ({describe(x)}); predict reads and resamples clouds of any "
            "size on the host (then runs the model on its device), and pwconv never copies GPU "
            f"data to the host behind your back: pass {name} as a host array, or call forward / "
            "predict_proba with a (B, n_points, 3) batch on the model's device")


def _in_device_context(method):
    """Run `method` with the model's CUDA device current (kernels, masks and allocations go to
    the device the weights are on, also when it is not device 0)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._device_context():
            return method(self, *args, **kwargs)

    return wrapper


def _check_dilations(dilations):
    if isinstance(dilations, (str, bytes)) or not hasattr(dilations, "__len__") or not dilations:
        raise ValueError(f"dilations must be a non-empty sequence of integers, got {dilations!r}")
    return tuple(int(d) for d in dilations)


class _PointwiseNet:
    """Shared machinery: the pointwise trunk, parameter dicts, modes and the summary."""

    def _build_trunk(self, in_channels, channels, voxel_size, dilations, dtype, rng):
        self.dtype = nn._check_dtype(dtype)
        self.in_channels = nn._check_channels(in_channels, "in_channels")
        self.channels = nn._check_channels(channels, "channels")
        self.voxel_size = float(voxel_size)
        self.dilations = _check_dilations(dilations)
        self._layers: dict = {}  # name -> layer with parameters (in order)
        self.convs = []
        self.conv_selus = []
        c_in = self.in_channels
        for i, s in enumerate(self.dilations):
            conv = nn.PointwiseConv(c_in, self.channels, self.voxel_size, dilation=s,
                                    dtype=self.dtype, rng=rng)
            self._layers[f"conv{i}"] = conv
            self.convs.append(conv)
            self.conv_selus.append(nn.SELU())
            c_in = self.channels
        self.concat = nn.Concat(axis=-1)
        self.input_grad = None
        self.kernel_maps: dict = {}
        self._device = CPU

    @property
    def _all_layers(self) -> list:
        raise NotImplementedError

    # -- parameters -----------------------------------------------------------------------------

    @property
    def params(self) -> dict:
        """Flat dict ``"layer.param"`` -> the layer's own array (not a copy)."""
        return {f"{name}.{k}": v for name, layer in self._layers.items()
                for k, v in layer.params.items()}

    def set_params(self, new_params: dict) -> None:
        """Write new values (e.g. an optimiser's update) into the layers' arrays, in place.

        `new_params` must have exactly the keys of ``params``, the same shapes, and sit on the
        model's device (host arrays for a CPU model, CUDA arrays for a GPU one)."""
        current = self.params
        missing = sorted(set(current) - set(new_params))
        extra = sorted(set(new_params) - set(current))
        if missing or extra:
            raise ValueError(f"set_params: missing parameters {missing}, unexpected {extra}")
        values = {key: self._on_device(new_params[key], f"set_params: {key!r}")
                  for key in current}
        if self._device == CPU:
            values = {key: np.asarray(v) for key, v in values.items()}
        for key, arr in current.items():
            if tuple(values[key].shape) != tuple(arr.shape):
                raise ValueError(f"set_params: {key!r} must have shape {arr.shape}, "
                                 f"got {tuple(values[key].shape)}")
        with self._device_context():
            for key, arr in current.items():
                arr[...] = values[key].astype(arr.dtype, copy=False)

    # -- device -----------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """Where the weights live and the network runs: ``"cpu"`` or ``"cuda:<index>"``."""
        return self._device

    @property
    def array_module(self):
        """The module of the weights' arrays: numpy on the CPU, cupy on a CUDA device."""
        return np if self._device == CPU else _cupy()

    def to(self, device):
        """Move the weights to `device` (``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``) and
        return self.  The forward context and kernel maps of the last call are dropped (they
        live on the old device), so ``backward`` needs a new ``forward``.  An optimiser state
        made for the old device moves with ``optim.state_from_arrays(optim.state_to_arrays(
        state), xp=model.array_module)`` (under the model's CUDA device), or is made afresh
        (``optimizer.init(model.params)``)."""
        target = _parse_device(device)
        if target == self._device:
            return self
        with self._device_context(target):
            for layer in self._layers.values():
                for key, value in layer.params.items():
                    host = _to_host(value)
                    layer.params[key] = host if target == CPU else _cupy().asarray(host)
        self._device = target
        for layer in self._all_layers:
            layer._ctx = None
            layer.grads = {}
        self.kernel_maps, self.input_grad = {}, None
        return self

    def device_array(self, x, dtype=None):
        """`x` as an array on the model's device: a host -> GPU copy for host data on a GPU model
        (the one transfer pwconv makes, and only when asked), otherwise `x` read in place."""
        with self._device_context():
            if self._device == CPU:
                return np.asarray(x, dtype=dtype)
            if device_of(x, "x") == CPU:
                return self.array_module.asarray(np.asarray(x, dtype=dtype))
            x = self._on_device(x, "x")
            return x if dtype is None else x.astype(dtype, copy=False)

    def _device_repr(self) -> str:
        return "" if self._device == CPU else f", device={self._device!r}"

    def _device_context(self, device=None):
        """The CUDA device of `device` (default: the model's) as a context; a no-op for the CPU."""
        import contextlib

        device = self._device if device is None else device
        if device == CPU:
            return contextlib.nullcontext()
        return _cupy().cuda.Device(int(device.partition(":")[2]))

    def _on_device(self, x, name: str):
        """`x` on the model's device (GPU arrays read in place), or a TypeError naming `name`:
        pwconv never moves data between devices behind the caller's back."""
        if x is None:
            return None
        where = device_of(x, name)
        if self._device == CPU:
            if where != CPU:
                raise TypeError(
                    f"{name} is in GPU memory ({describe(x)}, {where}) but the model is on the "
                    f"CPU; pwconv never copies GPU data to the host behind your back: move the "
                    f"model with model.to('cuda'), or pass {name} as a host array")
            return x
        if where == CPU:
            raise TypeError(
                f"{name} is a host array ({describe(x)}) but the model is on {self._device}; "
                f"pwconv never copies host data to the GPU behind your back: pass {name} on "
                f"that device (model.device_array({name}) or cupy.asarray({name})), or move the "
                "model with model.to('cpu')")
        if where not in ("cuda:?", self._device):
            raise TypeError(f"{name} is on {where} ({describe(x)}) but the model is on "
                            f"{self._device}: pass {name} on the model's device, or move the "
                            f"model with model.to({where!r})")
        return to_device(x, name)

    @property
    def n_params(self) -> int:
        return nn.param_count(self._layers.values())

    def train(self, mode: bool = True):
        self.training = bool(mode)
        for layer in self._all_layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def summary(self) -> str:
        return nn.summary(self._all_layers)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- trunk ------------------------------------------------------------------------------------

    def _prepare(self, points, feats, offsets):
        """(points, feats) as contiguous arrays of the model's dtype, from arrays forward has
        checked to be on the model's device, and the kernel maps of every dilation."""
        xp = self.array_module
        pts = xp.ascontiguousarray(points, dtype=self.dtype)
        if feats is None:
            if self.in_channels != 3:
                raise ValueError(f"feats are required: the model has in_channels="
                                 f"{self.in_channels} (the default features, xyz, have 3)")
            x = pts
        else:
            x = xp.asarray(feats)
            if x.dtype != self.dtype:
                x = x.astype(self.dtype)
            if x.shape[:-1] != pts.shape[:-1] or x.shape[-1] != self.in_channels:
                raise ValueError(f"feats must have shape {pts.shape[:-1] + (self.in_channels,)}, "
                                 f"got {x.shape}")
        index = NeighborIndex(pts, self.voxel_size, offsets=offsets)
        dilations = sorted(set(self.dilations))
        self.kernel_maps = dict(zip(dilations, index.kernel_maps(3, dilations)))
        return pts, x

    def _trunk_forward(self, pts, x, offsets):
        outs = []
        h = x
        for conv, selu in zip(self.convs, self.conv_selus):
            # maps made from pts by _prepare just now: no fingerprint of pts per layer
            h = conv.forward(pts, h, offsets=offsets, kernel_map=self.kernel_maps[conv.dilation],
                             check_map=False)
            h = selu.forward(h)
            outs.append(h)
        return self.concat.forward(outs)

    def _trunk_backward(self, d_cat, grads, input_grad):
        check_bool(input_grad, "input_grad")
        d_outs, _ = self.concat.backward(d_cat)
        carry = None
        for i in reversed(range(len(self.convs))):
            d = d_outs[i] if carry is None else d_outs[i] + carry
            d, _ = self.conv_selus[i].backward(d)
            carry, g = self.convs[i].backward(d, feats_grad=i > 0 or input_grad)
            for k, v in g.items():
                grads[f"conv{i}.{k}"] = v
        self.input_grad = carry
        return grads

    def _ordered(self, grads):
        return {k: grads[k] for k in self.params}


class PointwiseCNNClassifier(_PointwiseNet):
    """The paper's classification network (SPEC §1) on dense batches (B, n_points, 3).

    Parameters
    ----------
    n_points : int
        Points per cloud (the flatten fixes it).
    n_classes, in_channels, channels, hidden : int
    voxel_size : float
        Kernel cell edge v of every pointwise layer.
    dilations : sequence of int
        À-trous strides of the pointwise layers.
    dropout : float
        Alpha-dropout rate after the hidden layer (training mode only).
    logits_selu : bool
        Apply SELU to the logits (the paper does; off by default).
    dtype : float32 or float64
    seed : int
        Seed of the initialisation and of the dropout masks.
    """

    def __init__(self, n_points=1024, n_classes=40, in_channels=3, channels=9, voxel_size=0.1,
                 dilations=(1, 2, 3, 4), hidden=512, dropout=0.5, logits_selu=False,
                 dtype=np.float32, seed=0):
        rng = np.random.default_rng(seed)
        self.n_points = nn._check_channels(n_points, "n_points")
        self.n_classes = nn._check_channels(n_classes, "n_classes")
        self.hidden = nn._check_channels(hidden, "hidden")
        self.dropout_rate = float(dropout)
        self.logits_selu = bool(logits_selu)
        self.seed = seed
        self._build_trunk(in_channels, channels, voxel_size, dilations, dtype, rng)
        width = self.n_points * self.channels * len(self.dilations)
        self.sort_flatten = nn.SortFlatten()
        self.fc1 = nn.Linear(width, self.hidden, dtype=self.dtype, rng=rng)
        self.fc1_selu = nn.SELU()
        self.dropout = nn.AlphaDropout(self.dropout_rate, rng=rng)
        self.fc2 = nn.Linear(self.hidden, self.n_classes, dtype=self.dtype, rng=rng)
        self.out_selu = nn.SELU() if self.logits_selu else None
        self._layers["fc1"] = self.fc1
        self._layers["fc2"] = self.fc2
        self.train()

    @property
    def config(self) -> dict:
        return {"class": type(self).__name__, "n_points": self.n_points,
                "n_classes": self.n_classes, "in_channels": self.in_channels,
                "channels": self.channels, "voxel_size": self.voxel_size,
                "dilations": list(self.dilations), "hidden": self.hidden,
                "dropout": self.dropout_rate, "logits_selu": self.logits_selu,
                "dtype": self.dtype.name, "seed": self.seed}

    @property
    def _all_layers(self) -> list:
        layers = []
        for conv, selu in zip(self.convs, self.conv_selus):
            layers += [conv, selu]
        layers += [self.concat, self.sort_flatten, self.fc1, self.fc1_selu, self.dropout,
                   self.fc2]
        if self.out_selu is not None:
            layers.append(self.out_selu)
        return layers

    @_in_device_context
    def forward(self, points, feats=None):
        """Logits (B, n_classes) for a dense batch `points` (B, n_points, 3); `feats`
        (B, n_points, in_channels) default to the coordinates."""
        points = self._on_device(points, "points")
        feats = self._on_device(feats, "feats")
        shape = np.shape(points)
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"points must be a dense batch of shape (B, n_points, 3), "
                             f"got {shape}")
        if shape[1] != self.n_points:
            raise ValueError(f"the classifier was built for n_points={self.n_points} points per "
                             f"cloud, got clouds of {shape[1]} points (shape {shape}); resample "
                             "the clouds or build the model with a matching n_points")
        pts, x = self._prepare(points, feats, None)
        h = self._trunk_forward(pts, x, None)
        h = self.sort_flatten.forward(pts, h)
        h = self.fc1_selu.forward(self.fc1.forward(h))
        h = self.dropout.forward(h)
        z = self.fc2.forward(h)
        if self.out_selu is not None:
            z = self.out_selu.forward(z)
        return z

    @_in_device_context
    def backward(self, d_logits, *, input_grad=True) -> dict:
        """Gradients of all parameters (keyed like ``params``) for the upstream gradient
        `d_logits` (B, n_classes); also sets ``input_grad`` (d feats), unless
        ``input_grad=False``, which skips computing it (training needs no input gradient) and
        sets ``input_grad`` to None."""
        grads = {}
        d = self._on_device(d_logits, "d_logits")
        if self.out_selu is not None:
            d, _ = self.out_selu.backward(d)
        d, g = self.fc2.backward(d)
        grads.update({f"fc2.{k}": v for k, v in g.items()})
        d, _ = self.dropout.backward(d)
        d, _ = self.fc1_selu.backward(d)
        d, g = self.fc1.backward(d)
        grads.update({f"fc1.{k}": v for k, v in g.items()})
        d, _ = self.sort_flatten.backward(d)
        self._trunk_backward(d, grads, input_grad)
        return self._ordered(grads)

    @_in_device_context
    def predict_proba(self, points, feats=None):
        """Class probabilities (B, n_classes) on the model's device, computed in evaluation mode
        (the mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            z = self.forward(points, feats)
        finally:
            self.train(was_training)
        z = z - z.max(axis=-1, keepdims=True)
        e = self.array_module.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def predict(self, clouds, *, seed=0, batch_size=32):
        """Class probabilities for clouds of any size.

        Each cloud is normalised like the training data (centred on its centroid, farthest
        point at distance 1: :func:`pwconv_cy.data.normalize_clouds`), then resampled to
        ``n_points`` (:func:`pwconv_cy.data.resample`: a random subset, or every point plus
        random duplicates when the cloud is smaller) with ``numpy.random.default_rng(seed)``,
        drawn cloud by cloud in order, so the result depends only on the clouds and `seed`.

        Parameters
        ----------
        clouds : (B, m, 3) array, or a sequence of (m_i, 3) arrays (sizes may differ, m_i >= 1)
        seed : int
            Seed of the resampling.
        batch_size : int
            Clouds per forward pass.

        The clouds are read and resampled on the host, also for a model on a GPU: each batch
        is then copied to the device and its probabilities copied back.

        Returns
        -------
        (B, n_classes) NumPy float array
            Probabilities (rows sum to 1); ``argmax(axis=1)`` gives the labels.
        """
        _check_host_clouds(clouds, "clouds")
        if isinstance(clouds, np.ndarray) and clouds.ndim == 3:
            clouds = list(clouds)
        if isinstance(clouds, np.ndarray) or not hasattr(clouds, "__len__"):
            raise ValueError(f"clouds must be a (B, m, 3) array or a sequence of (m, 3) arrays, "
                             f"got {type(clouds).__name__} of shape {np.shape(clouds)}")
        batch_size = nn._check_channels(batch_size, "batch_size")
        rng = np.random.default_rng(seed)
        fixed = np.empty((len(clouds), self.n_points, 3), dtype=self.dtype)
        for i, cloud in enumerate(clouds):
            _check_host_clouds(cloud, f"cloud {i}")
            cloud = np.asarray(cloud)
            if cloud.ndim != 2 or cloud.shape[1] != 3 or cloud.shape[0] == 0:
                raise ValueError(f"cloud {i} must have shape (m, 3) with m >= 1, got "
                                 f"{cloud.shape}")
            if not np.isfinite(cloud).all():
                raise ValueError(f"cloud {i} has non-finite coordinates (NaN or Inf); every "
                                 "coordinate must be finite")
            fixed[i] = data.resample(data.normalize_clouds(cloud), self.n_points, rng)
        probs = np.empty((len(clouds), self.n_classes), dtype=self.dtype)
        for start in range(0, len(clouds), batch_size):
            batch = self.device_array(fixed[start:start + batch_size])
            probs[start:start + batch_size] = _to_host(self.predict_proba(batch))
        return probs

    @property
    def dropout_rng(self) -> np.random.Generator:
        """The Generator of the alpha-dropout masks (by default the initialisation's); a
        trainer sets its own to replay a run from one saved generator state."""
        return self.dropout._rng

    @dropout_rng.setter
    def dropout_rng(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"dropout_rng must be a numpy.random.Generator, got "
                            f"{type(rng).__name__}")
        self.dropout._rng = rng

    def __repr__(self) -> str:
        return (f"PointwiseCNNClassifier(n_points={self.n_points}, n_classes={self.n_classes}, "
                f"channels={self.channels}, hidden={self.hidden}, n_params={self.n_params}"
                f"{self._device_repr()})")


class PointwiseCNNSegmenter(_PointwiseNet):
    """The paper's segmentation network (SPEC §1): the pointwise trunk, then a fifth pointwise
    layer ``4*channels -> n_classes`` (stride 1, no activation) giving per-point logits.

    ``forward(points, feats=None, offsets=None)``: packed points (N, 3) with `offsets` (B + 1,)
    (or one cloud without) give logits (N, n_classes); dense points (B, n, 3) give (B, n,
    n_classes).  ``backward`` takes the gradient of that shape.
    """

    def __init__(self, n_classes, in_channels=3, channels=9, voxel_size=0.1,
                 dilations=(1, 2, 3, 4), dtype=np.float32, seed=0):
        rng = np.random.default_rng(seed)
        self.n_classes = nn._check_channels(n_classes, "n_classes")
        self.seed = seed
        self._build_trunk(in_channels, channels, voxel_size, dilations, dtype, rng)
        self.head = nn.PointwiseConv(self.channels * len(self.dilations), self.n_classes,
                                     self.voxel_size, dilation=1, dtype=self.dtype, rng=rng)
        self._layers[f"conv{len(self.dilations)}"] = self.head
        self.train()

    @property
    def config(self) -> dict:
        return {"class": type(self).__name__, "n_classes": self.n_classes,
                "in_channels": self.in_channels, "channels": self.channels,
                "voxel_size": self.voxel_size, "dilations": list(self.dilations),
                "dtype": self.dtype.name, "seed": self.seed}

    @property
    def _all_layers(self) -> list:
        layers = []
        for conv, selu in zip(self.convs, self.conv_selus):
            layers += [conv, selu]
        return layers + [self.concat, self.head]

    def _prepare(self, points, feats, offsets):
        pts, x = super()._prepare(points, feats, offsets)
        if 1 not in self.kernel_maps:  # the head's stride-1 map
            self.kernel_maps[1] = NeighborIndex(pts, self.voxel_size,
                                                offsets=offsets).kernel_map(3, 1)
        return pts, x

    @_in_device_context
    def forward(self, points, feats=None, offsets=None):
        points = self._on_device(points, "points")
        feats = self._on_device(feats, "feats")
        shape = np.shape(points)
        if len(shape) not in (2, 3) or shape[-1] != 3:
            raise ValueError(f"points must be packed (N, 3) or dense (B, n, 3), got {shape}")
        if len(shape) == 3 and offsets is not None:
            raise ValueError("offsets are for packed (N, 3) points; dense (B, n, 3) points "
                             "take none")
        self._offsets = offsets
        pts, x = self._prepare(points, feats, offsets)
        h = self._trunk_forward(pts, x, offsets)
        return self.head.forward(pts, h, offsets=offsets, kernel_map=self.kernel_maps[1],
                                 check_map=False)

    @_in_device_context
    def backward(self, d_logits, *, input_grad=True) -> dict:
        """Gradients of all parameters (keyed like ``params``); also sets ``input_grad`` (d feats),
        or skips it and sets None with ``input_grad=False``."""
        grads = {}
        d, g = self.head.backward(self._on_device(d_logits, "d_logits"))
        grads.update({f"conv{len(self.dilations)}.{k}": v for k, v in g.items()})
        self._trunk_backward(d, grads, input_grad)
        return self._ordered(grads)

    def __repr__(self) -> str:
        return (f"PointwiseCNNSegmenter(n_classes={self.n_classes}, channels={self.channels}, "
                f"n_params={self.n_params}{self._device_repr()})")


_CLASSES = {"PointwiseCNNClassifier": PointwiseCNNClassifier,
            "PointwiseCNNSegmenter": PointwiseCNNSegmenter}


def save(model, path, extra=None) -> None:
    """Write `model`'s parameters, configuration (JSON) and the format version to ``.npz``.

    The parameters of a model on a GPU are copied to the host for writing; the file does not
    record the device (:func:`load` takes one).

    The file is written atomically: to a temporary file in the same folder, then moved over
    `path` with ``os.replace``, so `path` always holds a complete file (the old or the new).
    As with ``np.savez``, ``.npz`` is appended to a path without it.

    Parameters
    ----------
    model : PointwiseCNNClassifier or PointwiseCNNSegmenter
    path : str or os.PathLike
    extra : dict of str to array-like, optional
        Arrays stored alongside (``"extra/<key>"``), returned by :func:`load_checkpoint`.
    """
    if type(model).__name__ not in _CLASSES:
        raise TypeError(f"save expects a PointwiseCNNClassifier or PointwiseCNNSegmenter, "
                        f"got {type(model).__name__}")
    arrays = {_PARAM_PREFIX + k: _to_host(v) for k, v in model.params.items()}
    arrays[_CONFIG_KEY] = np.array(json.dumps(model.config))
    arrays[_VERSION_KEY] = np.array(format_version, dtype=np.int64)
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"extra keys must be str, got {type(key).__name__} {key!r}")
        arrays[_EXTRA_PREFIX + key] = np.asarray(value)
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load(path, device="cpu"):
    """Rebuild the model saved by :func:`save` (no pickle) on `device`; see
    :func:`load_checkpoint`."""
    return load_checkpoint(path, device=device)[0]


def load_checkpoint(path, device="cpu"):
    """The model saved by :func:`save` and its extra arrays.

    `device` (``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``) is where the model is put; it is
    checked before the file is read.  The extra arrays stay NumPy arrays on the host.

    Returns
    -------
    model : PointwiseCNNClassifier or PointwiseCNNSegmenter
    extra : dict of str to numpy.ndarray
        The `extra` given to :func:`save` (empty when none).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A file that is not an ``.npz``, or not a pwconv model file, of another format version,
        without a configuration, or with missing, extra or mis-shaped parameters.
    """
    device = _parse_device(device)
    with data.open_npz(path, context="not a pwconv model file: ") as f:
        keys = set(f.files)
        if _VERSION_KEY not in keys:
            raise ValueError(f"{path}: not a pwconv model file (no {_VERSION_KEY!r} entry)")
        version = f[_VERSION_KEY]
        if version.shape != () or int(version) != format_version:
            raise ValueError(f"{path}: unsupported model format version {version.tolist()!r} "
                             f"(this pwconv reads version {format_version})")
        if _CONFIG_KEY not in keys:
            raise ValueError(f"{path}: the model configuration ({_CONFIG_KEY!r}) is missing")
        try:
            config = json.loads(str(f[_CONFIG_KEY]))
            cls = _CLASSES[config.pop("class")]
            if "dilations" in config:
                config["dilations"] = tuple(config["dilations"])
            model = cls(**config)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: invalid model configuration ({exc})") from None
        stored = {k[len(_PARAM_PREFIX):]: f[k] for k in keys if k.startswith(_PARAM_PREFIX)}
        extra = {k[len(_EXTRA_PREFIX):]: f[k] for k in keys if k.startswith(_EXTRA_PREFIX)}
        others = sorted(keys - {_VERSION_KEY, _CONFIG_KEY}
                        - {_PARAM_PREFIX + k for k in stored}
                        - {_EXTRA_PREFIX + k for k in extra})
        expected = model.params
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected)) + others
        if missing or unexpected:
            raise ValueError(f"{path}: parameters do not match the {cls.__name__} configuration:"
                             f" missing {missing}, unexpected {unexpected}")
        for k, arr in expected.items():
            if stored[k].shape != arr.shape:
                raise ValueError(f"{path}: parameter {k!r} has shape {stored[k].shape}, the "
                                 f"model expects {arr.shape}")
        model.set_params(stored)
    return model.to(device), extra
