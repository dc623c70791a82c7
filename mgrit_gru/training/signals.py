"""Scheduler signals: stop a run cleanly at the next synchronisation point.

Batch schedulers announce the end of a job with a signal: SLURM sends SIGTERM
at the time limit (and at ``scancel``), and ``sbatch --signal=SIG@SECONDS``
sends a chosen signal ahead of it. :class:`StopSignals` turns SIGTERM and one
configurable *stop signal* (default SIGUSR2) into a flag; the training loop
reads the flag at its next synchronisation point (after each batch with the
sequential strategy), agrees on it with every rank (one small allreduce),
writes a checkpoint and ends with exit code 75 (:data:`~mgrit_gru.errors.EXIT_STOPPED`).

SIGUSR1 is not offered: MPICH's ``MPI_Init`` installs its own handler for it
(hydra uses it for fault notification), so a user's SIGUSR1 would silently be
swallowed. SIGINT (Ctrl-C) is not a stop signal: it ends the run at once with
one line and exit code 130 (see :func:`mgrit_gru.core.comm.abort_on_exception`).

A second stop signal while the first is being handled is ignored (the
checkpoint is already on its way); SLURM's SIGKILL after ``KillWait`` remains
the hard limit.
"""

from __future__ import annotations

import signal
import threading
import time


def signal_number(name: str) -> int | None:
    """``"USR2"`` -> ``signal.SIGUSR2``; ``None`` for ``"none"``."""
    if name == "none":
        return None
    return int(getattr(signal, "SIG" + name))


class StopSignals:
    """``with StopSignals("USR2") as stop:`` ... ``if stop.requested: ...``

    Inside the block SIGTERM and the stop signal set :attr:`requested` (the
    signal's name) and :attr:`received_at` (``time.monotonic()``) instead of
    ending the process; on exit the previous handlers come back, or with
    ``after="ignore"`` the signals are ignored from then on (for a process
    that is about to end: a signal during its teardown must not turn a
    finished run into a killed one). Outside the main thread (where Python
    cannot install handlers) it does nothing.
    """

    def __init__(self, stop_signal: str = "USR2", after: str = "restore") -> None:
        self.after = after
        numbers = [signal.SIGTERM]
        extra = signal_number(stop_signal)
        if extra is not None and extra not in numbers:
            numbers.append(extra)
        self.numbers = numbers
        self.requested: str | None = None
        self.received_at: float | None = None
        self._saved: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            self.received_at = time.monotonic()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for n in self.numbers:
                self._saved[n] = signal.signal(n, self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        for n, old in self._saved.items():
            signal.signal(n, signal.SIG_IGN if self.after == "ignore" else old)
        self._saved.clear()
