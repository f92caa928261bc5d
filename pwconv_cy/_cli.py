"""Helpers shared by the train / evaluate / predict commands: argument types, the thread limit,
loading a classifier checkpoint with argparse-style errors, and atomic text files."""

from __future__ import annotations

import argparse
import contextlib
import sys

from pwconv_cy import models
from pwconv_cy._atomic import atomic_open


def _int_at_least(minimum: int, wording: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None / False of required options and flags."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def command_parser(prog: str, description: str, checkpoint: bool) -> argparse.ArgumentParser:
    """The parser of a pwconv command; with `checkpoint`, its required ``--checkpoint``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=_HelpFormatter)
    if checkpoint:
        parser.add_argument("--checkpoint", required=True, metavar="MODEL.npz",
                            help="a checkpoint written by pwconv_cy.train (e.g. DIR/best.npz)")
    return parser


def add_num_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-threads", type=positive_int, default=None, metavar="N",
                        help="threads of the OpenMP kernels and of BLAS (default: the OpenMP "
                             "default, e.g. OMP_NUM_THREADS)")


@contextlib.contextmanager
def thread_limit(num_threads):
    """The thread settings of a command: OpenMP and BLAS limited to `num_threads` (threadpoolctl;
    None: no limit), then, on stderr, a note when NumPy's BLAS keeps idle threads spinning
    between its matrix products and pwconv's kernels (pwconv_cy._config.blas_spin_note)."""
    from pwconv_cy._config import blas_spin_note

    if num_threads is None:
        limits = contextlib.nullcontext()
    else:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=num_threads)
    with limits:
        note = blas_spin_note()
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        yield


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the model runs: cpu, cuda or cuda:<index> (a CUDA device "
                             "needs CuPy: pip install pwconv[cuda12] or [cuda13])")


def checked_device(parser: argparse.ArgumentParser, device) -> str:
    """'cpu' or 'cuda:<index>', or an argparse-style exit saying why ``--device`` cannot be used
    (not a device name, no CuPy or no CUDA device, no such device)."""
    try:
        return models._parse_device(device)
    except (TypeError, ValueError, RuntimeError) as exc:
        parser.error(f"--device: {exc}")


def load_classifier(parser: argparse.ArgumentParser, path, arg: str = "--checkpoint",
                    device: str = "cpu"):
    """``(model, extra)`` from a checkpoint, the model put on `device` (checked by
    :func:`checked_device`), or an argparse-style exit naming `arg` and the problem (missing
    file, not a pwconv model file, wrong version or shapes, not a classifier)."""
    try:
        model, extra = models.load_checkpoint(path, device=device)
    except (OSError, ValueError) as exc:
        parser.error(f"{arg}: {exc}")
    if not isinstance(model, models.PointwiseCNNClassifier):
        parser.error(f"{arg}: {path} holds a {type(model).__name__}; this command needs a "
                     "PointwiseCNNClassifier checkpoint (written by pwconv_cy.train)")
    return model, extra


def class_names_of(extra: dict):
    """The class names stored in a checkpoint's extras, or None."""
    names = extra.get("class_names")
    return None if names is None else [str(s) for s in names.tolist()]


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` atomically (:func:`pwconv_cy._atomic.atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
