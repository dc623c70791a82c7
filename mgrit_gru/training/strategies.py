"""Data-parallel strategies: who computes which minibatch gradient, and when
the shared model is updated.

The training loop (:mod:`mgrit_gru.training.loop`) owns the data, the model, the
optimizer and MPI; a strategy owns only the order of work inside one rank for
one epoch. It is constructed once per run, started once (it may start worker
threads or processes there), asked to run each epoch, and closed at the end::

    with make_strategy("mutex", workers=2) as strategy:
        strategy.start(model, optimizer, step_fn)        # optional: else lazily
        for epoch in ...:
            stats = strategy.run_epoch(model, optimizer, batches, step_fn)

``step_fn(model, batch) -> float`` is provided by the training loop. It zeroes
``model``'s gradients, computes the loss of ``batch`` and its backward, leaves
exactly that minibatch gradient in the parameters' ``.grad`` and returns the
loss. ``model`` may be the shared model or a worker's copy of it. When the run
has several MPI data groups, ``step_fn`` is collective over them (it averages
the gradients with an allreduce): every rank must then call it once per batch,
in the order of ``batches``, from one thread at a time.

Strategies with workers use the parts of ``step_fn`` when it has them (the
training loop's does), and else ``step_fn`` itself with one data group:

* ``step_fn.local(model, batch) -> float``: this rank's share of the step,
  without MPI (picklable: worker processes run it); summed over the data
  groups, the shares are the minibatch's gradient and loss;
* ``step_fn.reduce_(flat)``: in-place sum of a flat tensor over the data groups;
* ``step_fn.record(model, batch)``: bookkeeping of one step (solver statistics);
* ``step_fn.data_groups``: the number of data groups.

Implementations (:data:`STRATEGIES`), with ``k`` minibatches per epoch and
``K`` workers:

* :class:`Sequential`: one worker, ``k`` updates, in order.
* :class:`Mutex` (implicit aggregation): worker ``j % K`` computes minibatch
  ``j`` on its local copy; the update with its gradient and the copy of the
  updated parameters back into it form a critical section; ``k`` updates.
  With ``order="arrival"`` the critical section is a plain lock, entered by
  whoever finishes first, and each worker takes the next free minibatch (the
  paper's algorithm; one rank only, like Hogwild).
* :class:`Averaging` (explicit aggregation): in each round, ``K`` workers
  compute ``K`` minibatch gradients from the same parameters; one update with
  their mean; ``ceil(k / K)`` updates.
* :class:`Hogwild`: each worker copies the shared parameters, computes a
  minibatch gradient and updates the shared parameters itself, with no lock;
  ``k`` updates.

Mutex and averaging update in a fixed order: minibatch ``j``'s gradient is
always the ``j``-th update (mutex), rounds are always the same minibatches
(averaging). A run is therefore deterministic, and identical on every rank,
which lets them compose with MPI data groups (the calling thread sums each
update's gradient over the groups) and with MGRIT time ranks (thread
workers, each with its own time communicator). Hogwild's update order is up
to the operating system: it runs on one rank only. The workers themselves
are in :mod:`mgrit_gru.training.pool` (the pool), :mod:`mgrit_gru.training.worker`
(one worker), :mod:`mgrit_gru.training.worker_sync` and
:mod:`mgrit_gru.training.replicas`.

On a GPU (the model's parameters on a CUDA device) the workers are threads
(``auto``); worker processes need the model on the cpu.
"""

from __future__ import annotations

import abc
import math
from collections import deque
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from mgrit_gru.errors import InputError
from mgrit_gru.training.config import MUTEX_ORDERS, WORKER_BACKENDS
from mgrit_gru.training.pool import BACKENDS, WorkerPool
from mgrit_gru.training.replicas import communicates, optimizer_step

StepFn = Callable[[torch.nn.Module, Any], float]

#: Worker backends accepted by :func:`make_strategy` (``auto`` chooses): the
#: config's choices, which are ``auto`` and the pool's backends.
BACKEND_CHOICES = WORKER_BACKENDS
assert set(BACKEND_CHOICES) == {"auto", *BACKENDS}


class Strategy(abc.ABC):
    """One way of turning an epoch's minibatches into model updates.

    Subclasses set :attr:`name`, may start workers in :meth:`start` (or in
    ``__init__``) and must release them in :meth:`close`.
    """

    name: ClassVar[str]

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              step_fn: StepFn) -> None:
        """Prepare the run's workers for ``model``, ``optimizer`` and
        ``step_fn`` (the default has none). Called once before the first epoch
        so that start-up time stays out of the epoch times; :meth:`run_epoch`
        calls it itself if needed. Raises InputError for unsupported runs."""

    @abc.abstractmethod
    def run_epoch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batches: Iterable[Any], step_fn: StepFn) -> dict[str, float]:
        """Consume ``batches`` and update ``model`` through ``optimizer``.

        Returns ``dict(train_loss=<mean of the minibatch losses>,
        updates=<number of optimizer steps>)``; the loss is NaN for an epoch
        without batches.
        """

    def describe(self) -> str:
        """One line for the log, e.g. ``mutex, 2 workers (process)``."""
        return f"{self.name}, {self.workers} worker{'s' if self.workers != 1 else ''}"

    def close(self) -> None:
        """Release workers (threads, processes); the default has none."""

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Sequential(Strategy):
    """The baseline: one worker, one optimizer step per minibatch, in order."""

    name = "sequential"

    def __init__(self, workers: int = 1, backend: str = "auto") -> None:
        if workers != 1:
            raise InputError(f"option workers (--workers): the sequential "
                             f"strategy runs 1 worker, got {workers}")
        _check_backend(backend)
        super().__init__(workers)

    def run_epoch(self, model, optimizer, batches, step_fn):
        total, updates = 0.0, 0
        for batch in batches:
            total += step_fn(model, batch)
            optimizer_step(optimizer)
            updates += 1
        return {"train_loss": total / updates if updates else math.nan,
                "updates": updates}


def _check_backend(backend: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise InputError(f"strategy backend: expected one of {', '.join(BACKEND_CHOICES)}, "
                         f"got {backend!r}")


class _Parts:
    """The parts of a ``step_fn`` (see the module docstring), with defaults
    for a plain function: itself, no reduction, no bookkeeping, one group."""

    def __init__(self, step_fn: StepFn) -> None:
        self.local = getattr(step_fn, "local", step_fn)
        self.reduce_ = getattr(step_fn, "reduce_", None)
        self.record = getattr(step_fn, "record", None)
        self.data_groups = int(getattr(step_fn, "data_groups", 1))


class _WithWorkers(Strategy):
    """Common part of the strategies with a pool of workers.

    ``backend``: ``process``, ``thread`` or ``auto`` (processes, unless the
    model's propagator communicates: then threads, each with its own
    communicator).

    With one data group an epoch is a *direct* epoch of the pool: the workers
    get their minibatches at once and synchronise among themselves
    (:meth:`WorkerPool.run_epoch`). With several, the calling thread
    coordinates: it hands out gradient jobs, sums each update's gradient over
    the groups and updates the model itself (:meth:`_coordinated`).
    """

    def __init__(self, workers: int = 1, backend: str = "auto") -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"option workers (--workers): must be at least 1, got {workers!r}")
        _check_backend(backend)
        super().__init__(workers)
        self.backend = backend
        self.pool: WorkerPool | None = None
        self._model = self._optimizer = None
        self._params: list[torch.Tensor] = []
        self._parts: _Parts | None = None

    def describe(self) -> str:
        backend = self.pool.backend if self.pool is not None else self.backend
        return f"{super().describe()} ({backend})"

    def _choose_backend(self, model: torch.nn.Module) -> str:
        propagator = getattr(model, "propagator", None)
        on_gpu = next(model.parameters()).device.type != "cpu"
        if self.backend == "auto":
            return "thread" if communicates(propagator) or on_gpu else "process"
        if self.backend == "process" and communicates(propagator):
            raise InputError(f"option worker_backend (--worker-backend): {self.name} workers "
                             f"cannot be processes with the {type(propagator).__name__}, "
                             f"which communicates over MPI (use thread or auto)")
        return self.backend

    def _check_ranks(self, model: torch.nn.Module, parts: _Parts) -> None:
        """Raise InputError for runs this strategy does not support."""

    def start(self, model, optimizer, step_fn) -> None:
        if self.pool is not None:
            if model is not self._model or optimizer is not self._optimizer:
                raise ValueError(f"the {self.name} strategy serves one model and one "
                                 f"optimizer per run")
            return
        parts = _Parts(step_fn)
        backend = self._choose_backend(model)
        self._check_ranks(model, parts)
        if backend == "thread" and communicates(getattr(model, "propagator", None)):
            _require_thread_multiple(self.name)
        self.pool = WorkerPool(model, parts.local, self.workers, optimizer, backend=backend,
                               record=parts.record)
        self._model, self._optimizer, self._parts = model, optimizer, parts
        self._params = list(model.parameters())

    def run_epoch(self, model, optimizer, batches, step_fn):
        self.start(model, optimizer, step_fn)
        if self._parts.data_groups == 1:
            total, count = self.pool.run_epoch(self._epoch_kind(), list(batches))
            updates = self._updates(count)
        else:
            total, updates, count = self._coordinated(iter(batches))
            for p in self._params:      # no references into the workers' buffers
                p.grad = None
        return {"train_loss": total / count if count else math.nan,
                "updates": updates}

    def _updates(self, count: int) -> int:
        """Updates of a direct epoch of ``count`` minibatches."""
        return count

    def _epoch_kind(self) -> str:
        """The pool's kind of direct epoch (:data:`~mgrit_gru.training.pool.EPOCH_KINDS`)."""
        return self.name

    def _coordinated(self, batches: Iterator[Any]) -> tuple[float, int, int]:
        """An epoch with several data groups; ``(sum of the minibatch
        losses, updates, minibatches)``."""
        raise NotImplementedError

    # -- helpers of the coordinator --------------------------------------------
    def _send(self, w: int, batch: Any) -> None:
        """Worker ``w`` computes ``batch`` from the current global parameters."""
        self.pool.load(w, self._params)
        self.pool.submit(w, batch)

    def _send_round(self, batches: Iterator[Any]) -> list[int]:
        """Send the next batches to workers 0, 1, ... (one each, while there
        are batches); the workers sent to, in order."""
        sent = []
        for w in range(self.workers):
            batch = next(batches, None)
            if batch is None:
                break
            self._send(w, batch)
            sent.append(w)
        return sent

    def _update(self, flat: torch.Tensor) -> float:
        """Sum ``flat`` (gradient, loss) over the data groups, step the global
        model with that gradient; return the loss entry."""
        self._parts.reduce_(flat)
        offset = 0
        for p in self._params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        optimizer_step(self._optimizer)
        return float(flat[-1])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class Mutex(_WithWorkers):
    """Implicit aggregation (Messi Nguele et al., Algorithms IV.1-IV.2).

    Worker ``j % K`` computes minibatch ``j`` on its local copy, loaded with
    the global parameters after its previous update. The update with its
    gradient and the copy of the new parameters into its local copy are the
    critical section, entered in the order of the minibatches (a ring of
    semaphores; with several data groups, the coordinator), so the gradient
    of minibatch ``j`` was computed from the parameters after update
    ``j - K + 1`` (``K = 1``: the sequential run). ``k`` updates per epoch.
    Works with several data groups and with MGRIT time ranks.
    """

    name = "mutex"

    def __init__(self, workers: int = 1, backend: str = "auto", order: str = "fixed") -> None:
        if order not in MUTEX_ORDERS:
            raise InputError(f"option mutex_order (--mutex-order): expected one of "
                             f"{', '.join(MUTEX_ORDERS)}, got {order!r}")
        super().__init__(workers, backend)
        self.order = order

    def describe(self) -> str:
        text = super().describe()
        return text.replace("mutex,", "mutex (arrival order),", 1) \
            if self.order == "arrival" else text

    def _epoch_kind(self) -> str:
        return "mutex" if self.order == "fixed" else "mutex_arrival"

    def _check_ranks(self, model, parts) -> None:
        if self.order == "arrival":
            _one_rank(model, parts, "mutex with --mutex-order arrival",
                      "use --mutex-order fixed")

    def _coordinated(self, batches):
        total, updates = 0.0, 0
        queue: deque[int] = deque(self._send_round(batches))     # workers, in update order
        while queue:
            w = queue.popleft()
            self.pool.wait(w)
            total += self._update(self.pool.grads[w])
            updates += 1
            batch = next(batches, None)
            if batch is not None:
                self._send(w, batch)
                queue.append(w)
        return total, updates, updates


class Averaging(_WithWorkers):
    """Explicit aggregation: rounds of ``K`` minibatches computed from the
    same parameters, one update with the mean of their gradients (a last
    round with fewer minibatches averages those); ``ceil(k / K)`` updates per
    epoch. Works with several data groups and with MGRIT time ranks.
    """

    name = "averaging"

    def __init__(self, workers: int = 1, backend: str = "auto") -> None:
        super().__init__(workers, backend)
        self._mean: torch.Tensor | None = None

    def _updates(self, count: int) -> int:
        return -(-count // self.workers)

    def _coordinated(self, batches):
        total, updates, count = 0.0, 0, 0
        if self._mean is None:
            self._mean = torch.zeros_like(self.pool.grads[0])
        while True:
            round_ = self._send_round(batches)
            if not round_:
                return total, updates, count
            for w in round_:
                self.pool.wait(w)
            mean = self._mean
            mean.copy_(self.pool.grads[round_[0]])
            for w in round_[1:]:
                mean.add_(self.pool.grads[w])
            if len(round_) > 1:
                mean.div_(len(round_))
            total += self._update(mean) * len(round_)
            updates += 1
            count += len(round_)


class Hogwild(_WithWorkers):
    """Lock-free updates (Niu et al.; Deyringer et al.): each worker takes the
    next minibatch nobody has taken, copies the shared parameters, computes
    the gradient and applies it to the shared parameters with its own
    optimizer instance over the shared optimizer state, with no lock on the
    model; ``k`` updates per epoch. One rank only (one data group, one time
    rank).
    """

    name = "hogwild"

    def _check_ranks(self, model, parts) -> None:
        _one_rank(model, parts, "hogwild", "use mutex or averaging")


def _one_rank(model, parts: _Parts, what: str, instead: str) -> None:
    """InputError unless the run has one rank: ``what``'s updates come in an
    order nobody controls, so several ranks would drift apart."""
    comm = getattr(getattr(model, "propagator", None), "comm", None)
    time_ranks = comm.size if comm is not None else 1
    if parts.data_groups > 1 or time_ranks > 1:
        raise InputError(
            f"option strategy (--strategy): {what} runs on one rank only (got "
            f"{time_ranks} time x {parts.data_groups} data ranks): its updates come in "
            f"an unpredictable order, so ranks would drift apart; {instead}")


def _require_thread_multiple(name: str) -> None:
    """Thread workers that communicate need MPI_THREAD_MULTIPLE."""
    from mgrit_gru.core.comm import MPI

    if MPI is not None and MPI.Is_initialized() and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise InputError(f"option strategy (--strategy): {name} with MGRIT time ranks needs "
                         f"an MPI library with MPI_THREAD_MULTIPLE (this one provides level "
                         f"{MPI.Query_thread()})")


#: Implemented strategies by name (the names of ``config.STRATEGIES``).
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Sequential, Mutex, Averaging, Hogwild)}


#: Below this many minibatches in a run, ``auto`` (as the training loop resolves
#: it, :func:`auto_backend`) starts thread workers: processes' start-up (2.4-4.4 s
#: to spawn and import torch) would not be repaid by their faster epochs (at
#: most ~0.3 ms per minibatch faster; docs/strategies.md).
AUTO_THREAD_MINIBATCHES = 10_000


def auto_backend(backend: str, minibatches: int) -> str:
    """The backend the training loop asks for: ``thread`` for ``auto`` when the
    run has fewer than :data:`AUTO_THREAD_MINIBATCHES` minibatches left,
    ``backend`` otherwise (where ``auto`` then means processes, or threads
    where the propagator communicates or the model is on a GPU)."""
    if backend == "auto" and minibatches < AUTO_THREAD_MINIBATCHES:
        return "thread"
    return backend


def make_strategy(name: str, workers: int = 1, backend: str = "auto", *,
                  mutex_order: str = "fixed") -> Strategy:
    """The strategy called ``name`` with ``workers`` workers on ``backend``
    (``auto``, ``process`` or ``thread``; InputError if it is unknown or not
    available in this version); ``mutex_order`` (``fixed`` or ``arrival``)
    applies to ``mutex``."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise InputError(f"option strategy (--strategy): {name!r} is not "
                         f"available (available: {', '.join(STRATEGIES)})") from None
    if cls is Mutex:
        return cls(workers, backend, order=mutex_order)
    return cls(workers, backend)
