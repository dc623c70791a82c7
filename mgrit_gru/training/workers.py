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
    ``rK, ..., rK + K - 1`` into double-buffered gradient buffers, meet at a
    barrier, and each applies the mean of the round's gradients to its own
    replica with its own copy of the optimizer (identical arithmetic, so the
    replicas stay identical); worker 0 writes the result back to the global
    model and optimizer at the end of the epoch;
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
per-time-step loop (see docs/strategies.md).
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError

BACKENDS = ("process", "thread")

#: Direct epochs (see the module docstring).
EPOCH_KINDS = ("mutex", "averaging", "hogwild")

#: Seconds ``close`` waits for a worker to stop before terminating it.
STOP_TIMEOUT = 5.0

#: Seconds between checks of the abort flag while a worker waits for its turn.
POLL = 0.2

#: Seconds a worker process polls before it sleeps while waiting for another
#: worker (threads never poll, nor processes that outnumber the cores); see
#: :class:`_Sync`.
SPIN = 0.005

LocalStep = Callable[[torch.nn.Module, Any], float]


def _usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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


def _make_optimizer(spec: tuple, params: Sequence[torch.Tensor], *,
                    private: bool = False) -> torch.optim.Optimizer:
    """An optimizer over ``params`` from ``(class, defaults, state_dict)``; its
    state tensors are those of the state dict (shared), or copies of them."""
    cls, defaults, state = spec
    opt = cls(params, **defaults)
    opt.load_state_dict(copy.deepcopy(state) if private else state)
    return opt


@torch.no_grad()
def _copy_state(dst: torch.optim.Optimizer, dst_params: Sequence[torch.Tensor],
                src: torch.optim.Optimizer, src_params: Sequence[torch.Tensor]) -> None:
    """Copy the optimizer state of ``src_params`` in ``src`` into that of
    ``dst_params`` in ``dst`` (same optimizer class, state already created)."""
    for p, q in zip(dst_params, src_params):
        target = dst.state[p]
        for key, value in src.state[q].items():
            if isinstance(value, torch.Tensor):
                target[key].copy_(value)
            else:
                target[key] = value


@torch.no_grad()
def _copy_params(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


# --------------------------------------------------------------------------- #
# the work of one worker (runs in its thread or process)
# --------------------------------------------------------------------------- #
class Aborted(Exception):
    """Another worker failed: this one left its epoch."""


class _Sync:
    """What the workers of a direct epoch synchronise with: a ring of
    semaphores (whose turn it is to update, mutex), one semaphore per worker
    for the end of a round (averaging: every worker posts one to each other
    worker and takes ``K - 1`` from its own), and an abort flag (a worker
    failed). ``ctx`` is a multiprocessing context or the ``threading`` module.

    A waiting worker first polls its semaphore for up to ``spin`` seconds,
    then blocks: on a virtual machine, waking a sleeping process costs the
    hypervisor's idle-exit latency at every turn (see docs/strategies.md),
    while the wait itself is usually shorter than one minibatch. Threads must
    not spin (a spinning thread holds the GIL): ``spin = 0``.
    """

    def __init__(self, ctx, workers: int, spin: float) -> None:
        self.workers, self.spin = workers, spin
        self.turns = [ctx.Semaphore(0) for _ in range(workers)]
        self.arrivals = [ctx.Semaphore(0) for _ in range(workers)]
        self.abort = ctx.Event()
        self.lock = ctx.Lock()
        self.next = ctx.Value("q", 0, lock=False) if ctx is not threading else _Box()

    def take_next(self) -> int:
        """The index of the next minibatch nobody has taken (Hogwild)."""
        with self.lock:
            j = self.next.value
            self.next.value = j + 1
        return j

    def fail(self) -> None:
        """Make every waiting worker leave its epoch (within :data:`POLL`)."""
        self.abort.set()

    def check(self) -> None:
        if self.abort.is_set():
            raise Aborted

    def _acquire(self, semaphore) -> None:
        if self.spin > 0:
            deadline = time.perf_counter() + self.spin
            while time.perf_counter() < deadline:
                if semaphore.acquire(False):
                    return
        while not semaphore.acquire(timeout=POLL):
            self.check()

    def take_turn(self, w: int) -> None:
        """Wait until worker ``w`` may update (mutex)."""
        self._acquire(self.turns[w])

    def pass_turn(self, w: int) -> None:
        """Let the worker after ``w`` update."""
        self.turns[(w + 1) % self.workers].release()

    def meet(self, w: int) -> None:
        """Wait until every worker has reached this point of its round."""
        for v in range(self.workers):
            if v != w:
                self.arrivals[v].release()
        for _ in range(self.workers - 1):
            self._acquire(self.arrivals[w])


class _Box:
    """A ``multiprocessing.Value`` stand-in for threads."""

    value = 0


class _Worker:
    """Worker ``w``: its replica, the shared global model and the jobs.

    ``buffers[v]`` are the two flat ``[n_params + 1]`` gradient-and-loss
    buffers of every worker ``v`` (averaging reads all of them). ``shared``:
    ``(global parameters, (optimizer class, defaults, state dict))``.
    """

    def __init__(self, w: int, replica: torch.nn.Module, local_step: LocalStep,
                 buffers: list, shared: tuple, sync: _Sync, record=None) -> None:
        self.w, self.workers = w, len(buffers)
        self.replica, self.local_step = replica, local_step
        self.buffers, self.sync, self.record = buffers, sync, record
        self.params = list(replica.parameters())
        self.views = [_views(b, self.params) for b in buffers[w]]
        # this worker's own tensor objects over the global storage: ``.grad``
        # is an attribute of the Python object, so it must not be shared
        self.shared = [torch.nn.Parameter(q.detach(), requires_grad=False) for q in shared[0]]
        self.spec = shared[1]
        self.optimizer = _make_optimizer(self.spec, self.shared)
        self.private = None             # averaging: this worker's copy of the optimizer,
        self.mean = self.mean_views = None  # and the mean gradient of a round

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

    def step_global(self) -> None:
        """Update the global model with the replica's gradient."""
        for q, p in zip(self.shared, self.params):
            q.grad = p.grad
        self.optimizer.step()

    # -- jobs -------------------------------------------------------------------
    def run(self, kind: str, payload: Any) -> tuple[float, int]:
        """Do one job; ``(sum of the minibatch losses, minibatches)``."""
        if kind == "gradient":
            return self.gradient(payload, 0), 1
        batches, k = payload
        return getattr(self, "_" + kind)(batches, k)

    def _hogwild(self, batches: list, k: int) -> tuple[float, int]:
        total, count = 0.0, 0
        while (j := self.sync.take_next()) < k:
            self.sync.check()
            _copy_params(self.params, self.shared)
            total += self.gradient(batches[j])
            self.step_global()
            count += 1
        return total, count

    def _mutex(self, batches: list, k: int) -> tuple[float, int]:
        # the replica holds the global parameters (loaded by the pool: a worker
        # copying them itself might already see another worker's first update)
        total, K = 0.0, self.workers
        for i, batch in enumerate(batches):
            self.sync.check()
            total += self.gradient(batch)
            self.sync.take_turn(self.w)
            self.step_global()
            _copy_params(self.params, self.shared)
            if self.w + i * K + 1 < k:
                self.sync.pass_turn(self.w)
        return total, len(batches)

    def _averaging(self, batches: list, k: int) -> tuple[float, int]:
        total, K = 0.0, self.workers
        if self.private is None:
            self.private = _make_optimizer(self.spec, self.params, private=True)
            self.mean = torch.zeros_like(self.buffers[0][0])
            self.mean_views = _views(self.mean, self.params)
        _copy_params(self.params, self.shared)
        _copy_state(self.private, self.params, self.optimizer, self.shared)
        for r in range(-(-k // K)):
            self.sync.check()
            m, parity = min(K, k - r * K), r % 2
            if self.w < m:
                total += self.gradient(batches[r], parity)
            self.sync.meet(self.w)
            mean = self.mean
            mean.copy_(self.buffers[0][parity])
            for v in range(1, m):
                mean.add_(self.buffers[v][parity])
            if m > 1:
                mean.div_(m)
            for p, g in zip(self.params, self.mean_views):
                p.grad = g
            self.private.step()
        if self.w == 0:
            _copy_params(self.shared, self.params)
            _copy_state(self.optimizer, self.shared, self.private, self.params)
        return total, len(batches)


def _views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``params``, one after the other."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _serve(worker_factory, receive, reply) -> None:
    """A worker's loop: build it, then do jobs until ``None`` (or the end of
    the channel). Replies: ``("ok", result)``, ``("aborted", None)`` or
    ``("error", (kind, message, traceback))``."""
    try:
        worker = worker_factory()
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        reply(("error", _failure(exc)))
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
            answer = ("error", _failure(exc))
        if not reply(answer):
            return


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


def _process_main(w, replica, local_step, buffers, shared, sync, conn, threads) -> None:
    """Body of a worker process. It ignores SIGINT, SIGTERM and the stop
    signals: schedulers signal every process of a job, and the parent, which
    handles them, ends its workers itself (the pipe closes; SIGKILL after
    :data:`STOP_TIMEOUT`)."""
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

    _serve(lambda: _Worker(w, replica, local_step, buffers, shared, sync), receive, reply)


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
        dtype = params[0].dtype
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
        spin = SPIN if backend == "process" and workers <= _usable_cores() else 0.0
        self.sync = _Sync(ctx, workers, spin)
        materialize_state(optimizer)
        share = backend == "process"
        if share:
            for t in params + _state_tensors(optimizer):
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
                buffers = [torch.zeros(n + 1, dtype=dtype) for _ in range(2)]
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
        with _child_environment(self.threads):
            for w in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_process_main, name=f"mgrit-gru-worker-{w}",
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
                return _Worker(w, self.models[w], local_step, self.buffers, shared,
                               self.sync, record)

            def reply(message, w=w) -> bool:
                self._outbox.put((w, message))
                return True

            thread = threading.Thread(target=_serve, name=f"mgrit-gru-worker-{w}",
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
            _raise(w, value)
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
        if kind == "hogwild":             # every worker takes the next free minibatch
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
        _copy_params(self.params[w], params)

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


def _stop(procs: list, conns: list, threads: list, inboxes: list, sync: _Sync) -> None:
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
