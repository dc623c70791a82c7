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
``mgrit_gru/data/bundled/`` (see :func:`builtin_datasets`) and ``synthetic:LEN``,
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
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from mgrit_gru import limits
from mgrit_gru.errors import InputError
from mgrit_gru.limits import MAX_SYNTHETIC_LENGTH

from mgrit_gru.data.schema import (DEFAULT_DATASET, Dataset, PROVENANCE_ATTRS, SYNTHETIC_N_TEST, SYNTHETIC_N_TRAIN, Split,
    _DATASETS_DIR, _SPLITS, _check_label_values, _check_lengths, _check_limit,
    _check_pair, _check_shapes, _check_split)
from mgrit_gru.data.synthetic import make_synthetic


def builtin_datasets() -> dict[str, Path]:
    """The data sets shipped in ``mgrit_gru/data/bundled/``: ``{name: path}``, sorted by name."""
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
