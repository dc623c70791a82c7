"""One worker of a pool: its replica, its jobs, and the loop that serves them
in a thread or in a process (:func:`serve`, :func:`process_main`).

Worker ``w`` computes minibatch gradients on its replica and, in a direct
epoch, synchronises with the other workers itself (see
:mod:`mgrit_gru.training.pool`). A failure is replied as ``(kind, message,
traceback)`` and raised by the pool (:func:`raise_failure`); an
:class:`~mgrit_gru.errors.InputError` stays one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import traceback
from typing import Any, Callable

import torch

from mgrit_gru.errors import InputError
from mgrit_gru.training.replicas import (copy_params, copy_state, flat_views, optimizer_from_spec,
                                       optimizer_step)
from mgrit_gru.training.worker_sync import Aborted, Sync

LocalStep = Callable[[torch.nn.Module, Any], float]


class Worker:
    """Worker ``w``: its replica, the shared global model and the jobs.

    ``buffers[v]`` are the two flat ``[n_params + 1]`` gradient-and-loss
    buffers of every worker ``v`` (averaging reads all of them). ``shared``:
    ``(global parameters, (optimizer class, defaults, state dict))``.
    """

    def __init__(self, w: int, replica: torch.nn.Module, local_step: LocalStep,
                 buffers: list, shared: tuple, sync: Sync, record=None,
                 single_updater: bool = False) -> None:
        self.w, self.workers = w, len(buffers)
        # averaging: worker 0 alone applies each round's mean gradient to the
        # global model and the others copy it (threads: their updates would
        # take turns on the GIL), or every worker applies it to its own replica
        # with its own copy of the optimizer (processes: in parallel, no wait)
        self.single_updater = bool(single_updater)
        self.replica, self.local_step = replica, local_step
        self.buffers, self.sync, self.record = buffers, sync, record
        self.params = list(replica.parameters())
        self.views = [flat_views(b, self.params) for b in buffers[w]]
        # this worker's own tensor objects over the global storage: ``.grad``
        # is an attribute of the Python object, so it must not be shared
        self.shared = [torch.nn.Parameter(q.detach(), requires_grad=False) for q in shared[0]]
        self.spec = shared[1]
        self.optimizer = optimizer_from_spec(self.spec, self.shared)
        self.private = None             # averaging: this worker's copy of the optimizer,
        self.mean = self.mean_views = None  # and the mean gradient of a round
        # diagnostics: MGRIT_GRU_WORKER_TIMELINE=<folder> records each direct
        # epoch's event times (time.perf_counter, one clock for all processes)
        folder = os.environ.get("MGRIT_GRU_WORKER_TIMELINE")
        self.timeline = _Timeline(folder, w) if folder else None

    # -- pieces ---------------------------------------------------------------
    def gradient(self, batch: Any, buffer: int | None = None) -> float:
        """Gradient of ``batch`` on the replica (into ``buffers[w][buffer]``
        too, unless None); the loss."""
        loss = self.local_step(self.replica, batch)
        if self.record is not None:
            self.record(self.replica, batch)
        if buffer is not None:
            with torch.no_grad():
                for p, view in zip(self.params, self.views[buffer]):
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad)
                self.buffers[self.w][buffer][-1] = loss
        return loss

    def step_global(self, grads=None) -> None:
        """Update the global model with ``grads`` (default: the replica's gradient)."""
        for q, g in zip(self.shared, grads if grads is not None else
                        [p.grad for p in self.params]):
            q.grad = g
        optimizer_step(self.optimizer)

    # -- jobs -------------------------------------------------------------------
    def run(self, kind: str, payload: Any) -> tuple[float, int]:
        """Do one job; ``(sum of the minibatch losses, minibatches)``."""
        if kind == "gradient":
            return self.gradient(payload, 0), 1
        batches, k = payload
        if self.timeline is None:
            return getattr(self, "_" + kind)(batches, k)
        self.timeline.begin(kind)
        try:
            return getattr(self, "_" + kind)(batches, k)
        finally:
            self.timeline.end()

    def _mark(self, event: str) -> None:
        if self.timeline is not None:
            self.timeline.events.append((event, time.perf_counter()))

    def _hogwild(self, batches: list, k: int) -> tuple[float, int]:
        total, count = 0.0, 0
        while (j := self.sync.take_next()) < k:
            self.sync.check()
            copy_params(self.params, self.shared)
            self._mark("gradient")
            total += self.gradient(batches[j])
            self._mark("update")
            self.step_global()
            self._mark("done")
            count += 1
        return total, count

    def _mutex(self, batches: list, k: int) -> tuple[float, int]:
        # the replica holds the global parameters (loaded by the pool: a worker
        # copying them itself might already see another worker's first update)
        total, K = 0.0, self.workers
        for i, batch in enumerate(batches):
            self.sync.check()
            self._mark("gradient")
            total += self.gradient(batch)
            self._mark("wait")
            self.sync.take_turn(self.w)
            self._mark("update")
            self.step_global()
            copy_params(self.params, self.shared)
            if self.w + i * K + 1 < k:
                self.sync.pass_turn(self.w)
            self._mark("done")
        return total, len(batches)

    def _mutex_arrival(self, batches: list, k: int) -> tuple[float, int]:
        # the replica holds the global parameters (loaded by the pool)
        total, count = 0.0, 0
        while (j := self.sync.take_next()) < k:
            self.sync.check()
            self._mark("gradient")
            total += self.gradient(batches[j])
            self._mark("wait")
            self.sync.lock_update()
            self._mark("update")
            try:
                self.step_global()
                copy_params(self.params, self.shared)
            finally:
                self.sync.unlock_update()
            self._mark("done")
            count += 1
        return total, count

    def _averaging(self, batches: list, k: int) -> tuple[float, int]:
        total, K, single = 0.0, self.workers, self.single_updater
        if self.mean is None:
            self.mean = torch.zeros_like(self.buffers[0][0])
            self.mean_views = flat_views(self.mean, self.params)
        if not single and self.private is None:
            self.private = optimizer_from_spec(self.spec, self.params, private=True)
        copy_params(self.params, self.shared)
        if not single:
            copy_state(self.private, self.params, self.optimizer, self.shared)
        for r in range(-(-k // K)):
            self.sync.check()
            m, parity = min(K, k - r * K), r % 2
            self._mark("gradient")
            if self.w < m:
                total += self.gradient(batches[r], parity)
            self._mark("wait")
            self.sync.meet(self.w)
            self._mark("update")
            if not single:
                self._mean_gradient(m, parity)
                for p, g in zip(self.params, self.mean_views):
                    p.grad = g
                optimizer_step(self.private)
            elif self.w == 0:
                self._mean_gradient(m, parity)
                self.step_global(self.mean_views)
                self.sync.release_round()
                copy_params(self.params, self.shared)
            else:
                self.sync.wait_round(self.w)
                copy_params(self.params, self.shared)
            self._mark("done")
        if not single and self.w == 0:
            copy_params(self.shared, self.params)
            copy_state(self.optimizer, self.shared, self.private, self.params)
        return total, len(batches)

    def _mean_gradient(self, m: int, parity: int) -> None:
        """:attr:`mean` := the mean of the first ``m`` workers' buffers ``parity``."""
        mean = self.mean
        mean.copy_(self.buffers[0][parity])
        for v in range(1, m):
            mean.add_(self.buffers[v][parity])
        if m > 1:
            mean.div_(m)


class _Timeline:
    """Event times of worker ``w``'s direct epochs, appended as one JSON line
    per epoch to ``<folder>/worker<w>.jsonl`` (a diagnostic; see
    ``drivers/bench_strategy_backends.py --timeline``). Events per minibatch:
    ``gradient`` (starts), ``wait`` (for the turn or the round), ``update``,
    ``done``."""

    def __init__(self, folder: str, w: int) -> None:
        self.path = os.path.join(folder, f"worker{w}.jsonl")
        self.kind, self.events = None, []

    def begin(self, kind: str) -> None:
        self.kind, self.events = kind, [("begin", time.perf_counter())]

    def end(self) -> None:
        self.events.append(("end", time.perf_counter()))
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"kind": self.kind, "pid": os.getpid(),
                                 "events": self.events}) + "\n")


def serve(worker_factory, receive, reply) -> None:
    """A worker's loop: build it, then do jobs until ``None`` (or the end of
    the channel). Replies: ``("ok", result)``, ``("aborted", None)`` or
    ``("error", (kind, message, traceback))``."""
    try:
        worker = worker_factory()
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        reply(("error", failure(exc)))
        return
    if not reply(("ok", None)):
        return
    while True:
        job = receive()
        if job is None:
            return
        try:
            answer = ("ok", worker.run(*job))
        except Aborted:
            answer = ("aborted", None)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            worker.sync.fail()
            answer = ("error", failure(exc))
        if not reply(answer):
            return


def failure(exc: BaseException) -> tuple[str, str, str]:
    """``(kind, one-line message, traceback)`` of a worker's exception
    (``kind`` is ``input`` for InputError: it stays one)."""
    kind = "input" if isinstance(exc, InputError) else type(exc).__name__
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return kind, message, "".join(traceback.format_exception(exc))


def raise_failure(w: int, report: tuple[str, str, str]) -> None:
    """Raise worker ``w``'s failure ``report`` (from :func:`failure`) in the caller."""
    kind, message, trace = report
    if kind == "input":
        raise InputError(message)
    raise RuntimeError(f"strategy worker {w} failed: {kind}: {message}\n{trace}")


def process_main(w, replica, local_step, buffers, shared, sync, conn, threads) -> None:
    """Body of a worker process. It ignores SIGINT, SIGTERM and the stop
    signals: schedulers signal every process of a job, and the parent, which
    handles them, ends its workers itself (the pipe closes; SIGKILL after
    :data:`~mgrit_gru.training.pool.STOP_TIMEOUT`)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR2", "SIGHUP", "SIGALRM", "SIGXCPU"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    torch.set_num_threads(threads)

    def receive():
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None

    def reply(message) -> bool:
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    serve(lambda: Worker(w, replica, local_step, buffers, shared, sync), receive, reply)


@contextlib.contextmanager
def child_environment(threads: int):
    """Environment inherited by spawned workers: no MPI initialisation, and
    ``threads`` OpenMP/MKL threads from the start."""
    values = {"MPI4PY_RC_INITIALIZE": "false", "OMP_NUM_THREADS": str(threads),
              "MKL_NUM_THREADS": str(threads)}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
