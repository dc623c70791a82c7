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


def abort_job(code: int = 1) -> None:  # pragma: no cover - ends the process
    """End every rank of the job now."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


@contextlib.contextmanager
def abort_on_exception(comm: Comm | None = None, *, prog: str = "mgrit-gru"):
    """Run a block; an exception on any rank ends the whole job with its message.

    An :class:`InputError` prints ``prog: error: msg`` (exit code 2), anything
    else prints the traceback of the failing rank (exit code 1).  With one
    process the exception propagates normally, so callers (and tests) can
    catch it.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - we re-raise or abort
        n = world_size()
        if n <= 1:
            raise
        rank = MPI.COMM_WORLD.Get_rank()
        if isinstance(exc, InputError):
            print(f"{prog}: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
            abort_job(2)
        print(f"{prog}: error (rank {rank} of {n}): {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        print(f"{prog}: aborting all {n} ranks", file=sys.stderr, flush=True)
        abort_job(1)
