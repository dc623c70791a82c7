"""Metrics of a run: confusion matrix, macro precision/recall/F1, parameter
checksums and the check that every replica holds the same weights."""

from __future__ import annotations

import math

import numpy as np
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import Diverged


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of samples of class ``i`` predicted as class ``j``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro (unweighted per-class mean) precision, recall and F1.

    Precision of class ``i`` is ``tp / (tp + fp)``, recall ``tp / (tp + fn)``;
    a class never predicted has precision 0 and a class absent from the labels
    has recall 0 (both still count in the mean over all classes). F1 is the
    harmonic mean of the macro precision and the macro recall (the
    "F-measure" of the data-parallel reference paper), 0 when both are 0.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    total = cm.sum()
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0).mean()
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0).mean()
    pr = precision + recall
    f1 = 2.0 * precision * recall / pr if pr > 0 else 0.0
    return {"accuracy": float(tp.sum() / total) if total > 0 else 0.0,
            "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def param_checksum(model: torch.nn.Module) -> tuple[float, float]:
    """Sum and sum of squares of all parameters (in float64)."""
    with torch.no_grad():
        s = sum(float(p.double().sum()) for p in model.parameters())
        sq = sum(float(p.double().square().sum()) for p in model.parameters())
    return s, sq


def check_replicas(model: torch.nn.Module, comm: Comm, where: str = "") -> tuple[float, float]:
    """Raise ``RuntimeError`` on every rank unless all ranks hold the same
    parameters (compared through :func:`param_checksum`); return the checksum.
    Non-finite parameters on any rank raise :class:`Diverged` instead (NaN
    never equals NaN, but it is no rank mismatch)."""
    checksum = param_checksum(model)
    gathered = comm.allgather_object((checksum, finite_params(model)))
    nonfinite = [r for r, (_, finite) in enumerate(gathered) if not finite]
    if nonfinite:
        raise Diverged(f"non-finite parameters{' ' + where if where else ''} (rank "
                       f"{nonfinite[0]}); the last checkpoint is untouched")
    gathered = [c for c, _ in gathered]
    # (huge finite parameters may overflow the sums to inf: equal infs still compare equal)
    bad = [r for r, c in enumerate(gathered) if c != gathered[0]]
    if bad:
        raise RuntimeError(f"parameters differ across ranks: checksum (sum, sum of squares) "
                           f"{gathered[bad[0]]} on rank {bad[0]} vs {gathered[0]} on rank 0")
    return checksum


# --------------------------------------------------------------------------- #
# configuration resolved at run time
# --------------------------------------------------------------------------- #


def all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` (an iterable, ``None`` entries
    skipped) is finite.

    One sum per tensor and one test of their sum: an inf or a NaN anywhere
    makes it non-finite, and only then (or when finite values overflow the
    sum) does the exact test per element decide. On the per-batch path, right
    after a minibatch, it costs about 0.6x of ``isfinite(t).all()`` per
    tensor (a fifth when the tensors are in cache).
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    total = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors]).sum()
    if math.isfinite(float(total)):
        return True
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def finite_params(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all_finite(model.parameters())
