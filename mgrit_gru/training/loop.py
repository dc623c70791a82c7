"""The training loop, its metrics and the run folder.

:func:`train` runs one training job on a communicator of ``P`` ranks split into
a ``time_ranks x (P // time_ranks)`` grid (:meth:`Comm.split_grid`):

* ranks of one *time group* share every minibatch; with ``propagator =
  mgrit`` each owns a chunk of time points and MGRIT solves the recurrence
  across them, otherwise ``time_ranks`` is 1;
* *data groups* split each global minibatch into contiguous shards and
  average their gradients (one allreduce per step, weighted by shard size, so
  the update equals the one of the whole minibatch on one rank).

Parameters are identical on every rank; a checksum (sum and sum of squares of
all parameters, gathered from every rank) proves it after every epoch.

The test metrics come from exact inference, the serial recurrence, with the
test set sharded over every rank of the job (:func:`evaluate_exact`); with
``propagator = mgrit`` the metrics under the training forward follow with the
suffix ``_inexact``. Options: ``exact_last_epochs`` trains the last epochs
serially, ``grad_check_every`` compares the MGRIT gradient of a probe batch
with the exact one (:func:`gradient_check`).

Rank 0 prints one summary line per epoch and writes the run folder
(:mod:`mgrit_gru.training.runfolder`: config, log, strict-JSON metrics, the last two
checkpoints with digests, a lock). The layout of ``metrics.json`` is
documented in docs/usage.md.

An epoch runs in segments between *synchronisation points* (after every
batch with the sequential strategy, every ``16 x workers`` batches with the
others: ``sync_batches``). At each point the ranks agree, in one small
allreduce, on three things: a stop signal received by any rank
(:class:`~mgrit_gru.training.signals.StopSignals`: checkpoint, then
:class:`~mgrit_gru.errors.Stopped`), a timed checkpoint due on rank 0, and a
non-finite loss, gradient, MGRIT residual or parameter on any rank
(:class:`~mgrit_gru.errors.Diverged`, or a skipped batch). A checkpoint
inside an epoch holds the position and the epoch's running sums, so that a
resumed run is bit for bit the uninterrupted one (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import socket
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mgrit_gru
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import TrainConfig, flag
from mgrit_gru.data import DEFAULT_DATASET, Dataset, Split, batch_indices, load_dataset
from mgrit_gru.errors import Diverged, InputError, Stopped
from mgrit_gru.limits import check_resources
from mgrit_gru.training.metrics import (check_replicas, classification_metrics, finite_params)
from mgrit_gru.training.runfolder import RunFolder, claim_run_name, load_checkpoint, strict_json
from mgrit_gru.training.signals import StopSignals
from mgrit_gru.training.strategies import make_strategy

#: Smallest minibatch of the evaluation (no gradients are kept, and larger
#: batches amortise the per-step overhead of the recurrence).
EVAL_BATCH = 256

#: MGRIT statistics averaged per epoch (keys of ``MGRITPropagator.last_stats``).
MGRIT_STATS = ("fwd_iters", "bwd_iters", "fwd_residual", "bwd_residual")
#: ... of which the epoch's largest value is kept too (as ``<key>_max``).
MGRIT_MAX_STATS = MGRIT_STATS
#: Total solver steps of a batch (all levels, all time ranks), averaged per
#: epoch; 0 when the propagator does not report them.
MGRIT_STEP_STATS = ("fwd_steps", "bwd_steps")
#: The keys of :meth:`_Stepper.mean_stats` (in the epoch records with mgrit).
EPOCH_STATS = (*MGRIT_STATS, *MGRIT_STEP_STATS, "serial_batches",
               *(f"{k}_max" for k in MGRIT_MAX_STATS))

#: The test metrics of :func:`evaluate` (suffix ``_inexact``: under the
#: training forward).
TEST_METRICS = ("test_loss", "test_accuracy", "test_precision", "test_recall", "test_f1")


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def resolve_config(config: TrainConfig, comm: Comm) -> TrainConfig:
    """Fill in the options left to run time (``out``, ``time_ranks``) and check the options against the communicator.

    The run folder is rank 0's choice, broadcast to every rank.
    """
    changes: dict[str, Any] = {}
    out = error = None
    if comm.is_root:
        out = config.out
        if out is None:
            try:
                out = claim_run_name(f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.cell}")
            except OSError as e:
                error = f"run folder under runs/: cannot create ({e.strerror})"
    out, error = comm.bcast_object((out, error))
    if error:
        raise InputError(error)
    changes["out"] = out
    time_ranks = config.time_ranks
    if time_ranks is None:
        time_ranks = comm.size if config.propagator == "mgrit" else 1
    changes["time_ranks"] = time_ranks
    if comm.size % time_ranks:
        raise InputError(f"option time_ranks ({flag('time_ranks')}): {time_ranks} does not "
                         f"divide the {comm.size} MPI ranks")
    if time_ranks > 1 and config.propagator != "mgrit":
        raise InputError(f"option time_ranks ({flag('time_ranks')}): {time_ranks} time ranks "
                         f"need propagator = mgrit (got {config.propagator})")
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------- #
# model pieces
# --------------------------------------------------------------------------- #
def make_propagator(config: TrainConfig, time_comm: Comm):
    """The propagator named by ``config.propagator``."""
    from mgrit_gru.models import AutogradPropagator, SerialPropagator

    if config.propagator == "serial":
        return SerialPropagator()
    if config.propagator == "autograd":
        return AutogradPropagator()
    from mgrit_gru.models import MGRITOptions, MGRITPropagator

    options = MGRITOptions(levels=config.levels, cfactor=config.cfactor,
                           fwd_iters=config.fwd_iters, bwd_iters=config.bwd_iters,
                           fwd_tol=config.fwd_tol, bwd_tol=config.bwd_tol,
                           fwd_rtol=config.fwd_rtol, bwd_rtol=config.bwd_rtol,
                           relax=config.relax, bwd_relax=config.bwd_relax,
                           skip_first_relax=config.skip_first_relax,
                           final_residual=config.final_residual,
                           cycle=config.cycle, nested=config.nested,
                           warm_start=config.warm_start, warm_start_mb=config.warm_start_mb,
                           coarse_input=config.coarse_input)
    return MGRITPropagator(time_comm, options)


class _using:
    """``with _using(model, propagator):`` -- ``model.propagator`` is
    ``propagator`` inside the block (the parameters stay the same objects)."""

    def __init__(self, model: torch.nn.Module, propagator: Any):
        self.model, self.propagator = model, propagator

    def __enter__(self):
        self.saved = self.model.propagator
        self.model.propagator = self.propagator
        return self.model

    def __exit__(self, *exc_info) -> None:
        self.model.propagator = self.saved


def _set_sample_ids(model: torch.nn.Module, ids: np.ndarray | None) -> None:
    """Tell the propagator which training sequences its next forward solves
    (``None``: none; it then uses no warm start), when it wants to know."""
    set_ids = getattr(getattr(model, "propagator", None), "set_sample_ids", None)
    if set_ids is not None:
        set_ids(None if ids is None else np.asarray(ids, dtype=np.int64))


def build_model(config: TrainConfig, dataset: Dataset, time_comm: Comm | None = None):
    """The run's :class:`SequenceClassifier`, its weights drawn from ``config.seed``
    (the same on every rank)."""
    from mgrit_gru.models import SequenceClassifier

    torch.manual_seed(config.seed)
    return SequenceClassifier(cell=config.cell, input_size=dataset.input_size,
                              hidden_size=config.hidden, num_classes=dataset.num_classes,
                              pooling=config.pooling, layers=config.layers,
                              propagator=make_propagator(config, time_comm or Comm.serial()),
                              dtype=getattr(torch, config.dtype))


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or Adam over the model's parameters with ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


class _TensorSplit:
    """A data split as torch tensors of the run's dtype (converted once)."""

    def __init__(self, split: Split, dtype: torch.dtype):
        self.x = torch.from_numpy(np.ascontiguousarray(split.x)).to(dtype)
        self.y = torch.from_numpy(np.ascontiguousarray(split.y))
        self.lengths = None if split.lengths is None else torch.from_numpy(
            np.ascontiguousarray(split.lengths))
        self.n = len(split)

    def take(self, idx: np.ndarray | slice):
        """``(x, y, lengths)`` of the samples ``idx``."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        lengths = None if self.lengths is None else self.lengths[idx]
        return self.x[idx], self.y[idx], lengths


def _shard(n: int, parts: int, index: int) -> slice:
    """The ``index``-th of ``parts`` contiguous, balanced pieces of ``range(n)``."""
    return slice(index * n // parts, (index + 1) * n // parts)


class _ShardStep:
    """This data group's share of one global minibatch (an index array):
    forward and backward of its shard, weighted by the shard's fraction of the
    minibatch, so that the sum over data groups is the minibatch's gradient
    and loss. Picklable and free of MPI: worker processes run it."""

    def __init__(self, data: _TensorSplit, rank: int, size: int):
        self.data, self.rank, self.size = data, rank, size

    def __call__(self, model: torch.nn.Module, idx: np.ndarray) -> float:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        part = idx[_shard(len(idx), self.size, self.rank)]
        if not len(part):
            return 0.0
        _set_sample_ids(model, part)
        x, y, lengths = self.data.take(part)
        batch_loss = torch.nn.functional.cross_entropy(model(x, lengths), y)
        weight = len(part) / len(idx)
        (batch_loss * weight if weight != 1.0 else batch_loss).backward()
        return float(batch_loss.detach()) * weight


class _Stepper:
    """The ``step_fn`` of the strategies: forward, backward and the gradient
    average over data groups for one global minibatch (an index array).

    The gradients and the loss of all data groups travel in one preallocated
    buffer (one allreduce per step). The parts, for strategies with workers
    (see :mod:`mgrit_gru.training.strategies`): :attr:`local` (a :class:`_ShardStep`),
    :meth:`reduce_`, :meth:`record` and :attr:`data_groups`.
    """

    def __init__(self, data: _TensorSplit, model: torch.nn.Module, data_comm: Comm,
                 skip: bool = False):
        self.local = _ShardStep(data, data_comm.rank, data_comm.size)
        #: skip the update of a batch with a non-finite loss, gradient or
        #: residual (else only note it in :attr:`bad` for the loop to stop)
        self.skip = skip
        self.position = 0          # index in the epoch of the next batch
        self.bad: tuple[int, str] | None = None   # first bad batch since reset by the loop
        self.skipped_now = 0       # batches skipped since reset by the loop
        self.comm = data_comm
        self.data_groups = data_comm.size
        self.sums = dict.fromkeys(MGRIT_STATS + MGRIT_STEP_STATS + ("serial_fallback",), 0.0)
        self.maxima = dict.fromkeys(MGRIT_MAX_STATS, 0.0)
        self.steps = 0
        n = sum(p.numel() for p in model.parameters())
        dtype = next(model.parameters()).dtype
        self.buffer = torch.zeros(n + 1, dtype=dtype) if data_comm.size > 1 else None

    def reset_stats(self) -> None:
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.maxima = dict.fromkeys(self.maxima, 0.0)
        self.steps = 0

    def state(self) -> dict:
        """The epoch's statistics so far (for a mid-epoch checkpoint)."""
        return {"sums": dict(self.sums), "maxima": dict(self.maxima), "steps": self.steps}

    def load_state(self, state: dict) -> None:
        self.sums.update({k: float(v) for k, v in state.get("sums", {}).items()
                          if k in self.sums})
        self.maxima.update({k: float(v) for k, v in state.get("maxima", {}).items()
                            if k in self.maxima})
        self.steps = int(state.get("steps", 0))

    def _check(self, model: torch.nn.Module, loss: float, residuals: bool = True) -> float:
        """Look for a non-finite loss, gradient or MGRIT residual in the batch
        just computed (identical on every rank of a data group's step). Note
        the first in :attr:`bad`; drop the gradients (the optimizer then skips
        the step) and return 0 as the loss when it is skipped or will stop the run."""
        index = self.position
        self.position += 1
        what = None
        if not math.isfinite(loss):
            what = "loss"
        elif not all(p.grad is None or bool(torch.isfinite(p.grad).all())
                     for p in model.parameters()):
            what = "gradient"
        elif residuals:     # (a data group's own: checked only with one group)
            info = getattr(model.propagator, "last_info", None) or {}
            for kind, name in (("fwd", "forward"), ("bwd", "backward")):
                res = getattr(info.get(kind), "residuals", None) or []
                it = next((k for k, r in enumerate(res) if not math.isfinite(r)), None)
                if it is not None:
                    what = f"{name} MGRIT residual (fine level, iteration {it})"
                    break
        if what is None:
            return loss
        if self.bad is None:
            self.bad = (index, what)
        if self.skip:
            self.skipped_now += 1
        for p in model.parameters():
            p.grad = None
        return 0.0

    def mean_stats(self) -> dict[str, float]:
        """The epoch's MGRIT statistics: the means per step of
        :data:`MGRIT_STATS` and :data:`MGRIT_STEP_STATS`, the largest values of
        :data:`MGRIT_MAX_STATS` (``<key>_max``) and ``serial_batches`` (steps
        the propagator solved serially); with several data groups (each solving
        for its own shard) each is the largest over the groups. Collective over
        the data groups."""
        if not self.steps:
            return {}
        values = [*(self.sums[k] / self.steps for k in MGRIT_STATS + MGRIT_STEP_STATS),
                  self.sums["serial_fallback"], *self.maxima.values()]
        values = torch.tensor(values, dtype=torch.float64)
        self.comm.allreduce_(values, op="max")
        return dict(zip(EPOCH_STATS, values.tolist()))

    def record(self, model: torch.nn.Module, idx: np.ndarray) -> None:
        """Count the step of minibatch ``idx`` and add the MGRIT statistics of
        ``model``'s last solve (if this group's shard of ``idx`` was not empty)."""
        stats = getattr(model.propagator, "last_stats", None)
        if stats and len(idx[_shard(len(idx), self.comm.size, self.comm.rank)]):
            for k in self.sums:
                self.sums[k] += float(stats.get(k, 0.0))
            for k in self.maxima:
                self.maxima[k] = max(self.maxima[k], float(stats.get(k, 0.0)))
        self.steps += 1

    def reduce_(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum a flat contiguous tensor over the data groups, in place."""
        return self.comm.allreduce_(flat)

    def __call__(self, model: torch.nn.Module, idx: np.ndarray) -> float:
        loss = self.local(model, idx)
        self.record(model, idx)
        if self.buffer is None:
            return self._check(model, loss)
        params = list(model.parameters())
        buf, offset = self.buffer, 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                buf[offset:offset + n].zero_()
            else:
                buf[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        buf[offset] = loss
        self.comm.allreduce_(buf)
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                p.grad = buf[offset:offset + n].view_as(p).clone()
            else:
                p.grad.view(-1).copy_(buf[offset:offset + n])
            offset += n
        return self._check(model, float(buf[offset]), residuals=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: _TensorSplit, num_classes: int,
             batch_size: int, data_comm: Comm) -> dict[str, float]:
    """Mean cross-entropy and classification metrics on a split with the
    model's propagator; each rank of ``data_comm`` evaluates a contiguous
    shard and the results are summed over ``data_comm`` (every rank gets
    them). For an MGRIT propagator ``data_comm`` is the data groups (the time
    ranks of a group solve its shard together); for a propagator without
    communication it may be every rank of the job (:func:`evaluate_exact`)."""
    model.eval()
    mine = _shard(data.n, data_comm.size, data_comm.rank)
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.float64)
    for start in range(mine.start, mine.stop, batch_size):
        x, y, lengths = data.take(slice(start, min(start + batch_size, mine.stop)))
        logits = model(x, lengths)
        counts[-1] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        counts[:-1] += torch.bincount(y * num_classes + logits.argmax(dim=1),
                                      minlength=num_classes * num_classes)
    model.train()
    data_comm.allreduce_(counts)
    confusion = counts[:-1].numpy().reshape(num_classes, num_classes)
    metrics = classification_metrics(confusion)
    return {"test_loss": float(counts[-1]) / data.n, "test_accuracy": metrics["accuracy"],
            "test_precision": metrics["precision"], "test_recall": metrics["recall"],
            "test_f1": metrics["f1"]}


def evaluate_exact(model: torch.nn.Module, data: _TensorSplit, num_classes: int,
                   batch_size: int, comm: Comm, exact=None) -> dict[str, float]:
    """:func:`evaluate` with the exact serial recurrence (``exact``, default a
    new :class:`~mgrit_gru.models.SerialPropagator`) in place of the model's
    propagator, the split sharded over every rank of ``comm`` (the whole job:
    no rank waits for another, the same total work as the serial loop on one
    time rank per data group) and the counts summed over ``comm``."""
    if exact is None:
        from mgrit_gru.models import SerialPropagator
        exact = SerialPropagator()
    with _using(model, exact):
        return evaluate(model, data, num_classes, batch_size, comm)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """The parameters' gradients as one float64 vector (zeros where None)."""
    return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None
                      else p.grad.detach().reshape(-1).double() for p in model.parameters()])


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
    if exact is None:
        from mgrit_gru.models import SerialPropagator
        exact = SerialPropagator()
    params = list(model.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in params]

    def grad() -> torch.Tensor:
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(x, lengths), y).backward()
        return _flat_grad(model)

    try:
        _set_sample_ids(model, None)
        g = grad()
        with _using(model, exact):
            g_exact = grad()
    finally:
        for p, s in zip(params, saved):
            p.grad = s
    norm, norm_exact = float(g.norm()), float(g_exact.norm())
    cosine = float(g @ g_exact) / (norm * norm_exact) if norm and norm_exact else float("nan")
    rel = float((g - g_exact).norm()) / norm_exact if norm_exact else float("nan")
    return {"grad_cosine": cosine, "grad_rel_error": rel}


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #
def _summary(epoch: int, epochs: int, record: dict) -> str:
    """``epoch 3/10 | train_loss 0.512 | test_loss 0.498 | acc 0.812 | f1 0.80 | 12.3 s``;
    with mgrit ``acc 0.812 (inexact 0.784)``, the solver statistics and the
    gradient check."""
    def num(key: str, fmt: str) -> str:
        value = record.get(key)
        return "-" if value is None else format(value, fmt)

    acc = num("test_accuracy", ".3f")
    if "test_accuracy_inexact" in record:
        acc += f" (inexact {num('test_accuracy_inexact', '.3f')})"
    line = (f"epoch {epoch}/{epochs} | train_loss {num('train_loss', '.3f')} | "
            f"test_loss {num('test_loss', '.3f')} | acc {acc} | "
            f"f1 {num('test_f1', '.2f')} | {record['seconds']:.1f} s")
    if record.get("fwd_iters") is not None:
        line += (f" | mgrit fwd {record['fwd_iters']:.1f} it res {record['fwd_residual']:.1e}"
                 f" | bwd {record['bwd_iters']:.1f} it res {record['bwd_residual']:.1e}")
        if record.get("serial_batches"):
            line += f" | {record['serial_batches']:.0f} serial batches"
    elif record.get("train_propagator") == "serial" and "test_accuracy_inexact" in record:
        line += " | trained serial"
    if record.get("grad_cosine") is not None:
        line += (f" | grad cos {record['grad_cosine']:.6g} "
                 f"relerr {record['grad_rel_error']:.1e}")
    return line


def _show_progress(config: TrainConfig, comm: Comm) -> bool:
    if not comm.is_root or config.progress == "off":
        return False
    return config.progress == "on" or sys.stderr.isatty()


def _agreed_signal(stop: StopSignals, comm: Comm) -> str:
    """The name of the stop signal some rank received (collective)."""
    names = comm.allgather_object(stop.requested)
    return next((n for n in names if n), "a stop signal")


def _final(epochs: list[dict]) -> dict:
    final = dict(epochs[-1])
    final["train_seconds"] = sum(e["seconds"] for e in epochs)
    return final


def _sync_batches(config: TrainConfig) -> int:
    """Batches between two synchronisation points of an epoch (where a run may
    stop or write a mid-epoch checkpoint): ``sync_batches``, else 1 for the
    sequential strategy and 16 x workers for the others (their pipeline
    drains at each point, so the points are part of the run's definition)."""
    if config.sync_batches:
        return config.sync_batches
    return 1 if config.strategy == "sequential" else 16 * config.workers


class _Partial:
    """The running sums of an epoch in progress (saved in mid-epoch checkpoints)."""

    FIELDS = ("loss", "count", "updates", "skipped", "seconds")

    def __init__(self, **values: float) -> None:
        for k in self.FIELDS:
            setattr(self, k, float(values.get(k, 0.0)))

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.FIELDS}


def _check_options(config: TrainConfig) -> None:
    """Cross-option checks of the reliability options."""
    if config.on_divergence == "skip-batch" and config.strategy != "sequential":
        raise InputError(f"option on_divergence ({flag('on_divergence')}): skip-batch needs "
                         f"strategy = sequential (workers update the model themselves)")


def train(config: TrainConfig, comm: Comm | None = None, *, resume: bool = False,
          stop: StopSignals | None = None) -> dict:
    """Train as ``config`` says; return the metrics (the content of metrics.json).

    ``comm`` defaults to all MPI ranks. With ``resume``, the run in
    ``config.out`` continues from its checkpoint (at an epoch's end or inside
    an epoch) up to ``config.epochs``. Bad options or data raise
    :class:`InputError` (on every rank); SIGTERM or the stop signal raise
    :class:`~mgrit_gru.errors.Stopped` on every rank after the checkpoint is
    written; a non-finite loss, gradient, residual or parameter raises
    :class:`~mgrit_gru.errors.Diverged` on every rank (docs/reliability.md).
    ``stop``: the caller's :class:`StopSignals` (default: caught during the
    call only).
    """
    comm = Comm.world() if comm is None else comm
    _check_options(config)
    config = resolve_config(config, comm)
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopSignals(config.stop_signal))
        run = stack.enter_context(RunFolder(config.out, comm, resume=resume))
        return _train(config, comm, run, stop, resume)


def _train(config: TrainConfig, comm: Comm, run: RunFolder, stop: StopSignals,
           resume: bool) -> dict:
    time_comm, data_comm = comm.split_grid(config.time_ranks)
    data_name = DEFAULT_DATASET if config.data == "default" else config.data
    dataset: Dataset = load_dataset(data_name, max_train=config.max_train,
                                    max_test=config.max_test, max_len=config.max_len)
    # memory and cores against the options, before anything big is allocated
    check_resources(config, dataset, comm.node_size())
    torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    train_data = _TensorSplit(dataset.train, dtype)
    test_data = _TensorSplit(dataset.test, dtype)
    if config.propagator == "mgrit" and dataset.train.seq_len < config.time_ranks:
        # batches shorter than the time ranks run serially on every rank: if
        # every batch is, MGRIT never runs (say so before training starts)
        raise InputError(f"option time_ranks ({flag('time_ranks')}): {config.time_ranks} time "
                         f"ranks for training sequences of at most {dataset.train.seq_len} "
                         f"steps: use at most {dataset.train.seq_len} time ranks")

    model = build_model(config, dataset, time_comm)
    optimizer = make_optimizer(config, model)
    mgrit = config.propagator == "mgrit"
    if mgrit and config.exact_last_epochs and config.strategy != "sequential":
        raise InputError(f"option exact_last_epochs ({flag('exact_last_epochs')}): needs "
                         f"strategy = sequential (the workers keep their own propagators)")
    from mgrit_gru.models import SerialPropagator
    # the exact serial recurrence: the test metrics, the serial epochs, the gradient check
    exact = model.propagator if config.propagator == "serial" else SerialPropagator()
    train_propagator = model.propagator
    history: list[dict] = []
    start, start_batch, partial0, stats0 = 1, 0, _Partial(), None
    warnings: list[str] = []
    if resume:
        state, warnings = load_checkpoint(run.path, comm)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"run folder {run.path}: checkpoint does not fit the options "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None
        start = int(state["epoch"]) + 1
        start_batch = int(state.get("batch", 0))
        if start_batch:
            partial0 = _Partial(**state.get("partial", {}))
            stats0 = state.get("stats")
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
        history = [e for e in state["history"] if e["epoch"] < start]
    check_replicas(model, comm)

    environment = {"torch": torch.__version__, "python": platform.python_version(),
                   "mgrit_gru": mgrit_gru.__version__, "hostname": socket.gethostname(),
                   "ranks": comm.size, "time_ranks": config.time_ranks,
                   "data_groups": data_comm.size, "threads": config.threads}
    run.write_config(config)
    for line in run.notes:
        run.log(line)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"mgrit-gru train | data {dataset.name}: {train_data.n} train / {test_data.n} test, "
            f"T {dataset.seq_len}, d {dataset.input_size}, {dataset.num_classes} classes | "
            f"{config.cell} H {config.hidden}, {n_params} parameters | {config.propagator} | "
            f"ranks {comm.size} = {config.time_ranks} time x {data_comm.size} data | "
            f"threads {config.threads} | run folder {run.path}")
    for line in warnings:
        run.log(line)
    if resume:
        where = f"batch {start_batch} of epoch {start}" if start_batch else f"epoch {start - 1}"
        run.log(f"resuming after {where}")
        if config.warm_start and mgrit:
            run.log("warning: warm starts are not checkpointed: the resumed run starts them "
                    "anew (its solves differ from the uninterrupted run's)")

    stepper = _Stepper(train_data, model, data_comm, skip=config.on_divergence == "skip-batch")
    # the gradient check's probe: the first batch_size training sequences, the whole
    # batch on every rank
    probe = train_data.take(slice(0, min(config.batch_size, train_data.n)))
    show_progress = _show_progress(config, comm)
    metrics: dict[str, Any] = {"config": config.to_dict(), "epochs": history,
                               "final": _final(history) if history else {},
                               "environment": environment}
    sync = _sync_batches(config)
    last_checkpoint = time.monotonic()
    batches_since_checkpoint = 0

    def checkpoint(epoch_done: int, batch: int, partial: _Partial | None) -> None:
        """Write a checkpoint after ``epoch_done`` epochs and ``batch`` batches
        of the next one (rank 0; the weights are known to be finite)."""
        nonlocal last_checkpoint, batches_since_checkpoint
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch_done, "batch": batch, "config": config.to_dict(),
                 "history": strict_json(history), "rng": {"torch": torch.get_rng_state()}}
        if batch:
            state["partial"] = partial.as_dict()
            state["stats"] = stepper.state()
        run.write_checkpoint(state)
        comm.barrier()      # no rank ends the job while rank 0 is writing
        last_checkpoint = time.monotonic()
        batches_since_checkpoint = 0

    with make_strategy(config.strategy, config.workers) as strategy:
        tic = time.perf_counter()
        strategy.start(model, optimizer, stepper)
        environment["strategy_startup_seconds"] = time.perf_counter() - tic
        if config.strategy != "sequential":
            run.log(f"strategy {strategy.describe()}: started in "
                    f"{environment['strategy_startup_seconds']:.1f} s")
        first_exact = config.epochs - config.exact_last_epochs + 1 if mgrit else config.epochs + 1
        for epoch in range(start, config.epochs + 1):
            serial_epoch = epoch >= first_exact
            if serial_epoch and (epoch == first_exact or epoch == start):
                run.log(f"epoch {epoch}: training switches from mgrit to the exact serial "
                        f"recurrence (exact_last_epochs {config.exact_last_epochs}, epochs "
                        f"{max(first_exact, 1)}-{config.epochs})")
            model.propagator = exact if serial_epoch else train_propagator
            order = np.random.default_rng([config.seed, epoch])
            batches = list(batch_indices(train_data.n, config.batch_size, shuffle=True,
                                         generator=order))
            n_batches = len(batches)
            pos, partial = 0, _Partial()
            stepper.reset_stats()
            if epoch == start and start_batch:
                pos, partial = min(start_batch, n_batches), partial0
                if stats0:
                    stepper.load_state(stats0)
            tic = time.perf_counter()
            with tqdm(total=n_batches, initial=pos, desc=f"epoch {epoch}/{config.epochs}",
                      unit="batch", leave=False, disable=not show_progress) as bar:
                while pos < n_batches:
                    end = min((pos // sync + 1) * sync, n_batches)
                    stepper.position = pos
                    stepper.bad = None
                    result = strategy.run_epoch(model, optimizer, batches[pos:end], stepper)
                    bar.update(end - pos)
                    loss = result["train_loss"] * (end - pos)   # skipped batches add 0
                    # the stepper's finding (a skipped batch is counted, not fatal),
                    # else the segment's loss (workers) and the updated parameters
                    bad = None if config.on_divergence == "skip-batch" else stepper.bad
                    if bad is None and not math.isfinite(loss):
                        bad = (pos, "loss" if end - pos == 1 else
                               f"loss (batches {pos + 1}-{end})")
                    if bad is None and not finite_params(model):
                        bad = (end - 1, "parameters after the update" if end - pos == 1 else
                               f"parameters after the updates of batches {pos + 1}-{end}")
                    partial.loss += loss if math.isfinite(loss) else 0.0
                    partial.count += end - pos - stepper.skipped_now
                    partial.updates += result["updates"] - stepper.skipped_now
                    partial.skipped += stepper.skipped_now
                    stepper.skipped_now = 0
                    batches_since_checkpoint += end - pos
                    pos = end
                    due = (config.checkpoint_seconds > 0 and
                           time.monotonic() - last_checkpoint >= config.checkpoint_seconds)
                    flags = torch.tensor([stop.requested is not None, due and comm.is_root,
                                          bad is not None], dtype=torch.float64)
                    comm.allreduce_(flags, op="max")
                    if flags[2]:
                        reports = comm.allgather_object(
                            None if bad is None else (bad, comm.rank))
                        (index, what), rank = next(r for r in reports if r is not None)
                        raise Diverged(f"non-finite {what} in epoch {epoch}, batch {index + 1} "
                                       f"of {n_batches} (rank {rank}); the last checkpoint "
                                       f"is untouched")
                    due_batches = (config.checkpoint_batches > 0 and
                                   batches_since_checkpoint >= config.checkpoint_batches)
                    # at the epoch's end (pos == n_batches) the epoch checkpoint follows,
                    # unless the run stops: then the evaluation is what is left
                    if flags[0] or (pos < n_batches and (flags[1] or due_batches)):
                        saved = _Partial(**partial.as_dict())
                        saved.seconds += time.perf_counter() - tic
                        checkpoint(epoch - 1, pos, saved)
                    if flags[0]:
                        name = _agreed_signal(stop, comm)
                        run.log(f"stopped by {name} in epoch {epoch} after batch {pos} of "
                                f"{n_batches}: checkpoint written; resume with --resume "
                                f"{run.path} (or --resume-or-start)")
                        raise Stopped(name)
            count = partial.count
            record: dict[str, Any] = {"epoch": epoch,
                                      "train_loss": partial.loss / count if count else math.nan,
                                      "updates": int(partial.updates),
                                      "seconds": partial.seconds + time.perf_counter() - tic,
                                      "train_propagator": "serial" if serial_epoch
                                      else config.propagator,
                                      "inference": "exact"}
            if config.on_divergence == "skip-batch":
                record["skipped_batches"] = int(partial.skipped)
            model.propagator = train_propagator
            if mgrit:   # null in the epochs trained serially
                record.update(dict.fromkeys(EPOCH_STATS) if serial_epoch
                              else stepper.mean_stats())
            if config.grad_check_every and epoch % config.grad_check_every == 0:
                tic = time.perf_counter()
                record.update(gradient_check(model, *probe, exact=exact))
                record["grad_check_seconds"] = time.perf_counter() - tic
            eval_batch = max(config.batch_size, EVAL_BATCH)
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                tic = time.perf_counter()
                record.update(evaluate_exact(model, test_data, dataset.num_classes,
                                             eval_batch, comm, exact=exact))
                record["eval_seconds"] = time.perf_counter() - tic
                if mgrit:
                    tic = time.perf_counter()
                    _set_sample_ids(model, None)
                    inexact = evaluate(model, test_data, dataset.num_classes, eval_batch,
                                       data_comm)
                    record.update({f"{k}_inexact": v for k, v in inexact.items()})
                    record["eval_seconds_inexact"] = time.perf_counter() - tic
            else:
                record.update(dict.fromkeys((*TEST_METRICS, "eval_seconds")))
                if mgrit:
                    record.update(dict.fromkeys((*(f"{k}_inexact" for k in TEST_METRICS),
                                                 "eval_seconds_inexact")))
            check_replicas(model, comm, where=f"after epoch {epoch}")
            history.append(record)
            metrics["final"] = _final(history)
            run.log(_summary(epoch, config.epochs, record))
            run.write_metrics(metrics)
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                checkpoint(epoch, 0, None)
    return metrics
