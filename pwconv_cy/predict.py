"""Classify point clouds of any size with a trained classifier.

    python -m pwconv_cy.predict --checkpoint DIR/best.npz INPUT [INPUT ...]

An INPUT is a ``.ply`` file (the ``x``, ``y``, ``z`` of its vertices: ASCII or binary) or an
``.npz`` whose ``points`` are one cloud (n, 3) or a batch (B, n, 3).  Each cloud is normalised
and resampled to the model's number of points as
:meth:`~pwconv_cy.models.PointwiseCNNClassifier.predict` documents (``--seed``), and one line per
cloud gives the most probable classes with their probabilities (``--json``: one JSON object per
line instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pwconv_cy import _cli
from pwconv_cy.data import open_npz
from pwconv_cy.ply import read_ply_points

__all__ = ["build_parser", "main", "read_clouds"]


def build_parser() -> argparse.ArgumentParser:
    p = _cli.command_parser("python -m pwconv_cy.predict", "Classify point clouds (.ply or "
                            ".npz) with a pointwise-CNN classifier.", checkpoint=True)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".ply file, or .npz with 'points' (n, 3) or (B, n, 3)")
    p.add_argument("--top-k", type=_cli.positive_int, default=3,
                   help="classes shown per cloud")
    p.add_argument("--seed", type=_cli.nonneg_int, default=0, help="seed of the resampling")
    p.add_argument("--batch-size", type=_cli.positive_int, default=32,
                   help="clouds per forward pass")
    p.add_argument("--json", action="store_true", help="one JSON object per cloud")
    _cli.add_num_threads(p)
    _cli.add_device(p)
    return p


def read_clouds(path) -> list:
    """``[(name, cloud (n, 3)), ...]`` from a ``.ply`` or ``.npz`` file.

    Raises FileNotFoundError or ValueError (naming the file, what was found and what is
    required) for a missing or unreadable file, another suffix, a missing ``points`` key, a
    wrong shape, an empty cloud or non-finite coordinates."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        clouds = [(str(path), read_ply_points(path))]
    elif suffix == ".npz":
        with open_npz(path) as f:
            if "points" not in f.files:
                raise ValueError(f"{path}: missing key 'points' (found keys "
                                 f"{sorted(f.files)}); required: 'points' (n, 3) or (B, n, 3)")
            points = f["points"]
        if points.ndim == 2 and points.shape[-1] == 3:
            clouds = [(str(path), points)]
        elif points.ndim == 3 and points.shape[-1] == 3:
            clouds = [(f"{path}[{i}]", c) for i, c in enumerate(points)]
        else:
            raise ValueError(f"{path}: 'points' must have shape (n, 3) or (B, n, 3), found "
                             f"{points.shape}")
        if points.dtype.kind not in "fiu":
            raise ValueError(f"{path}: 'points' must be real numbers, found dtype "
                             f"{points.dtype}")
    else:
        raise ValueError(f"{path}: unsupported input {suffix or '(no suffix)'!r}; required: "
                         ".ply or .npz")
    for name, cloud in clouds:
        if cloud.shape[0] == 0:
            raise ValueError(f"{name}: the cloud is empty (0 points); required: at least 1")
        if not np.isfinite(cloud).all():
            raise ValueError(f"{name}: {int((~np.isfinite(cloud)).any(axis=1).sum())} points "
                             "have non-finite coordinates (NaN or Inf); all must be finite")
    return clouds


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _cli.checked_device(parser, args.device)
    model, extra = _cli.load_classifier(parser, args.checkpoint, device=device)
    names = _cli.class_names_of(extra)
    clouds = []
    for path in args.inputs:
        try:
            clouds += read_clouds(path)
        except (OSError, ValueError) as exc:
            parser.error(f"INPUT: {exc}")
    with _cli.thread_limit(args.num_threads):
        probs = model.predict([c for _, c in clouds], seed=args.seed,
                              batch_size=args.batch_size)
    k = min(args.top_k, model.n_classes)
    for (name, cloud), p in zip(clouds, probs):
        top = np.argsort(-p, kind="stable")[:k]
        if args.json:
            print(json.dumps({"input": name, "n_points": int(cloud.shape[0]),
                              "label": int(top[0]),
                              "class_name": names[top[0]] if names else None,
                              "top": [{"label": int(c), "probability": float(p[c]),
                                       "class_name": names[c] if names else None}
                                      for c in top]}))
        else:
            shown = ", ".join(f"{c} {names[c]} ({p[c]:.3f})" if names else f"{c} ({p[c]:.3f})"
                              for c in top)
            print(f"{name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
