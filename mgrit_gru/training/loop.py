"""The training loop: :func:`train` and the epochs of a run.

:func:`train` runs one training job on a communicator of ``P`` ranks split into
a ``time_ranks x (P // time_ranks)`` grid (:meth:`Comm.split_grid`):

* ranks of one *time group* share every minibatch; with ``propagator =
  mgrit`` each owns a chunk of time points and MGRIT solves the recurrence
  across them, otherwise ``time_ranks`` is 1;
* *data groups* split each global minibatch into contiguous shards and
  average their gradients (one allreduce per step, weighted by shard size, so
  the update equals the one of the whole minibatch on one rank;
  :class:`~mgrit_gru.training.update.BatchUpdate`).

Parameters are identical on every rank; a checksum (sum and sum of squares of
all parameters, gathered from every rank) proves it after every epoch. The
model and the batches live on the run's device (``--device``,
:func:`~mgrit_gru.training.setup.choose_device`); checkpoints hold host
tensors, so a run may resume on another device.

The test metrics come from exact inference, the serial recurrence, with the
test set sharded over every rank of the job
(:func:`~mgrit_gru.training.evaluation.evaluate_exact`); with ``propagator =
mgrit`` the metrics under the training forward follow with the suffix
``_inexact``. Options: ``exact_last_epochs`` trains the last epochs serially,
``grad_check_every`` compares the MGRIT gradient of a probe batch with the
exact one (:func:`~mgrit_gru.training.evaluation.gradient_check`).

Rank 0 prints one summary line per epoch and writes the run folder
(:mod:`mgrit_gru.training.runfolder`: config, log, strict-JSON metrics, the
last two checkpoints with digests, a lock). The layout of ``metrics.json`` is
documented in docs/usage.md.

An epoch runs in segments between *synchronisation points* (after every
batch with the sequential strategy, every ``workers x max(16, ceil(2**17 /
(batch_size x T)))`` batches with the others: ``sync_batches``). At each point the ranks agree, in one small
allreduce, on three things: a stop signal received by any rank
(:class:`~mgrit_gru.training.signals.StopSignals`: checkpoint, then
:class:`~mgrit_gru.errors.Stopped`), a timed checkpoint due on rank 0, and a
non-finite loss, gradient, MGRIT residual or parameter on any rank
(:class:`~mgrit_gru.errors.Diverged`, or a skipped batch). A checkpoint
inside an epoch holds the position and the epoch's running sums, so that a
resumed run is bit for bit the uninterrupted one (docs/reliability.md). The
position in the epoch, the findings of the batches' checks and the running
sums are the loop's (:class:`_Run`); the update object only reports into
them.
"""

from __future__ import annotations

import contextlib
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
from mgrit_gru.data import DEFAULT_DATASET, Dataset, batch_indices, lengths_vary, load_dataset
from mgrit_gru.errors import Diverged, InputError, Stopped
from mgrit_gru.limits import check_resources
from mgrit_gru.training.config import TrainConfig, flag
from mgrit_gru.training.evaluation import (EVAL_BATCH, TEST_METRICS, evaluate, evaluate_exact,
                                           gradient_check)
from mgrit_gru.training.metrics import check_replicas, finite_params
from mgrit_gru.training.runfolder import RunFolder, load_checkpoint, strict_json
from mgrit_gru.training.setup import (build_model, check_options, choose_device,
                                      make_optimizer, make_propagator, resolve_config)
from mgrit_gru.training.signals import StopSignals
from mgrit_gru.training.strategies import Strategy, auto_backend, make_strategy
from mgrit_gru.training.tracing import RunTrace
from mgrit_gru.training.update import (EPOCH_STATS, BatchUpdate, SolverStats, TensorSplit,
                                       set_sample_ids)


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
    check_options(config)
    device = choose_device(config, comm)
    config = resolve_config(config, comm)
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopSignals(config.stop_signal))
        run = stack.enter_context(RunFolder(config.out, comm, resume=resume))
        return _Run(config, comm, run, stop, device).train(resume)


class _Partial:
    """The running sums of an epoch in progress (saved in mid-epoch checkpoints)."""

    FIELDS = ("loss", "count", "updates", "skipped", "seconds")

    def __init__(self, **values: float) -> None:
        for k in self.FIELDS:
            setattr(self, k, float(values.get(k, 0.0)))

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.FIELDS}


class _Run:
    """One training job on this rank: its data, model, optimizer and update
    object, and the loop's state (the epoch records, the position to resume
    from, the findings of the batches' checks, the solver statistics, the
    time and batches since the last checkpoint)."""

    def __init__(self, config: TrainConfig, comm: Comm, run: RunFolder, stop: StopSignals,
                 device: torch.device):
        self.config, self.comm, self.run, self.stop, self.device = config, comm, run, stop, device
        self.time_comm, self.data_comm = comm.split_grid(config.time_ranks)
        # --trace: the time group's timeline of the first batches (training/tracing.py)
        self.trace = RunTrace.start(config, comm, self.time_comm, self.data_comm, run.path)
        data_name = DEFAULT_DATASET if config.data == "default" else config.data
        self.dataset: Dataset = load_dataset(data_name, max_train=config.max_train,
                                             max_test=config.max_test, max_len=config.max_len)
        # memory and cores against the options, before anything big is allocated
        check_resources(config, self.dataset, comm.node_size())
        torch.set_num_threads(config.threads)
        dtype = getattr(torch, config.dtype)
        self.train_data = TensorSplit(self.dataset.train, dtype, device)
        self.batching = batching_options(config, self.dataset)
        self.test_data = TensorSplit(self.dataset.test, dtype, device)
        seq_len = self.dataset.train.seq_len
        if config.propagator == "mgrit" and seq_len < config.time_ranks:
            # batches shorter than the time ranks run serially on every rank: if
            # every batch is, MGRIT never runs (say so before training starts)
            raise InputError(f"option time_ranks ({flag('time_ranks')}): {config.time_ranks} "
                             f"time ranks for training sequences of at most {seq_len} steps: "
                             f"use at most {seq_len} time ranks")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.model = build_model(config, self.dataset, self.time_comm, device=device,
                                 propagator=make_propagator(config, self.time_comm))
        self.optimizer = make_optimizer(config, self.model)
        self.mgrit = config.propagator == "mgrit"
        from mgrit_gru.models import SerialPropagator
        # the exact serial recurrence: the test metrics, the serial epochs, the gradient check
        self.exact = self.model.propagator if config.propagator == "serial" \
            else SerialPropagator()
        self.train_propagator = self.model.propagator
        # the loop's state
        self.history: list[dict] = []
        self.start, self.start_batch, self.partial0, self.stats0 = 1, 0, _Partial(), None
        self.findings: list[str | None] = []
        self.stats = SolverStats()
        self.update = BatchUpdate(self.train_data, self.model, self.data_comm,
                                  findings=self.findings, stats=self.stats)
        self.last_checkpoint, self.batches_since_checkpoint = time.monotonic(), 0

    # -- start and resume -------------------------------------------------------
    def _load(self) -> list[str]:
        """Continue from the run folder's checkpoint; the warnings to log."""
        state, warnings = load_checkpoint(self.run.path, self.comm)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"run folder {self.run.path}: checkpoint does not fit the options "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None
        self.start = int(state["epoch"]) + 1
        self.start_batch = int(state.get("batch", 0))
        if self.start_batch:
            self.partial0 = _Partial(**state.get("partial", {}))
            self.stats0 = state.get("stats")
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
        self.history = [e for e in state["history"] if e["epoch"] < self.start]
        return warnings

    def _log_start(self, resume: bool, warnings: list[str]) -> None:
        config, run, dataset = self.config, self.run, self.dataset
        run.write_config(config)
        for line in run.notes:
            run.log(line)
        n_params = sum(p.numel() for p in self.model.parameters())
        run.log(f"mgrit-gru train | data {dataset.name}: {self.train_data.n} train / "
                f"{self.test_data.n} test, T {dataset.seq_len}, d {dataset.input_size}, "
                f"{dataset.num_classes} classes | {config.cell} H {config.hidden}, {n_params} "
                f"parameters | {config.propagator} | ranks {self.comm.size} = "
                f"{config.time_ranks} time x {self.data_comm.size} data | threads "
                f"{config.threads} | device {self.device} | run folder {run.path}")
        for line in warnings:
            run.log(line)
        if resume:
            where = (f"batch {self.start_batch} of epoch {self.start}" if self.start_batch
                     else f"epoch {self.start - 1}")
            run.log(f"resuming after {where}")
            if config.warm_start and self.mgrit:
                run.log("warning: warm starts are not checkpointed: the resumed run starts "
                        "them anew (its solves differ from the uninterrupted run's)")

    def train(self, resume: bool) -> dict:
        """The run from its start (or its checkpoint) to its last epoch; the metrics."""
        config = self.config
        warnings = self._load() if resume else []
        check_replicas(self.model, self.comm)
        self.environment = {"torch": torch.__version__, "python": platform.python_version(),
                            "mgrit_gru": mgrit_gru.__version__,
                            "hostname": socket.gethostname(), "ranks": self.comm.size,
                            "time_ranks": config.time_ranks,
                            "data_groups": self.data_comm.size, "threads": config.threads,
                            "device": str(self.device),
                            "length_bucketing": bool(self.batching)}
        self._log_start(resume, warnings)
        # the gradient check's probe: the first batch_size training sequences, the whole
        # batch on every rank
        n_probe = min(config.batch_size, self.train_data.n)
        self.probe = self.train_data.take(slice(0, n_probe))
        self.metrics: dict[str, Any] = {"config": config.to_dict(), "epochs": self.history,
                                        "final": _final(self.history) if self.history else {},
                                        "environment": self.environment}
        self.last_checkpoint = time.monotonic()
        left = (config.epochs - self.start + 1) * -(-self.train_data.n // config.batch_size) \
            - self.start_batch
        backend = auto_backend(config.worker_backend, left)
        with make_strategy(config.strategy, config.workers, backend,
                           mutex_order=config.mutex_order) as strategy:
            tic = time.perf_counter()
            strategy.start(self.model, self.optimizer, self.update)
            self.environment["strategy_startup_seconds"] = time.perf_counter() - tic
            if config.strategy != "sequential":
                self.run.log(f"strategy {strategy.describe()}: started in "
                             f"{self.environment['strategy_startup_seconds']:.1f} s")
            first_exact = (config.epochs - config.exact_last_epochs + 1 if self.mgrit
                           else config.epochs + 1)
            for epoch in range(self.start, config.epochs + 1):
                self._epoch(epoch, strategy, first_exact)
        return self.metrics

    # -- checkpoints --------------------------------------------------------------
    def _checkpoint(self, epoch_done: int, batch: int, partial: _Partial | None) -> None:
        """Write a checkpoint after ``epoch_done`` epochs and ``batch`` batches
        of the next one (rank 0; the weights are known to be finite)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": epoch_done, "batch": batch, "config": self.config.to_dict(),
                 "history": strict_json(self.history),
                 "rng": {"torch": torch.get_rng_state()}}
        if batch:
            state["partial"] = partial.as_dict()
            state["stats"] = self.stats.state()
        self.run.write_checkpoint(state)
        self.comm.barrier()      # no rank ends the job while rank 0 is writing
        self.last_checkpoint = time.monotonic()
        self.batches_since_checkpoint = 0

    # -- one epoch ----------------------------------------------------------------
    def _epoch(self, epoch: int, strategy: Strategy, first_exact: int) -> None:
        config, model = self.config, self.model
        serial_epoch = epoch >= first_exact
        if serial_epoch and (epoch == first_exact or epoch == self.start):
            self.run.log(f"epoch {epoch}: training switches from mgrit to the exact serial "
                         f"recurrence (exact_last_epochs {config.exact_last_epochs}, epochs "
                         f"{max(first_exact, 1)}-{config.epochs})")
        model.propagator = self.exact if serial_epoch else self.train_propagator
        order = np.random.default_rng([config.seed, epoch])
        batches = list(batch_indices(self.train_data.n, config.batch_size, shuffle=True,
                                     generator=order, **self.batching))
        n_batches = len(batches)
        pos, partial = 0, _Partial()
        self.stats.reset()
        if epoch == self.start and self.start_batch:
            pos, partial = min(self.start_batch, n_batches), self.partial0
            if self.stats0:
                self.stats.load_state(self.stats0)
        sync = _sync_batches(config, self.dataset.train.seq_len)
        tic = time.perf_counter()
        with tqdm(total=n_batches, initial=pos, desc=f"epoch {epoch}/{config.epochs}",
                  unit="batch", leave=False, disable=not _show_progress(config, self.comm)) \
                as bar:
            while pos < n_batches:
                end = min((pos // sync + 1) * sync, n_batches)
                bad = self._segment(strategy, batches, pos, end, partial)
                bar.update(end - pos)
                pos = end
                self._sync_point(epoch, pos, n_batches, bad, partial, tic)
        if self.trace is not None:   # fewer batches than --trace-batches
            self.trace.finish(self.run)
            self.trace = None
        self._end_epoch(epoch, serial_epoch, partial, tic)

    def _segment(self, strategy: Strategy, batches: list, pos: int, end: int,
                 partial: _Partial) -> tuple[int, str] | None:
        """Train batches ``pos`` to ``end - 1`` of the epoch and add them to
        ``partial``; the first bad batch ``(index, what)`` (not one skipped), or None."""
        self.findings.clear()
        step = self.update if self.trace is None else self.trace.wrap(self.update)
        result = strategy.run_epoch(self.model, self.optimizer, batches[pos:end], step)
        if self.trace is not None and self.trace.done:
            self.trace.finish(self.run)
            self.trace = None
        loss = result["train_loss"] * (end - pos)   # skipped batches add 0
        # the update's findings (a skipped batch is counted, not fatal), else the
        # segment's loss (workers) and the updated parameters
        found = [(pos + i, what) for i, what in enumerate(self.findings) if what is not None]
        skipping = self.config.on_divergence == "skip-batch"
        skipped = len(found) if skipping else 0
        bad = None if skipping or not found else found[0]
        if bad is None and not math.isfinite(loss):
            bad = (pos, "loss" if end - pos == 1 else f"loss (batches {pos + 1}-{end})")
        if bad is None and not finite_params(self.model):
            bad = (end - 1, "parameters after the update" if end - pos == 1 else
                   f"parameters after the updates of batches {pos + 1}-{end}")
        partial.loss += loss if math.isfinite(loss) else 0.0
        partial.count += end - pos - skipped
        partial.updates += result["updates"] - skipped
        partial.skipped += skipped
        self.batches_since_checkpoint += end - pos
        return bad

    def _sync_point(self, epoch: int, pos: int, n_batches: int, bad: tuple[int, str] | None,
                    partial: _Partial, tic: float) -> None:
        """After batch ``pos`` of ``n_batches``: agree on a stop signal, a timed
        checkpoint and a bad batch (``bad``, this rank's) with every rank;
        write a checkpoint when one is due; raise Diverged or Stopped."""
        config, comm = self.config, self.comm
        due = (config.checkpoint_seconds > 0 and
               time.monotonic() - self.last_checkpoint >= config.checkpoint_seconds)
        flags = torch.tensor([self.stop.requested is not None, due and comm.is_root,
                              bad is not None], dtype=torch.float64)
        comm.allreduce_(flags, op="max")
        if flags[2]:
            reports = comm.allgather_object(None if bad is None else (bad, comm.rank))
            (index, what), rank = next(r for r in reports if r is not None)
            raise Diverged(f"non-finite {what} in epoch {epoch}, batch {index + 1} of "
                           f"{n_batches} (rank {rank}); the last checkpoint is untouched")
        due_batches = (config.checkpoint_batches > 0 and
                       self.batches_since_checkpoint >= config.checkpoint_batches)
        # at the epoch's end (pos == n_batches) the epoch checkpoint follows,
        # unless the run stops: then the evaluation is what is left
        if flags[0] or (pos < n_batches and (flags[1] or due_batches)):
            saved = _Partial(**partial.as_dict())
            saved.seconds += time.perf_counter() - tic
            self._checkpoint(epoch - 1, pos, saved)
        if flags[0]:
            name = _agreed_signal(self.stop, comm)
            self.run.log(f"stopped by {name} in epoch {epoch} after batch {pos} of "
                         f"{n_batches}: checkpoint written; resume with --resume "
                         f"{self.run.path} (or --resume-or-start)")
            raise Stopped(name)

    def _end_epoch(self, epoch: int, serial_epoch: bool, partial: _Partial, tic: float) -> None:
        """The epoch's record: training sums, solver statistics, gradient check,
        evaluation; the replica check, metrics.json and the epoch checkpoint."""
        config, model, mgrit = self.config, self.model, self.mgrit
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
        model.propagator = self.train_propagator
        if mgrit:   # null in the epochs trained serially
            record.update(dict.fromkeys(EPOCH_STATS) if serial_epoch
                          else self.stats.means(self.data_comm))
        if config.grad_check_every and epoch % config.grad_check_every == 0:
            tic = time.perf_counter()
            record.update(gradient_check(model, *self.probe, exact=self.exact))
            record["grad_check_seconds"] = time.perf_counter() - tic
        eval_batch = max(config.batch_size, EVAL_BATCH)
        num_classes = self.dataset.num_classes
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            tic = time.perf_counter()
            record.update(evaluate_exact(model, self.test_data, num_classes, eval_batch,
                                         self.comm, exact=self.exact))
            record["eval_seconds"] = time.perf_counter() - tic
            if mgrit:
                tic = time.perf_counter()
                set_sample_ids(model, None)
                inexact = evaluate(model, self.test_data, num_classes, eval_batch,
                                   self.data_comm)
                record.update({f"{k}_inexact": v for k, v in inexact.items()})
                record["eval_seconds_inexact"] = time.perf_counter() - tic
        else:
            record.update(dict.fromkeys((*TEST_METRICS, "eval_seconds")))
            if mgrit:
                record.update(dict.fromkeys((*(f"{k}_inexact" for k in TEST_METRICS),
                                             "eval_seconds_inexact")))
        check_replicas(model, self.comm, where=f"after epoch {epoch}")
        self.history.append(record)
        self.metrics["final"] = _final(self.history)
        self.run.log(_summary(epoch, config.epochs, record))
        self.run.write_metrics(self.metrics)
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            self._checkpoint(epoch, 0, None)


# --------------------------------------------------------------------------- #
# small pieces
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


def batching_options(config: TrainConfig, dataset: Dataset) -> dict:
    """The length-bucketing arguments of :func:`~mgrit_gru.data.batch_indices`
    for this run: ``bucket_by_length`` applies when the training sequences'
    lengths vary; units of ``workers`` neighbouring batches, so that the
    batches the workers run side by side have similar lengths."""
    lengths = dataset.train.lengths
    if not (config.bucket_by_length and lengths_vary(lengths)):
        return {}
    return {"lengths": lengths, "bucket": True, "group": config.workers}


#: Default segment of the strategies with workers: at least this many
#: sequence steps (batch size x padded length) per worker between two
#: synchronisation points, and at least 16 batches per worker.
SYNC_STEPS = 2 ** 17


def _sync_batches(config: TrainConfig, seq_len: int) -> int:
    """Batches between two synchronisation points of an epoch (where a run may
    stop or write a mid-epoch checkpoint): ``sync_batches``, else 1 for the
    sequential strategy and, for the others, ``workers x max(16,
    ceil(SYNC_STEPS / (batch_size x seq_len)))``: their pipeline drains at
    each point (so the points are part of the run's definition), which costs
    each worker about one minibatch plus a message round trip (measured,
    docs/strategies.md); short sequences get longer segments, so that a
    segment is at least ``SYNC_STEPS`` sequence steps of work per worker
    (a stop waits for at most one segment)."""
    if config.sync_batches:
        return config.sync_batches
    if config.strategy == "sequential":
        return 1
    per_worker = max(16, -(-SYNC_STEPS // (config.batch_size * max(1, seq_len))))
    return config.workers * per_worker
