"""Copies the real data the GPU tests read into a folder that travels with the checkout to a GPU
machine, which cannot reach ../shared/data: the airborne LiDAR tile (6 MB) and the first 32
ModelNet40 shapes, in the layout of ../shared/data.  The folder is for that trip only (.gpudata/
is ignored by git; never commit the data).

    python benchmarks/gpu_data.py .gpudata          # then, on the GPU machine:
    PWCONV_SHARED_DATA=$PWD/.gpudata bash benchmarks/gpu_check.sh
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIDAR = Path("lidar_als_labelled") / "ign_lambert93_tile_698k.npz"
MODELNET = Path("modelnet40_1024") / "train.npz"
SHAPES = 32


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    if not SHARED.is_dir():
        print(f"no shared data at {SHARED}: nothing to copy", file=sys.stderr)
        return 1
    (out / LIDAR.parent).mkdir(parents=True, exist_ok=True)
    (out / MODELNET.parent).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED / LIDAR, out / LIDAR)
    with np.load(SHARED / MODELNET) as z:  # the per-shape arrays cut to the first SHAPES
        n_shapes = len(z["points"])
        subset = {key: z[key][:SHAPES] if len(z[key]) == n_shapes else z[key] for key in z.files}
    np.savez(out / MODELNET, **subset)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {LIDAR} and {SHAPES} shapes of {MODELNET} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
