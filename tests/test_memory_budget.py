"""The memory budget of variable-size results (SPEC §3): over the budget, a MemoryBudgetError
(a MemoryError) that says how many pairs were needed, how much memory that is and what to change
— raised before the memory is taken, never an out-of-memory kill."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from checks import PEAK_RSS_PRELUDE

import pwconv_cy as pc

UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "TiB": 1024 ** 4}


def cloud(rng, n=400):
    return rng.uniform(-1, 1, size=(n, 3))


def _parse_bytes(text):
    number, unit = re.fullmatch(r"([\d.,]+) ?(B|KiB|MiB|GiB|TiB)", text).groups()
    return float(number.replace(",", "")) * UNITS[unit]


def _check_message(message, what, n_pairs, budget, remedy):
    m = re.search(rf"{what} needs ([\d,]+) neighbour pairs = ([\d.]+ ?[KMGT]?i?B), over the "
                  rf"memory budget of ([\d.]+ ?[KMGT]?i?B)", message)
    assert m, message
    assert int(m.group(1).replace(",", "")) == n_pairs, "the pair count is not the true count"
    needed = _parse_bytes(m.group(2))
    # at least the index (8 bytes) per pair, at most a few passes' worth
    assert 8 * n_pairs <= needed <= 40 * n_pairs + 4 * 125 * 10 ** 6, message
    assert abs(_parse_bytes(m.group(3)) - budget) <= 0.06 * budget + 1, message
    assert remedy in message
    assert "pwconv_cy.set_memory_budget(nbytes)" in message and "memory_budget=" in message


@pytest.mark.parametrize("method", ["grid", "kdtree"])
@pytest.mark.parametrize("budget", [1, 10_000, "just-below"])
def test_kernel_map_over_budget_reports_pairs_bytes_and_remedy(rng, method, budget):
    points = cloud(rng)
    km = pc.kernel_map(points, 0.2, dilation=2, method=method)
    assert km.n_pairs > 1000
    if budget == "just-below":
        budget = km.n_pairs * 9 - 1  # below even the index and cell arrays alone
    with pytest.raises(pc.MemoryBudgetError) as info:
        pc.kernel_map(points, 0.2, dilation=2, method=method, memory_budget=budget)
    _check_message(str(info.value), "kernel_map", km.n_pairs, budget,
                   "reduce voxel_size, kernel_size or dilation, or split the batch")
    with pytest.raises(pc.MemoryBudgetError, match="kernel_map needs"):
        pc.NeighborIndex(points, 0.2, method=method).kernel_map(dilation=2, memory_budget=budget)


@pytest.mark.parametrize("method", ["grid", "kdtree"])
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_radius_search_over_budget_reports_pairs_bytes_and_remedy(rng, method, metric):
    points = cloud(rng)
    queries = cloud(rng, 150)
    splits, _ = pc.radius_search(points, 0.4, queries, metric=metric, method=method)
    n_pairs = int(splits[-1])
    with pytest.raises(pc.MemoryBudgetError) as info:
        pc.radius_search(points, 0.4, queries, metric=metric, method=method,
                         memory_budget=4096)
    _check_message(str(info.value), "radius_search", n_pairs, 4096, "reduce the radius")


def test_memory_budget_error_is_a_memory_error():
    assert issubclass(pc.MemoryBudgetError, MemoryError)


def test_a_sufficient_per_call_budget_gives_the_full_result(rng):
    points = cloud(rng)
    full = pc.kernel_map(points, 0.2)
    again = pc.kernel_map(points, 0.2, memory_budget=64 * full.nbytes)
    assert np.array_equal(full.index, again.index) and np.array_equal(full.cell, again.cell)


def test_set_memory_budget_is_global_and_per_call_budget_overrides(rng, memory_budget_reset):
    points = cloud(rng)
    default = memory_budget_reset
    assert isinstance(default, int) and default > 0
    pc.set_memory_budget(5000)
    assert pc.get_memory_budget() == 5000
    with pytest.raises(pc.MemoryBudgetError, match=r"over the memory budget of 4\.9 KiB"):
        pc.kernel_map(points, 0.2)
    with pytest.raises(pc.MemoryBudgetError, match=r"radius_search needs"):
        pc.radius_search(points, 0.3)
    with pytest.raises(pc.MemoryBudgetError, match=r"kernel_map needs"):
        pc.NeighborIndex(points, 0.2).kernel_map()
    km = pc.kernel_map(points, 0.2, memory_budget=1 << 30)  # per call wins
    assert km.n_pairs > 0
    pc.set_memory_budget(None)
    assert pc.get_memory_budget() == default
    assert pc.kernel_map(points, 0.2).n_pairs == km.n_pairs


def test_default_budget_is_within_the_machine_memory():
    import psutil

    assert 0 < pc.get_memory_budget() <= psutil.virtual_memory().total


@pytest.mark.parametrize("value", [0, -1, -(1 << 40)])
def test_non_positive_budgets_are_rejected(value, memory_budget_reset):
    with pytest.raises(ValueError, match=rf"memory budget must be a positive number of bytes or "
                                         rf"None, got {value}"):
        pc.set_memory_budget(value)
    with pytest.raises(ValueError, match=rf"memory_budget must be a positive number of bytes or "
                                         rf"None, got {value}"):
        pc.kernel_map(np.zeros((3, 3)), 0.1, memory_budget=value)
    with pytest.raises(ValueError, match=r"memory_budget must be a positive number of bytes"):
        pc.radius_search(np.zeros((3, 3)), 0.1, memory_budget=value)
    assert pc.get_memory_budget() == memory_budget_reset  # unchanged by the failed call


@pytest.mark.parametrize("value, shown", [(1.5, "1.5"), ("1GB", "'1GB'"), (True, "True"),
                                          ([1 << 20], "[1048576]")])
def test_budgets_of_wrong_type_are_type_errors(value, shown, memory_budget_reset):
    """As for every other scalar argument of the API (voxel_size, dilation, num_threads...),
    a value of the wrong type is a TypeError naming the argument."""
    with pytest.raises(TypeError, match=rf"memory budget must be .*got {re.escape(shown)}"):
        pc.set_memory_budget(value)
    with pytest.raises(TypeError, match=rf"memory_budget must be .*got {re.escape(shown)}"):
        pc.kernel_map(np.zeros((3, 3)), 0.1, memory_budget=value)
    assert pc.get_memory_budget() == memory_budget_reset


def test_numpy_integer_budgets_are_accepted(memory_budget_reset):
    """Budgets computed with NumPy (np.int64) are integers like any other."""
    pc.set_memory_budget(np.int64(1 << 30))
    assert pc.get_memory_budget() == 1 << 30
    km = pc.kernel_map(np.zeros((3, 3)), 0.1, memory_budget=np.int64(1 << 30))
    assert km.n_pairs == 9


_PEAK_SCRIPT = PEAK_RSS_PRELUDE + textwrap.dedent("""
    mode, method, threads, n, m, budget = sys.argv[1:]
    threads, n, m, budget = int(threads), int(n), int(m), int(budget)
    points = np.zeros((n, 3))                 # all coincident: every query sees every point
    queries = None if m == 0 else np.zeros((m, 3))
    before = peak_kib()
    t0 = time.perf_counter()
    message = None
    try:
        if mode == "kernel_map":
            pc.kernel_map(points, 0.1, queries=queries, method=method, num_threads=threads,
                          memory_budget=budget)
        else:
            pc.radius_search(points, 0.1, queries, method=method, num_threads=threads,
                             memory_budget=budget)
    except pc.MemoryBudgetError as exc:
        message = str(exc)
    print(json.dumps({"grown_mib": (peak_kib() - before) / 1024,
                      "seconds": time.perf_counter() - t0, "message": message}))
""")


def _peak(tmp_path, mode, method, threads, n, m, budget):
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode, method, str(threads),
                           str(n), str(m), str(budget)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


SLACK_MIB = 8  # interpreter noise, scratch arrays of a few hundred KB


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", ["grid", "kdtree"])
@pytest.mark.parametrize("mode", ["kernel_map", "radius_search"])
def test_result_over_budget_fails_fast_within_the_budget(tmp_path, mode, method, threads):
    """225 million pairs (3.8 GB) against a 32 MiB budget: the error comes quickly, gives the
    true count, and the failed call itself stays within the budget, whatever the number of
    threads (a per-thread allowance would multiply the memory by the thread count)."""
    out = _peak(tmp_path, mode, method, threads, 15000, 0, 32 << 20)
    assert out["message"] is not None, "no MemoryBudgetError"
    assert "225,000,000 neighbour pairs" in out["message"], out["message"]
    assert out["seconds"] < 20
    assert out["grown_mib"] <= 32 + SLACK_MIB, (
        f"{mode} ({method}, {threads} thread(s)) grew the peak RSS by {out['grown_mib']:.0f} MiB "
        f"before failing on a 32 MiB budget")


@pytest.mark.parametrize("mode", ["kernel_map", "radius_search"])
def test_a_few_dense_queries_over_budget_stay_within_the_budget(tmp_path, mode):
    """256 queries, each with 100,000 neighbours (25.6 M pairs, ~200 MB of keys) against a
    16 MiB budget: the budget must hold inside a batch of queries too, not only between them."""
    out = _peak(tmp_path, mode, "grid", 1, 100_000, 256, 16 << 20)
    assert out["message"] is not None, "no MemoryBudgetError"
    assert "25,600,000 neighbour pairs" in out["message"], out["message"]
    assert out["grown_mib"] <= 16 + SLACK_MIB, (
        f"{mode} grew the peak RSS by {out['grown_mib']:.0f} MiB before failing on a 16 MiB "
        f"budget")
