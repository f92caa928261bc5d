"""Assertions shared by the neighbour-search tests: exact comparison with an oracle (reporting
the first differing row), bit-identity of two kernel maps, and the invariants of SPEC §1-§3."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest


def _first_bad_row(splits_a, index_a, splits_b, index_b, cell_a=None, cell_b=None):
    m = min(len(splits_a), len(splits_b)) - 1
    for i in range(m):
        ra = index_a[splits_a[i]:splits_a[i + 1]]
        rb = index_b[splits_b[i]:splits_b[i + 1]]
        same = np.array_equal(ra, rb)
        if same and cell_a is not None:
            same = np.array_equal(cell_a[splits_a[i]:splits_a[i + 1]],
                                  cell_b[splits_b[i]:splits_b[i + 1]])
        if not same:
            msg = f"row {i}: got index {ra.tolist()}, expected {rb.tolist()}"
            if cell_a is not None:
                msg += (f"; got cells {cell_a[splits_a[i]:splits_a[i + 1]].tolist()}, expected "
                        f"{cell_b[splits_b[i]:splits_b[i + 1]].tolist()}")
            return msg
    return f"row counts differ: {len(splits_a) - 1} vs {len(splits_b) - 1}"


def assert_kernel_map_matches(km, ref, kernel_size):
    """A library KernelMap equals an oracle map exactly (values and the documented dtypes)."""
    K3 = kernel_size ** 3
    m = len(ref.splits) - 1
    assert km.splits.dtype == np.int64 and km.splits.shape == (m + 1,)
    assert km.index.dtype == np.int64
    assert km.cell.dtype == (np.uint8 if K3 <= 256 else np.int16 if K3 <= 32767 else np.int32)
    assert km.counts.dtype == np.int32 and km.counts.shape == (m, K3)
    assert km.kernel_size == kernel_size
    if not (np.array_equal(km.splits, ref.splits) and np.array_equal(km.index, ref.index)
            and np.array_equal(km.cell.astype(np.int64), ref.cell)):
        pytest.fail("kernel map differs from the SPEC §1 oracle: " + _first_bad_row(
            km.splits, km.index, ref.splits, ref.index, km.cell.astype(np.int64), ref.cell))
    np.testing.assert_array_equal(km.counts, ref.counts)


def assert_same_csr(splits, index, ref_splits, ref_index, what="radius search"):
    assert splits.dtype == np.int64 and index.dtype == np.int64
    assert splits.shape == ref_splits.shape
    if not (np.array_equal(splits, ref_splits) and np.array_equal(index, ref_index)):
        pytest.fail(f"{what} differs from the reference: "
                    + _first_bad_row(splits, index, ref_splits, ref_index))


def assert_kernel_maps_identical(a, b):
    """Bit-identical kernel maps (arrays, dtypes)."""
    for name in ("splits", "index", "cell", "counts"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), f"{name} differs"


def check_kernel_map_invariants(km, offsets, query_offsets=None, self_query=True):
    """counts.sum(1) == row lengths, counts == per-row histogram of cells, rows strictly
    ascending, every neighbour in the query's own cloud, the centre point in the centre cell."""
    K = km.kernel_size
    splits, index, cell = km.splits, km.index, km.cell.astype(np.int64)
    m = len(splits) - 1
    q_offsets = offsets if query_offsets is None else query_offsets
    assert splits[0] == 0 and (np.diff(splits) >= 0).all()
    assert splits[-1] == len(index) == len(cell)
    np.testing.assert_array_equal(km.counts.sum(axis=1), np.diff(splits))
    assert ((cell >= 0) & (cell < K ** 3)).all()
    rows = np.repeat(np.arange(m), np.diff(splits))
    hist = np.zeros((m, K ** 3), dtype=np.int64)
    np.add.at(hist, (rows, cell), 1)
    np.testing.assert_array_equal(km.counts, hist)
    if len(index):
        same_row = rows[1:] == rows[:-1]
        assert (np.diff(index)[same_row] > 0).all(), "a row is not strictly ascending"
    # clouds never mix: query i of cloud b only sees points offsets[b] <= j < offsets[b+1]
    cloud_of_query = np.searchsorted(q_offsets, np.arange(m), side="right") - 1
    cloud_of_point = np.searchsorted(offsets, index, side="right") - 1
    np.testing.assert_array_equal(cloud_of_point, cloud_of_query[rows])
    if self_query:
        centre = ((K // 2) * K + K // 2) * K + K // 2
        for i in range(m):
            row = index[splits[i]:splits[i + 1]]
            pos = np.searchsorted(row, i)
            assert pos < len(row) and row[pos] == i, f"point {i} is not its own neighbour"
            assert cell[splits[i] + pos] == centre, f"point {i} is not in its centre cell"


#: Start of a script run in a fresh subprocess to measure peak memory: imports and peak_kib(),
#: the peak RSS of that process image in KiB (VmHWM; ru_maxrss would also carry the forked
#: parent's peak - pytest, hundreds of MB - across exec, masking what is measured).
PEAK_RSS_PRELUDE = """\
import json, resource, sys, time
import numpy as np
import pwconv_cy as pc
def peak_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


# The kernel map's candidate filters exist three times (AVX-512, AVX2 and portable C++); tests
# marked with SIMD_MODES run under each family, those the CPU lacks skipped.
def simd_available() -> bool:
    """Whether this CPU (and build) has the AVX-512 filters."""
    from pwconv_cy import _core

    return _core.simd_state()[0]


def avx2_available() -> bool:
    """Whether this CPU (and build) has the AVX2 loops."""
    from pwconv_cy import _core

    return _core.avx2_state()[0]


NEEDS_AVX512 = pytest.mark.skipif(
    not simd_available(), reason="this CPU has no AVX-512: those loops cannot run here")
NEEDS_AVX2 = pytest.mark.skipif(
    not avx2_available(), reason="this CPU has no AVX2: those loops cannot run here")

SIMD_MODES = pytest.mark.parametrize("simd", [
    pytest.param("avx512", id="avx512", marks=NEEDS_AVX512),
    pytest.param("avx2", id="avx2", marks=NEEDS_AVX2),
    pytest.param("portable", id="portable"),
])


def simd_modes() -> list:
    """The loop families this CPU can run, best first: 'avx512', 'avx2', 'portable'."""
    from pwconv_cy import _core

    modes = ["avx512"] if _core.simd_state()[0] else []
    modes += ["avx2"] if _core.avx2_state()[0] else []
    return modes + ["portable"]


@contextlib.contextmanager
def simd_mode(mode: str):
    """Run the block with one family of loops: 'avx512', 'avx2' (AVX-512 not allowed) or
    'portable' (no SIMD), restoring the previous settings."""
    from pwconv_cy import _core

    previous = _core.set_simd(mode != "portable"), _core.set_avx512(mode == "avx512")
    try:
        yield
    finally:
        _core.set_simd(previous[0])
        _core.set_avx512(previous[1])
