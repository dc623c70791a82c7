"""The communicator wrapper: the only module that imports mpi4py.

* :class:`Comm` wraps a *duplicated* MPI communicator (it never reaches for
  ``COMM_WORLD`` behind the caller's back, except to abort the whole job).
  ``Comm.serial()`` is a stand-in for one process that needs no MPI at all.
* Torch tensors travel as buffers (``tensor.numpy()`` views of contiguous CPU
  tensors, no pickling).  Small metadata (configs, checksums) may be pickled.
* :func:`abort_on_exception` turns an exception on any rank into a clear
  message and an ``MPI_Abort`` of the whole job, so no rank is left waiting in
  a receive that will never come.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any

import torch

from mgrit_gru.errors import InputError

try:  # mpi4py is a hard dependency, but the serial stand-in must work without it
    from mpi4py import MPI  # noqa: N811
except Exception:  # pragma: no cover - exercised only on broken installs
    MPI = None

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _buffer(t: torch.Tensor):
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("MPI buffers must be contiguous CPU tensors")
    return t.detach().numpy()


class Request:
    """A pending non-blocking operation; keeps its buffer alive until waited on."""

    __slots__ = ("_req", "_buf")

    def __init__(self, req, buf):
        self._req, self._buf = req, buf

    def wait(self) -> None:
        if self._req is not None:
            self._req.Wait()
            self._req = self._buf = None


class Comm:
    """A (duplicated) communicator, or the serial stand-in when ``mpi_comm`` is None."""

    def __init__(self, mpi_comm=None):
        self._c = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()

    # -- construction -----------------------------------------------------
    @classmethod
    def world(cls) -> "Comm":
        """A duplicate of ``MPI.COMM_WORLD`` (serial stand-in if MPI is absent)."""
        if MPI is None:
            return cls(None)
        return cls(MPI.COMM_WORLD.Dup())

    @classmethod
    def serial(cls) -> "Comm":
        return cls(None)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def mpi(self):
        """The wrapped mpi4py communicator (None for the serial stand-in)."""
        return self._c

    def split(self, color: int, key: int) -> "Comm":
        if self._c is None:
            return Comm(None)
        return Comm(self._c.Split(color, key))

    def split_grid(self, time_size: int) -> tuple["Comm", "Comm"]:
        """Split into a (time x data) grid of ``time_size`` x ``size // time_size``.

        Consecutive ranks form a time group (neighbours in time are
        neighbours in rank, usually on the same node); ranks with the same
        time index across groups form a data group.
        """
        if time_size < 1 or self.size % time_size:
            raise InputError(
                f"--time-ranks {time_size} must divide the number of MPI ranks ({self.size})"
            )
        data_index, time_index = divmod(self.rank, time_size)
        return self.split(data_index, time_index), self.split(time_index, data_index)

    # -- point to point ---------------------------------------------------
    def send(self, t: torch.Tensor, dest: int, tag: int = 0) -> None:
        self._c.Send(_buffer(t), dest=dest, tag=tag)

    def recv(self, out: torch.Tensor, source: int, tag: int = 0) -> torch.Tensor:
        self._c.Recv(_buffer(out), source=source, tag=tag)
        return out

    def isend(self, t: torch.Tensor, dest: int, tag: int = 0) -> Request:
        buf = _buffer(t)
        return Request(self._c.Isend(buf, dest=dest, tag=tag), buf)

    def irecv(self, out: torch.Tensor, source: int, tag: int = 0) -> Request:
        buf = _buffer(out)
        return Request(self._c.Irecv(buf, source=source, tag=tag), buf)

    # -- collectives ------------------------------------------------------
    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place allreduce of a contiguous CPU tensor."""
        if self._c is not None and self.size > 1:
            self._c.Allreduce(MPI.IN_PLACE, _buffer(t), op=getattr(MPI, _OPS[op]))
        return t

    def allreduce_scalar(self, x: float, op: str = "sum") -> float:
        if self._c is None or self.size == 1:
            return float(x)
        return float(self._c.allreduce(float(x), op=getattr(MPI, _OPS[op])))

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        if self._c is None or self.size == 1:
            return obj
        return self._c.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        if self._c is None or self.size == 1:
            return [obj]
        return self._c.allgather(obj)

    def node_size(self) -> int:
        """Ranks of this communicator on this rank's node (shared memory);
        collective. 1 for the serial stand-in."""
        if self._c is None or self.size == 1:
            return 1
        node = self._c.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return int(node.Get_size())
        finally:
            node.Free()

    def barrier(self) -> None:
        if self._c is not None:
            self._c.Barrier()

    def free(self) -> None:
        if self._c is not None and self._c != MPI.COMM_WORLD:
            self._c.Free()
            self._c = None


def world_size() -> int:
    """Number of processes in the whole job (1 without MPI)."""
    return 1 if MPI is None else MPI.COMM_WORLD.Get_size()


def _say(line: str) -> None:
    """Write one line to stderr in one system call (lines of different
    ranks never interleave)."""
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr
        pass
    try:
        os.write(2, (line.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def abort_job(code: int = 1) -> None:  # pragma: no cover - ends the process
    """End every rank of the job now, with exit code ``code``.

    With several ranks this is ``MPI_Abort``; MPICH's own "application
    called MPI_Abort" line is silenced (stderr goes to /dev/null first: the
    reason was printed already)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    if MPI is not None and MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        except OSError:
            pass
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


#: Seconds a rank other than 0 waits before it prints an error that every rank
#: may have raised (rank 0 prints it and ends the job first, if it can).
ROOT_GRACE_SECONDS = 1.5


@contextlib.contextmanager
def abort_on_exception(comm: Comm | None = None, *, prog: str = "mgrit-gru"):
    """Run a block; an exception on any rank ends the whole job with its message.

    With one process the exception propagates normally, so callers (and
    tests) can catch it. With several:

    * :class:`~mgrit_gru.errors.Stopped` and :class:`~mgrit_gru.errors.Diverged`
      propagate too: the training loop raises them on every rank at the same
      point (after agreeing on them), so every rank can end normally;
    * :class:`InputError` prints ``prog: error: msg`` once and ends the job
      with exit code 2: rank 0 prints (it raises most input errors together
      with every other rank); another rank prints only if the job is still
      alive :data:`ROOT_GRACE_SECONDS` later (it alone raised it);
    * ``KeyboardInterrupt`` (SIGINT: mpiexec forwards Ctrl-C to every rank)
      prints ``prog: interrupted`` once the same way, exit code 130;
    * anything else prints the failing rank's traceback, exit code 1.
    """
    from mgrit_gru.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, Diverged, Stopped

    try:
        yield
    except (SystemExit, Stopped, Diverged):
        raise
    except BaseException as exc:  # noqa: BLE001 - we re-raise or abort
        n = world_size()
        if n <= 1:
            raise
        rank = MPI.COMM_WORLD.Get_rank()
        if isinstance(exc, (InputError, KeyboardInterrupt)):
            if isinstance(exc, InputError):
                lines = str(exc).strip().splitlines() or ["error"]
                code, line = EXIT_INPUT, f"{prog}: error: {lines[0]}"
            else:
                code, line = EXIT_INTERRUPTED, f"{prog}: interrupted"
            if rank != 0:
                import time
                time.sleep(ROOT_GRACE_SECONDS)
                line = line.replace(f"{prog}:", f"{prog} (rank {rank}):", 1)
            _say(line)
            abort_job(code)
        _say(f"{prog}: error (rank {rank} of {n}): {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        _say(f"{prog}: aborting all {n} ranks")
        abort_job(EXIT_INTERNAL)
