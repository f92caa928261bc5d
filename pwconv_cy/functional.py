"""Pointwise convolution as functions: forward and its exact adjoint (SPEC §1).

Both take either a precomputed :class:`~pwconv_cy.KernelMap` (built once, shared by forward and
backward and by every layer with the same geometry) or compute it from the points.
"""
from __future__ import annotations

import numpy as np

from pwconv_cy import _core
from pwconv_cy._arrays import CallArrays
from pwconv_cy._validation import (
    check_bool,
    check_choice,
    check_dilation,
    check_features,
    check_finite_coordinates,
    check_grad_out,
    check_map_matches,
    check_num_threads,
    check_points,
    check_positive,
    check_queries,
    check_weight,
    coordinates_unchecked_for_finiteness,
)
from pwconv_cy.neighbors import METHODS, KernelMap, NeighborIndex, digest_matches

__all__ = ["pointwise_conv", "pointwise_conv_backward"]


def _call_arrays(points, feats, weight, queries, offsets, query_offsets, kernel_map,
                 **leading) -> CallArrays:
    """The call's arrays on one device (CUDA data goes to the GPU path; nothing is copied between
    host and device), viewed as NumPy or CuPy, and the kind the results take.  `leading`: arrays
    before the points (grad_out)."""
    data = {**leading, "points": points, "feats": feats, "weight": weight, "queries": queries}
    return CallArrays(data, {"offsets": offsets, "query_offsets": query_offsets}, kernel_map)


def _resolve_map(batch, voxel_size, kernel_size, dilation, queries, query_offsets, kernel_map,
                 method, threads, check_map=True) -> tuple[KernelMap, tuple | None]:
    """The kernel map to use (computed, or the caller's after checking it fits) and the dense
    output shape (B, m) or None."""
    q, q_offsets, q_dense = check_queries(queries, query_offsets, batch)
    out_dense = q_dense if q is not None else batch.dense_shape
    if kernel_map is None:
        num_threads = threads or None  # 0 is the core's "OpenMP default"
        index = NeighborIndex.from_batch(batch, voxel_size, method=method,
                                         num_threads=num_threads)
        km = index.kernel_map(kernel_size, dilation, voxel_size=voxel_size, queries=q,
                              query_offsets=q_offsets, num_threads=num_threads)
        return km, out_dense
    if not isinstance(kernel_map, KernelMap):
        raise TypeError(f"kernel_map must be a pwconv_cy.KernelMap (from pwconv_cy.kernel_map or "
                        f"NeighborIndex.kernel_map), got {type(kernel_map).__name__}")
    km = kernel_map

    def same_points():
        if digest_matches(km.points_digest, batch.points, batch.offsets):
            return True  # the map's points, checked finite when it was built
        check_finite_coordinates(batch.points, "points")  # NaN: say so, not "other points"
        return False

    check_map_matches(
        km, voxel_size, kernel_size, dilation, batch, q,
        same_points=same_points if check_map else None,
        same_queries=(lambda: (km.queries_digest is None) == (q is None) and (
            q is None or digest_matches(km.queries_digest, q, q_offsets))) if check_map else None)
    return km, out_dense


def _prepare(points, feats, weight, voxel_size, dilation, offsets, queries, query_offsets,
             kernel_map, depthwise, method, num_threads, check_finite, check_map=True):
    # With a kernel map, the points only have to be the map's (compared by digest): their
    # finiteness was checked when the map was built, and is checked again only on a mismatch.
    batch = (check_points(points, offsets) if kernel_map is None else
             check_points(points, offsets, coordinates=coordinates_unchecked_for_finiteness))
    v = check_positive(voxel_size, "voxel_size")
    s = check_dilation(dilation)
    threads = check_num_threads(num_threads)
    check_choice(method, "method", METHODS)
    check_bool(depthwise, "depthwise")
    x = check_features(feats, batch, "feats", check_finite)
    w, k, c_out = check_weight(weight, x.shape[1], x.dtype, bool(depthwise), check_finite)
    km, out_dense = _resolve_map(batch, v, k, s, queries, query_offsets, kernel_map, method,
                                 threads, check_bool(check_map, "check_map"))
    return x, w, k, c_out, km, out_dense, threads


def pointwise_conv(points, feats, weight, voxel_size, *, dilation=1, offsets=None, queries=None,
                   query_offsets=None, kernel_map=None, depthwise=False, method="grid",
                   num_threads=None, check_finite=True, check_map=True):
    """Pointwise convolution (Hua et al., CVPR 2018), exactly as SPEC §1 defines it.

    ``y_i = sum_f sum_{j in Omega_i(f)} x_j W_f / n_i(f)``: the features of the neighbours in each
    of the K^3 cells of the cube around point i are averaged and the cell's matrix applied; empty
    cells contribute nothing.

    Parameters
    ----------
    points : (n, 3) or (B, n, 3) float16/32/64
        Coordinates (any units; ``voxel_size`` in the same units).  This and the other arrays:
        NumPy or CuPy arrays, or torch/JAX/DLPack tensors on the CPU or a CUDA device, read
        without a copy, all on one device (CUDA data runs on the GPU path); the result takes
        the caller's kind (a torch tensor for torch input).  Gradients are not recorded: see
        :mod:`pwconv_cy.torch` and :mod:`pwconv_cy.jax` for autograd.
    feats : (n, c_in) or (B, n, c_in) float32/float64
        Input features.
    weight : (K, K, K, c_in, c_out), or (K, K, K, c_in) with ``depthwise=True``
        Cell matrices ``W_f = weight[kz, ky, kx]``; same dtype as ``feats``.
    voxel_size : float
        Edge v of a kernel cell.
    dilation : int
        À-trous stride s: cells sit s*v apart.
    offsets, queries, query_offsets
        Packed batches and query points (default: every point is a query), as in
        :func:`pwconv_cy.kernel_map`.
    kernel_map : KernelMap, optional
        A precomputed map for exactly these points, queries, voxel size, K and dilation (checked);
        skips the neighbour search.
    depthwise : bool
        Per-channel weights without channel mixing: ``y_i[c] = sum_f W_f[c] mean_{Omega_i(f)} x[c]``.
    method, num_threads
        Neighbour-search method and OpenMP threads (None: the OpenMP default).
    check_finite : bool
        Reject NaN/Inf in features and weights (default); False skips the scan.
    check_map : bool
        With ``kernel_map``: check that its points (and queries) are these, by fingerprinting
        the coordinates (default).  False checks only the sizes, offsets, voxel size, kernel
        size and dilation: for loops that pass a map they have just built from these very
        points (on the GPU the fingerprint costs a pass over the coordinates and a device-to-host
        synchronisation per call).  A map of other points with the same sizes then gives a
        wrong result, not an error.

    Returns
    -------
    y : (m, c_out), or (B, m, c_out) for dense input, in the features' dtype.
    """
    call = _call_arrays(points, feats, weight, queries, offsets, query_offsets, kernel_map)
    if call.on_gpu:
        from pwconv_cy import cuda

        return call.export(cuda.pointwise_conv(
            call["points"], call["feats"], call["weight"], voxel_size, dilation=dilation,
            offsets=offsets, queries=call["queries"], query_offsets=query_offsets,
            kernel_map=call.kernel_map, depthwise=depthwise, method=method,
            num_threads=num_threads, check_finite=check_finite, check_map=check_map))
    x, w, k, c_out, km, out_dense, threads = _prepare(
        call["points"], call["feats"], call["weight"], voxel_size, dilation, offsets,
        call["queries"], query_offsets, call.kernel_map, depthwise, method, num_threads,
        check_finite, check_map)
    y = np.empty((km.n_queries, c_out), dtype=x.dtype)
    _core.conv_forward_(km.splits, km._stored_index(), km.cell, k, x, w.reshape(-1), c_out,
                        bool(depthwise), y, threads)
    return call.export(y.reshape(*out_dense, c_out) if out_dense is not None else y)


def pointwise_conv_backward(grad_out, points, feats, weight, voxel_size, *, dilation=1,
                            offsets=None, queries=None, query_offsets=None, kernel_map=None,
                            depthwise=False, method="grid", num_threads=None, check_finite=True,
                            feats_grad=True, check_map=True):
    """Gradients of :func:`pointwise_conv` (its exact adjoint; no gradient for coordinates).

    ``dx_j = sum_i sum_{f: j in Omega_i(f)} dy_i W_f^T / n_i(f)`` and
    ``dW_f = sum_i (mean_{Omega_i(f)} x)^T dy_i``, both from the sums ``S_jf = sum_{i: j in
    Omega_i(f)} dy_i / n_i(f)`` (``dW_f = sum_j x_j^T S_jf``), reduced in a fixed order:
    bit-identical for every run and thread count.  Batches of 16 clouds or more collect ``S``
    cloud by cloud straight from the kernel map; smaller ones gather it over the transposed map
    (``kernel_map.transposed()``, cached on the map).

    Parameters
    ----------
    grad_out : (m, c_out) or (B, m, c_out)
        Gradient of the loss with respect to the output.
    points, feats, weight, voxel_size, dilation, offsets, queries, query_offsets, kernel_map,
    depthwise, method, num_threads, check_finite, check_map
        As in :func:`pointwise_conv`.
    feats_grad : bool, default True
        Compute ``d_feats``.  False skips it (``d_feats`` is None; ``d_weight`` is the same):
        for a first layer, whose input features need no gradient.

    Returns
    -------
    d_feats : shaped like ``feats`` (packed (n, c_in) or dense (B, n, c_in)), or None
    d_weight : shaped like ``weight``
    """
    check_bool(feats_grad, "feats_grad")
    call = _call_arrays(points, feats, weight, queries, offsets, query_offsets, kernel_map,
                        grad_out=grad_out)
    if call.on_gpu:
        from pwconv_cy import cuda

        d_feats, d_weight = cuda.pointwise_conv_backward(
            call["grad_out"], call["points"], call["feats"], call["weight"], voxel_size,
            dilation=dilation, offsets=offsets, queries=call["queries"],
            query_offsets=query_offsets, kernel_map=call.kernel_map, depthwise=depthwise,
            method=method, num_threads=num_threads, check_finite=check_finite,
            feats_grad=bool(feats_grad), check_map=check_map)
        return call.export((d_feats, d_weight))
    x, w, k, c_out, km, out_dense, threads = _prepare(
        call["points"], call["feats"], call["weight"], voxel_size, dilation, offsets,
        call["queries"], query_offsets, call.kernel_map, depthwise, method, num_threads,
        check_finite, check_map)
    dy = check_grad_out(call["grad_out"], km.n_queries, c_out, x.dtype, out_dense, check_finite)
    dx = np.empty_like(x) if feats_grad else None
    dw = np.empty(w.size, dtype=x.dtype)
    # Batches of many clouds collect the sums cloud by cloud straight from the map (in cache,
    # nothing stored, no counts needed); otherwise the gather runs over the (cached) transposed
    # map, which needs the counts.
    by_cloud = km.offsets is not None and km.query_offsets is not None and \
        _core.conv_backward_by_cloud_(km.splits, km._stored_index(), km.cell, k, km.offsets,
                                      km.query_offsets, x, dy, w.reshape(-1), bool(depthwise),
                                      dx, dw, threads)
    if not by_cloud:
        tsplits, tkeys, count_bits = km._transposed_packed(threads or None)
        _core.conv_backward_(km.splits, km._stored_index(), km.cell, km.counts, k, tsplits, tkeys,
                             count_bits, x, dy, w.reshape(-1), bool(depthwise), dx, dw, threads)
    return call.export((None if dx is None else dx.reshape(call["feats"].shape),
                        dw.reshape(w.shape)))
