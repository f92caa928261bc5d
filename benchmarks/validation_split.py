"""Writes the validation split that `python -m pwconv_cy.train` holds out (stratified,
`--val-fraction`, `--seed`) as an .npz of the training data's format, so that
`python -m pwconv_cy.evaluate` can report on exactly those shapes.

    python benchmarks/validation_split.py ../shared/data/modelnet40_1024/train.npz VAL.npz
"""
import argparse

import numpy as np

from pwconv_cy import data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the training .npz given to --data")
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with np.load(args.data, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    _, val_idx = data.stratified_split(arrays["labels"], args.val_fraction, args.seed)
    out = {"points": arrays["points"][val_idx], "labels": arrays["labels"][val_idx]}
    if "class_names" in arrays:
        out["class_names"] = arrays["class_names"]
    np.savez(args.out, **out)
    print(f"{args.out}: {len(val_idx)} of {len(arrays['labels'])} shapes")


if __name__ == "__main__":
    main()
