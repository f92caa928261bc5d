"""Optimisers, learning-rate schedules and gradient clipping for dicts of named arrays.

Optimisers follow the ``init``/``update`` pattern of optax with explicit state::

    opt = SGD(lr=exponential_decay(0.001, 0.96, 100_000), momentum=0.9)   # the paper's recipe
    state = opt.init(layer.params)
    for ...:
        _, grads = layer.backward(grad_out)
        new_params, state = opt.update(layer.params, grads, state)
        layer.params.update(new_params)

``update`` is functional: it never modifies ``params``, ``grads`` or ``state`` and returns new
dicts of new arrays (keys in the order of ``params``).  The layer picks the new values up with
``layer.params.update(new_params)`` (the layer keeps its own dict object).  With
``update(..., inplace=True)`` the parameter and state arrays are overwritten instead and returned
in the result: no allocation, which for large layers (the classifier's 19 M-parameter head) is
most of the update's cost.

NumPy float32/float64 parameters are updated by one fused C++ pass (OpenMP, the ``num_threads``
rule of the rest of the library) that performs the very operations of the array expressions in
the docstrings, in the parameter's dtype and order, so both give bit-identical results; other
array kinds (CuPy, ...) use the expressions.

Every parameter is updated with its own array module (NumPy, or CuPy and the like, found from
``type(array).__module__`` in ``sys.modules``; nothing is imported here), in its own dtype.
Gradients are converted with that module's ``asarray``.

The state is a dict: ``state["step"]`` (a Python ``int``, the number of updates done so far) and
one dict of arrays per slot (``"momentum_buffer"`` for SGD with momentum, ``"exp_avg"`` and
``"exp_avg_sq"`` for Adam/AdamW), keyed like ``params``.  :func:`state_to_arrays` and
:func:`state_from_arrays` convert it to and from a flat dict of NumPy arrays that ``np.savez``
stores without pickle.

A learning rate is a float or a schedule, a callable ``step -> lr``; the update number ``k``
(counting from 0) uses ``lr(k)``, so ``lr(state["step"])`` before the update.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys

import numpy as np

from . import _core
from ._arrays import cupy_device_context, host_scalars
from ._validation import check_bool, check_num_threads

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "clip_by_global_norm",
    "cosine_with_warmup",
    "exponential_decay",
    "state_from_arrays",
    "state_to_arrays",
]


# --------------------------------------------------------------------------------------------
# helpers


def _array_module(a):
    """The module of array ``a`` (``numpy``, ``cupy``, ...) looked up in ``sys.modules``."""
    module = sys.modules.get(type(a).__module__.partition(".")[0])
    if module is None or not hasattr(module, "asarray"):
        return np
    return module


def _to_numpy(a) -> np.ndarray:
    """A host NumPy copy of a NumPy or device array (CuPy's ``.get()``)."""
    if isinstance(a, np.ndarray):
        return np.array(a, copy=True)
    if hasattr(a, "get"):
        return np.asarray(a.get())
    return np.array(a, copy=True)


def _is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_nonneg_float(value, name: str) -> float:
    """``value`` as a float, finite and >= 0, else TypeError/ValueError naming ``name``."""
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def _check_unit_interval(value, name: str) -> float:
    """``value`` as a float in [0, 1), else TypeError/ValueError naming ``name``."""
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return int(value)


def _check_lr(lr):
    """A float lr (finite, >= 0) or a callable schedule."""
    if callable(lr):
        return lr
    if not _is_real_number(lr):
        raise TypeError(
            f"lr must be a real number or a schedule (callable step -> lr), "
            f"got {type(lr).__name__} {lr!r}"
        )
    return _check_nonneg_float(lr, "lr")


def _lr_at(lr, step: int) -> float:
    """The learning rate of update number ``step``; a schedule's value is checked too."""
    if not callable(lr):
        return lr
    value = lr(step)
    if not _is_real_number(value) and not (isinstance(value, np.ndarray) and value.ndim == 0):
        raise TypeError(
            f"lr schedule must return a real number, got {type(value).__name__} at step {step}"
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"lr must be finite and >= 0, got {value!r} from the schedule at step {step}"
        )
    return value


def _check_params(params, name: str = "params") -> None:
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__} {key!r}")
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name}[{key!r}] must be an array, got {type(value).__name__}")


def _check_grads(params, grads) -> None:
    """``grads`` must have exactly the keys and shapes of ``params``."""
    _check_params(grads, "grads")
    if set(grads) != set(params):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ValueError(
            f"grads must have the keys of params {sorted(params)}, got {sorted(grads)} "
            f"(missing {missing}, unexpected {extra})"
        )
    for key, p in params.items():
        if tuple(grads[key].shape) != tuple(p.shape):
            raise ValueError(
                f"grads[{key!r}] must have the shape of params[{key!r}] {tuple(p.shape)}, "
                f"got {tuple(grads[key].shape)}"
            )


def _check_state(params, state, slots) -> int:
    """The step count of ``state``, after checking its slots against ``params``."""
    if not isinstance(state, dict) or "step" not in state:
        raise TypeError(f"state must be a dict made by init(), got {type(state).__name__}")
    step = state["step"]
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise ValueError(f"state['step'] must be an integer >= 0, got {step!r}")
    for slot in slots:
        if slot not in state:
            raise ValueError(
                f"state must have the slot {slot!r} (made by init()), got {sorted(state)}"
            )
        if set(state[slot]) != set(params):
            raise ValueError(
                f"state[{slot!r}] must have the keys of params {sorted(params)}, "
                f"got {sorted(state[slot])}"
            )
    return int(step)


def _zeros_like(params) -> dict:
    return {k: _array_module(p).zeros_like(p) for k, p in params.items()}


def _fused_operands(p, slots, g, inplace: bool):
    """Flat views ``(param, grad, *slots)`` for the fused C++ update, or None where it does not
    apply (not all NumPy arrays of one float32/float64 dtype and shape; or, in place, an array
    that is read-only or not C-contiguous, so that its flat view would be a copy).  Without
    `inplace`, the parameter and slots are copied first; the gradient is cast to the parameter's
    dtype like ``asarray(g, dtype=p.dtype)``."""
    arrays = (p, *slots)
    if not all(type(a) is np.ndarray for a in arrays):
        return None
    if p.dtype not in (np.float32, np.float64) or any(
            a.dtype != p.dtype or a.shape != p.shape for a in slots):
        return None
    if inplace:
        if not all(a.flags.c_contiguous and a.flags.writeable for a in arrays):
            return None
    else:
        arrays = tuple(np.array(a, order="C", copy=True) for a in arrays)
    grad = np.ascontiguousarray(np.asarray(g, dtype=p.dtype)).reshape(-1)
    return arrays, tuple(a.reshape(-1) for a in arrays), grad


def _check_writeable(params, state, slots) -> None:
    """For ``inplace=True``: every parameter and slot array must accept writes."""
    for where, arrays in [("params", params)] + [(f"state[{s!r}]", state[s]) for s in slots]:
        for key, a in arrays.items():
            flags = getattr(a, "flags", None)
            if flags is not None and not getattr(flags, "writeable", True):
                raise ValueError(f"inplace=True needs writeable arrays, but {where}[{key!r}] is "
                                 "read-only; pass inplace=False or a writeable copy")


def _store(inplace: bool, target, value):
    """`value` written into `target` (in place) or `value` itself."""
    if inplace:
        target[...] = value
        return target
    return value


_UPDATE_DOC = """One {name} step.

Parameters
----------
params : dict of str to array
    Current parameters.
grads : dict of str to array
    Gradients, with the keys and shapes of ``params``.
state : dict
    State from :meth:`init` or a previous :meth:`update`.
inplace : bool, default False
    Overwrite the arrays of ``params`` and of the state's slots (and return them)
    instead of leaving every input unmodified.

Returns
-------
new_params : dict of str to array
    Updated parameters (new arrays, or those of ``params`` with ``inplace``; dtypes
    of ``params``).
new_state : dict
    The state after this step (``step`` incremented).
"""


def _begin_update(optimizer, params, grads, state, inplace) -> tuple:
    """The checks every ``update`` starts with; returns ``(step, lr, threads)``."""
    _check_params(params)
    _check_grads(params, grads)
    step = _check_state(params, state, optimizer._slots)
    check_bool(inplace, "inplace")
    if inplace:
        _check_writeable(params, state, optimizer._slots)
    return step, _lr_at(optimizer.lr, step), check_num_threads(None)


# --------------------------------------------------------------------------------------------
# optimisers


def _on_params_device(update):
    """Run an optimiser's update with the parameters' CUDA device current (CuPy allocates on the
    current device): parameters on cuda:1 are updated there."""
    @functools.wraps(update)
    def wrapper(self, params, *args, **kwargs):
        with cupy_device_context(params):
            return update(self, params, *args, **kwargs)

    return wrapper


class _Optimizer:
    """The state's set-up shared by the optimisers: a step count and, per slot the optimiser
    keeps (``_slots``), one array of zeros per parameter."""

    _slots: tuple = ()

    def init(self, params: dict) -> dict:
        """The initial state for ``params``.

        Parameters
        ----------
        params : dict of str to array
            The parameters to optimise.

        Returns
        -------
        state : dict
            ``{"step": 0}`` plus, for each slot of the optimiser, zeros like ``params``: SGD
            keeps ``"momentum_buffer"`` when ``momentum > 0``; Adam and AdamW keep
            ``"exp_avg"`` and ``"exp_avg_sq"``.
        """
        _check_params(params)
        state = {"step": 0}
        with cupy_device_context(params):  # the slots beside the parameters, on their device
            for slot in self._slots:
                state[slot] = _zeros_like(params)
        return state

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "update" in cls.__dict__:
            cls.update = _on_params_device(cls.__dict__["update"])


class SGD(_Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay.

    PyTorch semantics (``torch.optim.SGD`` with ``dampening=0``): for each parameter ``p`` with
    gradient ``g``, update number ``t`` (from 0) and ``lr_t = lr(t)``::

        g = g + weight_decay * p                  # L2 added to the gradient
        b = momentum * b + g                      # b starts at 0, so b = g at the first update
        d = g + momentum * b if nesterov else b   # d = g when momentum == 0
        p = p - lr_t * d

    The paper trains with ``SGD(exponential_decay(0.001, 0.96, 100_000), momentum=0.9)``.

    Parameters
    ----------
    lr : float or callable
        Learning rate (finite, >= 0) or a schedule ``step -> lr``.
    momentum : float, default 0.0
        Momentum factor in [0, 1).
    nesterov : bool, default False
        Nesterov momentum; requires ``momentum > 0``.
    weight_decay : float, default 0.0
        L2 coefficient (finite, >= 0) added to the gradient.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``lr`` is negative or not finite, ``momentum`` is outside [0, 1), ``weight_decay`` is
        negative or not finite, or ``nesterov`` is set without momentum.
    """

    def __init__(
        self, lr, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
    ):
        self.lr = _check_lr(lr)
        self.momentum = _check_unit_interval(momentum, "momentum")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError(f"nesterov=True requires momentum > 0, got momentum={self.momentum!r}")
        self.weight_decay = _check_nonneg_float(weight_decay, "weight_decay")

    @property
    def _slots(self):
        return ("momentum_buffer",) if self.momentum > 0 else ()

    def update(self, params: dict, grads: dict, state: dict, *, inplace: bool = False):
        step, lr, threads = _begin_update(self, params, grads, state, inplace)
        mu, wd = self.momentum, self.weight_decay
        new_params, new_buf = {}, {}
        for key, p in params.items():
            slots = (state["momentum_buffer"][key],) if mu > 0 else ()
            fused = _fused_operands(p, slots, grads[key], inplace)
            if fused is not None:
                arrays, flat, g = fused
                _core.sgd_update_(flat[0], g, flat[1] if mu > 0 else None, lr, mu, wd,
                                  self.nesterov, threads)
                new_params[key] = arrays[0]
                if mu > 0:
                    new_buf[key] = arrays[1]
                continue
            xp = _array_module(p)
            g = xp.asarray(grads[key], dtype=p.dtype)
            if wd != 0.0:
                g = g + wd * p
            if mu > 0:
                b = mu * slots[0] + g
                new_buf[key] = _store(inplace, slots[0], b)
                d = g + mu * b if self.nesterov else b
            else:
                d = g
            new_params[key] = _store(inplace, p, p - lr * d)
        new_state = {"step": step + 1}
        if mu > 0:
            new_state["momentum_buffer"] = new_buf
        return new_params, new_state

    update.__doc__ = _UPDATE_DOC.format(name="SGD")

    def __repr__(self) -> str:
        return (
            f"SGD(lr={self.lr!r}, momentum={self.momentum!r}, nesterov={self.nesterov!r}, "
            f"weight_decay={self.weight_decay!r})"
        )


class Adam(_Optimizer):
    """Adam with bias correction and optional L2 weight decay added to the gradient.

    PyTorch semantics (``torch.optim.Adam``, ``amsgrad=False``): for update number ``t``
    (counted from 1 here) and ``lr_t = lr(t - 1)``::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p = p - (lr_t / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Parameters
    ----------
    lr : float or callable
        Learning rate (finite, >= 0) or a schedule ``step -> lr``.
    betas : tuple of two floats, default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator; must be finite and > 0.
    weight_decay : float, default 0.0
        L2 coefficient (finite, >= 0) added to the gradient.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``lr`` is negative or not finite, a beta is outside [0, 1), ``eps <= 0`` or
        ``weight_decay`` is negative or not finite.
    """

    _slots = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, lr, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr = _check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_unit_interval(betas[0], "betas[0]"),
            _check_unit_interval(betas[1], "betas[1]"),
        )
        if not _is_real_number(eps):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {float(eps)!r}")
        self.eps = float(eps)
        self.weight_decay = _check_nonneg_float(weight_decay, "weight_decay")

    def update(self, params: dict, grads: dict, state: dict, *, inplace: bool = False):
        step, lr, threads = _begin_update(self, params, grads, state, inplace)
        t = step + 1
        beta1, beta2 = self.betas
        wd = self.weight_decay
        step_size = lr / (1.0 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        new_params, new_m, new_v = {}, {}, {}
        for key, p in params.items():
            m0, v0 = state["exp_avg"][key], state["exp_avg_sq"][key]
            fused = _fused_operands(p, (m0, v0), grads[key], inplace)
            if fused is not None:
                arrays, flat, g = fused
                _core.adam_update_(flat[0], g, flat[1], flat[2], step_size,
                                   bias_correction2_sqrt, beta1, beta2, self.eps, wd,
                                   1.0 - lr * wd, self._decoupled, threads)
                new_params[key], new_m[key], new_v[key] = arrays
                continue
            xp = _array_module(p)
            g = xp.asarray(grads[key], dtype=p.dtype)
            p_in = p
            if wd != 0.0:
                if self._decoupled:
                    p = p * (1.0 - lr * wd)
                else:
                    g = g + wd * p
            m = beta1 * m0 + (1.0 - beta1) * g
            v = beta2 * v0 + (1.0 - beta2) * (g * g)
            denom = xp.sqrt(v) / bias_correction2_sqrt + self.eps
            new_params[key] = _store(inplace, p_in, p - step_size * (m / denom))
            new_m[key], new_v[key] = _store(inplace, m0, m), _store(inplace, v0, v)
        return new_params, {"step": t, "exp_avg": new_m, "exp_avg_sq": new_v}

    update.__doc__ = _UPDATE_DOC.format(name="Adam")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}, "
            f"weight_decay={self.weight_decay!r})"
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's ``torch.optim.AdamW``.

    The parameter is first shrunk, ``p = p * (1 - lr_t * weight_decay)``, then updated by Adam
    without any L2 term in the gradient.

    Parameters
    ----------
    lr : float or callable
        Learning rate (finite, >= 0) or a schedule ``step -> lr``.
    betas : tuple of two floats, default (0.9, 0.999)
        Decay rates of the moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator; must be finite and > 0.
    weight_decay : float, default 0.01
        Decoupled decay coefficient (finite, >= 0).

    Raises
    ------
    TypeError, ValueError
        As for :class:`Adam`.
    """

    _decoupled = True

    def __init__(self, lr, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------
# schedules


def exponential_decay(lr: float, decay_rate: float, decay_steps: int, staircase: bool = True):
    """Exponential learning-rate decay, ``lr * decay_rate ** (step / decay_steps)``.

    With ``staircase=True`` the exponent is ``floor(step / decay_steps)``: the paper's schedule
    is ``exponential_decay(0.001, 0.96, 100_000)``, i.e. ``0.001 * 0.96**k`` for steps
    ``k * 100_000 <= step < (k + 1) * 100_000``.

    Parameters
    ----------
    lr : float
        Initial learning rate, finite and >= 0.
    decay_rate : float
        Factor per ``decay_steps`` steps, finite and > 0.
    decay_steps : int
        Steps per decay, > 0.
    staircase : bool, default True
        Decay in whole steps of ``decay_steps`` (True) or continuously (False).

    Returns
    -------
    schedule : callable
        ``step -> lr`` for integer ``step >= 0``, returning a Python float.
    """
    lr = _check_nonneg_float(lr, "lr")
    decay_rate = _check_nonneg_float(decay_rate, "decay_rate")
    if decay_rate == 0.0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate!r}")
    decay_steps = _check_positive_int(decay_steps, "decay_steps")
    staircase = bool(staircase)

    def schedule(step) -> float:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        exponent = step // decay_steps if staircase else step / decay_steps
        return lr * decay_rate**exponent

    return schedule


def cosine_with_warmup(lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0):
    """Linear warm-up from 0 to ``lr``, then cosine decay to ``final_lr``.

    ``lr * step / warmup_steps`` for ``step < warmup_steps``; then, with
    ``s = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1],
    ``final_lr + (lr - final_lr) * (1 + cos(pi * s)) / 2``.  So ``schedule(0) == 0`` when there
    is a warm-up (else ``lr``), ``schedule(warmup_steps) == lr`` and
    ``schedule(step) == final_lr`` for ``step >= total_steps``.

    Parameters
    ----------
    lr : float
        Peak learning rate, finite and >= 0.
    total_steps : int
        Steps of warm-up plus decay, > 0.
    warmup_steps : int, default 0
        Steps of linear warm-up, ``0 <= warmup_steps <= total_steps``.
    final_lr : float, default 0.0
        Learning rate at and after ``total_steps``, finite and >= 0.

    Returns
    -------
    schedule : callable
        ``step -> lr`` for integer ``step >= 0``, returning a Python float.
    """
    lr = _check_nonneg_float(lr, "lr")
    final_lr = _check_nonneg_float(final_lr, "final_lr")
    total_steps = _check_positive_int(total_steps, "total_steps")
    if not isinstance(warmup_steps, numbers.Integral) or isinstance(warmup_steps, bool):
        raise TypeError(f"warmup_steps must be an integer, got {type(warmup_steps).__name__}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    warmup_steps = int(warmup_steps)
    decay_steps = total_steps - warmup_steps

    def schedule(step) -> float:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < warmup_steps:
            return lr * step / warmup_steps
        if decay_steps == 0:
            return final_lr
        s = min(1.0, (step - warmup_steps) / decay_steps)
        return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * s))

    return schedule


# --------------------------------------------------------------------------------------------
# clipping


def clip_by_global_norm(grads: dict, max_norm: float):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    The global norm is ``sqrt(sum over arrays of sum(g**2))`` (accumulated in float64).  Below or
    at ``max_norm`` the gradients are returned unchanged (the same array objects); above, every
    array is multiplied by ``max_norm / norm``.

    Parameters
    ----------
    grads : dict of str to array
        Gradients (any array module).
    max_norm : float
        Largest allowed global norm, finite and >= 0.

    Returns
    -------
    clipped : dict of str to array
        The (possibly scaled) gradients, same keys, shapes and dtypes.
    norm : float
        The global norm before clipping.
    """
    _check_params(grads, "grads")
    max_norm = _check_nonneg_float(max_norm, "max_norm")
    with cupy_device_context(grads):
        return _clip(grads, max_norm)


def _clip(grads: dict, max_norm: float):
    """clip_by_global_norm's work, on the gradients' device."""
    squares = []
    for g in grads.values():
        g64 = g.astype(np.float64)
        squares.append(_array_module(g).sum(g64 * g64))
    # one device -> host transfer for all the arrays' sums (each would wait for the queue),
    # then added in the same order as ever
    total = 0.0
    for s in host_scalars(squares):
        total += float(s)
    norm = math.sqrt(total)
    if norm <= max_norm:
        return dict(grads), norm
    scale = max_norm / norm
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, norm


# --------------------------------------------------------------------------------------------
# state save / load


def state_to_arrays(state: dict) -> dict:
    """A flat dict of host NumPy arrays for ``np.savez`` (no pickle needed).

    ``"step"`` becomes a 0-d ``int64`` array, ``"slots"`` a string array of the slot names (so
    that empty slots survive); slot ``s`` of parameter ``name`` becomes the key ``"s/name"``
    (parameter names may themselves contain ``/``).

    Parameters
    ----------
    state : dict
        An optimiser state.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        Copies on the host.
    """
    if not isinstance(state, dict) or "step" not in state:
        raise TypeError(
            f"state must be a dict made by an optimiser's init(), got {type(state).__name__}"
        )
    slots = [slot for slot in state if slot != "step"]
    arrays = {
        "step": np.asarray(int(state["step"]), dtype=np.int64),
        "slots": np.array(slots, dtype=np.str_),
    }
    for slot in slots:
        values = state[slot]
        if "/" in slot or not isinstance(values, dict):
            raise ValueError(f"state[{slot!r}] must be a dict of arrays with a name without '/'")
        for name, value in values.items():
            arrays[f"{slot}/{name}"] = _to_numpy(value)
    return arrays


def state_from_arrays(arrays, xp=None) -> dict:
    """The optimiser state stored by :func:`state_to_arrays`.

    Parameters
    ----------
    arrays : mapping of str to array
        For example the result of ``np.load(path, allow_pickle=False)``.
    xp : module, optional
        Array module to put the slot arrays in (``cupy`` to resume on a GPU); NumPy by default.

    Returns
    -------
    state : dict
        ``{"step": int, slot: {name: array}}``, equal to the saved state.
    """
    keys = list(arrays.keys())
    if "step" not in keys or "slots" not in keys:
        raise ValueError(f"arrays must contain 'step' and 'slots', got keys {sorted(keys)}")
    state = {"step": int(np.asarray(arrays["step"]))}
    for slot in np.asarray(arrays["slots"]).tolist():
        state[str(slot)] = {}
    for key in keys:
        if key in ("step", "slots"):
            continue
        slot, sep, name = key.partition("/")
        if not sep:
            raise ValueError(f"arrays keys must be 'step' or 'slot/name', got {key!r}")
        if slot not in state:
            raise ValueError(
                f"arrays key {key!r} names a slot not listed in 'slots' {sorted(state)}"
            )
        value = np.array(arrays[key], copy=True)
        state[slot][name] = value if xp is None else xp.asarray(value)
    return state
