"""Write the synthetic long-memory task to an HDF5 file.

The generator lives in :func:`mgrit_gru.data.make_synthetic` (so that
``load_dataset("synthetic:LEN")`` needs no file); this script only freezes
one instance to disk, e.g. for a scaling study over lengths 64..16384::

    python -m data_prep.synthetic --length 1024 --n-train 1000 --n-test 200 --out FILE.h5
        [--num-classes 2] [--input-size 1] [--seed 0] [--variable-length]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mgrit_gru.data import make_synthetic, write_dataset
from mgrit_gru.errors import InputError


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.synthetic``: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, required=True, help="sequence length T (e.g. 64..16384)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variable-length", action="store_true",
                    help="lengths uniform in [T/2, T], zero padding")
    ap.add_argument("--out", type=Path, required=True, help="output .h5 file")
    args = ap.parse_args(argv)
    try:
        ds = make_synthetic(args.length, args.n_train, args.n_test, num_classes=args.num_classes,
                            input_size=args.input_size, seed=args.seed,
                            variable_length=args.variable_length)
        cmd = " ".join(["python -m data_prep.synthetic", *(argv if argv is not None else sys.argv[1:])])
        write_dataset(args.out, ds.train, ds.test, name=ds.name, num_classes=ds.num_classes,
                      attrs={**ds.attrs, "prep_command": cmd})
    except InputError as exc:
        print(f"data_prep.synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {ds.name}, {len(ds.train)} train / {len(ds.test)} test, "
          f"{ds.num_classes} classes, d={ds.input_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
