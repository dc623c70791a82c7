"""Worker pools of the data-parallel strategies: K replicas of the model.

A :class:`WorkerPool` holds ``K`` workers, threads or processes. Worker ``w``
owns a *replica* of the model (its local copy). The global model's
parameters and its optimizer's state are shared with the workers (in place
for threads, in shared memory for processes), and each worker has its own
optimizer instance over them. The pool runs work in two ways:

* **Direct epochs** (:meth:`WorkerPool.run_epoch`): the calling thread hands
  each worker its share of the epoch's minibatches in one message and waits;
  the workers synchronise among themselves:

  - ``mutex``: worker ``w`` has minibatches ``w, w + K, ...``; after computing
    minibatch ``j`` it waits for its turn (a ring of semaphores), updates the
    global model, copies it into its replica and passes the turn to worker
    ``(j + 1) % K``: the ``j``-th update is always minibatch ``j``'s;
  - ``averaging``: in round ``r`` the workers compute minibatches
    ``rK, ..., rK + K - 1`` into double-buffered gradient buffers and meet at
    a barrier. Processes: each applies the mean of the round's gradients to
    its own replica with its own copy of the optimizer (identical arithmetic,
    so the replicas stay identical), and worker 0 writes the result back to
    the global model and optimizer at the end of the epoch. Threads: worker 0
    alone applies the mean to the global model with the global optimizer and
    lets the others copy it (K updates at once would take turns on the GIL);
    the same values either way;
  - ``mutex_arrival``: as ``mutex``, but each worker takes the next
    minibatch nobody has taken (a shared counter) and the critical section is
    a plain lock, entered by whoever finishes first: no worker waits for a
    turn, and the update order depends on timing;
  - ``hogwild``: each worker takes the next minibatch nobody has taken (a
    shared counter), copies the global parameters, computes the gradient and
    updates the global model, with no lock on the model at all.

* **Gradient jobs** (:meth:`load`, :meth:`submit`, :meth:`wait`), for a
  coordinator that makes the updates itself (with several MPI data groups the
  gradient must be summed over the groups first, which worker processes cannot
  do): worker ``w`` computes one minibatch gradient and loss into
  :attr:`grads` ``[w]``.

Backends
--------
``process``: ``torch.multiprocessing`` with the *spawn* start method (forking
a process that already runs OpenMP threads can deadlock). Replica and global
parameters, optimizer state, gradient buffers and the training data live in
shared memory; no tensor is copied per message. Each child runs
``max(1, threads // K)`` torch threads, ignores SIGINT (the parent decides
when it ends) and exits when its pipe closes, so a dead parent leaves no
orphan. Children never initialise MPI (``MPI4PY_RC_INITIALIZE``); the step
function they run must not communicate. Scripts that start worker processes
need an ``if __name__ == "__main__":`` guard (the children import them).

``thread``: ``threading`` in this process. The replicas' propagators are
copies; a propagator that communicates (it has a ``comm``, e.g. MGRIT across
time ranks) gets a new communicator per worker, split from its own, so that
the workers' solves never mix messages (this needs MPI_THREAD_MULTIPLE).
Python holds the GIL between torch calls, which limits the speedup of a
per-time-step loop (see docs/strategies.md). The gradient buffers of thread
workers live on the model's device; worker processes need the model on the
cpu.

The pieces: the replicas and the shared optimizer state
(:mod:`mgrit_gru.training.replicas`), the synchronisation primitives
(:mod:`mgrit_gru.training.worker_sync`), one worker and its entry points in
a thread or a process (:mod:`mgrit_gru.training.worker`).
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import weakref
from typing import Any, Sequence

import torch
import torch.multiprocessing as mp

from mgrit_gru.errors import InputError
from mgrit_gru.training.replicas import (copy_params, materialize_state, replicate,
                                         state_tensors, thread_propagator)
from mgrit_gru.training.worker import (LocalStep, Worker, child_environment, process_main,
                                       raise_failure, serve)
from mgrit_gru.training.worker_sync import SPIN, Sync, usable_cores

BACKENDS = ("process", "thread")

#: Direct epochs (see the module docstring).
EPOCH_KINDS = ("mutex", "mutex_arrival", "averaging", "hogwild")

#: Seconds ``close`` waits for a worker to stop before terminating it.
STOP_TIMEOUT = 5.0


class WorkerPool:
    """``workers`` replicas of ``model`` and their workers (see the module
    docstring).

    ``local_step(replica, batch) -> loss`` leaves the batch's gradient in the
    replica's ``.grad`` (for processes it must be picklable and must not use
    MPI). ``optimizer`` is the global model's: its state is created now if
    missing, and shared with the workers. ``record(replica, batch)``, called
    after each gradient (thread workers only, under a lock), does the
    caller's bookkeeping. Worker ``w``'s replica is :attr:`models` ``[w]``, its
    parameters :attr:`params` ``[w]`` and the buffer of its gradient jobs
    :attr:`grads` ``[w]`` (``[n_params + 1]``: the gradient, then the loss).
    """

    def __init__(self, model: torch.nn.Module, local_step: LocalStep, workers: int,
                 optimizer: torch.optim.Optimizer, *, backend: str = "process",
                 threads: int | None = None, record=None) -> None:
        if backend not in BACKENDS:
            raise InputError(f"strategy backend: expected one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        self.backend = backend
        self.workers = workers
        threads = threads if threads is not None else torch.get_num_threads()
        self.threads = max(1, threads // workers)
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        dtype, device = params[0].dtype, params[0].device
        if backend == "process" and device.type != "cpu":
            raise InputError(f"strategy backend: worker processes need the model on the "
                             f"cpu (it is on {device}); use threads")
        self.models: list[torch.nn.Module] = []
        self.params: list[list[torch.Tensor]] = []
        self.buffers: list[list[torch.Tensor]] = []
        self._closed = False
        self._busy: set[int] = set()
        self._procs: list = []
        self._conns: list = []
        self._threads: list[threading.Thread] = []
        self._inboxes: list[queue.SimpleQueue] = []
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: dict[int, Any] = {}
        self._comms: list = []
        self._saved_threads = torch.get_num_threads()
        ctx = mp.get_context("spawn") if backend == "process" else threading
        spin = SPIN if backend == "process" and workers <= usable_cores() else 0.0
        self.sync = Sync(ctx, workers, spin)
        materialize_state(optimizer)
        share = backend == "process"
        if share:
            for t in params + state_tensors(optimizer):
                t.share_memory_()
        self._global = params
        shared = (params, (type(optimizer), dict(optimizer.defaults), optimizer.state_dict()))
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns,
                                           self._threads, self._inboxes, self.sync)
        try:
            propagator = getattr(model, "propagator", None)
            for w in range(workers):
                if share:
                    replica = replicate(model, copy.deepcopy(propagator))
                    for p in replica.parameters():
                        p.share_memory_()
                else:
                    replica = replicate(model, thread_propagator(propagator))
                    comm = getattr(replica.propagator, "comm", None) \
                        if hasattr(replica, "propagator") else None
                    if comm is not None:
                        self._comms.append(comm)
                buffers = [torch.zeros(n + 1, dtype=dtype, device=device) for _ in range(2)]
                if share:
                    buffers = [b.share_memory_() for b in buffers]
                self.models.append(replica)
                self.params.append(list(replica.parameters()))
                self.buffers.append(buffers)
            self.grads = [b[0] for b in self.buffers]
            if share:
                self._start_processes(local_step, shared)
            else:
                torch.set_num_threads(self.threads)
                self._start_threads(local_step, shared, record)
            for w in range(workers):        # every worker reports once it is set up
                self._busy.add(w)
                self._wait(w)
        except BaseException:
            self.close()
            raise

    # -- start-up -----------------------------------------------------------
    def _start_processes(self, local_step: LocalStep, shared) -> None:
        ctx = mp.get_context("spawn")
        with child_environment(self.threads):
            for w in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=process_main, name=f"mgrit-gru-worker-{w}",
                                   args=(w, self.models[w], local_step, self.buffers, shared,
                                         self.sync, child, self.threads), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)

    def _start_threads(self, local_step: LocalStep, shared, record) -> None:
        if record is not None:
            lock = threading.Lock()
            user_record = record

            def record(replica, batch):
                with lock:
                    user_record(replica, batch)

        for w in range(self.workers):
            inbox: queue.SimpleQueue = queue.SimpleQueue()

            def factory(w=w):
                return Worker(w, self.models[w], local_step, self.buffers, shared,
                               self.sync, record, single_updater=True)

            def reply(message, w=w) -> bool:
                self._outbox.put((w, message))
                return True

            thread = threading.Thread(target=serve, name=f"mgrit-gru-worker-{w}",
                                      args=(factory, inbox.get, reply), daemon=True)
            thread.start()
            self._inboxes.append(inbox)
            self._threads.append(thread)

    # -- messages -----------------------------------------------------------
    def _send(self, w: int, job) -> None:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if w in self._busy:
            raise RuntimeError(f"worker {w} is busy")
        self._busy.add(w)
        if self.backend == "process":
            try:
                self._conns[w].send(job)
            except (BrokenPipeError, OSError):
                raise RuntimeError(f"strategy worker {w} (pid {self._procs[w].pid}) "
                                   f"has died") from None
        else:
            self._inboxes[w].put(job)

    def _receive(self, w: int):
        """Worker ``w``'s next reply ``(status, value)``."""
        if self.backend == "thread":
            while w not in self._replies:
                v, message = self._outbox.get()
                self._replies[v] = message
            return self._replies.pop(w)
        try:
            return self._conns[w].recv()
        except (EOFError, OSError):
            proc = self._procs[w]
            proc.join(STOP_TIMEOUT)
            raise RuntimeError(f"strategy worker {w} (pid {proc.pid}) has died (exit code "
                               f"{proc.exitcode}); note that a script starting worker "
                               f"processes needs an `if __name__ == '__main__':` guard, "
                               f"since they import it") from None

    def _wait(self, w: int):
        """Wait for worker ``w``'s reply; raise its failure; return its value."""
        if w not in self._busy:
            raise RuntimeError(f"worker {w} has no job")
        status, value = self._receive(w)
        self._busy.discard(w)
        if status == "error":
            raise_failure(w, value)
        if status == "aborted":
            raise RuntimeError(f"strategy worker {w} stopped: another worker failed")
        return value

    # -- direct epochs --------------------------------------------------------
    def run_epoch(self, kind: str, batches: Sequence[Any]) -> tuple[float, int]:
        """Run a direct epoch (``mutex``, ``averaging``, ``hogwild``) over
        ``batches``; ``(sum of the minibatch losses, minibatches)``. A
        worker's failure stops all of them and is raised here."""
        if kind not in EPOCH_KINDS:
            raise ValueError(f"unknown epoch kind {kind!r}")
        if self.sync.abort.is_set():
            raise RuntimeError("a worker failed in an earlier epoch; the pool cannot go on")
        k = len(batches)
        if kind == "mutex":
            for w in range(self.workers):
                self.load(w, self._global)
            if k:
                self.sync.turns[0].release()
        if kind == "mutex_arrival":       # the replicas start from the global model
            for w in range(self.workers):
                self.load(w, self._global)
        if kind in ("hogwild", "mutex_arrival"):  # every worker takes the next free minibatch
            self.sync.next.value = 0
            shares = [list(batches)] * self.workers
        else:
            shares = [list(batches[w::self.workers]) for w in range(self.workers)]
        for w in range(self.workers):
            self._send(w, (kind, (shares[w], k)))
        results, failures = [], []
        for w in range(self.workers):
            try:
                results.append(self._wait(w))
            except (InputError, RuntimeError) as exc:
                failures.append(exc)
        if failures:
            real = [f for f in failures if "another worker failed" not in str(f)]
            raise (real or failures)[0]
        return sum(r[0] for r in results), sum(r[1] for r in results)

    # -- gradient jobs ----------------------------------------------------------
    @torch.no_grad()
    def load(self, w: int, params: Sequence[torch.Tensor]) -> None:
        """Copy ``params`` (the global parameters) into worker ``w``'s replica."""
        if w in self._busy:
            raise RuntimeError(f"worker {w} is busy")
        copy_params(self.params[w], params)

    def submit(self, w: int, batch: Any) -> None:
        """Start worker ``w`` on the gradient and loss of ``batch`` (into
        :attr:`grads` ``[w]``)."""
        self._send(w, ("gradient", batch))

    def wait(self, w: int) -> None:
        """Wait until worker ``w`` has finished its gradient job."""
        self._wait(w)

    # -- shutdown -------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker (terminate processes that do not stop within
        :data:`STOP_TIMEOUT`), free the workers' communicators. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        for comm in self._comms:
            comm.free()
        self._comms.clear()
        if self.backend == "thread":
            torch.set_num_threads(self._saved_threads)

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes (empty for threads)."""
        return [p.pid for p in self._procs]


def _stop(procs: list, conns: list, threads: list, inboxes: list, sync: Sync) -> None:
    """Ask every worker to stop, then wait; terminate (and kill) processes
    that do not stop in time. Also run at garbage collection and exit."""
    sync.fail()                 # workers still in an epoch leave it
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(None)
    for inbox in inboxes:
        inbox.put(None)
    for proc in procs:
        proc.join(STOP_TIMEOUT)
        if proc.is_alive():
            proc.terminate()
            proc.join(STOP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()
    for thread in threads:
        thread.join(STOP_TIMEOUT)
