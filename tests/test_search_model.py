"""The CPU models behind GPU choices: benchmarks/search_work_model.py counts what the GPU
kernel-map search visits per query (the rows it looks up, the candidates it tests), to choose the
cell sizes a GPU run times: its counts must cover the real map, every pair of a query among the
candidates the model says it tests.  benchmarks/sort_lanes_model.py counts the warp steps and L1
passes of sort_rows_by_rank for a number of threads per row: its counts must be those of the
kernel's loops, walked one load at a time."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pwconv_cy

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    path = BENCHMARKS / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not here (tests run outside the repository)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return _load("search_work_model")


@pytest.fixture(scope="module")
def sort_model():
    return _load("sort_lanes_model")


@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("factor", [0.5, 0.75, 1.0, 2.0])
def test_model_candidates_cover_every_pair(model, dilation, factor):
    """On a random surface cloud and a random box (no point exactly on a kernel cell's face, where
    the model's plain arithmetic and the exact binning rule could round apart)."""
    rng = np.random.default_rng(10 * dilation + int(4 * factor))
    sphere = rng.standard_normal((400, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    for points in (sphere, rng.uniform(-0.6, 0.6, size=(400, 3))):
        km = pwconv_cy.kernel_map(points, 0.1, kernel_size=3, dilation=dilation)
        rows, occupied, candidates = model.search_work(points, points, 0.1, dilation,
                                                       factor * 0.1)
        assert (candidates >= np.diff(km.splits)).all()
        assert ((occupied <= rows) & (occupied > 0)).all()  # a query's own row is occupied


def test_model_counts_fall_with_finer_cells(model):
    """Finer cells: fewer candidates, more rows (the trade the GPU tuning times)."""
    rng = np.random.default_rng(3)
    points = rng.standard_normal((600, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    work = {f: [a.mean() for a in model.search_work(points, points, 0.1, 2, f * 0.1)]
            for f in (0.5, 1.0, 2.0)}
    assert work[0.5][2] < work[1.0][2] < work[2.0][2]
    assert work[0.5][0] > work[1.0][0] > work[2.0][0]


def _walk_sort(lengths, lanes, bases=None):
    """sort_rows_by_rank's loops for `lanes` threads a row, walked one load at a time: (warp steps,
    L1 passes), each per row.  Thread t of the grid is lane t % lanes of row t // lanes; its
    outer loop takes keys lane, lane + lanes, ..., its inner loop loads key j = 0..L-1 of the
    row.  A warp issues a step while any of its threads has one; the step loads one line per
    distinct 128-byte line its threads read."""
    steps_of_warp, lines = {}, set()
    for r, length in enumerate(lengths):
        warp = (r * lanes) // 32
        for lane in range(lanes):
            for o, _key in enumerate(range(lane, length, lanes)):
                for j in range(length):
                    line = ("row", r) if bases is None else (bases[r] + j) // 16
                    lines.add((warp, o, j, line))
                steps_of_warp[warp] = max(steps_of_warp.get(warp, 0), (o + 1) * length)
    m = len(lengths)
    return sum(steps_of_warp.values()) / m, len(lines) / m


def test_sort_model_by_hand(sort_model):
    """Rows of 3, 1, 2, 2 keys: 16 lanes put rows (0, 1) and (2, 3) on one warp each."""
    lengths = [3, 1, 2, 2]
    assert sort_model.sort_cost(lengths, 16) == (5 / 4, 8 / 4)
    # contiguous keys (all on one line): the rows of a warp share their loads' line
    assert sort_model.sort_cost(lengths, 16, bases=[0, 3, 4, 6]) == (5 / 4, 5 / 4)
    assert sort_model.sort_cost(lengths, 32) == (8 / 4, 8 / 4)  # a warp per row: L steps
    assert sort_model.sort_cost([5], 2) == (15.0, 15.0)  # ceil(5 / 2) passes over 5 keys
    with pytest.raises(ValueError, match="lanes must divide 32"):
        sort_model.sort_cost(lengths, 3)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=24),
       lanes=st.sampled_from([1, 2, 4, 8, 16, 32]), contiguous=st.booleans())
def test_sort_model_counts_the_kernels_loops(lengths, lanes, contiguous):
    sort_model = _load("sort_lanes_model")
    bases = list(np.cumsum(lengths) - lengths) if contiguous else None
    got = sort_model.sort_cost(lengths, lanes, bases=bases)
    want = _walk_sort(lengths, lanes, bases)
    assert got == pytest.approx(want, rel=1e-12)
    if lanes == 32:  # a warp per row: one line per step, without sharing
        assert got[0] == pytest.approx(np.mean(np.array(lengths) * -(-np.array(lengths) // 32)))


def test_warp_overhead_by_hand(sort_model):
    """Rows of 4, 1, 1, 4 entries, 2 a warp: warps (4, 1) and (1, 4) take 4 steps each, 8 x 2
    row-steps for 10 entries; blocks of 4 rows longest first pair (4, 4) and (1, 1): 5 x 2."""
    lengths = [4, 1, 1, 4]
    assert sort_model.warp_overhead(lengths, 2) == pytest.approx(16 / 10)
    assert sort_model.warp_overhead(lengths, 2, block_rows=4) == pytest.approx(10 / 10)
    # blocks of 2 rows: no reordering across the blocks (4, 1) and (1, 4)
    assert sort_model.warp_overhead(lengths, 2, block_rows=2) == pytest.approx(16 / 10)
    # blocks of 3 rows: (4, 1, 1) -> warps (4, 1), (1); then (4) alone
    assert sort_model.warp_overhead(lengths, 2, block_rows=3) == pytest.approx((4 + 1 + 4) * 2 / 10)
    assert sort_model.warp_overhead([], 32) == 1.0
