"""Slow, obviously-right float64 references for the neighbour search (SPEC §1-§3).

Everything here is brute force over all (query, point) pairs of a cloud, written to be read
against the SPEC line by line, not to be fast: keep the clouds small (the cost is O(n * m)).
The CSR results use the library's conventions: rows in query order, neighbours in ascending
global (packed) index order, clouds never mixed.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OracleKernelMap(NamedTuple):
    splits: np.ndarray  # (m + 1,) int64
    index: np.ndarray   # (E,) int64, global packed indices
    cell: np.ndarray    # (E,) int64 flat kernel cell f = (kz*K + ky)*K + kx
    counts: np.ndarray  # (m, K**3) int64


def as_float64(coords) -> np.ndarray:
    """Coordinates promoted to float64 (float16 and float32 convert exactly), shape (-1, 3)."""
    return np.asarray(coords).astype(np.float64).reshape(-1, 3)


def single_cloud_offsets(n: int) -> np.ndarray:
    return np.array([0, n], dtype=np.int64)


def dense_offsets(n_clouds: int, n_per_cloud: int) -> np.ndarray:
    return np.arange(n_clouds + 1, dtype=np.int64) * n_per_cloud


def _cloud_ranges(offsets):
    offsets = np.asarray(offsets, dtype=np.int64)
    return [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]


def kernel_cells_of_query(q, cloud_points, voxel_size, kernel_size, dilation):
    """SPEC §1 for one query q (3,) against the points (n, 3) of its cloud, all float64.

    Returns (local indices of the neighbours in ascending order, their flat cells f)."""
    v = float(voxel_size)
    K = int(kernel_size)
    s = int(dilation)
    span = s * (K - 1) + 1
    h = span * v / 2                      # half-width of the closed support cube
    lo = q - h                            # subtract h first ...
    t = (cloud_points - lo) / v           # ... then subtract, then divide (no FMA, no reciprocal)
    support = np.flatnonzero(((t >= 0) & (t <= span)).all(axis=1))
    c = np.minimum(s * (K - 1), np.floor(t[support])).astype(np.int64)  # upper face: last cell
    not_hole = (c % s == 0).all(axis=1)                                 # holes are ignored
    keep = support[not_hole]
    k = c[not_hole] // s
    f = (k[:, 2] * K + k[:, 1]) * K + k[:, 0]   # z slowest, x fastest
    return keep.astype(np.int64), f.astype(np.int64)


def kernel_map(points, voxel_size, kernel_size=3, dilation=1, offsets=None, queries=None,
               query_offsets=None) -> OracleKernelMap:
    """Brute-force kernel map of a packed batch (queries default to the points)."""
    p = as_float64(points)
    offsets = single_cloud_offsets(len(p)) if offsets is None else np.asarray(offsets, np.int64)
    if queries is None:
        q, q_offsets = p, offsets
    else:
        q = as_float64(queries)
        q_offsets = (single_cloud_offsets(len(q)) if query_offsets is None
                     else np.asarray(query_offsets, np.int64))
    assert len(offsets) == len(q_offsets)
    K3 = int(kernel_size) ** 3
    m = len(q)
    rows_index, rows_cell = [None] * m, [None] * m
    counts = np.zeros((m, K3), dtype=np.int64)
    for (a, b), (qa, qb) in zip(_cloud_ranges(offsets), _cloud_ranges(q_offsets)):
        for i in range(qa, qb):
            local, f = kernel_cells_of_query(q[i], p[a:b], voxel_size, kernel_size, dilation)
            rows_index[i] = local + a
            rows_cell[i] = f
            counts[i] = np.bincount(f, minlength=K3)
    return _csr(rows_index, rows_cell, counts)


def radius_neighbours_of_query(q, cloud_points, radius, metric):
    """SPEC §3 fixed-radius test for one query (3,), float64: d = p - q per axis."""
    r = float(radius)
    d = cloud_points - q
    if metric == "chebyshev":
        inside = (np.abs(d) <= r).all(axis=1)
    elif metric == "euclidean":
        inside = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2] <= r * r
    else:
        raise ValueError(metric)
    return np.flatnonzero(inside).astype(np.int64)


def radius_search(points, radius, queries=None, offsets=None, query_offsets=None,
                  metric="chebyshev"):
    """Brute-force closed cube/ball search of a packed batch; returns (splits, index)."""
    p = as_float64(points)
    offsets = single_cloud_offsets(len(p)) if offsets is None else np.asarray(offsets, np.int64)
    if queries is None:
        q, q_offsets = p, offsets
    else:
        q = as_float64(queries)
        q_offsets = (single_cloud_offsets(len(q)) if query_offsets is None
                     else np.asarray(query_offsets, np.int64))
    rows = [None] * len(q)
    for (a, b), (qa, qb) in zip(_cloud_ranges(offsets), _cloud_ranges(q_offsets)):
        for i in range(qa, qb):
            rows[i] = radius_neighbours_of_query(q[i], p[a:b], radius, metric) + a
    splits = np.zeros(len(q) + 1, dtype=np.int64)
    splits[1:] = np.cumsum([len(r) for r in rows], dtype=np.int64)
    index = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return splits, index.astype(np.int64)


def _csr(rows_index, rows_cell, counts) -> OracleKernelMap:
    m = len(rows_index)
    splits = np.zeros(m + 1, dtype=np.int64)
    splits[1:] = np.cumsum([len(r) for r in rows_index], dtype=np.int64)
    index = np.concatenate(rows_index).astype(np.int64) if m else np.zeros(0, np.int64)
    cell = np.concatenate(rows_cell).astype(np.int64) if m else np.zeros(0, np.int64)
    return OracleKernelMap(splits, index, cell, counts)


def kernel_map_from_candidates(points, queries, voxel_size, kernel_size, dilation,
                               cand_query, cand_point) -> OracleKernelMap:
    """The exact SPEC §1 rule applied, in NumPy, to candidate pairs (query i, point j) that are a
    superset of the support (e.g. from scipy's cKDTree); one cloud.  Vectorised over pairs so
    that real clouds of tens of thousands of points stay cheap."""
    p = as_float64(points)
    q = as_float64(queries)
    v = float(voxel_size)
    K = int(kernel_size)
    s = int(dilation)
    span = s * (K - 1) + 1
    h = span * v / 2
    i = np.asarray(cand_query, np.int64)
    j = np.asarray(cand_point, np.int64)
    lo = q[i] - h
    t = (p[j] - lo) / v
    support = ((t >= 0) & (t <= span)).all(axis=1)
    i, j, t = i[support], j[support], t[support]
    c = np.minimum(s * (K - 1), np.floor(t)).astype(np.int64)
    keep = (c % s == 0).all(axis=1)
    i, j, k = i[keep], j[keep], c[keep] // s
    f = (k[:, 2] * K + k[:, 1]) * K + k[:, 0]
    order = np.lexsort((j, i))
    i, j, f = i[order], j[order], f[order]
    m = len(q)
    splits = np.zeros(m + 1, dtype=np.int64)
    splits[1:] = np.cumsum(np.bincount(i, minlength=m))
    counts = np.zeros((m, K ** 3), dtype=np.int64)
    np.add.at(counts, (i, f), 1)
    return OracleKernelMap(splits, j, f, counts)


def candidates_from_ckdtree(points, queries, half_width):
    """Candidate pairs from scipy.spatial.cKDTree: every point within the Chebyshev distance
    half_width * (1 + 1e-9) of a query (a superset of the closed support cube)."""
    from scipy.spatial import cKDTree

    p = as_float64(points)
    q = as_float64(queries)
    tree = cKDTree(p)
    lists = tree.query_ball_point(q, r=half_width * (1 + 1e-9), p=np.inf)
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    cand_query = np.repeat(np.arange(len(q), dtype=np.int64), lengths)
    cand_point = (np.concatenate([np.asarray(x, np.int64) for x in lists]) if len(q)
                  else np.zeros(0, np.int64))
    return cand_query, cand_point
