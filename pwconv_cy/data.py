"""Labelled point-cloud data sets for training and evaluation: loading and checking the ``.npz``
format, the stratified validation split, the paper's augmentation, and resampling of clouds to a
fixed number of points.

The ``.npz`` format (that of the shared ModelNet40 copy):

=============== ======================= =============================================
key             shape / dtype           meaning
=============== ======================= =============================================
``points``      (S, n, 3) float         S clouds of n points (any float or int dtype)
``labels``      (S,) integer            class of each cloud, ``0 <= label``
``class_names`` (C,) str, optional      class names; then ``label < C`` is required
=============== ======================= =============================================

Clouds are *normalised* like the shared ModelNet40 copy before anything else: centred on their
centroid and scaled so that the farthest point is at distance 1 (:func:`normalize_clouds`).  The
same is done to every cloud that a trained classifier sees, so training, evaluation and
prediction agree.

All randomness comes from a caller's ``numpy.random.Generator``, so a training run is replayed
exactly from the generator's state.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Dataset",
    "augment",
    "batch_indices",
    "limit_per_class",
    "load_dataset",
    "normalize_clouds",
    "open_npz",
    "resample",
    "resample_batch",
    "stratified_split",
]


@dataclass
class Dataset:
    """Clouds and labels read by :func:`load_dataset`.

    Attributes
    ----------
    points : (S, n, 3) float32
        Normalised clouds (centroid at the origin, farthest point at distance 1).
    labels : (S,) int64
    n_classes : int
        ``len(class_names)`` when the file has them, else ``labels.max() + 1``.
    class_names : list of str or None
    path : str
    """

    points: np.ndarray
    labels: np.ndarray
    n_classes: int
    class_names: list | None
    path: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> Dataset:
        """The clouds ``index`` (an integer array), same classes."""
        return Dataset(self.points[index], self.labels[index], self.n_classes, self.class_names,
                       self.path)


_REQUIRED = ("'points' (n_shapes, n_points, 3) float and 'labels' (n_shapes,) integer, "
             "optionally 'class_names' (n_classes,) str")


def open_npz(path, context: str = ""):
    """``np.load(path)`` of an ``.npz`` file (no pickle), to be used in a ``with`` block.

    Raises FileNotFoundError (no such file) or ValueError (``"<path>: <context>cannot be read
    as an .npz file (...)"``: not a zip of arrays, a truncated file, a single ``.npy`` array)."""
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise ValueError(f"{path}: {context}cannot be read as an .npz file ({exc})") from None
        raise ValueError(f"{path}: {context}cannot be read as an .npz file (it is neither a zip "
                         "archive of arrays nor a .npy array)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: {context}cannot be read as an .npz file "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(  # noqa: TRY004 - the file's content is wrong, not an argument's type
            f"{path}: {context}cannot be read as an .npz file (it holds a single array of "
            f"shape {np.shape(f)}, not named arrays)")
    return f


def _check_points_array(points, where: str) -> np.ndarray:
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"{where} must have shape (n_shapes, n_points, 3), found shape "
                         f"{points.shape}")
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"{where} must hold at least one cloud of at least one point, found "
                         f"shape {points.shape}")
    if points.dtype == np.bool_ or not (np.issubdtype(points.dtype, np.floating)
                                        or np.issubdtype(points.dtype, np.integer)):
        raise ValueError(f"{where} must be real numbers (float or int), found dtype "
                         f"{points.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        out = points.astype(np.float32)
    finite = np.isfinite(out).all(axis=(1, 2))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{where} has non-finite coordinates (NaN or Inf, or beyond float32) "
                         f"in {bad.size} cloud(s), the first is cloud {bad[0]}; every "
                         "coordinate must be finite")
    return out


def _check_labels_array(labels, n_shapes: int, n_classes: int | None, where: str) -> np.ndarray:
    if labels.shape != (n_shapes,):
        raise ValueError(f"{where} must have shape (n_shapes,) = ({n_shapes},), found shape "
                         f"{labels.shape}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where} must be integers (class indices), found dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (n_classes is not None and high >= n_classes):
        required = "0 <= label" if n_classes is None else f"0 <= label <= {n_classes - 1}"
        raise ValueError(f"{where} out of range: found labels from {low} to {high}, required "
                         f"{required}")
    return labels


def load_dataset(path) -> Dataset:
    """Read and check a labelled ``.npz`` (see the module docstring for the format).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Dataset
        Points (S, n, 3) float32, normalised; labels (S,) int64.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not an ``.npz``; a missing key; a key of the wrong shape or dtype; non-finite
        coordinates; labels that are not integers or out of range.  The message names the file
        and the key, what was found and what is required.
    """
    path = str(path)
    try:
        npz = open_npz(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; required: {_REQUIRED}") from None
    with npz as f:
        keys = sorted(f.files)
        for key in ("points", "labels"):
            if key not in keys:
                raise ValueError(f"{path}: missing key {key!r} (found keys {keys}); required: "
                                 f"{_REQUIRED}")
        points = _check_points_array(f["points"], f"{path}: 'points'")
        class_names = None
        if "class_names" in keys:
            names = f["class_names"]
            if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
                raise ValueError(f"{path}: 'class_names' must be a non-empty 1-D array of "
                                 f"strings, found shape {names.shape} dtype {names.dtype}")
            class_names = [str(s) for s in names.tolist()]
        labels = _check_labels_array(f["labels"], points.shape[0],
                                     None if class_names is None else len(class_names),
                                     f"{path}: 'labels'")
    n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    return Dataset(normalize_clouds(points), labels, n_classes, class_names, path)


def normalize_clouds(points) -> np.ndarray:
    """Centre each cloud on its centroid and scale it so its farthest point is at distance 1.

    Parameters
    ----------
    points : (B, n, 3) or (n, 3) array of float
        A cloud whose points all coincide is only centred.

    Returns
    -------
    (B, n, 3) or (n, 3) float32
    """
    pts = np.asarray(points, dtype=np.float32)
    centred = pts - pts.mean(axis=-2, keepdims=True, dtype=np.float64).astype(np.float32)
    radius = np.sqrt((centred.astype(np.float64) ** 2).sum(axis=-1)).max(axis=-1)
    radius = np.where(radius > 0, radius, 1.0).astype(np.float32)
    return centred / radius[..., None, None]


def resample(cloud, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """A cloud of exactly `n_points` points drawn from `cloud` (m, 3).

    With ``m >= n_points`` a uniformly random subset without replacement; with fewer points
    every point once plus ``n_points - m`` duplicates drawn uniformly with replacement.  The
    points keep their original order (the classifier sorts them anyway).

    Parameters
    ----------
    cloud : (m, 3) array, m >= 1
    n_points : int
    rng : numpy.random.Generator

    Returns
    -------
    (n_points, 3) array of the cloud's dtype
    """
    cloud = np.asarray(cloud)
    m = cloud.shape[0]
    if m == 0:
        raise ValueError("cannot resample an empty cloud (0 points)")
    if m >= n_points:
        index = np.sort(rng.choice(m, size=n_points, replace=False))
    else:
        index = np.sort(np.concatenate([np.arange(m), rng.choice(m, size=n_points - m)]))
    return cloud[index]


def resample_batch(points, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`resample` applied to every cloud of a batch (B, m, 3) -> (B, n_points, 3).

    With ``m >= n_points`` the random subsets of all clouds are drawn at once (each cloud's
    subset uniform: the indices of the ``n_points`` smallest of m uniform keys)."""
    points = np.asarray(points)
    B, m, _ = points.shape
    if m == n_points:
        return points
    if m < n_points:
        return np.stack([resample(c, n_points, rng) for c in points])
    keys = rng.random((B, m))
    index = np.sort(np.argpartition(keys, n_points - 1, axis=1)[:, :n_points], axis=1)
    return np.take_along_axis(points, index[..., None], axis=1)


def augment(points, rng: np.random.Generator, rotate: bool = True, jitter_sigma: float = 0.01,
            jitter_clip: float = 0.05, scale_range=None, shift: float = 0.0) -> np.ndarray:
    """The paper's augmentation of a batch (B, n, 3): a rotation of each cloud by a uniform
    random angle about the up axis z, then independent Gaussian jitter of every coordinate
    (standard deviation `jitter_sigma`, clipped to +-`jitter_clip`, in the clouds' units).

    Optionally first (before the rotation) the usual ModelNet augmentation of later work:
    each cloud scaled per axis by factors uniform in ``scale_range = (low, high)`` and moved by
    a shift uniform in [-`shift`, `shift`] per axis.

    Returns a new float32 array; `points` is not modified."""
    pts = np.asarray(points, dtype=np.float32)
    if scale_range is not None:
        low, high = scale_range
        if not (0 < low <= high):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got "
                             f"{scale_range!r}")
        scale = rng.uniform(low, high, size=(pts.shape[0], 1, 3)).astype(np.float32)
        pts = pts * scale
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift!r}")
    if shift > 0:
        pts = pts + rng.uniform(-shift, shift, size=(pts.shape[0], 1, 3)).astype(np.float32)
    if rotate:
        theta = rng.uniform(0.0, 2.0 * np.pi, size=pts.shape[0])
        c, s = np.cos(theta), np.sin(theta)
        rot = np.zeros((pts.shape[0], 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
        rot[:, 2, 2] = 1.0
        pts = np.einsum("bij,bnj->bni", rot.astype(np.float32), pts)
    if jitter_sigma > 0:
        noise = np.clip(jitter_sigma * rng.standard_normal(pts.shape), -jitter_clip, jitter_clip)
        pts = pts + noise.astype(np.float32)
    return pts


def stratified_split(labels, fraction: float, seed: int):
    """Indices ``(train, val)`` with ``round(fraction * count)`` clouds of each class in `val`,
    chosen at random with ``numpy.random.default_rng(seed)``; a class keeps at least one cloud
    in `train`, and a class of two or more clouds gets at least one in `val` when
    ``fraction > 0``.  Both index arrays are sorted.

    Parameters
    ----------
    labels : (S,) int array
    fraction : float in [0, 1)
    seed : int
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = round(fraction * members.size)
        if fraction > 0 and members.size >= 2:
            k = max(k, 1)
        k = min(k, members.size - 1)
        val.append(rng.permutation(members)[:k])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(labels.size), val)
    return train, val


def limit_per_class(labels, n: int) -> np.ndarray:
    """Sorted indices of the first `n` clouds (in file order) of every class."""
    labels = np.asarray(labels)
    keep = [np.flatnonzero(labels == c)[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list:
    """Consecutive batches of ``range(n)`` (shuffled with `rng` when given); the last batch
    may be smaller."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
