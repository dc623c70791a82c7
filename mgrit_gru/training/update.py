"""The update of one global minibatch: the data on the device, a data group's
shard of the batch, the gradient sum over the data groups, the check for
non-finite values, and the solver statistics of the epoch.

:class:`BatchUpdate` is the ``step_fn`` the strategies call
(:mod:`mgrit_gru.training.strategies`). Between batches it holds only what it
must own: its shard step, its communicator and the buffer of the gradient
sum. What the loop needs to know of a batch goes to objects the loop owns:
the finding of the batch's check (a list, one entry per batch) and the
epoch's solver statistics (:class:`SolverStats`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.data import Split
from mgrit_gru.models.fused_step import fused_loss_and_grads
from mgrit_gru.training.metrics import all_finite

#: MGRIT statistics averaged per epoch (keys of ``MGRITPropagator.last_stats``).
MGRIT_STATS = ("fwd_iters", "bwd_iters", "fwd_residual", "bwd_residual")
#: ... of which the epoch's largest value is kept too (as ``<key>_max``).
MGRIT_MAX_STATS = MGRIT_STATS
#: Total solver steps of a batch (all levels, all time ranks), averaged per
#: epoch; 0 when the propagator does not report them.
MGRIT_STEP_STATS = ("fwd_steps", "bwd_steps")
#: The keys of :meth:`SolverStats.means` (in the epoch records with mgrit).
EPOCH_STATS = (*MGRIT_STATS, *MGRIT_STEP_STATS, "serial_batches",
               *(f"{k}_max" for k in MGRIT_MAX_STATS))


class TensorSplit:
    """A data split as torch tensors of the run's dtype, converted once and
    kept on the host; :meth:`take` hands out batches on ``device``."""

    def __init__(self, split: Split, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.x = torch.from_numpy(np.ascontiguousarray(split.x)).to(dtype)
        self.y = torch.from_numpy(np.ascontiguousarray(split.y))
        self.lengths = None if split.lengths is None else torch.from_numpy(
            np.ascontiguousarray(split.lengths))
        self.n = len(split)
        self.device = torch.device(device)

    def take(self, idx: np.ndarray | slice):
        """``(x, y, lengths)`` of the samples ``idx``, on :attr:`device`."""
        if isinstance(idx, np.ndarray):     # index_select: a row copy per sample,
            idx = torch.from_numpy(idx).long()  # 4-5x faster than x[idx] on CPU
            lengths = None if self.lengths is None else self.lengths.index_select(0, idx)
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        else:
            lengths = None if self.lengths is None else self.lengths[idx]
            x, y = self.x[idx], self.y[idx]
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
            lengths = None if lengths is None else lengths.to(self.device)
        return x, y, lengths


def shard(n: int, parts: int, index: int) -> slice:
    """The ``index``-th of ``parts`` contiguous, balanced pieces of ``range(n)``."""
    return slice(index * n // parts, (index + 1) * n // parts)


def set_sample_ids(model: torch.nn.Module, ids: np.ndarray | None) -> None:
    """Tell the propagator which training sequences its next forward solves
    (``None``: none; it then uses no warm start), when it wants to know."""
    set_ids = getattr(getattr(model, "propagator", None), "set_sample_ids", None)
    if set_ids is not None:
        set_ids(None if ids is None else np.asarray(ids, dtype=np.int64))


class ShardStep:
    """This data group's share of one global minibatch (an index array):
    forward and backward of its shard, weighted by the shard's fraction of the
    minibatch, so that the sum over data groups is the minibatch's gradient
    and loss. Picklable and free of MPI: worker processes run it.

    With ``fused`` (the default) a batch that
    :func:`~mgrit_gru.models.fused_step.fused_loss_and_grads` can run (a
    single-layer kernel cell on the serial propagator, CPU) goes through that
    one GIL-free C++ call; any other through autograd. Both give the same
    loss and gradients to float tolerance (tests/test_fused_step.py)."""

    def __init__(self, data: TensorSplit, rank: int, size: int, fused: bool = True):
        self.data, self.rank, self.size = data, rank, size
        self.fused = bool(fused)

    def __call__(self, model: torch.nn.Module, idx: np.ndarray) -> float:
        for p in model.parameters():    # autograd then stores the new gradients
            p.grad = None               # as they are: no zeroing, no accumulation
        part = idx[shard(len(idx), self.size, self.rank)]
        if not len(part):
            return 0.0
        set_sample_ids(model, part)
        x, y, lengths = self.data.take(part)
        weight = len(part) / len(idx)
        if getattr(self, "fused", True):        # (instances pickled before the option)
            loss = fused_loss_and_grads(model, x, y, lengths, weight)
            if loss is not None:
                return loss
        batch_loss = torch.nn.functional.cross_entropy(model(x, lengths), y)
        (batch_loss * weight if weight != 1.0 else batch_loss).backward()
        return float(batch_loss.detach()) * weight


class SolverStats:
    """The MGRIT statistics of the epoch so far: sums and maxima over its
    steps (the loop's; saved in a mid-epoch checkpoint)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(MGRIT_STATS + MGRIT_STEP_STATS + ("serial_fallback",), 0.0)
        self.maxima = dict.fromkeys(MGRIT_MAX_STATS, 0.0)
        self.steps = 0

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.maxima = dict.fromkeys(self.maxima, 0.0)
        self.steps = 0

    def state(self) -> dict:
        """The statistics as plain values (for a mid-epoch checkpoint)."""
        return {"sums": dict(self.sums), "maxima": dict(self.maxima), "steps": self.steps}

    def load_state(self, state: dict) -> None:
        self.sums.update({k: float(v) for k, v in state.get("sums", {}).items()
                          if k in self.sums})
        self.maxima.update({k: float(v) for k, v in state.get("maxima", {}).items()
                            if k in self.maxima})
        self.steps = int(state.get("steps", 0))

    def add(self, stats: dict | None, solved: bool = True) -> None:
        """Count one step; add the propagator's ``last_stats`` when this group
        ``solved`` a shard in it."""
        if stats and solved:
            for k in self.sums:
                self.sums[k] += float(stats.get(k, 0.0))
            for k in self.maxima:
                self.maxima[k] = max(self.maxima[k], float(stats.get(k, 0.0)))
        self.steps += 1

    def means(self, data_comm: Comm) -> dict[str, float]:
        """The epoch's statistics (keys :data:`EPOCH_STATS`): the means per
        step of :data:`MGRIT_STATS` and :data:`MGRIT_STEP_STATS`, the largest
        values of :data:`MGRIT_MAX_STATS` (``<key>_max``) and
        ``serial_batches`` (steps the propagator solved serially); with
        several data groups (each solving for its own shard) each is the
        largest over the groups. Collective over the data groups; empty
        without steps."""
        if not self.steps:
            return {}
        values = [*(self.sums[k] / self.steps for k in MGRIT_STATS + MGRIT_STEP_STATS),
                  self.sums["serial_fallback"], *self.maxima.values()]
        values = torch.tensor(values, dtype=torch.float64)
        data_comm.allreduce_(values, op="max")
        return dict(zip(EPOCH_STATS, values.tolist()))


def nonfinite(model: torch.nn.Module, loss: float, residuals: bool = True) -> str | None:
    """What is non-finite in the batch just computed: ``"loss"``,
    ``"gradient"``, an MGRIT residual of the model's last solve (with
    ``residuals``), or ``None``."""
    if not math.isfinite(loss):
        return "loss"
    if not all_finite(p.grad for p in model.parameters()):
        return "gradient"
    if residuals:
        info = getattr(model.propagator, "last_info", None) or {}
        for kind, name in (("fwd", "forward"), ("bwd", "backward")):
            res = getattr(info.get(kind), "residuals", None) or []
            it = next((k for k, r in enumerate(res) if not math.isfinite(r)), None)
            if it is not None:
                return f"{name} MGRIT residual (fine level, iteration {it})"
    return None


class BatchUpdate:
    """The ``step_fn`` of the strategies: forward, backward and the gradient
    sum over data groups for one global minibatch (an index array), then the
    check of the batch.

    The gradients and the loss of all data groups travel in one preallocated
    buffer on the model's device (one allreduce per step; the communicator
    stages a GPU's buffer through the host unless MPI is CUDA-aware). The parts, for strategies with
    workers (see :mod:`mgrit_gru.training.strategies`): :attr:`local` (a
    :class:`ShardStep`), :meth:`reduce_`, :meth:`record` and
    :attr:`data_groups`.

    ``findings``: the loop's list that gets one entry per checked batch, what
    was non-finite in it (:func:`nonfinite`) or ``None``; a batch with a
    finding has its gradients dropped (the optimizer then skips the step)
    and counts 0 in the loss. ``stats``: the loop's :class:`SolverStats`,
    where :meth:`record` counts each step. Either may be ``None``.
    """

    def __init__(self, data: TensorSplit, model: torch.nn.Module, data_comm: Comm, *,
                 findings: list | None = None, stats: SolverStats | None = None):
        self.local = ShardStep(data, data_comm.rank, data_comm.size)
        self.comm = data_comm
        self.data_groups = data_comm.size
        self.findings, self.stats = findings, stats
        n = sum(p.numel() for p in model.parameters())
        first = next(model.parameters())
        self.buffer = torch.zeros(n + 1, dtype=first.dtype, device=first.device) \
            if data_comm.size > 1 else None

    def _check(self, model: torch.nn.Module, loss: float, residuals: bool = True) -> float:
        """Check the batch just computed (identical on every rank of a data
        group's step); the loss, or 0 with the gradients dropped."""
        what = nonfinite(model, loss, residuals)
        if self.findings is not None:
            self.findings.append(what)
        if what is None:
            return loss
        for p in model.parameters():
            p.grad = None
        return 0.0

    def record(self, model: torch.nn.Module, idx: np.ndarray) -> None:
        """Count the step of minibatch ``idx`` and add the MGRIT statistics of
        ``model``'s last solve (if this group's shard of ``idx`` was not empty)."""
        if self.stats is not None:
            solved = bool(len(idx[shard(len(idx), self.comm.size, self.comm.rank)]))
            self.stats.add(getattr(model.propagator, "last_stats", None), solved)

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
