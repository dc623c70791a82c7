"""Dataset schema: the in-memory splits and the validation of their contents."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mgrit_gru.errors import InputError
from mgrit_gru.limits import MAX_CLASSES


#: Root attributes every file carries (written as "" when not given).
PROVENANCE_ATTRS = ("source", "normalisation", "description")

#: The built-in set ``mgrit-gru train`` uses when no data set is given.
DEFAULT_DATASET = "FreezerRegularTrain"

#: Default sizes of the ``synthetic:LEN`` data set (overridden by max_train/max_test).
SYNTHETIC_N_TRAIN = 1000
SYNTHETIC_N_TEST = 200

_DATASETS_DIR = Path(__file__).resolve().parent / "bundled"
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
