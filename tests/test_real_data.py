"""Neighbour search on the real clouds of ../shared/data, checked against an independent oracle:
scipy's cKDTree gives candidate pairs (a Chebyshev ball slightly larger than the support), the
exact SPEC §1 rule in NumPy keeps and bins them (tests/oracles.py)."""
from __future__ import annotations

import numpy as np
import oracles
import pytest
from checks import (
    assert_kernel_map_matches,
    assert_kernel_maps_identical,
    assert_same_csr,
    check_kernel_map_invariants,
)

import pwconv_cy as pc


def ckdtree_kernel_map(points, voxel, K, s, queries=None):
    queries = points if queries is None else queries
    h = (s * (K - 1) + 1) * voxel / 2
    cand_q, cand_p = oracles.candidates_from_ckdtree(points, queries, h)
    return oracles.kernel_map_from_candidates(points, queries, voxel, K, s, cand_q, cand_p)


@pytest.fixture
def bunny(shared_data):
    with np.load(shared_data / "stanford_bunny" / "stanford_bunny.npz") as z:
        return z["zipper_points"], z["scan_points"]


@pytest.fixture
def conifer(shared_data):
    with np.load(shared_data / "lidar_als_labelled" / "lidR_MixedConifer.npz") as z:
        return z["points"]


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_bunny_kernel_map_matches_ckdtree_oracle(bunny, dilation):
    points, _ = bunny
    assert points.shape == (35947, 3) and points.dtype == np.float32
    voxel = 0.002 if dilation < 4 else 0.001
    km = pc.kernel_map(points, voxel, dilation=dilation)
    assert_kernel_map_matches(km, ckdtree_kernel_map(points, voxel, 3, dilation), 3)
    check_kernel_map_invariants(km, oracles.single_cloud_offsets(len(points)))
    assert_kernel_maps_identical(km, pc.kernel_map(points, voxel, dilation=dilation,
                                                   method="kdtree"))


def test_bunny_scan_queries_against_zipper_points_match_ckdtree_oracle(bunny, rng):
    points, scans = bunny
    queries = scans[rng.choice(len(scans), 3000, replace=False)]
    for K, s in ((3, 1), (5, 2)):
        km = pc.kernel_map(points, 0.0015, kernel_size=K, dilation=s, queries=queries)
        assert_kernel_map_matches(km, ckdtree_kernel_map(points, 0.0015, K, s, queries), K)
        assert km.n_pairs > len(queries)


@pytest.mark.parametrize("metric, p_norm", [("chebyshev", np.inf), ("euclidean", 2)])
@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_bunny_radius_search_matches_ckdtree(bunny, metric, p_norm, method):
    from scipy.spatial import cKDTree

    points, _ = bunny
    r = 0.003
    splits, index = pc.radius_search(points, r, metric=metric, method=method)
    lists = cKDTree(points.astype(np.float64)).query_ball_point(points.astype(np.float64), r,
                                                                p=p_norm)
    ref_index = np.concatenate([np.sort(np.asarray(x, dtype=np.int64)) for x in lists])
    ref_splits = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    assert_same_csr(splits, index, ref_splits, ref_index, "radius search vs cKDTree")


@pytest.mark.parametrize("dilation", [1, 3])
def test_lidar_conifer_kernel_map_matches_ckdtree_oracle(conifer, dilation):
    points = conifer
    assert points.shape == (37657, 3)
    km = pc.kernel_map(points, 1.0, dilation=dilation)
    assert_kernel_map_matches(km, ckdtree_kernel_map(points, 1.0, 3, dilation), 3)
    assert_kernel_maps_identical(km, pc.kernel_map(points, 1.0, dilation=dilation,
                                                   method="kdtree"))


def test_lidar_conifer_crops_as_a_packed_batch_match_per_cloud_maps(conifer):
    """Four overlapping 40 m crops packed as one batch (a point may be in several crops): each
    cloud's map is the map of that crop alone, shifted by its offset."""
    p = conifer
    crops = [p[(p[:, 0] < 40) & (p[:, 1] < 40)], p[(p[:, 0] > 30) & (p[:, 0] < 70)],
             p[:0], p[(p[:, 1] > 50) & (p[:, 2] > 5)]]
    packed = np.concatenate(crops)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in crops])])
    km = pc.kernel_map(packed, 0.75, dilation=2, offsets=offsets)
    check_kernel_map_invariants(km, offsets)
    for b, crop in enumerate(crops):
        ref = ckdtree_kernel_map(crop, 0.75, 3, 2)
        rows = slice(offsets[b], offsets[b + 1])
        lo, hi = km.splits[offsets[b]], km.splits[offsets[b + 1]]
        np.testing.assert_array_equal(km.splits[offsets[b]:offsets[b + 1] + 1] - lo, ref.splits)
        np.testing.assert_array_equal(km.index[lo:hi] - offsets[b], ref.index)
        np.testing.assert_array_equal(km.cell[lo:hi], ref.cell)
        np.testing.assert_array_equal(km.counts[rows], ref.counts)


def test_lidar_tile_698k_grid_matches_kdtree(shared_data):
    """The full 0.7 M-point tile at v = 0.5 m (about 13 M pairs): both methods, bit for bit."""
    with np.load(shared_data / "lidar_als_labelled" / "ign_lambert93_tile_698k.npz") as z:
        points = z["points"]
    assert points.shape == (697721, 3)
    grid = pc.kernel_map(points, 0.5, method="grid")
    tree = pc.kernel_map(points, 0.5, method="kdtree")
    assert_kernel_maps_identical(grid, tree)
    np.testing.assert_array_equal(grid.counts.sum(axis=1), np.diff(grid.splits))
    # the centre point of every row sits in the centre cell (13 for K=3)
    rows = np.repeat(np.arange(len(points)), np.diff(grid.splits))
    own = grid.index == rows
    assert own.sum() == len(points)
    assert (grid.cell[own] == 13).all()


def test_modelnet40_dense_float16_batch_matches_bruteforce(shared_data):
    """A few shapes as a dense (B, 1024, 3) float16 batch with the paper's four dilations."""
    with np.load(shared_data / "modelnet40_1024" / "train.npz") as z:
        shapes = z["points"][[0, 1234, 5000, 9842]]
    assert shapes.dtype == np.float16 and shapes.shape == (4, 1024, 3)
    packed32 = shapes.reshape(-1, 3).astype(np.float32)  # float16 -> float32 is exact
    offsets = oracles.dense_offsets(4, 1024)
    index = pc.NeighborIndex(shapes, 0.1)
    for s in (1, 2, 3, 4):
        km = index.kernel_map(3, s)
        assert_kernel_map_matches(km, oracles.kernel_map(packed32, 0.1, 3, s, offsets), 3)
        check_kernel_map_invariants(km, offsets)
        assert_kernel_maps_identical(km, pc.kernel_map(packed32, 0.1, dilation=s,
                                                       offsets=offsets, method="kdtree"))
