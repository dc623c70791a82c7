"""Evaluation: the test metrics under the model's propagator
(:func:`evaluate`) and under the exact serial recurrence
(:func:`evaluate_exact`), and the gradient check of a probe batch
(:func:`gradient_check`). The model and the batches are on the run's device;
the counts are summed on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.training.metrics import classification_metrics
from mgrit_gru.training.update import TensorSplit, set_sample_ids, shard

#: Smallest minibatch of the evaluation (no gradients are kept, and larger
#: batches amortise the per-step overhead of the recurrence).
EVAL_BATCH = 256

#: The test metrics of :func:`evaluate` (suffix ``_inexact``: under the
#: training forward).
TEST_METRICS = ("test_loss", "test_accuracy", "test_precision", "test_recall", "test_f1")


class using:
    """``with using(model, propagator):`` -- ``model.propagator`` is
    ``propagator`` inside the block (the parameters stay the same objects)."""

    def __init__(self, model: torch.nn.Module, propagator: Any):
        self.model, self.propagator = model, propagator

    def __enter__(self):
        self.saved = self.model.propagator
        self.model.propagator = self.propagator
        return self.model

    def __exit__(self, *exc_info) -> None:
        self.model.propagator = self.saved


def _serial(exact):
    """``exact``, or a new :class:`~mgrit_gru.models.SerialPropagator`."""
    if exact is None:
        from mgrit_gru.models import SerialPropagator
        exact = SerialPropagator()
    return exact


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorSplit, num_classes: int,
             batch_size: int, data_comm: Comm) -> dict[str, float]:
    """Mean cross-entropy and classification metrics on a split with the
    model's propagator; each rank of ``data_comm`` evaluates a contiguous
    shard and the results are summed over ``data_comm`` (every rank gets
    them). For an MGRIT propagator ``data_comm`` is the data groups (the time
    ranks of a group solve its shard together); for a propagator without
    communication it may be every rank of the job (:func:`evaluate_exact`)."""
    model.eval()
    mine = shard(data.n, data_comm.size, data_comm.rank)
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.float64)
    for start in range(mine.start, mine.stop, batch_size):
        x, y, lengths = data.take(slice(start, min(start + batch_size, mine.stop)))
        logits = model(x, lengths)
        counts[-1] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        counts[:-1] += torch.bincount(y * num_classes + logits.argmax(dim=1),
                                      minlength=num_classes * num_classes).cpu()
    model.train()
    data_comm.allreduce_(counts)
    confusion = counts[:-1].numpy().reshape(num_classes, num_classes)
    metrics = classification_metrics(confusion)
    return {"test_loss": float(counts[-1]) / data.n, "test_accuracy": metrics["accuracy"],
            "test_precision": metrics["precision"], "test_recall": metrics["recall"],
            "test_f1": metrics["f1"]}


def evaluate_exact(model: torch.nn.Module, data: TensorSplit, num_classes: int,
                   batch_size: int, comm: Comm, exact=None) -> dict[str, float]:
    """:func:`evaluate` with the exact serial recurrence (``exact``, default a
    new :class:`~mgrit_gru.models.SerialPropagator`) in place of the model's
    propagator, the split sharded over every rank of ``comm`` (the whole job:
    no rank waits for another, the same total work as the serial loop on one
    time rank per data group) and the counts summed over ``comm``."""
    with using(model, _serial(exact)):
        return evaluate(model, data, num_classes, batch_size, comm)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """The parameters' gradients as one float64 vector on the host (zeros where None)."""
    return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None
                      else p.grad.detach().reshape(-1).double().cpu()
                      for p in model.parameters()])


def gradient_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lengths,
                   exact=None) -> dict[str, float]:
    """Compare the gradient of the mean cross-entropy of the batch ``(x, y,
    lengths)`` under the model's propagator (cold start: no warm-start ids)
    with the one under the exact serial recurrence ``exact`` (default a new
    :class:`~mgrit_gru.models.SerialPropagator`).

    Returns ``grad_cosine`` (cosine of the angle between the two flattened
    gradients) and ``grad_rel_error`` (``||g - g_exact|| / ||g_exact||``).
    The parameters' ``.grad`` are restored afterwards; nothing is updated.
    Collective over the propagator's communicator (every time rank of the
    group calls it with the same batch).
    """
    exact = _serial(exact)
    params = list(model.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in params]

    def grad() -> torch.Tensor:
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(x, lengths), y).backward()
        return _flat_grad(model)

    try:
        set_sample_ids(model, None)
        g = grad()
        with using(model, exact):
            g_exact = grad()
    finally:
        for p, s in zip(params, saved):
            p.grad = s
    norm, norm_exact = float(g.norm()), float(g_exact.norm())
    cosine = float(g @ g_exact) / (norm * norm_exact) if norm and norm_exact else float("nan")
    rel = float((g - g_exact).norm()) / norm_exact if norm_exact else float("nan")
    return {"grad_cosine": cosine, "grad_rel_error": rel}
