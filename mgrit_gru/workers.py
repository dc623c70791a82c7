"""Worker pools of the data-parallel strategies: K replicas of the model that
compute minibatch gradients on request.

A :class:`WorkerPool` holds ``K`` workers, threads or processes. Worker ``w``
owns a *replica* of the model (its local copy) and a flat buffer
``grads[w]`` (every parameter gradient, then the loss). The coordinator (the
calling thread, see :mod:`mgrit_gru.strategies`) drives it::

    pool.load(w, global_params)     # copy the global parameters into replica w
    pool.submit(w, batch)           # worker w: grads[w] <- gradient and loss of batch
    pool.wait(w)                    # until worker w is done (or pool.wait_any())

and may write into a replica's parameters or read ``grads[w]`` only while
worker ``w`` is idle (between ``wait`` and the next ``submit``).

In *Hogwild* mode (``hogwild=optimizer``) a job does more: the worker copies
the global parameters into its replica, computes the gradient and applies it
to the global parameters with its own instance of the optimizer, all without
any lock. The global parameters and the optimizer state are shared: in place
for threads, in shared memory for processes.

Backends
--------
``process``: ``torch.multiprocessing`` with the *spawn* start method (forking
a process that already runs OpenMP threads can deadlock). Replica parameters,
gradient buffers and the training data live in shared memory, so no tensor is
copied per job; jobs and replies are small messages over one pipe per worker.
Each child runs ``max(1, threads // K)`` torch threads, ignores SIGINT (the
parent decides when it ends) and exits when its pipe closes, so a dead parent
leaves no orphan. Children never initialise MPI (``MPI4PY_RC_INITIALIZE``);
the step function they run must not communicate.

``thread``: ``threading`` in this process. The replicas' propagators are
copies; a propagator that communicates (it has a ``comm``, e.g. MGRIT across
time ranks) gets a new communicator per worker, split from its own, so that
the workers' solves never mix messages (this needs MPI_THREAD_MULTIPLE).
Python holds the GIL between torch calls, which limits the speedup of a
per-time-step loop (see docs/strategies.md).
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import signal
import threading
import traceback
import weakref
from multiprocessing.connection import wait as wait_connections
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from mgrit_gru.comm import Comm
from mgrit_gru.errors import InputError

BACKENDS = ("process", "thread")

#: Seconds ``close`` waits for a worker to stop before terminating it.
STOP_TIMEOUT = 5.0

LocalStep = Callable[[torch.nn.Module, Any], float]


# --------------------------------------------------------------------------- #
# replicas and optimizer state
# --------------------------------------------------------------------------- #
def replicate(model: torch.nn.Module, propagator: Any = None) -> torch.nn.Module:
    """A deep copy of ``model`` whose ``propagator`` attribute is ``propagator``.

    The model's own propagator is neither copied nor touched (it may hold a
    communicator). Models without a ``propagator`` attribute are deep-copied.
    """
    if not hasattr(model, "propagator"):
        return copy.deepcopy(model)
    saved = model.propagator
    model.propagator = None
    try:
        clone = copy.deepcopy(model)
    finally:
        model.propagator = saved
    clone.propagator = propagator
    return clone


class _WorkerComm(Comm):
    """The communicator of a worker thread.

    ``Comm.allreduce_scalar`` goes through mpi4py's pickle-based ``allreduce``,
    which keeps the GIL while it waits for the other ranks (its fast reduction
    calls back into Python); a thread waiting there stops every other thread of
    its process, and ranks whose workers wait for each other deadlock. Here the
    scalar travels as a one-element buffer, whose allreduce releases the GIL.
    """

    def allreduce_scalar(self, x: float, op: str = "sum") -> float:
        if self.size == 1:
            return float(x)
        return float(self.allreduce_(torch.tensor([float(x)], dtype=torch.float64), op)[0])


def thread_propagator(propagator: Any) -> Any:
    """The propagator of a worker thread: a deep copy, or, for one that owns a
    communicator (``comm``), a shallow copy with a new communicator split from
    it (collective over that communicator) and fresh statistics."""
    comm = getattr(propagator, "comm", None)
    if comm is None:
        return copy.deepcopy(propagator)
    clone = copy.copy(propagator)
    clone.comm = _WorkerComm(comm.split(0, comm.rank).mpi)
    for name in ("last_stats", "last_info"):
        if isinstance(getattr(clone, name, None), dict):
            setattr(clone, name, {})
    return clone


def communicates(propagator: Any) -> bool:
    """Whether ``propagator`` owns a communicator (it cannot run in a child process)."""
    return getattr(propagator, "comm", None) is not None


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state of every parameter that has none, equal to
    the state the optimizer would create itself, so that it can be shared
    before the first update.

    The state is created the optimizer's own way, by one step with zero
    gradients and learning rate 0, after which step counters are reset to 0.
    That is exact for SGD and Adam (zero moments); a RuntimeError says so if
    the step moved a parameter.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if not optimizer.state.get(p)]
    if not missing:
        return
    grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    before = [p.detach().clone() for p in missing]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if any(p is q for q in missing) else None
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
    for p, old in zip(missing, before):
        if not torch.equal(p, old):
            raise RuntimeError(f"cannot share the state of {type(optimizer).__name__}: "
                               f"a zero step moved the parameters")
        step = optimizer.state.get(p, {}).get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            optimizer.state[p]["step"] = 0


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


def _make_optimizer(spec: tuple, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """An optimizer over ``params`` from ``(class, defaults, state_dict)``; the
    state tensors are those of the state dict (shared, not copied)."""
    cls, defaults, state = spec
    opt = cls(params, **defaults)
    opt.load_state_dict(state)
    return opt


# --------------------------------------------------------------------------- #
# the work of one worker (runs in its thread or process)
# --------------------------------------------------------------------------- #
class _Job:
    """What worker ``w`` does for one batch."""

    def __init__(self, replica: torch.nn.Module, local_step: LocalStep,
                 grads: torch.Tensor, hogwild: tuple | None):
        self.replica = replica
        self.local_step = local_step
        self.grads = grads
        self.params = list(replica.parameters())
        self.views = _views(grads, self.params)
        self.shared = self.optimizer = None
        if hogwild is not None:
            # this worker's own tensor objects over the global storage: ``.grad``
            # is an attribute of the Python object, so it must not be shared
            self.shared = [torch.nn.Parameter(q.detach(), requires_grad=False)
                           for q in hogwild[0]]
            self.optimizer = _make_optimizer(hogwild[1], self.shared)

    def __call__(self, batch: Any) -> None:
        if self.shared is not None:
            with torch.no_grad():
                for p, q in zip(self.params, self.shared):
                    p.copy_(q)
        loss = self.local_step(self.replica, batch)
        with torch.no_grad():
            for p, view in zip(self.params, self.views):
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
            self.grads[-1] = loss
        if self.optimizer is not None:
            for q, p in zip(self.shared, self.params):
                q.grad = p.grad
            self.optimizer.step()


def _views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``params``, one after the other."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _failure(exc: BaseException) -> tuple[str, str, str]:
    """``(kind, one-line message, traceback)`` of a worker's exception
    (``kind`` is ``input`` for InputError: it stays one)."""
    kind = "input" if isinstance(exc, InputError) else type(exc).__name__
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return kind, message, "".join(traceback.format_exception(exc))


def _raise(w: int, failure: tuple[str, str, str]) -> None:
    kind, message, trace = failure
    if kind == "input":
        raise InputError(message)
    raise RuntimeError(f"strategy worker {w} failed: {kind}: {message}\n{trace}")


def _process_main(w: int, replica, local_step, grads, conn, threads: int, hogwild) -> None:
    """Body of a worker process: serve jobs from ``conn`` until ``None`` or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        job = _Job(replica, local_step, grads, hogwild)
        conn.send(None)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(_failure(exc))
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        try:
            job(batch)
            reply = None
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            reply = _failure(exc)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _thread_main(w: int, job: _Job, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue) -> None:
    """Body of a worker thread: serve jobs from ``inbox`` until ``None``."""
    while True:
        batch = inbox.get()
        if batch is None:
            return
        try:
            job(batch)
            outbox.put((w, None))
        except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
            outbox.put((w, _failure(exc)))


@contextlib.contextmanager
def _child_environment(threads: int):
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


# --------------------------------------------------------------------------- #
# the pool
# --------------------------------------------------------------------------- #
class WorkerPool:
    """``workers`` replicas of ``model`` computing gradients on request.

    ``local_step(replica, batch) -> loss`` leaves the batch's gradient in the
    replica's ``.grad`` (for processes it must be picklable and must not use
    MPI). ``hogwild``: the optimizer of the global model; the workers then
    update the global parameters themselves (see the module docstring).
    Worker ``w``'s replica is :attr:`models` ``[w]``, its parameters
    :attr:`params` ``[w]`` and its gradient-and-loss buffer :attr:`grads`
    ``[w]`` (``[n_params + 1]``, the model's dtype).
    """

    def __init__(self, model: torch.nn.Module, local_step: LocalStep, workers: int, *,
                 backend: str = "process", threads: int | None = None,
                 hogwild: torch.optim.Optimizer | None = None) -> None:
        if backend not in BACKENDS:
            raise InputError(f"strategy backend: expected one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        self.backend = backend
        self.workers = workers
        threads = threads if threads is not None else torch.get_num_threads()
        self.threads = max(1, threads // workers)
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        dtype = params[0].dtype
        self.models: list[torch.nn.Module] = []
        self.params: list[list[torch.Tensor]] = []
        self.grads: list[torch.Tensor] = []
        self._closed = False
        self._busy: set[int] = set()
        self._procs: list = []
        self._conns: list = []
        self._threads: list[threading.Thread] = []
        self._inboxes: list[queue.SimpleQueue] = []
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._done: dict[int, Any] = {}
        self._comms: list = []
        self._saved_threads = torch.get_num_threads()
        spec = None
        if hogwild is not None:
            materialize_state(hogwild)
            if backend == "process":
                for t in params + _state_tensors(hogwild):
                    t.share_memory_()
            spec = (params, (type(hogwild), dict(hogwild.defaults), hogwild.state_dict()))
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns,
                                           self._threads, self._inboxes)
        try:
            for w in range(workers):
                if backend == "process":
                    replica = replicate(model, copy.deepcopy(getattr(model, "propagator", None)))
                    grads = torch.zeros(n + 1, dtype=dtype).share_memory_()
                    for p in replica.parameters():
                        p.share_memory_()
                else:
                    replica = replicate(model, thread_propagator(getattr(model, "propagator",
                                                                         None)))
                    grads = torch.zeros(n + 1, dtype=dtype)
                    prop_comm = getattr(replica.propagator, "comm", None) \
                        if hasattr(replica, "propagator") else None
                    if prop_comm is not None:
                        self._comms.append(prop_comm)
                self.models.append(replica)
                self.params.append(list(replica.parameters()))
                self.grads.append(grads)
            if backend == "process":
                self._start_processes(local_step, spec)
            else:
                torch.set_num_threads(self.threads)
                self._start_threads(local_step, spec)
        except BaseException:
            self.close()
            raise

    # -- start-up -----------------------------------------------------------
    def _start_processes(self, local_step: LocalStep, spec) -> None:
        ctx = mp.get_context("spawn")
        with _child_environment(self.threads):
            for w in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_process_main, name=f"mgrit-gru-worker-{w}",
                                   args=(w, self.models[w], local_step, self.grads[w], child,
                                         self.threads, spec), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        for w in range(self.workers):        # every child reports once it is set up
            self._busy.add(w)
            self.wait(w)

    def _start_threads(self, local_step: LocalStep, spec) -> None:
        for w in range(self.workers):
            job = _Job(self.models[w], local_step, self.grads[w], spec)
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=_thread_main, name=f"mgrit-gru-worker-{w}",
                                      args=(w, job, inbox, self._outbox), daemon=True)
            thread.start()
            self._inboxes.append(inbox)
            self._threads.append(thread)

    # -- jobs -----------------------------------------------------------------
    @torch.no_grad()
    def load(self, w: int, params: Sequence[torch.Tensor]) -> None:
        """Copy ``params`` (the global parameters) into worker ``w``'s replica."""
        if w in self._busy:
            raise RuntimeError(f"worker {w} is busy")
        for dst, src in zip(self.params[w], params):
            dst.copy_(src)

    def submit(self, w: int, batch: Any) -> None:
        """Start worker ``w`` on ``batch``."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if w in self._busy:
            raise RuntimeError(f"worker {w} is busy")
        self._busy.add(w)
        if self.backend == "process":
            try:
                self._conns[w].send(batch)
            except (BrokenPipeError, OSError):
                raise RuntimeError(f"strategy worker {w} (pid {self._procs[w].pid}) "
                                   f"has died") from None
        else:
            self._inboxes[w].put(batch)

    def wait(self, w: int) -> None:
        """Wait until worker ``w`` has finished its job; raise its exception."""
        if w not in self._busy:
            raise RuntimeError(f"worker {w} has no job")
        if self.backend == "process":
            self._finish(w, self._receive(w))
            return
        while w not in self._done:
            v, result = self._outbox.get()
            self._done[v] = result
        self._finish(w, self._done.pop(w))

    def wait_any(self) -> int:
        """Wait until some busy worker has finished; return its index."""
        if not self._busy:
            raise RuntimeError("no worker has a job")
        if self.backend == "process":
            ready = wait_connections([self._conns[w] for w in sorted(self._busy)])
            w = self._conns.index(ready[0])
            self._finish(w, self._receive(w))
            return w
        if not self._done:
            v, result = self._outbox.get()
            self._done[v] = result
        w = next(iter(self._done))
        self._finish(w, self._done.pop(w))
        return w

    def _receive(self, w: int):
        try:
            return self._conns[w].recv()
        except (EOFError, OSError):
            proc = self._procs[w]
            proc.join(STOP_TIMEOUT)
            raise RuntimeError(f"strategy worker {w} (pid {proc.pid}) has died (exit code "
                               f"{proc.exitcode}); note that a script starting worker "
                               f"processes needs an `if __name__ == '__main__':` guard, "
                               f"since they import it") from None

    def _finish(self, w: int, failure) -> None:
        self._busy.discard(w)
        if failure is not None:
            _raise(w, failure)

    # -- shutdown -------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker (terminate those that do not stop within
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


def _stop(procs: list, conns: list, threads: list, inboxes: list) -> None:
    """Ask every worker to stop, then wait; terminate (and kill) processes
    that do not stop in time. Also run at garbage collection and exit."""
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
