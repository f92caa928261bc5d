"""Hypothesis strategies for point clouds, packed batches and query sets.

Clouds are generated on a unit scale (roughly [-1, 1]^3, so that voxel sizes of 0.05-0.6 give a
handful to a few dozen neighbours) from a drawn kind, size and NumPy seed, then optionally
translated.  Kinds:

* ``sphere``       points on the unit sphere (the paper's data: a surface),
* ``volume``       uniform in the cube,
* ``clustered``    a few tight Gaussian blobs (very uneven density),
* ``duplicates``   a few distinct points repeated many times,
* ``plane``/``line``  degenerate extents (a coordinate exactly 0 for every point),
* ``lattice``      integer multiples of 1/8: with a dyadic voxel (1/8, 1/4, 1/2) every point
                   sits exactly on cell faces and every step of the rule is exact,
* ``decimal``      integer multiples of 0.1 (ties decided by float64 rounding).

Every strategy returns float64 coordinates; tests cast them to the dtype under test and hand the
oracle the cast values (promoted back to float64), as the SPEC prescribes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

CLOUD_KINDS = ("sphere", "volume", "clustered", "duplicates", "plane", "line", "lattice",
               "decimal")
EXACT_KINDS = ("lattice",)
DYADIC_VOXELS = (1 / 8, 1 / 4, 1 / 2)
COORD_DTYPES = (np.float16, np.float32, np.float64)


class Batch(NamedTuple):
    points: np.ndarray   # (N, 3) float64
    offsets: np.ndarray  # (B + 1,) int64


def make_cloud(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points (float64, shape (n, 3)) of the given kind."""
    if kind == "sphere":
        x = rng.normal(size=(n, 3))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x
    if kind == "volume":
        return rng.uniform(-1, 1, size=(n, 3))
    if kind == "clustered":
        centres = rng.uniform(-1, 1, size=(int(rng.integers(1, 5)), 3))
        sigma = rng.uniform(0.01, 0.2)
        return centres[rng.integers(0, len(centres), n)] + rng.normal(scale=sigma, size=(n, 3))
    if kind == "duplicates":
        distinct = rng.uniform(-1, 1, size=(int(rng.integers(1, 6)), 3))
        # a few tight pairs too: neighbours closer than any rounding of a coarse method
        distinct = np.concatenate([distinct, distinct[:1] + 1e-12])
        return distinct[rng.integers(0, len(distinct), n)]
    if kind == "plane":
        x = rng.uniform(-1, 1, size=(n, 3))
        x[:, int(rng.integers(0, 3))] = 0.0
        return x
    if kind == "line":
        x = np.zeros((n, 3))
        x[:, int(rng.integers(0, 3))] = rng.uniform(-1, 1, size=n)
        return x
    if kind == "lattice":
        return rng.integers(-8, 9, size=(n, 3)) / 8.0
    if kind == "decimal":
        return rng.integers(-10, 11, size=(n, 3)) * 0.1
    raise ValueError(kind)


seeds = st.integers(0, 2**32 - 1)


def sizes(min_size, max_size):
    """Cloud sizes biased towards the large end (hypothesis otherwise favours tiny clouds, which
    have no neighbours to get wrong); the small ones, 0 and 1 included, still come up."""
    return st.one_of(st.integers(min_size, max_size),
                     st.integers(max(min_size, max_size // 2), max_size),
                     st.just(max_size))


@st.composite
def clouds(draw, min_points=0, max_points=150, kinds=CLOUD_KINDS):
    """One cloud (n, 3) float64."""
    kind = draw(st.sampled_from(kinds))
    n = draw(sizes(min_points, max_points))
    return make_cloud(kind, n, np.random.default_rng(draw(seeds)))


@st.composite
def batches(draw, min_clouds=1, max_clouds=4, max_points=80, kinds=CLOUD_KINDS):
    """A packed batch: clouds of one kind (so they overlap in space: mixing them would show),
    any of them possibly empty."""
    kind = draw(st.sampled_from(kinds))
    counts = draw(st.lists(sizes(0, max_points), min_size=min_clouds, max_size=max_clouds))
    rng = np.random.default_rng(draw(seeds))
    parts = [make_cloud(kind, n, rng) for n in counts]
    points = np.concatenate(parts) if parts else np.zeros((0, 3))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return Batch(points.reshape(-1, 3), offsets)


@st.composite
def queries_for(draw, batch: Batch, max_per_cloud=30):
    """Query points for a batch (one query cloud per point cloud, possibly empty): copies of
    points of the cloud, copies nudged by one ulp, fresh points of any kind, lattice points."""
    rng = np.random.default_rng(draw(seeds))
    counts = draw(st.lists(sizes(0, max_per_cloud), min_size=len(batch.offsets) - 1,
                           max_size=len(batch.offsets) - 1))
    parts = []
    for b, m in enumerate(counts):
        cloud = batch.points[batch.offsets[b]:batch.offsets[b + 1]]
        how = draw(st.sampled_from(("copies", "nudged", "fresh", "lattice")))
        if how in ("copies", "nudged") and len(cloud):
            q = cloud[rng.integers(0, len(cloud), m)]
            if how == "nudged":
                q = np.nextafter(q, rng.choice([-np.inf, np.inf], size=q.shape))
        elif how == "lattice":
            q = make_cloud("lattice", m, rng)
        else:
            q = make_cloud(str(rng.choice(CLOUD_KINDS)), m, rng)
        parts.append(q.reshape(-1, 3))
    queries = np.concatenate(parts) if parts else np.zeros((0, 3))
    q_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    q_offsets[1:] = np.cumsum(counts)
    return Batch(queries.reshape(-1, 3), q_offsets)


def nudge(x: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """x moved by `steps` ulps (element-wise, either direction)."""
    x = np.array(x, dtype=np.float64)
    for k in range(int(np.abs(steps).max(initial=0))):
        x = np.where(steps > k, np.nextafter(x, np.inf), x)
        x = np.where(steps < -k, np.nextafter(x, -np.inf), x)
    return x


def near_cell_faces(queries, voxel, kernel_size, dilation, n, rng, ulps=3):
    """n points whose coordinates lie within a few ulps of the rule's cell faces of the given
    queries (lo + k*v, k = 0..span, on each axis): where a different order of operations, a
    reciprocal, a fused multiply-add or an integer-cell shortcut would bin differently."""
    span = dilation * (kernel_size - 1) + 1
    h = span * voxel / 2
    q = np.asarray(queries, dtype=np.float64)[rng.integers(0, len(queries), n)]
    k = rng.integers(0, span + 1, size=(n, 3))
    x = (q - h) + k * voxel
    inside = rng.random((n, 3)) < 0.2      # some coordinates well inside a cell instead
    x = np.where(inside, q - h + (k + 0.5) * voxel, x)
    return nudge(x, rng.integers(-ulps, ulps + 1, size=(n, 3)))


def near_spheres(queries, radius, n, rng, ulps=3):
    """n points within a few ulps of the cube (chebyshev) or sphere (euclidean) of the given
    radius around the queries."""
    q = np.asarray(queries, dtype=np.float64)[rng.integers(0, len(queries), n)]
    u = rng.normal(size=(n, 3))
    sphere = q + radius * u / np.linalg.norm(u, axis=1, keepdims=True)
    cube = q + rng.uniform(-radius, radius, size=(n, 3))
    axis = rng.integers(0, 3, n)
    cube[np.arange(n), axis] = q[np.arange(n), axis] + rng.choice([-radius, radius], n)
    pts = np.where((rng.random(n) < 0.5)[:, None], sphere, cube)
    return nudge(pts, rng.integers(-ulps, ulps + 1, size=(n, 3)))


voxel_sizes = st.one_of(st.sampled_from((1 / 8, 1 / 4, 1 / 2, 0.1, 0.15, 0.3)),
                        st.floats(0.04, 0.6, allow_nan=False, allow_infinity=False))
radii = st.one_of(st.sampled_from((1 / 8, 1 / 4, 1 / 2, 0.1, 0.3)),
                  st.floats(0.02, 0.8, allow_nan=False, allow_infinity=False))
kernel_sizes = st.sampled_from((1, 3, 5))
dilations = st.integers(1, 4)
coord_dtypes = st.sampled_from(COORD_DTYPES)
methods = st.sampled_from(("grid", "kdtree"))
metrics = st.sampled_from(("chebyshev", "euclidean"))
#: translations applied to float32/float64 clouds: far from the origin, cell keys get large and
#: coordinates lose low bits (float16 clouds stay untranslated: float16 holds only ~3 digits)
shifts = st.sampled_from((0.0, 0.0, 0.0, 1024.0, -3.0e4, 1.0e6 + 0.375, -7.5e7))


def cast(points: np.ndarray, dtype) -> np.ndarray:
    """Coordinates in the dtype under test (the oracle then reads them back as float64)."""
    return np.ascontiguousarray(np.asarray(points, dtype=np.float64).astype(dtype))
