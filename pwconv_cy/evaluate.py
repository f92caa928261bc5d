"""Evaluate a trained classifier on a labelled ``.npz`` (the training data's format).

    python -m pwconv_cy.evaluate --checkpoint DIR/best.npz --data TEST.npz [--out-json FILE]

Prints the loss, overall accuracy, mean class accuracy, per-class accuracy and the confusion
matrix; the last line is one JSON object with (at least) ``overall_accuracy`` and
``mean_class_accuracy``, fractions in [0, 1].  Clouds whose size differs from the model's are
resampled as :meth:`~pwconv_cy.models.PointwiseCNNClassifier.predict` documents (``--seed``).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from pwconv_cy import _cli, data
from pwconv_cy.metrics import classification_report

__all__ = ["build_parser", "evaluate", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = _cli.command_parser("python -m pwconv_cy.evaluate", "Evaluate a pointwise-CNN "
                            "classifier checkpoint on a labelled .npz.", checkpoint=True)
    p.add_argument("--data", required=True, metavar="TEST.npz",
                   help="'points' (S, n, 3), 'labels' (S,), optional 'class_names'")
    p.add_argument("--batch-size", type=_cli.positive_int, default=32,
                   help="clouds per forward pass")
    p.add_argument("--seed", type=_cli.nonneg_int, default=0,
                   help="seed of the resampling of clouds whose size differs from the model's")
    p.add_argument("--out-json", metavar="FILE", default=None,
                   help="also write the full report (per-class accuracy, confusion matrix) here")
    _cli.add_num_threads(p)
    _cli.add_device(p)
    return p


def evaluate(model, dataset: data.Dataset, *, seed=0, batch_size=32, class_names=None) -> dict:
    """:func:`~pwconv_cy.metrics.classification_report` of `model` on `dataset`, plus
    ``loss`` (mean cross-entropy of the predicted probabilities)."""
    probs = model.predict(dataset.points, seed=seed, batch_size=batch_size)
    picked = probs[np.arange(len(dataset)), dataset.labels].astype(np.float64)
    report = classification_report(dataset.labels, probs.argmax(axis=1), model.n_classes,
                                   class_names)
    report["loss"] = float(-np.log(np.maximum(picked, 1e-30)).mean())
    return report


def _check_compatible(parser, args, model, ds, names):
    high = int(ds.labels.max())
    if high >= model.n_classes:
        parser.error(f"--data: {args.data} has labels up to {high}, but the classifier in "
                     f"{args.checkpoint} has {model.n_classes} classes (labels 0.."
                     f"{model.n_classes - 1})")
    if names is not None and ds.class_names is not None and ds.class_names != names:
        parser.error(f"--data: the class names of {args.data} ({_preview(ds.class_names)}) "
                     f"differ from those the checkpoint {args.checkpoint} was trained with "
                     f"({_preview(names)}); required: the same classes in the same order")


def _preview(names) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} classes: {shown}"


def _print_report(report: dict, names) -> None:
    n = report["n_samples"]
    correct = sum(report["confusion_matrix"][i][i] for i in range(report["n_classes"]))
    print(f"loss: {report['loss']:.4f}")
    print(f"overall accuracy: {report['overall_accuracy']:.4f} ({correct}/{n})")
    print(f"mean class accuracy: {report['mean_class_accuracy']:.4f}")
    print("per-class accuracy:")
    width = max((len(s) for s in names), default=0) if names else 0
    for i, (acc, support) in enumerate(zip(report["per_class_accuracy"], report["support"])):
        name = names[i] if names else ""
        shown = "-" if acc is None else f"{acc:.4f}"
        print(f"  {i:3d} {name:<{width}}  {shown:>6}  ({support} shapes)")
    cm = report["confusion_matrix"]
    cell = max(3, len(str(max(max(row) for row in cm))))
    print("confusion matrix (rows: true class, columns: predicted class):")
    print("     " + " ".join(f"{j:>{cell}d}" for j in range(len(cm))))
    for i, row in enumerate(cm):
        print(f"  {i:3d}" + "".join(f" {v:>{cell}d}" for v in row))


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _cli.checked_device(parser, args.device)
    model, extra = _cli.load_classifier(parser, args.checkpoint, device=device)
    names = _cli.class_names_of(extra)
    try:
        ds = data.load_dataset(args.data)
    except (OSError, ValueError) as exc:
        parser.error(f"--data: {exc}")
    _check_compatible(parser, args, model, ds, names)
    names = names or ds.class_names
    with _cli.thread_limit(args.num_threads):
        report = evaluate(model, ds, seed=args.seed, batch_size=args.batch_size,
                          class_names=names)
    report.update(checkpoint=str(args.checkpoint), data=str(args.data))
    print(f"checkpoint: {args.checkpoint} ({model!r})")
    print(f"data: {args.data} ({len(ds)} shapes of {ds.points.shape[1]} points; the model "
          f"sees {model.n_points})")
    _print_report(report, names)
    if args.out_json:
        _cli.atomic_write_text(args.out_json, json.dumps(report, indent=1))
        print(f"report written to {args.out_json}")
    summary = {k: report[k] for k in ("overall_accuracy", "mean_class_accuracy", "loss",
                                      "n_samples", "n_classes", "checkpoint", "data")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
