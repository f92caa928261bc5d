"""How much a kernel-map search visits per query, by the grid's cell size (a model; CPU only).

The GPU search (kernels.cu, ``kernel_map_search``) visits, for every query, the grid rows
(cz, cy) of the grid-cell ranges that cover each kernel cell along z and y (dilation 1: one box
over the whole support), looks each row up in the row table, and tests every point of the row's
cells that cover each kernel cell along x (ranges that touch merged into one: s = 2 on cells of
the voxel's edge).  Its cost is about (rows looked up) x (one probe) + (candidates tested) x
(three coordinates and the binning).  This script counts both per query, the same way, for
several cell sizes (multiples of the voxel's edge v), next to the pairs the map really has
(``pwconv_cy.kernel_map``): a cheap way to choose the cell sizes a GPU run should time.

Datasets: the paper workload's sphere clouds (2,048 points, v = 0.1, K = 3, s = 1-4), ModelNet40
shapes (1,024 points, unit sphere, v = 0.1: the classifier's maps) and the airborne LiDAR tile
(698k points, v = 0.5 m, s = 1-2) from ../shared/data (skipped, saying so, where absent).

    python benchmarks/search_work_model.py            # a few seconds
    python benchmarks/search_work_model.py --queries 2000
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

K = 3
FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


def axis_ranges(q: float, v: float, s: int, cell: float, origin: float) -> list:
    """Closed grid-cell ranges along one axis covering each kernel cell (s = 1: the support)."""
    def coord(a):
        return int(np.floor((a - origin) / cell))
    if s == 1:
        return [(coord(q - 1.5 * v), coord(q + 1.5 * v))]
    return [(coord(q + (k - 1) * s * v - 0.5 * v), coord(q + (k - 1) * s * v + 0.5 * v))
            for k in range(K)]


def merged(ranges: list) -> list:
    """Ranges that touch or overlap as one hull (kernels.cu's merge_touching_ranges, x only)."""
    if len(ranges) > 1 and all(b[0] <= a[1] + 1 for a, b in zip(ranges, ranges[1:])):
        return [(ranges[0][0], ranges[-1][1])]
    return ranges


def search_work(points: np.ndarray, queries: np.ndarray, v: float, s: int, cell: float):
    """(rows looked up, rows occupied, candidates tested), each (m,) int64: one query's each,
    over one cloud."""
    origin = points.min(axis=0)
    cells = np.floor((points - origin) / cell).astype(np.int64)
    lines: dict = {}  # (cz, cy) -> sorted cx of its points (one entry per point)
    order = np.lexsort((cells[:, 0], cells[:, 1], cells[:, 2]))
    for (cx, cy, cz) in cells[order]:
        lines.setdefault((cz, cy), []).append(cx)
    lines = {key: np.asarray(xs) for key, xs in lines.items()}
    cmax = cells.max(axis=0)  # the GPU clamps the ranges to the cloud's cells
    work = np.zeros((len(queries), 3), dtype=np.int64)
    for i, q in enumerate(queries):
        rows = occupied = candidates = 0
        rz = axis_ranges(q[2], v, s, cell, origin[2])
        ry = axis_ranges(q[1], v, s, cell, origin[1])
        rx = merged(axis_ranges(q[0], v, s, cell, origin[0])) if s > 1 else \
            axis_ranges(q[0], v, s, cell, origin[0])
        for z0, z1 in rz:
            for cz in range(max(z0, 0), min(z1, cmax[2]) + 1):
                for y0, y1 in ry:
                    for cy in range(max(y0, 0), min(y1, cmax[1]) + 1):
                        rows += 1
                        xs = lines.get((cz, cy))
                        if xs is None:
                            continue
                        occupied += 1
                        for x0, x1 in rx:
                            candidates += int(np.searchsorted(xs, x1, "right")
                                              - np.searchsorted(xs, max(x0, 0), "left"))
        work[i] = rows, occupied, candidates
    return work[:, 0], work[:, 1], work[:, 2]


def datasets(rng):
    """(name, list of clouds, voxel size, dilations)."""
    p = rng.standard_normal((8 * 2048, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    yield "sphere clouds, 2,048 points (paper workload)", np.split(p, 8), 0.1, (1, 2, 3, 4)
    import _common

    shapes = _common.modelnet_train_shapes(16)
    if shapes is not None:
        yield "ModelNet40 shapes, 1,024 points (16 of the train split)", list(shapes), 0.1, \
            (1, 2, 3, 4)
    if _common.LIDAR_TILE.exists():
        yield "airborne LiDAR tile, 698k points", [_common.lidar_tile().astype(np.float64)], 0.5, \
            (1, 2)
    else:
        print(f"(LiDAR tile skipped: {_common.LIDAR_TILE} not found)")


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=400, help="queries sampled per dataset")
    opts = parser.parse_args(argv)
    import pwconv_cy

    rng = np.random.default_rng(0)
    for name, clouds, v, dilations in datasets(rng):
        print(f"\n{name}, v = {v}, K = {K}: per query, rows looked up (occupied) / candidates "
              "tested / pairs in the map")
        per_cloud = max(1, opts.queries // len(clouds))
        header = "cell size " + "".join(f"{'s=' + str(s):>24}" for s in dilations)
        print(header)
        pairs = []
        for s in dilations:
            total = sum(int(pwconv_cy.kernel_map(c, v, kernel_size=K, dilation=s).n_pairs)
                        for c in clouds)
            pairs.append(total / sum(len(c) for c in clouds))
        for f in FACTORS:
            cols = []
            for s in dilations:
                work = np.zeros(3)
                for c in clouds:
                    pick = c[rng.choice(len(c), size=min(per_cloud, len(c)), replace=False)]
                    work += np.array([a.mean() for a in search_work(c, pick, v, s, f * v)]) \
                        / len(clouds)
                cols.append(f"{work[0]:6.1f} ({work[1]:5.1f}) / {work[2]:6.1f}")
            print(f"{f:4.2f} v    " + "".join(f"{col:>24}" for col in cols))
        print("pairs      " + "".join(f"{p:>24.1f}" for p in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
