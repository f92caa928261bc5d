"""Peer implementations of pointwise convolution for the paper workload (SPEC §7).

Both follow SPEC §1 to the letter (float64 binning of float32 coordinates, closed cube, holes,
per-cell means) so that their kernel maps equal pwconv's exactly and their values agree within
float32 rounding; they are what a careful user would write without pwconv:

* :class:`ScipyPeer` -- NumPy/SciPy: ``scipy.spatial.cKDTree.query_pairs(h, p=inf)`` per cloud,
  vectorised binning of the pairs, the operator as one ``scipy.sparse`` CSR matrix ``A_f`` per
  kernel cell (entries ``1 / n_i(f)``); forward ``sum_f A_f X W_f``, backward
  ``dX = sum_f A_f^T dY W_f^T`` and ``dW_f = (A_f X)^T dY``.
* :class:`TorchPeer` -- plain PyTorch on the CPU: neighbours by brute force per cloud with
  ``torch.cdist(p=inf)`` (then the exact binning on the candidate pairs, in torch), the operator as
  an ``index_add_`` of the neighbours' features into per-(point, cell) sums scaled by
  ``1 / n_i(f)``, then one matmul with the stacked cell weights; gradients by autograd.

Not a benchmark itself: ``paper_workload.py`` times them side by side with pwconv.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["PeerMap", "ScipyPeer", "TorchPeer", "bin_pairs"]

# Candidate pairs are searched with a radius this much larger than h, then filtered by the exact
# SPEC §1 rule: the rule, not the tree's distance test, decides membership at the boundary.
_MARGIN = 1e-9


class PeerMap(NamedTuple):
    """A kernel map as flat pair arrays (rows sorted by query, then neighbour)."""

    rows: np.ndarray  # (E,) int64 query index (packed)
    cols: np.ndarray  # (E,) int64 neighbour index (packed)
    cell: np.ndarray  # (E,) int64 flat kernel cell f = (kz*K + ky)*K + kx
    counts: np.ndarray  # (N, K**3) int64, n_i(f)


def bin_pairs(
    p_query: np.ndarray, p_nbr: np.ndarray, voxel_size: float, kernel_size: int, dilation: int
):
    """SPEC §1 for pairs (float64 (E, 3) each): (kept mask, flat cell of the kept pairs)."""
    k, s, v = kernel_size, dilation, voxel_size
    span = s * (k - 1) + 1
    h = span * v / 2
    t = (p_nbr - (p_query - h)) / v
    inside = ((t >= 0) & (t <= span)).all(axis=1)
    c = np.minimum(s * (k - 1), np.floor(t[inside])).astype(np.int64)
    not_hole = (c % s == 0).all(axis=1)
    keep = np.flatnonzero(inside)[not_hole]
    cell = c[not_hole] // s
    return keep, (cell[:, 2] * k + cell[:, 1]) * k + cell[:, 0]


def _half_width(voxel_size, kernel_size, dilation) -> float:
    return (dilation * (kernel_size - 1) + 1) * voxel_size / 2


# --- NumPy / SciPy --------------------------------------------------------------------------


class ScipyPeer:
    """NumPy/SciPy pointwise convolution over a packed batch (one cKDTree per cloud)."""

    name = "numpy/scipy"

    @staticmethod
    def kernel_map(points, offsets, voxel_size, kernel_size=3, dilation=1) -> PeerMap:
        from scipy.spatial import cKDTree

        p_all = np.asarray(points, dtype=np.float64)
        h = _half_width(voxel_size, kernel_size, dilation)
        rows, cols, cells = [], [], []
        for a, b in zip(offsets[:-1], offsets[1:]):
            if a == b:
                continue
            p = p_all[a:b]
            pairs = cKDTree(p).query_pairs(h * (1 + _MARGIN), p=np.inf, output_type="ndarray")
            self_ = np.arange(b - a, dtype=np.int64)
            i = np.concatenate([pairs[:, 0], pairs[:, 1], self_])
            j = np.concatenate([pairs[:, 1], pairs[:, 0], self_])
            keep, f = bin_pairs(p[i], p[j], voxel_size, kernel_size, dilation)
            rows.append(i[keep] + a)
            cols.append(j[keep] + a)
            cells.append(f)
        n = p_all.shape[0]
        n_cells = kernel_size**3
        if rows:
            rows, cols, cells = map(np.concatenate, (rows, cols, cells))
        else:
            rows = cols = cells = np.zeros(0, dtype=np.int64)
        order = np.lexsort((cols, rows))
        rows, cols, cells = rows[order], cols[order], cells[order]
        counts = np.bincount(rows * n_cells + cells, minlength=n * n_cells).reshape(n, n_cells)
        return PeerMap(rows, cols, cells, counts)

    @staticmethod
    def operator(km: PeerMap, n: int, dtype=np.float32):
        """The K^3 sparse matrices A_f (n x n CSR, entries 1 / n_i(f))."""
        from scipy import sparse

        n_cells = km.counts.shape[1]
        values = (1.0 / km.counts[km.rows, km.cell]).astype(dtype)
        order = np.argsort(km.cell, kind="stable")
        bounds = np.searchsorted(km.cell[order], np.arange(n_cells + 1))
        mats = []
        for f in range(n_cells):
            sel = order[bounds[f] : bounds[f + 1]]
            mats.append(
                sparse.csr_matrix((values[sel], (km.rows[sel], km.cols[sel])), shape=(n, n))
            )
        return mats

    @staticmethod
    def forward(mats, x, weight):
        """``sum_f A_f X W_f``; weight (K, K, K, c_in, c_out)."""
        w = weight.reshape(len(mats), weight.shape[-2], weight.shape[-1])
        y = np.zeros((x.shape[0], w.shape[2]), dtype=x.dtype)
        for a, w_f in zip(mats, w):
            y += (a @ x) @ w_f
        return y

    @staticmethod
    def backward(mats, x, weight, grad_out):
        """``(dX, dW)``: ``dX = sum_f A_f^T dY W_f^T``, ``dW_f = (A_f X)^T dY``."""
        w = weight.reshape(len(mats), weight.shape[-2], weight.shape[-1])
        dx = np.zeros_like(x)
        dw = np.empty_like(w)
        for f, (a, w_f) in enumerate(zip(mats, w)):
            dx += a.T @ (grad_out @ w_f.T)
            dw[f] = (a @ x).T @ grad_out
        return dx, dw.reshape(weight.shape)


# --- PyTorch --------------------------------------------------------------------------------


class TorchPeer:
    """Plain PyTorch (CPU) pointwise convolution; autograd gives the gradients."""

    name = "pytorch"
    neighbours = "brute force per cloud: torch.cdist(p=inf) candidates + exact binning in torch"

    class Map(NamedTuple):
        slot: object  # (E,) int64 tensor: row * K^3 + cell, the (point, cell) sum receiving
        cols: object  # (E,) int64 tensor: neighbour index
        scale: object  # (E,) tensor: 1 / n_i(f) of the pair's (row, cell)
        counts: object  # (N, K^3) int64 tensor
        n: int
        n_cells: int

    @staticmethod
    def kernel_map(points_t, offsets, voxel_size, kernel_size=3, dilation=1, dtype=None):
        """points_t: (N, 3) float64 tensor (float32 coordinates promoted exactly)."""
        import torch

        k, s, v = kernel_size, dilation, voxel_size
        span = s * (k - 1) + 1
        h = span * v / 2
        n_cells = k**3
        rows, cols, cells = [], [], []
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            if a == b:
                continue
            p = points_t[a:b]
            cand = torch.cdist(p, p, p=float("inf")) <= h * (1 + _MARGIN)
            i, j = torch.nonzero(cand, as_tuple=True)
            t = (p[j] - (p[i] - h)) / v
            inside = ((t >= 0) & (t <= span)).all(dim=1)
            i, j, t = i[inside], j[inside], t[inside]
            c = torch.clamp(torch.floor(t), max=s * (k - 1)).to(torch.int64)
            not_hole = (c % s == 0).all(dim=1)
            c = c[not_hole] // s
            rows.append(i[not_hole] + a)
            cols.append(j[not_hole] + a)
            cells.append((c[:, 2] * k + c[:, 1]) * k + c[:, 0])
        n = points_t.shape[0]
        if rows:
            rows, cols, cells = torch.cat(rows), torch.cat(cols), torch.cat(cells)
        else:
            rows = cols = cells = torch.zeros(0, dtype=torch.int64)
        slot = rows * n_cells + cells
        counts = torch.bincount(slot, minlength=n * n_cells)
        scale = (1.0 / counts[slot].to(torch.float64)).to(dtype or torch.float32)
        return TorchPeer.Map(slot, cols, scale, counts.view(n, n_cells), n, n_cells)

    @staticmethod
    def forward(km: TorchPeer.Map, x, weight):
        """x (N, c_in) tensor, weight (K, K, K, c_in, c_out) tensor; differentiable in both."""
        import torch

        c_in = x.shape[1]
        msg = x.index_select(0, km.cols) * km.scale[:, None]
        sums = torch.zeros(km.n * km.n_cells, c_in, dtype=x.dtype).index_add_(0, km.slot, msg)
        return sums.view(km.n, km.n_cells * c_in) @ weight.reshape(km.n_cells * c_in, -1)
