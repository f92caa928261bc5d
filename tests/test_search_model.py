"""benchmarks/search_work_model.py counts what the GPU kernel-map search visits per query (the
rows it looks up, the candidates it tests), to choose the cell sizes a GPU run times: its counts
must cover the real map, every pair of a query among the candidates the model says it tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pwconv_cy

MODEL = Path(__file__).resolve().parents[1] / "benchmarks" / "search_work_model.py"


@pytest.fixture(scope="module")
def model():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not here (tests run outside the repository)")
    spec = importlib.util.spec_from_file_location("search_work_model", MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
