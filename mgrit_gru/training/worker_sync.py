"""What the workers of a direct epoch synchronise with (:class:`Sync`): whose
turn it is to update (mutex), the end of a round (averaging), the next free
minibatch (Hogwild) and the abort flag, for threads or processes alike.
"""

from __future__ import annotations

import os
import threading
import time

#: Seconds between checks of the abort flag while a worker waits for its turn.
POLL = 0.2

#: Seconds a worker process polls before it sleeps while waiting for another
#: worker (threads never poll, nor processes that outnumber the cores); see
#: :class:`Sync`.
SPIN = 0.005


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Aborted(Exception):
    """Another worker failed: this one left its epoch."""


class Sync:
    """What the workers of a direct epoch synchronise with: a ring of
    semaphores (whose turn it is to update, mutex), one semaphore per worker
    for the end of a round (averaging: every worker posts one to each other
    worker and takes ``K - 1`` from its own), the lock of an arrival-order
    mutex epoch, and an abort flag (a worker
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
        self.rounds = [ctx.Semaphore(0) for _ in range(workers)]
        self.abort = ctx.Event()
        self.lock = ctx.Lock()
        self.update_lock = ctx.Lock()
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

    def lock_update(self) -> None:
        """Enter the critical section of an arrival-order mutex epoch."""
        self._acquire(self.update_lock)

    def unlock_update(self) -> None:
        self.update_lock.release()

    def take_turn(self, w: int) -> None:
        """Wait until worker ``w`` may update (mutex)."""
        self._acquire(self.turns[w])

    def pass_turn(self, w: int) -> None:
        """Let the worker after ``w`` update."""
        self.turns[(w + 1) % self.workers].release()

    def release_round(self) -> None:
        """Worker 0 has updated the model for this round: let the others on
        (averaging with one updater)."""
        for v in range(1, self.workers):
            self.rounds[v].release()

    def wait_round(self, w: int) -> None:
        """Wait until worker 0 has updated the model for this round."""
        self._acquire(self.rounds[w])

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
