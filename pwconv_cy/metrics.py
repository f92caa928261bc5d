"""Classification metrics: confusion matrix, overall, per-class and mean class accuracy.

Accuracies are fractions in [0, 1].  The mean class accuracy is the mean of the per-class
accuracies over the classes present in the true labels (the figure the paper reports next to
the overall accuracy); a class without samples has no accuracy (``None`` in reports).
"""

from __future__ import annotations

import numpy as np

__all__ = ["classification_report", "confusion_matrix"]


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of samples of true class t predicted as class p.

    Parameters
    ----------
    y_true, y_pred : (N,) int arrays with values in [0, n_classes)
    n_classes : int

    Returns
    -------
    (n_classes, n_classes) int64
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.size} and "
                         f"{y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} must be in [0, {n_classes - 1}], found values from "
                             f"{y.min()} to {y.max()}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def classification_report(y_true, y_pred, n_classes: int, class_names=None) -> dict:
    """Overall accuracy, mean class accuracy, per-class accuracy and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred : (N,) int arrays with values in [0, n_classes)
    n_classes : int
    class_names : sequence of str, optional

    Returns
    -------
    dict
        ``overall_accuracy`` (float, NaN for N = 0), ``mean_class_accuracy`` (float over the
        classes with samples), ``per_class_accuracy`` (list, ``None`` for a class without
        samples), ``support`` (samples per true class), ``confusion_matrix`` (list of lists,
        rows = true class), ``n_samples``, ``n_classes`` and ``class_names`` (or None).
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    correct = np.diag(cm)
    n = int(support.sum())
    present = support > 0
    per_class = [float(c / s) if s else None for c, s in zip(correct, support)]
    return {
        "overall_accuracy": float(correct.sum() / n) if n else float("nan"),
        "mean_class_accuracy": (float(np.mean(correct[present] / support[present]))
                                if present.any() else float("nan")),
        "per_class_accuracy": per_class,
        "support": support.tolist(),
        "confusion_matrix": cm.tolist(),
        "n_samples": n,
        "n_classes": int(n_classes),
        "class_names": None if class_names is None else list(class_names),
    }
