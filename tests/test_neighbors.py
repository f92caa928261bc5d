"""Kernel map and radius search against the float64 brute-force oracles (tests/oracles.py), and
the invariants the SPEC promises: grid == kd-tree, 1 thread == 2 threads bit for bit, rows
ascending, clouds never mixed, the centre point in the centre cell, memory that does not grow
with the bounding box."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import oracles
import pytest
import strategies as S
from checks import (
    PEAK_RSS_PRELUDE,
    SIMD_MODES,
    assert_kernel_map_matches,
    assert_kernel_maps_identical,
    assert_same_csr,
    check_kernel_map_invariants,
    simd_available,
    simd_mode,
    simd_modes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pwconv_cy as pc

# PWCONV_TEST_EXAMPLES=<factor> scales the number of examples for a deeper search
# (the default keeps the whole suite within a few minutes on two cores).
_SCALE = float(os.environ.get("PWCONV_TEST_EXAMPLES", "1"))
PROPERTY = settings(max_examples=max(1, int(30 * _SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=max(1, int(15 * _SCALE)), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def prepared(points64, dtype, shift=0.0):
    """Cast (and for float32/float64 translate) a unit-scale cloud."""
    if np.dtype(dtype) == np.float16:
        shift = 0.0
    return S.cast(points64 + shift, dtype)


# --------------------------------------------------------------------------- kernel map vs oracle

@SIMD_MODES
@PROPERTY
@given(cloud=S.clouds(), voxel=S.voxel_sizes, K=S.kernel_sizes, s=S.dilations,
       dtype=S.coord_dtypes, method=S.methods, shift=S.shifts)
def test_kernel_map_matches_bruteforce(simd, cloud, voxel, K, s, dtype, method, shift):
    points = prepared(cloud, dtype, shift)
    with simd_mode(simd):
        km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method=method)
    assert_kernel_map_matches(km, oracles.kernel_map(points, voxel, K, s), K)
    check_kernel_map_invariants(km, oracles.single_cloud_offsets(len(points)))


@SIMD_MODES
@PROPERTY
@given(cloud=S.clouds(max_points=120, kinds=S.EXACT_KINDS), voxel=st.sampled_from(S.DYADIC_VOXELS),
       K=S.kernel_sizes, s=S.dilations, dtype=S.coord_dtypes, method=S.methods,
       shift=st.sampled_from((0.0, 1024.0, -2.0 ** 20)), data=st.data())
def test_kernel_map_matches_bruteforce_on_lattice(simd, cloud, voxel, K, s, dtype, method, shift,
                                                  data):
    """Points (and queries) exactly on cell faces: every step of the rule is exact, so the faces
    must be assigned exactly as the SPEC says (closed cube, upper face in the last cell, holes)."""
    points = prepared(cloud, dtype, shift)
    queries = data.draw(st.one_of(st.none(), S.clouds(kinds=S.EXACT_KINDS, max_points=40)))
    if queries is not None:
        queries = prepared(queries, dtype, shift)
    with simd_mode(simd):
        km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, queries=queries,
                           method=method)
    assert_kernel_map_matches(km, oracles.kernel_map(points, voxel, K, s, queries=queries), K)


@SIMD_MODES
@PROPERTY
@given(queries=S.clouds(min_points=1, max_points=12, kinds=("volume", "sphere", "decimal")),
       voxel=st.one_of(st.sampled_from((0.1, 0.3, 0.7, 1 / 3)), S.voxel_sizes),
       K=S.kernel_sizes, s=S.dilations, shift=S.shifts, method=S.methods, seed=S.seeds)
def test_kernel_map_matches_bruteforce_near_cell_faces(simd, queries, voxel, K, s, shift, method,
                                                       seed):
    """Points within a few ulps of the faces of the queries' kernel cells (non-dyadic voxels,
    coordinates far from the origin): only the exact float64 rule of SPEC §1 gets all of them
    right; a reordered subtraction, a reciprocal or an FMA misplaces some."""
    rng = np.random.default_rng(seed)
    q = queries + shift
    points = S.near_cell_faces(q, voxel, K, s, 200, rng)
    both = np.concatenate([points, q])  # the same points as self-queries, with the queries
    with simd_mode(simd):
        km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, queries=q, method=method)
        km_both = pc.kernel_map(both, voxel, kernel_size=K, dilation=s, method=method)
    assert_kernel_map_matches(km, oracles.kernel_map(points, voxel, K, s, queries=q), K)
    assert_kernel_map_matches(km_both, oracles.kernel_map(both, voxel, K, s), K)


def test_kernel_map_on_cell_faces_worked_example():
    """A hand-checked case of the face rules (K=3, s=2, v=1, h=2.5, query at 0): t = x + 2.5.
    x = -2.5 (t=0, lower face: kernel cell 0), -1.5 (t=1: hole), -0.5 (t=2: cell 1), 0 (t=2.5:
    cell 1), 0.5 (t=3: hole), 1.5 (t=4: cell 2), 2.5 (t=5 = span: upper face, min() puts it in
    the last unit cell 4 -> cell 2), 2.5 + 1e-9 (outside).  (2.5 + 1 ulp would still be inside:
    5 + ulp(2.5) rounds to 5.)"""
    xs = np.array([-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 2.5 + 1e-9])
    points = np.zeros((len(xs), 3))
    points[:, 0] = xs
    centre_yz = (1 * 3 + 1) * 3
    for method in ("grid", "kdtree"):
        km = pc.kernel_map(points, 1.0, kernel_size=3, dilation=2, queries=np.zeros((1, 3)),
                           method=method)
        assert km.index.tolist() == [0, 2, 3, 5, 6]
        assert km.cell.tolist() == [centre_yz + 0, centre_yz + 1, centre_yz + 1, centre_yz + 2,
                                    centre_yz + 2]
        assert km.counts[0].tolist() == np.bincount(km.cell, minlength=27).tolist()
        assert km.counts[0, centre_yz + 1] == 2


@SIMD_MODES
@PROPERTY
@given(batch=S.batches(), voxel=S.voxel_sizes, K=S.kernel_sizes, s=S.dilations,
       dtype=S.coord_dtypes, qdtype=S.coord_dtypes, method=S.methods, data=st.data())
def test_kernel_map_batches_with_queries_match_bruteforce(simd, batch, voxel, K, s, dtype, qdtype,
                                                          method, data):
    points = S.cast(batch.points, dtype)
    qb = data.draw(S.queries_for(batch))
    queries = S.cast(qb.points, qdtype)
    with simd_mode(simd):
        km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, offsets=batch.offsets,
                           queries=queries, query_offsets=qb.offsets, method=method)
    ref = oracles.kernel_map(points, voxel, K, s, offsets=batch.offsets, queries=queries,
                             query_offsets=qb.offsets)
    assert_kernel_map_matches(km, ref, K)
    check_kernel_map_invariants(km, batch.offsets, qb.offsets, self_query=False)


@PROPERTY
@given(batch=S.batches(min_clouds=0, max_clouds=5), voxel=S.voxel_sizes, K=S.kernel_sizes,
       s=S.dilations, dtype=S.coord_dtypes, method=S.methods)
def test_kernel_map_packed_batches_with_empty_clouds_match_bruteforce(batch, voxel, K, s, dtype,
                                                                      method):
    points = S.cast(batch.points, dtype)
    km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, offsets=batch.offsets,
                       method=method)
    assert_kernel_map_matches(km, oracles.kernel_map(points, voxel, K, s, batch.offsets), K)
    check_kernel_map_invariants(km, batch.offsets)


@PROPERTY
@given(B=st.integers(1, 3), n=st.integers(0, 40), m=st.integers(0, 20), kind=st.sampled_from(
       S.CLOUD_KINDS), seed=S.seeds, voxel=S.voxel_sizes, K=S.kernel_sizes, s=S.dilations,
       dtype=S.coord_dtypes, method=S.methods)
def test_dense_kernel_map_equals_packed_and_bruteforce(B, n, m, kind, seed, voxel, K, s, dtype,
                                                       method):
    rng = np.random.default_rng(seed)
    dense = S.cast(S.make_cloud(kind, B * n, rng).reshape(B, n, 3), dtype)
    packed = dense.reshape(B * n, 3)
    offsets = oracles.dense_offsets(B, n)
    km_dense = pc.kernel_map(dense, voxel, kernel_size=K, dilation=s, method=method)
    km_packed = pc.kernel_map(packed, voxel, kernel_size=K, dilation=s, offsets=offsets,
                              method=method)
    assert_kernel_maps_identical(km_dense, km_packed)
    assert_kernel_map_matches(km_dense, oracles.kernel_map(packed, voxel, K, s, offsets), K)
    # dense queries (B, m, 3) == packed queries with query_offsets [0, m, 2m, ...]
    dq = S.cast(S.make_cloud(kind, B * m, rng).reshape(B, m, 3), dtype)
    km_dq = pc.kernel_map(dense, voxel, kernel_size=K, dilation=s, queries=dq, method=method)
    ref = oracles.kernel_map(packed, voxel, K, s, offsets, dq.reshape(-1, 3),
                             oracles.dense_offsets(B, m))
    assert_kernel_map_matches(km_dq, ref, K)


@pytest.mark.parametrize("K, cell_dtype", [(7, np.int16), (33, np.int32)])
def test_large_kernels_use_wider_cell_dtype_and_match_bruteforce(rng, K, cell_dtype):
    points = rng.uniform(-1, 1, size=(40, 3))
    km = pc.kernel_map(points, 0.1, kernel_size=K, dilation=1)
    assert km.cell.dtype == cell_dtype
    assert_kernel_map_matches(km, oracles.kernel_map(points, 0.1, K, 1), K)
    check_kernel_map_invariants(km, oracles.single_cloud_offsets(40))


# --------------------------------------------------------------------------- consistency

@FEW
@given(cloud=S.clouds(min_points=200, max_points=1500), voxel=S.voxel_sizes, K=S.kernel_sizes,
       s=S.dilations, dtype=st.sampled_from((np.float32, np.float64)), shift=S.shifts,
       leaf_size=st.sampled_from((1, 3, 16, 64)))
def test_grid_matches_kdtree_kernel_map(cloud, voxel, K, s, dtype, shift, leaf_size):
    points = prepared(cloud * 2, dtype, shift)
    grid = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method="grid")
    tree = pc.NeighborIndex(points, voxel, method="kdtree", leaf_size=leaf_size).kernel_map(
        K, s)
    auto = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method="auto")
    assert_kernel_maps_identical(grid, tree)
    assert_kernel_maps_identical(grid, auto)
    check_kernel_map_invariants(grid, oracles.single_cloud_offsets(len(points)))


@FEW
@given(cloud=S.clouds(min_points=200, max_points=1500), radius=S.radii, metric=S.metrics,
       dtype=st.sampled_from((np.float32, np.float64)), shift=S.shifts,
       leaf_size=st.sampled_from((1, 3, 16, 64)))
def test_grid_matches_kdtree_radius_search(cloud, radius, metric, dtype, shift, leaf_size):
    points = prepared(cloud * 2, dtype, shift)
    splits_g, index_g = pc.radius_search(points, radius, metric=metric, method="grid")
    splits_t, index_t = pc.NeighborIndex(points, radius, method="kdtree",
                                         leaf_size=leaf_size).radius_search(radius, metric=metric)
    assert_same_csr(splits_t, index_t, splits_g, index_g, "kd-tree vs grid radius search")


@pytest.mark.parametrize("method", ["grid", "kdtree"])
@pytest.mark.parametrize("dilation", [1, 3])
def test_one_thread_matches_two_threads_bit_for_bit(rng, method, dilation):
    """Large enough for the work to be split between threads (several clouds, uneven sizes)."""
    sizes = [3000, 0, 1700, 5]
    points = np.concatenate([S.make_cloud(k, n, rng) for k, n in
                             zip(("sphere", "volume", "clustered", "line"), sizes)])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    queries = S.make_cloud("volume", 2500, rng)
    q_offsets = np.array([0, 1000, 1500, 2400, 2500])
    for kwargs in ({}, {"queries": queries, "query_offsets": q_offsets}):
        one = pc.kernel_map(points, 0.1, dilation=dilation, offsets=offsets, method=method,
                            num_threads=1, **kwargs)
        two = pc.kernel_map(points, 0.1, dilation=dilation, offsets=offsets, method=method,
                            num_threads=2, **kwargs)
        assert_kernel_maps_identical(one, two)
        # more threads than cores (and than some clouds have blocks): still the same bits
        five = pc.kernel_map(points, 0.1, dilation=dilation, offsets=offsets, method=method,
                             num_threads=5, **kwargs)
        assert_kernel_maps_identical(one, five)
        for metric in ("chebyshev", "euclidean"):
            r1 = pc.radius_search(points, 0.15, offsets=offsets, metric=metric, method=method,
                                  num_threads=1, **kwargs)
            r2 = pc.radius_search(points, 0.15, offsets=offsets, metric=metric, method=method,
                                  num_threads=2, **kwargs)
            assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])


@pytest.mark.skipif(len(simd_modes()) < 2, reason="this CPU has neither AVX-512 nor AVX2")
@pytest.mark.parametrize("K", [1, 3, 5])
def test_simd_filters_equal_portable_ones_bit_for_bit(rng, K):
    """The paper's kind of batch (compact sphere clouds, the path the SIMD filters serve), with
    self-queries and other queries, every dilation, and the voxel equal to, smaller than and three
    times the index's cell (then a dilated query spans more grid rows than the AVX-512 path lists
    at once, and it falls back to row-by-row loops): every family of loops gives the same maps."""
    sizes = [2048, 0, 700, 1, 2048]
    points = np.concatenate([S.make_cloud("sphere", n, rng) for n in sizes]).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    queries = S.make_cloud("volume", 900, rng)
    q_offsets = np.array([0, 300, 300, 600, 600, 900])
    index = pc.NeighborIndex(points, 0.1, offsets=offsets)
    for s in (1, 2, 3, 4):
        for kwargs in ({}, {"queries": queries, "query_offsets": q_offsets},
                       {"voxel_size": 0.07}, {"voxel_size": 0.3}):
            maps = []
            for mode in simd_modes():
                with simd_mode(mode):
                    maps.append(index.kernel_map(K, s, **kwargs))
            assert maps[0].index.size > 0
            for other in maps[1:]:
                assert_kernel_maps_identical(maps[0], other)


def test_set_simd_enabled_reports_and_validates():
    previous = pc.neighbors.set_simd_enabled(False)
    try:
        assert pc.neighbors.simd_enabled() is False
        assert pc.neighbors.set_simd_enabled(True) is False
        assert pc.neighbors.simd_enabled() is simd_available()
        with pytest.raises(TypeError, match="enabled must be True or False, got int"):
            pc.neighbors.set_simd_enabled(1)
    finally:
        pc.neighbors.set_simd_enabled(previous)


@PROPERTY
@given(cloud=S.clouds(min_points=1, max_points=150), voxel=S.voxel_sizes, K=S.kernel_sizes,
       s=S.dilations, dtype=S.coord_dtypes, shift=S.shifts, method=S.methods)
def test_self_query_has_centre_point_in_centre_cell(cloud, voxel, K, s, dtype, shift, method):
    points = prepared(cloud, dtype, shift)
    km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method=method)
    check_kernel_map_invariants(km, oracles.single_cloud_offsets(len(points)), self_query=True)


@FEW
@given(cloud=S.clouds(min_points=1, max_points=120), voxel=S.voxel_sizes,
       cell_factor=st.sampled_from((1.0, 0.37, 2.5)), K=st.sampled_from((3, 5)),
       method=S.methods, dtype=S.coord_dtypes)
def test_neighbor_index_reused_for_dilations_equals_fresh_kernel_maps(cloud, voxel, cell_factor,
                                                                      K, method, dtype):
    """One index (cell edge independent of the dilation) serves the four layers of the paper;
    an index built with another cell size still gives the exact map for voxel_size=v."""
    points = S.cast(cloud, dtype)
    index = pc.NeighborIndex(points, voxel * cell_factor, method=method)
    for s in (1, 2, 3, 4):
        reused = index.kernel_map(kernel_size=K, dilation=s, voxel_size=voxel)
        fresh = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method=method)
        assert_kernel_maps_identical(reused, fresh)
        assert_kernel_map_matches(reused, oracles.kernel_map(points, voxel, K, s), K)
        assert reused.dilation == s and reused.voxel_size == voxel
    again = index.kernel_map(kernel_size=K, dilation=1, voxel_size=voxel)
    assert_kernel_maps_identical(again, pc.kernel_map(points, voxel, kernel_size=K, method=method))


@FEW
@given(batch=S.batches(), voxel=S.voxel_sizes, K=st.sampled_from((1, 3, 5)),
       dilations=st.lists(st.integers(1, 4), max_size=4), method=S.methods,
       with_queries=st.booleans(), seed=S.seeds)
def test_kernel_maps_equal_one_kernel_map_per_dilation(batch, voxel, K, dilations, method,
                                                       with_queries, seed):
    """NeighborIndex.kernel_maps: one map per dilation (repeats and none included), each the
    map kernel_map makes for it, with or without queries."""
    queries = q_offsets = None
    if with_queries:
        rng = np.random.default_rng(seed)
        counts = rng.integers(0, 6, size=len(batch.offsets) - 1)
        q_offsets = np.concatenate([[0], np.cumsum(counts)])
        queries = rng.uniform(-1.2, 1.2, size=(int(q_offsets[-1]), 3))
    index = pc.NeighborIndex(batch.points, voxel, offsets=batch.offsets, method=method)
    maps = index.kernel_maps(K, dilations, queries=queries, query_offsets=q_offsets)
    assert len(maps) == len(dilations)
    for s, km in zip(dilations, maps):
        assert km.dilation == s and km.kernel_size == K
        assert_kernel_maps_identical(km, index.kernel_map(K, s, queries=queries,
                                                          query_offsets=q_offsets))


def test_kernel_maps_checks_dilations_and_bounds_all_maps_by_the_budget(rng):
    points = rng.uniform(-1, 1, size=(400, 3))
    index = pc.NeighborIndex(points, 0.2)
    for bad, err, text in ((3, TypeError, "dilations must be a sequence of integers"),
                           ("12", TypeError, "dilations must be a sequence"),
                           ([1, 0], ValueError, r"dilations\[1\]: dilation must be >= 1, got 0"),
                           ([2.0], TypeError, r"dilations\[0\]: dilation must be an integer")):
        with pytest.raises(err, match=text):
            index.kernel_maps(3, bad)
    maps = index.kernel_maps(3, np.array([1, 2]))
    first = sum(a.nbytes for a in (maps[0].splits, maps[0].index, maps[0].cell))
    # room for the first map (and its temporaries), not for both
    budget = 2 * first + 20 * maps[0].n_pairs
    with pytest.raises(pc.MemoryBudgetError, match=r"kernel_maps, dilation 2 \(the maps for "
                                                   r"dilations \(1,( 2)?\) already use"):
        index.kernel_maps(3, (1, 2, 2, 2, 2), memory_budget=budget)


def test_neighbor_index_default_voxel_is_cell_size_and_queries_work(rng):
    points = rng.uniform(-1, 1, size=(300, 3))
    queries = rng.uniform(-1.2, 1.2, size=(50, 3))
    index = pc.NeighborIndex(points, 0.2)
    assert index.n_points == 300 and index.n_clouds == 1
    km = index.kernel_map(3, 2, queries=queries)
    assert km.voxel_size == 0.2
    assert_kernel_map_matches(km, oracles.kernel_map(points, 0.2, 3, 2, queries=queries), 3)
    splits, idx = index.radius_search(0.33, queries, metric="euclidean")
    assert_same_csr(splits, idx, *oracles.radius_search(points, 0.33, queries,
                                                        metric="euclidean"))


def test_non_contiguous_and_other_integer_offsets_give_the_same_map(rng):
    base = rng.uniform(-1, 1, size=(400, 3))
    strided = base[::2]                      # a strided view
    fortran = np.asfortranarray(strided)
    offsets = np.array([0, 70, 70, 200])
    expected = pc.kernel_map(np.ascontiguousarray(strided), 0.2, offsets=offsets)
    for pts in (strided, fortran):
        for offs in (offsets.astype(np.int32), offsets.astype(np.uint16), offsets.tolist()):
            assert_kernel_maps_identical(pc.kernel_map(pts, 0.2, offsets=offs), expected)
    assert_kernel_map_matches(expected, oracles.kernel_map(strided, 0.2, 3, 1, offsets), 3)


def test_kernel_map_counts_are_computed_on_first_access_only(rng):
    """Host maps are emitted without their (m, K^3) counts, which the operator does not need:
    a forward and a backward leave them uncomputed; the first access computes them (equal to
    the oracle's), later accesses return the same array; a converted map gets them."""
    sizes = [60, 0, 45] + [20] * 15  # 18 clouds: the backward by cloud
    points = np.concatenate([rng.uniform(-1, 1, size=(m, 3)) for m in sizes])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    km = pc.kernel_map(points, 0.3, dilation=2, offsets=offsets)
    assert km._stored_counts() is None
    assert km._stored_index().dtype == np.int32  # fewer than 2**31 points: stored narrow
    assert km.nbytes == (km.splits.nbytes + 4 * km.n_pairs + km.cell.nbytes
                         + 4 * km.n_queries * 27)
    x = rng.standard_normal((len(points), 4))
    w = rng.standard_normal((3, 3, 3, 4, 2))
    y = pc.pointwise_conv(points, x, w, 0.3, dilation=2, offsets=offsets, kernel_map=km)
    pc.pointwise_conv_backward(np.ones_like(y), points, x, w, 0.3, dilation=2, offsets=offsets,
                               kernel_map=km)
    assert km._stored_counts() is None
    assert km._with_arrays(lambda a, _: a) is km  # no conversion: still uncomputed
    assert km._stored_counts() is None
    ref = oracles.kernel_map(points, 0.3, 3, 2, offsets)
    counts = km.counts
    assert counts.dtype == np.int32 and counts.shape == (km.n_queries, 27)
    np.testing.assert_array_equal(counts, ref.counts)
    assert km.counts is counts and km._stored_counts() is counts
    fresh = pc.kernel_map(points, 0.3, dilation=2, offsets=offsets)
    copied = fresh._with_arrays(lambda a, _: a.copy())  # a conversion: the copy has its counts
    np.testing.assert_array_equal(copied._stored_counts(), ref.counts)
    # the small-batch backward (over the transposed map) computes and uses them
    km3 = pc.kernel_map(points[:105], 0.3, dilation=2, offsets=offsets[:4])
    pc.pointwise_conv_backward(np.ones((105, 2)), points[:105], x[:105], w, 0.3, dilation=2,
                               offsets=offsets[:4], kernel_map=km3)
    assert km3._stored_counts() is not None


def test_points_fingerprint_sees_every_byte_where_it_is_and_not_the_threads(rng):
    """The 64-bit hash behind a kernel map's points digest: the same at 1, 2 and 3 threads (fixed
    chunks of 256 KiB), changed by any flipped bit (chunk starts, ends, tails), by swapping two
    words, and by the length."""
    chunk = 1 << 18
    data = rng.integers(0, 256, size=2 * chunk + 77, dtype=np.uint8)  # two chunks and a tail
    base = pc._core.fingerprint_(data, 1)
    assert all(pc._core.fingerprint_(data, t) == base for t in (2, 3))
    for pos in [0, 7, 31, 32, chunk - 1, chunk, 2 * chunk, len(data) - 1,
                *rng.integers(0, len(data), 20)]:
        for bit in (0, 7):
            flipped = data.copy()
            flipped[pos] ^= 1 << bit
            assert pc._core.fingerprint_(flipped, 2) != base, (pos, bit)
    swapped = data.copy()
    swapped[:8], swapped[8:16] = data[8:16], data[:8]
    assert pc._core.fingerprint_(swapped, 2) != base
    assert pc._core.fingerprint_(data[:-1], 2) != base
    assert pc._core.fingerprint_(np.zeros(0, np.uint8), 1) == pc._core.fingerprint_(
        np.zeros(0, np.uint8), 2)

def test_kernel_map_index_is_int64_and_stored_as_int32(rng):
    """Host maps of fewer than 2**31 points store their index in 32 bits (the kernels take it
    as it is); KernelMap.index is the documented int64, widened on first access (the int64 copy
    replaces the int32 one); a map of a converted kind gets int64."""
    points = rng.uniform(-1, 1, size=(500, 3))
    km = pc.kernel_map(points, 0.3)
    wide = pc.kernel_map(points, 0.3)
    stored = km._stored_index()
    assert stored.dtype == np.int32 and km.nbytes == wide.nbytes
    copied = km._with_arrays(lambda a, _: a.copy())
    assert copied._stored_index().dtype == np.int64
    assert km._stored_index() is stored  # converting did not widen the original
    index = wide.index
    assert index.dtype == np.int64 and wide.index is index and wide._stored_index() is index
    assert wide.nbytes == km.nbytes + 4 * km.n_pairs
    np.testing.assert_array_equal(index, stored)
    np.testing.assert_array_equal(index, oracles.kernel_map(points, 0.3, 3, 1).index)
    x = rng.standard_normal((500, 2))
    w = rng.standard_normal((3, 3, 3, 2, 2))
    # the int64 and int32 maps give the same results
    assert wide._stored_index().dtype == np.int64
    for a, b in zip(
            (pc.pointwise_conv(points, x, w, 0.3, kernel_map=km),
             *pc.pointwise_conv_backward(np.ones((500, 2)), points, x, w, 0.3, kernel_map=km)),
            (pc.pointwise_conv(points, x, w, 0.3, kernel_map=wide),
             *pc.pointwise_conv_backward(np.ones((500, 2)), points, x, w, 0.3,
                                         kernel_map=wide))):
        assert np.array_equal(a, b)

@pytest.mark.parametrize("m, empty_rows", [(0, False), (5, True)])
def test_kernel_map_counts_of_empty_maps_are_zero(m, empty_rows):
    splits = np.zeros(m + 1, dtype=np.int64)
    counts = pc._core.kernel_map_counts_(splits, np.zeros(0, dtype=np.uint8), 3, 1)
    assert counts.shape == (m, 27) and counts.dtype == np.int32 and not counts.any()


# --------------------------------------------------------------------------- radius search

@PROPERTY
@given(batch=S.batches(), radius=S.radii, metric=S.metrics, dtype=S.coord_dtypes,
       method=S.methods, with_queries=st.booleans(), data=st.data())
def test_radius_search_matches_bruteforce(batch, radius, metric, dtype, method, with_queries,
                                          data):
    points = S.cast(batch.points, dtype)
    kwargs = {}
    if with_queries:
        qb = data.draw(S.queries_for(batch))
        kwargs = {"queries": S.cast(qb.points, data.draw(S.coord_dtypes)),
                  "query_offsets": qb.offsets}
    splits, index = pc.radius_search(points, radius, offsets=batch.offsets, metric=metric,
                                     method=method, **kwargs)
    ref = oracles.radius_search(points, radius, kwargs.get("queries"), batch.offsets,
                                kwargs.get("query_offsets"), metric)
    assert_same_csr(splits, index, *ref)
    if not with_queries:  # every point finds itself
        for i in range(len(points)):
            assert i in index[splits[i]:splits[i + 1]]


@PROPERTY
@given(cloud=S.clouds(kinds=S.EXACT_KINDS, max_points=120),
       radius=st.sampled_from((1 / 8, 1 / 4, 3 / 8, 1 / 2)), metric=S.metrics,
       dtype=S.coord_dtypes, method=S.methods)
def test_radius_search_matches_bruteforce_on_lattice(cloud, radius, metric, dtype, method):
    """Neighbours exactly at distance r (both metrics) must be included: the ball is closed."""
    points = S.cast(cloud, dtype)
    splits, index = pc.radius_search(points, radius, metric=metric, method=method)
    assert_same_csr(splits, index, *oracles.radius_search(points, radius, metric=metric))


@PROPERTY
@given(cloud=S.clouds(min_points=1, max_points=300, kinds=("sphere", "volume", "clustered")),
       queries=S.clouds(min_points=0, max_points=60, kinds=("volume", "sphere")),
       radius=S.radii, metric=S.metrics, dtype=st.sampled_from((np.float32, np.float64)),
       method=S.methods)
def test_radius_search_matches_ckdtree(cloud, queries, radius, metric, dtype, method):
    from scipy.spatial import cKDTree

    points = S.cast(cloud, dtype)
    q = S.cast(queries, dtype)
    splits, index = pc.radius_search(points, radius, q, metric=metric, method=method)
    p_norm = np.inf if metric == "chebyshev" else 2
    lists = cKDTree(points.astype(np.float64)).query_ball_point(q.astype(np.float64), radius,
                                                                p=p_norm)
    ref_index = np.array([j for row in lists for j in sorted(row)], dtype=np.int64)
    ref_splits = np.concatenate([[0], np.cumsum([len(r) for r in lists])]).astype(np.int64)
    assert_same_csr(splits, index, ref_splits, ref_index, "radius search vs cKDTree")


@PROPERTY
@given(queries=S.clouds(min_points=1, max_points=12, kinds=("volume", "sphere", "decimal")),
       radius=st.one_of(st.sampled_from((0.1, 0.3, 1 / 3)), S.radii), metric=S.metrics,
       shift=S.shifts, method=S.methods, seed=S.seeds)
def test_radius_search_matches_bruteforce_near_the_boundary(queries, radius, metric, shift,
                                                            method, seed):
    """Points within a few ulps of the cube/sphere of radius r: the closed test in float64
    (d = p - q, (dx*dx + dy*dy) + dz*dz <= r*r) decides, whatever the search structure."""
    rng = np.random.default_rng(seed)
    q = queries + shift
    points = S.near_spheres(q, radius, 200, rng)
    splits, index = pc.radius_search(points, radius, q, metric=metric, method=method)
    assert_same_csr(splits, index, *oracles.radius_search(points, radius, q, metric=metric))


def test_radius_search_closed_ball_boundaries():
    """Distance exactly r is inside for both metrics; one ulp further is outside."""
    r = 0.5
    q = np.zeros((1, 3))
    points = np.array([[0.5, 0, 0], [0, -0.5, 0], [0, 0, np.nextafter(0.5, 1)],
                       [0.3, 0.4, 0.0],
                       [0.5, 0.5, 0.5], [0.5, 0.5, np.nextafter(0.5, 1)]])
    for method in ("grid", "kdtree"):
        _, i_c = pc.radius_search(points, r, q, metric="chebyshev", method=method)
        assert i_c.tolist() == [0, 1, 3, 4]
        _, i_e = pc.radius_search(points, r, q, metric="euclidean", method=method)
        ref = oracles.radius_search(points, r, q, metric="euclidean")
        assert i_e.tolist() == ref[1].tolist()
        assert {0, 1} <= set(i_e.tolist()) and not {2, 4, 5} & set(i_e.tolist())


# --------------------------------------------------------------------------- empty & tiny inputs

@pytest.mark.parametrize("dtype", S.COORD_DTYPES)
@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_empty_inputs_give_empty_results(dtype, method):
    empty = np.zeros((0, 3), dtype=dtype)
    km = pc.kernel_map(empty, 0.1, method=method)
    assert km.splits.tolist() == [0] and km.index.shape == (0,) and km.cell.shape == (0,)
    assert km.counts.shape == (0, 27) and km.counts.dtype == np.int32
    splits, index = pc.radius_search(empty, 0.1, method=method)
    assert splits.tolist() == [0] and index.shape == (0,) and index.dtype == np.int64
    # queries against no points: every row is empty
    q = np.ones((4, 3), dtype=dtype)
    km = pc.kernel_map(empty, 0.1, queries=q, method=method)
    assert km.splits.tolist() == [0] * 5 and km.counts.shape == (4, 27) and not km.counts.any()
    splits, index = pc.radius_search(empty, 0.1, q, method=method)
    assert splits.tolist() == [0] * 5 and index.size == 0
    # dense forms with no points per cloud, and with no clouds at all
    for shape in ((3, 0, 3), (0, 5, 3)):
        km = pc.kernel_map(np.zeros(shape, dtype=dtype), 0.1, method=method)
        assert km.splits.tolist() == [0] and km.counts.shape == (0, 27)
    # packed clouds that are all empty, with queries in one of them
    km = pc.kernel_map(empty, 0.1, offsets=[0, 0, 0], queries=q, query_offsets=[0, 0, 4],
                       method=method)
    assert km.splits.tolist() == [0] * 5


@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("dtype", S.COORD_DTYPES)
@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_single_point_is_its_own_only_neighbour(K, dtype, method):
    point = np.array([[0.25, -1.5, 3.0]], dtype=dtype)
    for s in (1, 2, 4):
        km = pc.kernel_map(point, 0.2, kernel_size=K, dilation=s, method=method)
        centre = ((K // 2) * K + K // 2) * K + K // 2
        assert km.splits.tolist() == [0, 1] and km.index.tolist() == [0]
        assert km.cell.tolist() == [centre]
        expected = np.zeros((1, K ** 3), dtype=np.int32)
        expected[0, centre] = 1
        np.testing.assert_array_equal(km.counts, expected)
    for metric in ("chebyshev", "euclidean"):
        splits, index = pc.radius_search(point, 1e-9, metric=metric, method=method)
        assert splits.tolist() == [0, 1] and index.tolist() == [0]


def test_kernel_size_one_is_a_single_cell_of_edge_v():
    """K=1: the support is the cube of edge v centred on the query, whatever the dilation."""
    q = np.zeros((1, 3))
    points = np.array([[0.05, 0.05, -0.05], [0.0500001, 0, 0], [0.049, -0.049, 0.0]])
    for s in (1, 2, 4):
        km = pc.kernel_map(points, 0.1, kernel_size=1, dilation=s, queries=q)
        assert km.index.tolist() == [0, 2] and km.cell.tolist() == [0, 0]
        assert km.counts.tolist() == [[2]]


# --------------------------------------------------------------------------- far and huge coordinates

_RSS_SCRIPT = PEAK_RSS_PRELUDE + textwrap.dedent("""
    points = np.array([[0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [1e9, 0.0, 0.0]])
    before = peak_kib()
    t0 = time.perf_counter()
    result = {}
    if sys.argv[1] == "work":
        for method in ("grid", "kdtree"):
            for s in (1, 4):
                km = pc.kernel_map(points, 1e-3, kernel_size=5, dilation=s, method=method)
                result[f"{method}-{s}"] = km.index.tolist()
            splits, index = pc.radius_search(points, 1e-3, method=method)
            result[f"{method}-radius"] = index.tolist()
        index = pc.NeighborIndex(points, 1e-3)
        result["index-km"] = index.kernel_map(3, 4).index.tolist()
    elapsed = time.perf_counter() - t0
    after = peak_kib()
    print(json.dumps({"before_kib": before, "after_kib": after, "seconds": elapsed,
                      "result": result}))
""")


def _run_rss(mode, cwd):
    # run outside the checkout: `python -c` puts the working directory first on sys.path, and
    # the source folder pwconv_cy/ there is not the installed (compiled) package
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_far_outlier_needs_no_dense_grid(tmp_path):
    """Three points, one at 1e9, voxel 1e-3 (a 1e12-cell bounding box per axis): the maps finish
    at once and the peak RSS stays within a few MB of a process that only imports pwconv_cy."""
    baseline = _run_rss("import-only", tmp_path)
    work = _run_rss("work", tmp_path)
    grown_mib = (work["after_kib"] - baseline["after_kib"]) / 1024
    assert grown_mib < 8, f"peak RSS grew by {grown_mib:.1f} MiB for a 3-point kernel map"
    assert work["seconds"] < 2.0, f"took {work['seconds']:.2f} s for 3 points"
    res = work["result"]
    points = np.array([[0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [1e9, 0.0, 0.0]])
    for method in ("grid", "kdtree"):
        for s in (1, 4):
            ref = oracles.kernel_map(points, 1e-3, 5, s)
            assert res[f"{method}-{s}"] == ref.index.tolist(), (method, s)
        assert res[f"{method}-radius"] == oracles.radius_search(points, 1e-3)[1].tolist()
    assert res["index-km"] == oracles.kernel_map(points, 1e-3, 3, 4).index.tolist()


def _huge_cloud(rng, scale, voxel):
    """Clusters at +-scale on every axis (cell coordinates far beyond 40 bits), points a few
    voxels apart inside each cluster, and points whose cell coordinates differ by exactly
    2**k cells (k = 16..52) from a cluster — a packed or truncated key would alias them."""
    corners = np.array([[1, 1, 1], [-1, -1, -1], [1, -1, 1], [-1, 1, -1], [0, 0, 0]]) * scale
    parts = [c + rng.integers(-4, 5, size=(12, 3)) * voxel * 0.5 for c in corners]
    base = corners[0]
    for k in range(16, 53, 3):
        for axis in range(3):
            p = base.copy()
            p[axis] -= (2.0 ** k) * voxel
            parts.append(p[None, :])
    parts.append(rng.uniform(-scale, scale, size=(10, 3)))
    return np.concatenate(parts)


@pytest.mark.parametrize("method", ["grid", "kdtree"])
@pytest.mark.parametrize("scale, voxel", [(1e13, 1e-2), (3e15, 1e-2)])
def test_huge_cell_coordinates_match_bruteforce(rng, method, scale, voxel):
    points = _huge_cloud(rng, scale, voxel)
    assert (np.abs(points).max() / voxel) > 2.0 ** 40
    for K, s in ((3, 1), (3, 4), (5, 2)):
        km = pc.kernel_map(points, voxel, kernel_size=K, dilation=s, method=method)
        assert_kernel_map_matches(km, oracles.kernel_map(points, voxel, K, s), K)
        assert km.n_pairs > len(points)  # the clusters really have neighbours
    for metric in ("chebyshev", "euclidean"):
        splits, index = pc.radius_search(points, 2 * voxel, metric=metric, method=method)
        assert_same_csr(splits, index, *oracles.radius_search(points, 2 * voxel, metric=metric))


@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_cell_coordinates_beyond_int64_match_bruteforce(method):
    """Coordinates ~1e18 with voxel 1e-3: cell numbers ~1e21 overflow int64; the rule still
    defines the map (neighbours are the points at equal coordinates) and it must be followed."""
    base = np.array([[1e18, -1e18, 5e17], [1e18, -1e18, 5e17], [1e18 + 256, -1e18, 5e17],
                     [-1e18, 1e18, 0.0], [0.0, 0.0, 0.0], [1e-3, 0.0, 0.0]])
    for K, s in ((3, 1), (3, 2)):
        km = pc.kernel_map(base, 1e-3, kernel_size=K, dilation=s, method=method)
        assert_kernel_map_matches(km, oracles.kernel_map(base, 1e-3, K, s), K)


@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_index_memory_grows_with_points_not_with_the_bounding_box(rng, method):
    compact = rng.uniform(0, 1, size=(2000, 3))
    spread = compact.copy()
    spread[::100] *= 1e9                      # 20 points scattered over a 1e9-wide box
    small = pc.NeighborIndex(compact, 1e-3, method=method).memory_bytes
    big = pc.NeighborIndex(spread, 1e-3, method=method).memory_bytes
    assert 0 < big <= 1.5 * small + 4096, (small, big)
    assert big < 2000 * 3 * 8 * 16            # a small multiple of the coordinates themselves


def test_dlpack_producers_are_read_like_numpy_arrays(rng):
    """README: anything exposing DLPack on the CPU is accepted (here a bare DLPack producer)."""
    class Producer:
        def __init__(self, array):
            self._array = array

        def __dlpack__(self, **kwargs):
            return self._array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._array.__dlpack_device__()

    points = rng.uniform(-1, 1, size=(200, 3)).astype(np.float32)
    queries = rng.uniform(-1, 1, size=(30, 3))
    expected = pc.kernel_map(points, 0.2, queries=queries)
    got = pc.kernel_map(Producer(points), 0.2, queries=Producer(queries))
    assert_kernel_maps_identical(got, expected)
    splits, index = pc.radius_search(Producer(points), 0.2, Producer(queries))
    assert_same_csr(splits, index, *pc.radius_search(points, 0.2, queries))


# --- the transposed kernel map ----------------------------------------------------------------


def _transposed_by_definition(km):
    """For every point j: keys (row << 5) | cell of the entries naming j, rows ascending, and the
    count n_row(cell) of each (the backward's keys carry it in their low 16 bits)."""
    rows = np.repeat(np.arange(km.n_queries), np.diff(km.splits))
    order = np.lexsort((rows, km.index))
    tsplits = np.zeros(km.n_points + 1, dtype=np.int64)
    np.cumsum(np.bincount(km.index, minlength=km.n_points), out=tsplits[1:])
    cells = km.cell[order].astype(np.int64)
    return tsplits, (rows[order] << 5) | cells, km.counts[rows[order], cells]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), voxel=S.voxel_sizes, dilation=S.dilations)
def test_transposed_map_cloud_by_cloud_equals_the_definition(data, voxel, dilation):
    batch = data.draw(S.batches(max_clouds=6))
    queries = data.draw(st.one_of(st.none(), S.queries_for(batch)))
    km = pc.kernel_map(batch.points, voxel, dilation=dilation, offsets=batch.offsets,
                              queries=None if queries is None else queries.points,
                              query_offsets=None if queries is None else queries.offsets)
    want = _transposed_by_definition(km)
    for threads in (1, 2):  # 2 threads: cloud by cloud from 2 clouds, else the global sort
        for offsets in ((km.offsets, km.query_offsets), (None, None)):
            tsplits, tkeys, count_bits = pc._core.transpose_map(
                km.splits, km.index, km.cell, km.counts, km.n_points, 3, *offsets, True, threads)
            assert count_bits == 16
            np.testing.assert_array_equal(tsplits, want[0])
            np.testing.assert_array_equal(tkeys >> 16, want[1])
            np.testing.assert_array_equal(tkeys & 0xFFFF, np.minimum(want[2], 0xFFFF))
            plain = pc._core.transpose_map(km.splits, km.index, km.cell, km.counts, km.n_points,
                                           3, *offsets, False, threads)
            assert plain[2] == 0
            np.testing.assert_array_equal(plain[1], want[1])
    np.testing.assert_array_equal(km.transposed()[1], want[1])  # the public form


def test_transposed_map_refuses_rows_that_name_another_clouds_points(rng):
    points = rng.random((40, 3))
    offsets = np.array([0, 20, 40])
    km = pc.kernel_map(points, 0.3, offsets=offsets)
    index = km.index.copy()
    index[0] = 39  # a point of the second cloud in a row of the first
    with pytest.raises(ValueError, match="kernel map refers to a point outside the query's cloud"):
        pc._core.transpose_map(km.splits, index, km.cell, km.counts, 40, 3, km.offsets,
                               km.query_offsets, True, 2)
