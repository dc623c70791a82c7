"""Sequence-classification data: one HDF5 schema, validation, mini-batches.

Schema (every file this package reads or writes)::

    /train/x        [n, T, d] float32   the input sequences
    /train/y        [n]       int64     class labels 0..C-1
    /train/lengths  [n]       int64     optional: valid steps 1..T per sample
    /test/...                           the same three datasets
    root attrs: name, source, num_classes, normalisation, description (str)

Steps beyond a sample's length are zero and never enter the answer.  Any
further root attribute (label mapping, statistics, seeds) is provenance and
is returned in :attr:`Dataset.attrs`.

Besides files, :func:`load_dataset` accepts the names of the sets shipped in
``mgrit_gru/datasets/`` (see :func:`builtin_datasets`) and ``synthetic:LEN``,
the synthetic long-memory task of :func:`make_synthetic`.

This module is numpy/h5py only: conversion to torch tensors is the caller's.
Every problem with user input raises :class:`~mgrit_gru.errors.InputError`
with one line naming the file (or option) and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from mgrit_gru import limits
from mgrit_gru.errors import InputError
from mgrit_gru.limits import MAX_CLASSES, MAX_SYNTHETIC_LENGTH

__all__ = [
    "DEFAULT_DATASET",
    "Batch",
    "Dataset",
    "Split",
    "batch_indices",
    "builtin_datasets",
    "iterate_minibatches",
    "load_dataset",
    "make_synthetic",
    "write_dataset",
]

#: Root attributes every file carries (written as "" when not given).
PROVENANCE_ATTRS = ("source", "normalisation", "description")

#: The built-in set ``mgrit-gru train`` uses when no data set is given.
DEFAULT_DATASET = "FreezerRegularTrain"

#: Default sizes of the ``synthetic:LEN`` data set (overridden by max_train/max_test).
SYNTHETIC_N_TRAIN = 1000
SYNTHETIC_N_TEST = 200

_DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
_SPLITS = ("train", "test")


# --------------------------------------------------------------------------- #
# containers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Split:
    """One split: ``x [n, T, d] float32``, ``y [n] int64``, ``lengths [n] int64 | None``.

    ``lengths=None`` means every sample uses all ``T`` steps.
    """

    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def seq_len(self) -> int:
        """Padded sequence length ``T``."""
        return int(self.x.shape[1])

    @property
    def input_size(self) -> int:
        """Features per step ``d``."""
        return int(self.x.shape[2])

    def take(self, index: np.ndarray | slice) -> Split:
        """The samples selected by ``index`` (an index array or a slice)."""
        lengths = None if self.lengths is None else self.lengths[index]
        return Split(self.x[index], self.y[index], lengths)


@dataclass(frozen=True)
class Dataset:
    """A named train/test pair with ``num_classes`` and provenance ``attrs``."""

    name: str
    train: Split
    test: Split
    num_classes: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        """Features per step ``d`` (equal for both splits)."""
        return self.train.input_size

    @property
    def seq_len(self) -> int:
        """Longest padded length over both splits."""
        return max(self.train.seq_len, self.test.seq_len)


class Batch(NamedTuple):
    """One mini-batch of numpy slices (``lengths`` is None for full-length data)."""

    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray | None


# --------------------------------------------------------------------------- #
# validation (shared by load and write)
# --------------------------------------------------------------------------- #
def _check_shapes(p: str, x_shape: tuple, y_shape: tuple, len_shape: tuple | None) -> None:
    """Ranks, emptiness and sample counts (metadata only; ``p`` prefixes messages)."""
    if len(x_shape) != 3:
        raise InputError(f"{p}/x must be 3-D [n, T, d], got {len(x_shape)}-D shape {tuple(x_shape)}")
    if len(y_shape) != 1:
        raise InputError(f"{p}/y must be 1-D [n], got {len(y_shape)}-D shape {tuple(y_shape)}")
    if len_shape is not None and len(len_shape) != 1:
        raise InputError(f"{p}/lengths must be 1-D [n], got {len(len_shape)}-D shape {tuple(len_shape)}")
    n, t, d = x_shape
    if n == 0:
        raise InputError(f"{p} is empty (0 samples)")
    if t == 0 or d == 0:
        raise InputError(f"{p}/x has an empty axis: shape {tuple(x_shape)}")
    if y_shape[0] != n:
        raise InputError(f"{p}: x has {n} samples but y has {y_shape[0]}")
    if len_shape is not None and len_shape[0] != n:
        raise InputError(f"{p}: x has {n} samples but lengths has {len_shape[0]}")


def _check_lengths(p: str, lengths: np.ndarray, t: int) -> np.ndarray:
    """Integer lengths in 1..t, returned as int64."""
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.dtype == np.bool_:
        raise InputError(f"{p}/lengths must be integers, got dtype {lengths.dtype}")
    lo, hi = int(lengths.min()), int(lengths.max())  # before the cast: uint64 may not fit
    if lo < 1 or hi > t:
        raise InputError(f"{p}/lengths must lie in 1..{t} (T), got range {lo}..{hi}")
    return lengths.astype(np.int64, copy=False)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_values(p: str, x: np.ndarray) -> np.ndarray:
    """Finite values that fit float32, returned as float32 (no overflow warning)."""
    if x.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(np.argwhere(~finite)[0, 0])
            raise InputError(f"{p}/x contains NaN or Inf (first in sample {bad})")
        del finite
        if x.dtype.itemsize > 4 and x.size:
            hi, lo = float(x.max()), float(x.min())
            if max(hi, -lo) > _FLOAT32_MAX:
                value = hi if hi > -lo else lo
                bad = int(np.argwhere(np.abs(x) > _FLOAT32_MAX)[0, 0])
                raise InputError(f"{p}/x has the value {value:.6g} (first in sample {bad}), "
                                 f"beyond the float32 range (|x| <= {_FLOAT32_MAX:.4g}): it "
                                 f"would overflow to Inf")
    return x.astype(np.float32, copy=False)


def _check_label_values(p: str, y: np.ndarray) -> int:
    """Integer labels in 0..MAX_CLASSES-1 (checked before any cast); the largest."""
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise InputError(f"{p}/y must hold integer class labels, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise InputError(f"{p}/y has a negative label ({lo}); labels must be 0..C-1")
    if hi >= MAX_CLASSES:
        raise InputError(f"{p}/y has the label {hi}: at most {MAX_CLASSES} classes are "
                         f"supported (labels 0..{MAX_CLASSES - 1}; the evaluation keeps a "
                         f"classes x classes confusion matrix)")
    return hi


def _check_split(where: str, split_name: str, x: np.ndarray, y: np.ndarray,
                 lengths: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate one split's arrays and return them as float32/int64/int64.

    ``where`` names the file in messages.  Labels are checked against
    ``num_classes`` separately, once it is known.
    """
    p = f"{where}: /{split_name}"
    x = np.asarray(x)
    y = np.asarray(y)
    lengths = None if lengths is None else np.asarray(lengths)
    _check_shapes(p, x.shape, y.shape, None if lengths is None else lengths.shape)
    if x.dtype.kind not in "fiu":
        raise InputError(f"{p}/x must be numeric, got dtype {x.dtype}")
    x = _check_values(p, x)
    _check_label_values(p, y)
    y = y.astype(np.int64, copy=False)
    if lengths is not None:
        t = x.shape[1]
        lengths = _check_lengths(p, lengths, t)
        pad = np.arange(t)[None, :] >= lengths[:, None]
        if pad.any():
            nonzero_pad = np.any(x != 0, axis=2) & pad
            if nonzero_pad.any():
                bad = int(np.argwhere(nonzero_pad)[0, 0])
                raise InputError(f"{p}/x is nonzero beyond lengths (first in sample {bad}); "
                                 "padding must be zeros")
    return x, y, lengths


def _check_labels(where: str, split_name: str, top: int, num_classes: int) -> None:
    if top >= num_classes:
        raise InputError(f"{where}: /{split_name}/y has label {top}, out of range 0..{num_classes - 1} "
                         f"(num_classes={num_classes})")


def _check_num_classes(where: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: num_classes must be an integer, got {_short_repr(value)}")
    if value < 2:
        raise InputError(f"{where}: num_classes must be >= 2, got {int(value)}")
    if value > MAX_CLASSES:
        raise InputError(f"{where}: num_classes {int(value)} is more than the {MAX_CLASSES} "
                         f"classes supported")
    return int(value)


def _check_declared_classes(where: str, num_classes: int, top_label: int) -> None:
    """A given ``num_classes`` may leave classes without samples, but at most as
    many as there are labels: ``num_classes <= 2 (largest label + 1)``."""
    if num_classes > 2 * (top_label + 1):
        raise InputError(f"{where}: num_classes {num_classes} is far above the largest label "
                         f"{top_label} (at most 2 x (largest label + 1) = {2 * (top_label + 1)} "
                         f"classes; fix or drop the num_classes attribute)")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_pair(where: str, train: Split, test: Split, num_classes: int | None,
                top_labels: Mapping[str, int] | None = None) -> tuple[Split, Split, int]:
    """Validate both splits against each other; infer num_classes if None.

    ``top_labels`` holds the largest label of each split of the whole file
    (the splits may be a prefix of it: the classes are the file's); the
    largest labels of the splits when None.
    """
    checked = {}
    for split_name, s in zip(_SPLITS, (train, test)):
        checked[split_name] = Split(*_check_split(where, split_name, s.x, s.y, s.lengths))
    tr, te = checked["train"], checked["test"]
    if tr.input_size != te.input_size:
        raise InputError(f"{where}: train and test feature dims differ "
                         f"({tr.input_size} vs {te.input_size})")
    tops = {"train": int(tr.y.max()), "test": int(te.y.max())}
    if top_labels is not None:
        tops = {k: max(v, int(top_labels.get(k, v))) for k, v in tops.items()}
    top = max(tops.values())
    if num_classes is None:
        num_classes = top + 1
    elif isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, (bool, np.bool_)):
        _check_declared_classes(where, int(num_classes), top)
    num_classes = _check_num_classes(where, num_classes)
    for split_name in _SPLITS:
        _check_labels(where, split_name, tops[split_name], num_classes)
    return tr, te, num_classes


def _check_limit(option: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{option}: must be a positive integer, got {_short_repr(value)}")
    return int(value)


# --------------------------------------------------------------------------- #
# reading and writing
# --------------------------------------------------------------------------- #
def builtin_datasets() -> dict[str, Path]:
    """The data sets shipped in ``mgrit_gru/datasets/``: ``{name: path}``, sorted by name."""
    if not _DATASETS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(_DATASETS_DIR.glob("*.h5"))}


def _show(text: str, limit: int = 300) -> str:
    """``text`` for a one-line message: as is when printable, else its repr;
    cut to ``limit`` characters."""
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    lines = str(text).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


#: What h5py raises for a damaged or unusual file (besides our InputError).
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, SystemError,
              AttributeError, IndexError, OverflowError, MemoryError)


class _NotUTF8(ValueError):
    """A string h5py decoded with surrogate escapes (bytes that are not UTF-8)."""


@contextlib.contextmanager
def _guard(where: str, what: str) -> Iterator[None]:
    """h5py errors while reading ``what`` -> one-line InputError naming the file."""
    try:
        yield
    except InputError:
        raise
    except (UnicodeDecodeError, _NotUTF8):
        raise InputError(f"{where}: {what} is not valid UTF-8 text") from None
    except MemoryError:
        raise InputError(f"{where}: not enough memory to read {what}") from None
    except _H5_ERRORS as exc:
        raise InputError(f"{where}: cannot read {what} ({_first_line(exc)}); "
                         "is the file damaged?") from None


def _attr_value(v: Any) -> Any:
    """An HDF5 attribute as a plain Python value (str, int, float, bool, list, None)."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _NotUTF8(v) from None
        return v
    if isinstance(v, h5py.Empty):
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_attr_value(e) for e in v]
    if isinstance(v, np.generic):
        return _attr_value(v.item())
    return v


def _read_attrs(f: h5py.File, where: str) -> dict[str, Any]:
    """The root attributes; InputError for one that cannot be read or decoded."""
    with _guard(where, "a root attribute name"):
        names = list(f.attrs.keys())
    attrs = {}
    for key in names:
        with _guard(where, "a root attribute name"):
            _attr_value(key)
        with _guard(where, f"the root attribute {key!r}"):
            attrs[key] = _attr_value(f.attrs[key])
    return attrs


def _attr_for_hdf5(value: Any) -> Any:
    """A root attribute value HDF5 can store: dicts and non-numeric lists become JSON text."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        return arr if arr.dtype.kind in "biuf" else json.dumps(list(value))
    return value


def _exists(path: Path, test: str = "exists") -> bool:
    """``path.exists()`` / ``is_file()``; InputError for a path the OS rejects."""
    try:
        return bool(getattr(path, test)())
    except ValueError:  # a NUL byte
        return False
    except OSError as exc:
        raise InputError(f"{_show(str(path))}: cannot access ({exc.strerror or exc})") from None


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """The file behind a path or a built-in name; InputError when neither exists."""
    path = Path(path_or_name)
    if _exists(path, "is_file"):
        return path
    text = str(path_or_name)
    builtins = builtin_datasets()
    if text in builtins:
        return builtins[text]
    if text == "default" and DEFAULT_DATASET in builtins:  # as TrainConfig.data
        return builtins[DEFAULT_DATASET]
    shown = _show(text)
    if _exists(path):
        raise InputError(f"{shown}: not a regular file")
    looks_like_path = path.suffix != "" or os.sep in text or "/" in text
    if looks_like_path:
        raise InputError(f"{shown}: no such file")
    available = ", ".join([*builtins, "synthetic:LEN"])
    raise InputError(f"{shown}: no such file and not a built-in data set (available: {available})")


def _member(f: h5py.File, where: str, path: str) -> Any:
    """The object at ``path`` (``/train/x``), None when there is no such link.

    A soft link to nothing or an external link to a missing file is an
    InputError that says so (not a KeyError).
    """
    parent, _, key = path.rpartition("/")
    group = f[parent] if parent else f
    name = key.encode()
    with _guard(where, path):
        if not group.id.links.exists(name):
            return None
        kind = group.id.links.get_info(name).type
    try:
        return group[key]
    except InputError:
        raise
    except _H5_ERRORS as exc:
        with _guard(where, path):
            target = group.id.links.get_val(name)
        if kind == h5py.h5l.TYPE_SOFT:
            raise InputError(f"{where}: {path} is a soft link to {_show(os.fsdecode(target))}, "
                             "which does not exist") from None
        if kind == h5py.h5l.TYPE_EXTERNAL:
            file, obj = (os.fsdecode(t) for t in target)
            raise InputError(f"{where}: {path} is an external link to {_show(obj)} in "
                             f"{_show(file)}, which cannot be opened ({_first_line(exc)})") from None
        raise InputError(f"{where}: cannot open {path} ({_first_line(exc)}); "
                         "is the file damaged?") from None


class _SplitMeta(NamedTuple):
    """A split's datasets in a file, checked on their metadata only."""

    x: h5py.Dataset
    y: h5py.Dataset
    lengths: h5py.Dataset | None
    shape: tuple[int, int, int]
    dtype: np.dtype


def _split_meta(f: h5py.File, where: str, split_name: str) -> _SplitMeta:
    """Structure, shapes and dtypes of a split (nothing read but metadata)."""
    group = _member(f, where, f"/{split_name}")
    if not isinstance(group, h5py.Group):
        raise InputError(f"{where}: missing group /{split_name}")
    p = f"{where}: /{split_name}"
    found: dict[str, Any] = {}
    for key in ("x", "y", "lengths"):
        obj = _member(f, where, f"/{split_name}/{key}")
        if obj is None and key == "lengths":
            found[key] = None
            continue
        if not isinstance(obj, h5py.Dataset):
            if key == "lengths":
                raise InputError(f"{where}: /{split_name}/lengths is not a dataset")
            raise InputError(f"{where}: missing dataset /{split_name}/{key}")
        with _guard(where, f"/{split_name}/{key}"):
            shape, dtype = obj.shape, obj.dtype
        if shape is None:
            raise InputError(f"{p}/{key} has a null dataspace (no shape and no data)")
        found[key] = (obj, tuple(int(n) for n in shape), dtype)
    dx, dy, dl = found["x"], found["y"], found["lengths"]
    _check_shapes(p, dx[1], dy[1], None if dl is None else dl[1])
    if dx[2].kind not in "fiu":
        raise InputError(f"{p}/x must be numeric, got dtype {dx[2]}")
    if dy[2].kind not in "iu":
        raise InputError(f"{p}/y must hold integer class labels, got dtype {dy[2]}")
    if dl is not None and dl[2].kind not in "iu":
        raise InputError(f"{p}/lengths must be integers, got dtype {dl[2]}")
    return _SplitMeta(dx[0], dy[0], None if dl is None else dl[0], dx[1], dx[2])


def _read_bytes(meta: _SplitMeta, max_n: int | None, max_len: int | None) -> int:
    """Peak bytes of reading a split: the kept part of x (as stored, as float32,
    the finiteness and padding masks), all of y (its label range counts)."""
    n, t, d = meta.shape
    rows, steps = min(n, max_n or n), min(t, max_len or t)
    x = rows * steps * d * (meta.dtype.itemsize + 4 + 2)
    return x + n * (meta.y.dtype.itemsize + 8) + rows * 16


def _read_split(where: str, split_name: str, meta: _SplitMeta, max_n: int | None,
                max_len: int | None) -> tuple[Split, int]:
    """The kept part of a split and the largest label of the whole split."""
    p = f"{where}: /{split_name}"
    with _guard(where, f"/{split_name}/y"):
        y_all = meta.y[()]
    top = _check_label_values(p, y_all)
    rows = slice(0, max_n)
    with _guard(where, f"/{split_name}/x"):
        x = meta.x[rows] if max_len is None else meta.x[rows, :max_len]
    with _guard(where, f"/{split_name}/lengths"):
        lengths = None if meta.lengths is None else meta.lengths[rows]
    y = y_all[rows]
    if lengths is not None and max_len is not None:
        lengths = np.minimum(_check_lengths(p, lengths, meta.shape[1]), x.shape[1])
    return Split(*_check_split(where, split_name, x, y, lengths)), top


def _parse_synthetic(text: str, max_len: int | None) -> int:
    """LEN of ``synthetic:LEN`` (capped by ``max_len``)."""
    spec = text.partition(":")[2]
    digits = spec.lstrip("0")
    if not (spec.isascii() and spec.isdigit()) or not digits:
        raise InputError(f"{_show(text)}: expected synthetic:LEN with a positive integer LEN")
    length = int(digits) if len(digits) <= 40 else 10 ** 40
    if max_len is not None:
        length = min(length, max_len)
    if length > MAX_SYNTHETIC_LENGTH:
        raise InputError(f"{_show(text)}: LEN {length} is more than the {MAX_SYNTHETIC_LENGTH} "
                         "steps supported (use a smaller LEN or --max-len)")
    return length


def load_dataset(path_or_name: str | os.PathLike, *, max_train: int | None = None,
                 max_test: int | None = None, max_len: int | None = None) -> Dataset:
    """Load a data set from an HDF5 file, a built-in name or ``synthetic:LEN``.

    ``max_train``/``max_test`` keep the first N samples of a split (the prep
    scripts shuffle, so a prefix is a random subset); ``max_len`` keeps the
    first ``max_len`` steps (lengths are clipped accordingly; for
    ``synthetic:LEN`` it caps the generated length instead).  Only the kept
    part of ``x`` is read from disk (all of ``y``: the classes are the
    file's), after its declared size was checked against the available
    memory.  Raises :class:`InputError` for every bad input.
    """
    max_train = _check_limit("max_train", max_train)
    max_test = _check_limit("max_test", max_test)
    max_len = _check_limit("max_len", max_len)
    text = str(path_or_name)
    if text.startswith("synthetic:") and not _exists(Path(text)):
        length = _parse_synthetic(text, max_len)
        return make_synthetic(length, max_train or SYNTHETIC_N_TRAIN, max_test or SYNTHETIC_N_TEST)

    path = _resolve(path_or_name)
    where = _show(str(path_or_name))
    with _guard(where, "the file"):
        is_hdf5 = h5py.is_hdf5(path)
    if not is_hdf5:
        raise InputError(f"{where}: not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except _H5_ERRORS as exc:
        raise InputError(f"{where}: cannot open as HDF5 ({_first_line(exc)})") from None
    limits_ = {"train": max_train, "test": max_test}
    with f:
        # Metadata checks first: truncation must not hide a problem in the file,
        # and a declared size beyond the memory is an error before any read.
        metas = {s: _split_meta(f, where, s) for s in _SPLITS}
        need = sum(_read_bytes(metas[s], limits_[s], max_len) for s in _SPLITS)
        shapes = " and ".join(f"/{s}/x {metas[s].shape} {metas[s].dtype}" for s in _SPLITS)
        limits.check_read(where, f"reading {shapes}", need,
                          "use --max-train, --max-test or --max-len, or a smaller file")
        read = {s: _read_split(where, s, metas[s], limits_[s], max_len) for s in _SPLITS}
        attrs = _read_attrs(f, where)
    (train, top_train), (test, top_test) = read["train"], read["test"]
    nc = attrs.get("num_classes")
    train, test, num_classes = _check_pair(where, train, test, nc,
                                           {"train": top_train, "test": top_test})
    attrs["num_classes"] = num_classes
    name = str(attrs.get("name") or path.stem)
    attrs["name"] = name
    for key in PROVENANCE_ATTRS:
        attrs.setdefault(key, "")
    return Dataset(name, train, test, num_classes, attrs)


def write_dataset(path: str | os.PathLike, train: Split, test: Split, *, name: str,
                  num_classes: int | None = None, attrs: Mapping[str, Any] | None = None) -> None:
    """Write a data set in the schema, atomically (temp file + rename), gzip-compressed.

    ``num_classes`` defaults to the largest label + 1.  ``attrs`` become root
    attributes (``source``, ``normalisation`` and ``description`` default to
    ""); numeric lists are stored as arrays (read back as lists), dicts and
    other lists as JSON strings.  The arrays are
    validated exactly as :func:`load_dataset` does, so a written file always
    loads.  On any error no file (and no partial file) is left at ``path``.
    """
    path = Path(path)
    where = str(path)
    train, test, num_classes = _check_pair(where, train, test, num_classes)
    root: dict[str, Any] = {key: "" for key in PROVENANCE_ATTRS}
    for key, value in (attrs or {}).items():
        root[str(key)] = _attr_for_hdf5(value)
    root["name"] = str(name)
    root["num_classes"] = num_classes
    if not path.parent.is_dir():
        raise InputError(f"{where}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # The HDF5 1.8 file format: its object headers carry checksums, so a
        # damaged file fails to read instead of crashing HDF5 (docs/data.md).
        with h5py.File(tmp, "w", libver=("v108", "v108")) as f:
            for split_name, s in zip(_SPLITS, (train, test)):
                g = f.create_group(split_name)
                chunk_rows = max(1, min(len(s), (1 << 20) // (4 * s.seq_len * s.input_size)))
                g.create_dataset("x", data=s.x, compression="gzip", compression_opts=4,
                                 shuffle=True, chunks=(chunk_rows, s.seq_len, s.input_size))
                g.create_dataset("y", data=s.y, compression="gzip")
                if s.lengths is not None:
                    g.create_dataset("lengths", data=s.lengths, compression="gzip")
            for key, value in root.items():
                f.attrs[key] = value
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- #
# mini-batches
# --------------------------------------------------------------------------- #
def _generator(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    return generator if generator is not None else np.random.default_rng(seed)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int | None = None,
                  generator: np.random.Generator | None = None,
                  drop_last: bool = False) -> Iterator[np.ndarray]:
    """Index arrays of one epoch over ``n`` samples: each sample exactly once.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (or a
    fresh ``default_rng(seed)``); pass the same generator every epoch for a
    new, reproducible order each epoch.  ``drop_last`` drops a final short batch.
    """
    if batch_size < 1:
        raise InputError(f"batch_size: must be a positive integer, got {batch_size!r}")
    order = _generator(seed, generator).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def iterate_minibatches(split: Split, batch_size: int, *, shuffle: bool, seed: int | None = None,
                        generator: np.random.Generator | None = None,
                        drop_last: bool = False) -> Iterator[Batch]:
    """One epoch of :class:`Batch` slices ``(x, y, lengths)`` of ``split``.

    Same order rules as :func:`batch_indices`.  Batches keep the split's
    padded length ``T`` (a fixed time grid across batches).
    """
    for idx in batch_indices(len(split), batch_size, shuffle=shuffle, seed=seed,
                             generator=generator, drop_last=drop_last):
        if not shuffle:  # contiguous: views, no copy
            idx = slice(int(idx[0]), int(idx[-1]) + 1)
        lengths = None if split.lengths is None else split.lengths[idx]
        yield Batch(split.x[idx], split.y[idx], lengths)


# --------------------------------------------------------------------------- #
# the synthetic long-memory task
# --------------------------------------------------------------------------- #
#: Minimum steps per pulse segment (a pulse plus as much noise around it).
_MIN_SEGMENT = 4
_PULSE_WIDTH = 8
_NOISE_STD = 0.25


def _pulse_code(num_classes: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel and signed amplitude of each pulse type.

    Type ``c`` is a bump on channel ``(c // 2) % d`` with sign ``+`` for even
    ``c`` and ``-`` for odd ``c``, amplitude ``1 + c // (2 d)``: for two classes
    and one channel simply a positive and a negative bump.
    """
    c = np.arange(num_classes)
    channel = (c // 2) % input_size
    amplitude = np.where(c % 2 == 0, 1.0, -1.0) * (1 + c // (2 * input_size))
    return channel, amplitude


def _synthetic_split(length: int, n: int, num_classes: int, input_size: int,
                     variable_length: bool, seed: np.random.SeedSequence) -> Split:
    num_events = 2 * num_classes - 1
    r_label, r_len, r_type, r_fix, r_pos, r_noise = (np.random.default_rng(s) for s in seed.spawn(6))
    y = r_label.permutation(np.arange(n) % num_classes).astype(np.int64)
    if variable_length:
        lengths = r_len.integers(max(length // 2, _MIN_SEGMENT * num_events), length + 1, size=n)
    else:
        lengths = np.full(n, length, dtype=np.int64)

    # Event types: random, then repaired so the label type is the strict majority.
    types = r_type.integers(0, num_classes, size=(n, num_events))
    fix_order = np.argsort(r_fix.random((n, num_events)), axis=1)
    rows = np.arange(n)
    for _ in range(num_events):
        counts = np.stack([(types == c).sum(axis=1) for c in range(num_classes)], axis=1)
        own = counts[rows, y]
        counts[rows, y] = -1
        need = own <= counts.max(axis=1)
        if not need.any():
            break
        # the first event (in the random order) that is not yet of the label type
        not_label = np.take_along_axis(types, fix_order, axis=1) != y[:, None]
        pick = fix_order[rows, np.argmax(not_label, axis=1)]
        sel = rows[need]
        types[sel, pick[need]] = y[need]

    # One event per equal segment of the valid length, at a random offset inside it.
    seg = lengths // num_events                                   # [n]
    width = np.minimum(_PULSE_WIDTH, seg // 2)                    # [n]
    offset = (r_pos.random((n, num_events)) * (seg - width + 1)[:, None]).astype(np.int64)
    start = np.arange(num_events)[None, :] * seg[:, None] + offset  # [n, E]

    x = (_NOISE_STD * r_noise.standard_normal((n, length, input_size))).astype(np.float32)
    channel, amplitude = _pulse_code(num_classes, input_size)
    k = np.arange(_PULSE_WIDTH)
    steps = start[:, :, None] + k[None, None, :]                  # [n, E, W]
    inside = np.broadcast_to(k[None, None, :] < width[:, None, None], steps.shape)
    ii = np.broadcast_to(rows[:, None, None], steps.shape)[inside]
    tt = steps[inside]
    cc = np.broadcast_to(channel[types][:, :, None], steps.shape)[inside]
    aa = np.broadcast_to(amplitude[types][:, :, None], steps.shape)[inside]
    x[ii, tt, cc] += aa.astype(np.float32)
    x[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
    return Split(x, y, lengths if variable_length else None)


def make_synthetic(length: int, n_train: int, n_test: int, *, num_classes: int = 2,
                   input_size: int = 1, seed: int = 0, variable_length: bool = False) -> Dataset:
    """The synthetic long-memory classification task (deterministic in ``seed``).

    Each sequence is Gaussian noise (std 0.25) carrying ``E = 2C - 1`` short
    pulses (width 8, fewer steps for very short sequences), one at a random
    offset inside each of ``E`` equal segments of the sequence, so the first
    pulse lies in the first ``1/E`` of it.  A pulse has one of ``C`` types
    (channel and signed amplitude, see :func:`_pulse_code`); the class is the
    type that occurs most often (a strict majority by construction).  The
    answer thus depends on events spread over the whole sequence: a model must
    detect pulses in noise and keep counts from the first to the last step.
    Labels are balanced exactly (counts differ by at most one); train and test
    come from independent streams of ``seed``.  With ``variable_length`` the
    lengths are uniform in ``[length // 2, length]`` and padding is zero.
    """
    where = f"synthetic:{length}"
    for option, value in (("length", length), ("n_train", n_train), ("n_test", n_test),
                          ("input_size", input_size)):
        _check_limit(option, value)
    num_classes = _check_num_classes(where, num_classes)
    num_events = 2 * num_classes - 1
    if length < _MIN_SEGMENT * num_events:
        raise InputError(f"{where}: length must be >= {_MIN_SEGMENT * num_events} "
                         f"for {num_classes} classes ({num_events} pulses), got {length}")
    if length > MAX_SYNTHETIC_LENGTH:
        raise InputError(f"{where}: length {length} is more than the {MAX_SYNTHETIC_LENGTH} "
                         "steps supported")
    # peak: both splits as float32, the float64 noise and masks of the larger one
    values = length * input_size
    need = (n_train + n_test) * values * 4 + max(n_train, n_test) * (values * 9 + length)
    limits.check_read(where, f"generating {n_train} + {n_test} sequences of {length} x "
                      f"{input_size} values", need,
                      "use a smaller LEN, --max-len, --max-train or --max-test")
    ss_train, ss_test = np.random.SeedSequence(seed).spawn(2)
    train = _synthetic_split(length, n_train, num_classes, input_size, variable_length, ss_train)
    test = _synthetic_split(length, n_test, num_classes, input_size, variable_length, ss_test)
    attrs = {
        "name": where,
        "num_classes": num_classes,
        "source": "mgrit_gru.data.make_synthetic",
        "normalisation": "none",
        "description": (f"majority pulse type among {num_events} pulses (width {_PULSE_WIDTH}) "
                        f"in Gaussian noise (std {_NOISE_STD}), one pulse per segment"),
        "seed": int(seed),
        "input_size": int(input_size),
        "variable_length": bool(variable_length),
    }
    return Dataset(where, train, test, num_classes, attrs)
