"""Data-parallel strategies: who computes which minibatch gradient, and when
the shared model is updated.

The training loop (:mod:`mgrit_gru.train`) owns the data, the model, the
optimizer and MPI; a strategy owns only the order of work inside one rank for
one epoch. It is constructed once per run (it may start worker threads or
processes there), asked to run each epoch, and closed at the end::

    with make_strategy("sequential", workers=1) as strategy:
        for epoch in ...:
            stats = strategy.run_epoch(model, optimizer, batches, step_fn)

``step_fn(model, batch) -> float`` is provided by the training loop. It zeroes
``model``'s gradients, computes the loss of ``batch`` and its backward, leaves
exactly that minibatch gradient in the parameters' ``.grad`` and returns the
loss. ``model`` may be the shared model or a worker's copy of it. When the run
has several MPI data groups, ``step_fn`` is collective over them (it averages
the gradients with an allreduce): every rank must then call it once per batch,
in the order of ``batches``, from one thread at a time.

Implementations: :class:`Sequential` (one worker, one update per minibatch).
Mutex (implicit aggregation), averaging (explicit aggregation) and Hogwild
(lock-free) register themselves in :data:`STRATEGIES` the same way.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar, Iterable

import torch

from mgrit_gru.errors import InputError

StepFn = Callable[[torch.nn.Module, Any], float]


class Strategy(abc.ABC):
    """One way of turning an epoch's minibatches into model updates.

    Subclasses set :attr:`name`, may start workers in ``__init__`` and must
    release them in :meth:`close`.
    """

    name: ClassVar[str]

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    @abc.abstractmethod
    def run_epoch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batches: Iterable[Any], step_fn: StepFn) -> dict[str, float]:
        """Consume ``batches`` and update ``model`` through ``optimizer``.

        Returns ``dict(train_loss=<mean of the minibatch losses>,
        updates=<number of optimizer steps>)``; the loss is NaN for an epoch
        without batches.
        """

    def close(self) -> None:
        """Release workers (threads, processes); the default has none."""

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Sequential(Strategy):
    """The baseline: one worker, one optimizer step per minibatch, in order."""

    name = "sequential"

    def __init__(self, workers: int = 1) -> None:
        if workers != 1:
            raise InputError(f"option workers (--workers): the sequential "
                             f"strategy runs 1 worker, got {workers}")
        super().__init__(workers)

    def run_epoch(self, model, optimizer, batches, step_fn):
        total, updates = 0.0, 0
        for batch in batches:
            total += step_fn(model, batch)
            optimizer.step()
            updates += 1
        return {"train_loss": total / updates if updates else math.nan,
                "updates": updates}


#: Implemented strategies by name (the names of ``config.STRATEGIES``).
STRATEGIES: dict[str, type[Strategy]] = {Sequential.name: Sequential}


def make_strategy(name: str, workers: int = 1) -> Strategy:
    """The strategy called ``name`` with ``workers`` workers (InputError if it
    is unknown or not available in this version)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise InputError(f"option strategy (--strategy): {name!r} is not "
                         f"available (available: {', '.join(STRATEGIES)})") from None
    return cls(workers)
