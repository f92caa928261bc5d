"""Every wrong input raises TypeError (types, dtypes) or ValueError (shapes, values) with a message
that names the argument and says what was found and what is required — one pytest.raises per
message, for each public entry point that takes the argument."""
from __future__ import annotations

import re

import numpy as np
import pytest

import pwconv_cy as pc

P5 = np.random.default_rng(0).uniform(-1, 1, size=(5, 3))
Q4 = np.random.default_rng(1).uniform(-1, 1, size=(4, 3))


def _km(points=P5, voxel=0.1, **kw):
    return pc.kernel_map(points, voxel, **kw)


def _rs(points=P5, radius=0.1, **kw):
    return pc.radius_search(points, radius, **kw)


def _index_km(points=P5, voxel=0.1, **kw):
    offsets = kw.pop("offsets", None)
    method = kw.pop("method", "grid")
    return pc.NeighborIndex(points, voxel, offsets=offsets, method=method).kernel_map(
        voxel_size=voxel, **kw)


def _index_rs(points=P5, radius=0.1, **kw):
    offsets = kw.pop("offsets", None)
    method = kw.pop("method", "grid")
    return pc.NeighborIndex(points, radius, offsets=offsets, method=method).radius_search(
        radius, **kw)


ENTRY_POINTS = {"kernel_map": _km, "radius_search": _rs, "NeighborIndex.kernel_map": _index_km,
                "NeighborIndex.radius_search": _index_rs}
entry_points = pytest.mark.parametrize("call", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


def with_value(arr, row, value):
    arr = np.array(arr)
    arr[row, 1] = value
    return arr


# --------------------------------------------------------------------------- coordinates

@entry_points
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_points_are_rejected(call, bad, dtype):
    points = with_value(P5, 3, bad).astype(dtype)
    with pytest.raises(ValueError, match=r"points must be finite, got NaN or infinite "
                                         r"coordinates \(first at row 3: "):
        call(points)


@entry_points
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_queries_are_rejected(call, bad):
    with pytest.raises(ValueError, match=r"queries must be finite, got NaN or infinite "
                                         r"coordinates \(first at row 2: "):
        call(queries=with_value(Q4, 2, bad))


def test_non_finite_dense_points_report_the_packed_row():
    dense = np.zeros((2, 3, 3))
    dense[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"points must be finite.*row 5"):
        pc.kernel_map(dense, 0.1)


@entry_points
@pytest.mark.parametrize("shape", [(5, 2), (5,), (2, 5, 4), (5, 4), (1, 2, 5, 3), ()],
                         ids=str)
def test_points_of_wrong_shape_are_rejected(call, shape):
    expected = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=r"points must have shape \(n, 3\) or \(B, n, 3\), "
                                         rf"got {expected}"):
        call(np.zeros(shape))


@entry_points
@pytest.mark.parametrize("shape", [(4, 2), (4,), (4, 4)], ids=str)
def test_queries_of_wrong_shape_are_rejected(call, shape):
    expected = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"queries must have shape \(n, 3\) or \(B, n, 3\), "
                                         rf"got {expected}"):
        call(queries=np.zeros(shape))


NON_FLOAT_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object,
                    "U3"] + ([np.longdouble] if np.dtype(np.longdouble).itemsize > 8 else [])


@entry_points
@pytest.mark.parametrize("dtype", NON_FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_points_of_non_float_dtype_are_rejected(call, dtype):
    points = np.zeros((5, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"points must have a floating dtype \(float16, float32 "
                                        rf"or float64\), got {re.escape(str(np.dtype(dtype)))}"):
        call(points)


@entry_points
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128],
                         ids=lambda d: np.dtype(d).name)
def test_queries_of_non_float_dtype_are_rejected(call, dtype):
    with pytest.raises(TypeError, match=r"queries must have a floating dtype .*got "
                                        rf"{np.dtype(dtype).name}"):
        call(queries=np.zeros((4, 3), dtype=dtype))


def test_integer_lists_are_rejected_as_integer_coordinates():
    with pytest.raises(TypeError, match=r"points must have a floating dtype .*got int"):
        pc.kernel_map([[0, 0, 0], [1, 1, 1]], 0.5)


def test_none_points_are_rejected():
    """None is not an array of the wrong shape: a TypeError that says what was passed."""
    with pytest.raises(TypeError, match=r"points must .*got (NoneType|None|object)"):
        pc.kernel_map(None, 0.5)


# --------------------------------------------------------------------------- scalars

@pytest.mark.parametrize("value, shown", [(0, "0"), (0.0, "0.0"), (-0.1, "-0.1"),
                                          (float("nan"), "nan"), (float("inf"), "inf"),
                                          (-np.inf, "-inf"), (np.float32(0), "")])
@pytest.mark.parametrize("name, call", [
    ("voxel_size", lambda v: pc.kernel_map(P5, v)),
    ("radius", lambda v: pc.radius_search(P5, v)),
    ("cell_size", lambda v: pc.NeighborIndex(P5, v)),
    ("voxel_size", lambda v: pc.NeighborIndex(P5, 0.1).kernel_map(voxel_size=v)),
    ("radius", lambda v: pc.NeighborIndex(P5, 0.1).radius_search(v)),
], ids=["kernel_map", "radius_search", "NeighborIndex", "NeighborIndex.kernel_map",
        "NeighborIndex.radius_search"])
def test_non_positive_or_non_finite_sizes_are_rejected(name, call, value, shown):
    with pytest.raises(ValueError, match=rf"{name} must be positive and finite, got .*{shown}"):
        call(value)


WRONG_TYPES = [("0.1", "str"), (True, "bool"), (np.array([0.1]), "ndarray"), (1 + 1j, "complex"),
               ([0.1], "list"), (None, "NoneType")]


@pytest.mark.parametrize("value, type_name", WRONG_TYPES, ids=lambda x: type(x).__name__)
@pytest.mark.parametrize("name, call", [
    ("voxel_size", lambda v: pc.kernel_map(P5, v)),
    ("radius", lambda v: pc.radius_search(P5, v)),
    ("cell_size", lambda v: pc.NeighborIndex(P5, v)),
    ("radius", lambda v: pc.NeighborIndex(P5, 0.1).radius_search(v)),
], ids=["kernel_map", "radius_search", "NeighborIndex", "NeighborIndex.radius_search"])
def test_sizes_of_wrong_type_are_rejected(name, call, value, type_name):
    with pytest.raises(TypeError, match=rf"{name} must be a positive real number, got "
                                        rf"{type_name}"):
        call(value)


@pytest.mark.parametrize("value, type_name", WRONG_TYPES[:-1], ids=lambda x: type(x).__name__)
def test_index_voxel_size_of_wrong_type_is_rejected(value, type_name):
    """(None is valid there: the index's cell size.)"""
    with pytest.raises(TypeError, match=rf"voxel_size must be a positive real number, got "
                                        rf"{type_name}"):
        pc.NeighborIndex(P5, 0.1).kernel_map(voxel_size=value)


def test_index_voxel_size_none_means_cell_size():
    km = pc.NeighborIndex(P5, 0.3).kernel_map(voxel_size=None)
    assert km.voxel_size == 0.3


@pytest.mark.parametrize("value", [0, -1, -4])
@pytest.mark.parametrize("call", [lambda s: pc.kernel_map(P5, 0.1, dilation=s),
                                  lambda s: pc.NeighborIndex(P5, 0.1).kernel_map(dilation=s)],
                         ids=["kernel_map", "NeighborIndex.kernel_map"])
def test_dilation_below_one_is_rejected(call, value):
    with pytest.raises(ValueError, match=rf"dilation must be >= 1, got {value}"):
        call(value)


@pytest.mark.parametrize("value, shown", [(1.5, "float 1.5"), (2.0, "float 2.0"),
                                          (True, "bool True"), ("2", "str '2'"),
                                          (None, "NoneType None")])
@pytest.mark.parametrize("call", [lambda s: pc.kernel_map(P5, 0.1, dilation=s),
                                  lambda s: pc.NeighborIndex(P5, 0.1).kernel_map(dilation=s)],
                         ids=["kernel_map", "NeighborIndex.kernel_map"])
def test_non_integer_dilation_is_rejected(call, value, shown):
    with pytest.raises(TypeError, match=rf"dilation must be an integer, got {shown}"):
        call(value)


def test_numpy_integer_dilation_and_kernel_size_are_accepted():
    a = pc.kernel_map(P5, 0.5, kernel_size=np.int64(3), dilation=np.int32(2))
    b = pc.kernel_map(P5, 0.5, kernel_size=3, dilation=2)
    assert np.array_equal(a.index, b.index) and np.array_equal(a.cell, b.cell)


def test_absurd_dilation_is_rejected():
    with pytest.raises(ValueError, match=r"dilation must be at most \d+, got 2097153"):
        pc.kernel_map(P5, 0.1, dilation=2 ** 21 + 1)


@pytest.mark.parametrize("value", [0, 2, 4, -1, -3])
@pytest.mark.parametrize("call", [lambda k: pc.kernel_map(P5, 0.1, kernel_size=k),
                                  lambda k: pc.NeighborIndex(P5, 0.1).kernel_map(kernel_size=k)],
                         ids=["kernel_map", "NeighborIndex.kernel_map"])
def test_even_or_non_positive_kernel_size_is_rejected(call, value):
    with pytest.raises(ValueError, match=rf"kernel_size must be odd and >= 1, got {value}"):
        call(value)


@pytest.mark.parametrize("value, shown", [(3.0, "float 3.0"), (True, "bool True"),
                                          ("3", "str '3'")])
def test_non_integer_kernel_size_is_rejected(value, shown):
    with pytest.raises(TypeError, match=rf"kernel_size must be an integer, got {shown}"):
        pc.kernel_map(P5, 0.1, kernel_size=value)


@pytest.mark.parametrize("voxel, K, s", [(1e308, 3, 1), (1e303, 5, 1 << 20)])
def test_kernel_extent_overflowing_float64_is_rejected(voxel, K, s):
    """(s*(K-1)+1)*v overflows to inf: the support is not a finite cube, say so."""
    with pytest.raises(ValueError, match=r"extent .*voxel_size must be finite"):
        pc.kernel_map(P5, voxel, kernel_size=K, dilation=s)


def test_absurd_kernel_size_is_rejected():
    with pytest.raises(ValueError, match=r"kernel_size must be at most 1023, got 1025"):
        pc.kernel_map(P5, 0.1, kernel_size=1025)


# --------------------------------------------------------------------------- offsets

@entry_points
@pytest.mark.parametrize("offsets, message", [
    ([1, 5], r"offsets must start at 0, got offsets\[0\] = 1"),
    ([-1, 5], r"offsets must start at 0, got offsets\[0\] = -1"),
    ([0, 3, 2, 5], r"offsets must be non-decreasing, got offsets\[1\] = 3 > offsets\[2\] = 2"),
    ([0, 4], r"offsets must end at the number of points \(5\), got offsets\[-1\] = 4"),
    ([0, 2, 6], r"offsets must end at the number of points \(5\), got offsets\[-1\] = 6"),
    (np.array([[0, 2, 5]]), r"offsets must have shape \(n_clouds \+ 1,\), got \(1, 3\)"),
    (np.zeros(0, dtype=np.int64), r"offsets must have shape \(n_clouds \+ 1,\), got \(0,\)"),
    (np.int64(5), r"offsets must have shape \(n_clouds \+ 1,\), got \(\)"),
], ids=["start1", "start-1", "decreasing", "short", "long", "2d", "empty", "scalar"])
def test_bad_offsets_are_rejected(call, offsets, message):
    with pytest.raises(ValueError, match=message):
        call(offsets=offsets)


@entry_points
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_offsets_of_non_integer_dtype_are_rejected(call, dtype):
    with pytest.raises(TypeError, match=rf"offsets must have an integer dtype, got "
                                        rf"{np.dtype(dtype).name}"):
        call(offsets=np.array([0, 5]).astype(dtype))


@entry_points
def test_offsets_with_dense_points_are_rejected(call):
    dense = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match=r"offsets must be None when points is dense "
                                         r"\(B, n, 3\), got points of shape \(2, 3, 3\)"):
        call(dense, offsets=[0, 3, 6])


# --------------------------------------------------------------------------- queries

@entry_points
def test_queries_without_query_offsets_for_several_clouds_are_rejected(call):
    with pytest.raises(ValueError, match=r"queries need query_offsets with 3 entries.*"
                                         r"\(2 clouds\), got query_offsets=None"):
        call(offsets=[0, 2, 5], queries=Q4)


@entry_points
def test_query_offsets_without_queries_are_rejected(call):
    with pytest.raises(ValueError, match=r"query_offsets was given without queries"):
        call(offsets=[0, 2, 5], query_offsets=[0, 1, 4])


@entry_points
@pytest.mark.parametrize("query_offsets, found", [([0, 4], 1), ([0, 1, 2, 4], 3)])
def test_query_offsets_with_another_number_of_clouds_are_rejected(call, query_offsets, found):
    with pytest.raises(ValueError, match=r"query_offsets must describe as many clouds as "
                                         rf"offsets \(2\), got {found}"):
        call(offsets=[0, 2, 5], queries=Q4, query_offsets=query_offsets)


@entry_points
def test_query_offsets_not_ending_at_the_number_of_queries_are_rejected(call):
    """The message must speak of the *queries* (there are 4 of them, and 5 points)."""
    with pytest.raises(ValueError, match=r"query_offsets must end at the number of queries "
                                         r"\(4\), got query_offsets\[-1\] = 3"):
        call(offsets=[0, 2, 5], queries=Q4, query_offsets=[0, 1, 3])


@entry_points
@pytest.mark.parametrize("query_offsets, message", [
    ([1, 2, 4], r"query_offsets must start at 0, got query_offsets\[0\] = 1"),
    ([0, 3, 1, 4], r"query_offsets must be non-decreasing"),
    (np.array([0.0, 2.0, 4.0]), r"query_offsets must have an integer dtype, got float64"),
], ids=["start", "decreasing", "float"])
def test_bad_query_offsets_are_rejected(call, query_offsets, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(offsets=[0, 2, 5], queries=Q4, query_offsets=query_offsets)


@entry_points
def test_dense_queries_with_packed_points_are_rejected(call):
    with pytest.raises(ValueError, match=r"dense queries \(B, m, 3\) need dense points with "
                                         r"the same B, got queries of shape \(2, 2, 3\) and "
                                         r"points packed in 1 cloud"):
        call(queries=Q4.reshape(2, 2, 3))


@entry_points
def test_dense_queries_with_another_batch_size_are_rejected(call):
    with pytest.raises(ValueError, match=r"dense queries \(B, m, 3\) need dense points with "
                                         r"the same B, got queries of shape \(4, 1, 3\)"):
        call(np.zeros((2, 3, 3)), queries=Q4.reshape(4, 1, 3))


@entry_points
def test_dense_queries_with_query_offsets_are_rejected(call):
    with pytest.raises(ValueError, match=r"query_offsets must be None when queries are dense"):
        call(np.zeros((2, 3, 3)), queries=Q4.reshape(2, 2, 3), query_offsets=[0, 2, 4])


# --------------------------------------------------------------------------- choices and threads

@pytest.mark.parametrize("metric", ["manhattan", "Euclidean", "", None, 2])
@pytest.mark.parametrize("call", [lambda m: pc.radius_search(P5, 0.1, metric=m),
                                  lambda m: pc.NeighborIndex(P5, 0.1).radius_search(0.1, metric=m)],
                         ids=["radius_search", "NeighborIndex.radius_search"])
def test_unknown_metric_is_rejected(call, metric):
    with pytest.raises(ValueError, match=rf"metric must be one of 'chebyshev', 'euclidean', got "
                                         rf"{metric!r}"):
        call(metric)


@pytest.mark.parametrize("method", ["brute", "KDTree", "kd-tree", None])
@pytest.mark.parametrize("call", [lambda m: pc.kernel_map(P5, 0.1, method=m),
                                  lambda m: pc.radius_search(P5, 0.1, method=m),
                                  lambda m: pc.NeighborIndex(P5, 0.1, method=m)],
                         ids=["kernel_map", "radius_search", "NeighborIndex"])
def test_unknown_method_is_rejected(call, method):
    with pytest.raises(ValueError, match=rf"method must be one of 'grid', 'kdtree', 'auto', got "
                                         rf"{method!r}"):
        call(method)


THREAD_CALLS = {
    "kernel_map": lambda t: pc.kernel_map(P5, 0.1, num_threads=t),
    "radius_search": lambda t: pc.radius_search(P5, 0.1, num_threads=t),
    "NeighborIndex": lambda t: pc.NeighborIndex(P5, 0.1, num_threads=t),
    "NeighborIndex.kernel_map": lambda t: pc.NeighborIndex(P5, 0.1).kernel_map(num_threads=t),
    "NeighborIndex.radius_search":
        lambda t: pc.NeighborIndex(P5, 0.1).radius_search(0.1, num_threads=t),
}
thread_calls = pytest.mark.parametrize("call", list(THREAD_CALLS.values()), ids=list(THREAD_CALLS))


@thread_calls
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_num_threads_is_rejected(call, value):
    with pytest.raises(ValueError, match=r"num_threads must be None \(the OpenMP default\) or "
                                         rf">= 1, got {value}"):
        call(value)


@thread_calls
@pytest.mark.parametrize("value, shown", [(1.5, "float 1.5"), (True, "bool True"),
                                          (False, "bool False"), ("2", "str '2'")])
def test_non_integer_num_threads_is_rejected(call, value, shown):
    with pytest.raises(TypeError, match=rf"num_threads must be an integer, got {shown}"):
        call(value)


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_leaf_size_is_rejected(value):
    with pytest.raises(ValueError, match=rf"leaf_size must be an integer >= 1, got {value}"):
        pc.NeighborIndex(P5, 0.1, method="kdtree", leaf_size=value)


@pytest.mark.parametrize("value, shown", [(1.5, "float 1.5"), (True, "bool True"),
                                          ("16", "str '16'")])
def test_non_integer_leaf_size_is_a_type_error(value, shown):
    """As for num_threads, dilation and kernel_size: a value of the wrong type is a TypeError."""
    with pytest.raises(TypeError, match=rf"leaf_size must be an integer.*got {shown}"):
        pc.NeighborIndex(P5, 0.1, method="kdtree", leaf_size=value)


# --------------------------------------------------------------------------- GPU arrays on the CPU path

def test_gpu_arrays_go_to_the_gpu_path_which_says_why_it_cannot_run():
    """A GPU array is never copied to the host: it is sent to the GPU path, which, on a machine
    without CuPy or a device, says so (on a GPU machine tests/test_cuda.py covers the real path)."""
    from pwconv_cy import cuda

    if cuda.is_available():
        pytest.skip("a usable GPU is present: the GPU path runs (see tests/test_cuda.py)")

    class FakeCupyArray:
        @property
        def __cuda_array_interface__(self):
            return {"shape": (5, 3), "typestr": "<f4", "data": (0, False), "version": 3}

    for call in (lambda a: pc.kernel_map(a, 0.1), lambda a: pc.radius_search(a, 0.1),
                 lambda a: pc.pointwise_conv(a, np.zeros((5, 1), np.float32),
                                             np.zeros((3, 3, 3, 1, 1), np.float32), 0.1)):
        with pytest.raises(RuntimeError, match=r"GPU path of pwconv is not available: "):
            call(FakeCupyArray())
