"""The communicator wrapper: the only module that imports mpi4py.

* :class:`Comm` wraps a *duplicated* MPI communicator (it never reaches for
  ``COMM_WORLD`` behind the caller's back, except to abort the whole job).
  ``Comm.serial()`` is a stand-in for one process that needs no MPI at all.
* Torch tensors travel as buffers (``tensor.numpy()`` views of contiguous CPU
  tensors, no pickling).  Small metadata (configs, checksums) may be pickled;
  scalars (:meth:`Comm.allreduce_scalar`) travel as one-element buffers, whose
  MPI call releases the GIL (worker threads call it).
* Tensors on a device (CUDA) are staged through reusable host buffers (pinned
  when CUDA is present), or passed to MPI directly when MPI is CUDA-aware:
  detected with mpi4py's ``MPI.Query_cuda_support()`` where mpi4py has it,
  overridden by the environment variable ``MGRIT_GRU_CUDA_AWARE=0|1``
  (:func:`cuda_aware_mpi`).  ``Comm(..., stage=True)`` forces the staging
  path for every tensor, CPU ones included (non-pinned buffers without CUDA),
  so that it can be tested without a GPU.
* What MPI cannot carry (a non-contiguous tensor, a dtype without an MPI
  type) is refused with one :class:`~mgrit_gru.errors.InputError` line.
* Every call can be recorded on a per-rank timeline: set ``comm.tracer`` to a
  :class:`~mgrit_gru.core.trace.Tracer` (default: the disabled
  :data:`~mgrit_gru.core.trace.NULL_TRACER`, which costs one attribute test
  per call).  Sends, receives, waits and collectives are recorded with their
  peer, bytes and tag (docs/performance.md, "MGRIT scaling").
* :func:`abort_on_exception` turns an exception on any rank into a clear
  message and an ``MPI_Abort`` of the whole job, so no rank is left waiting in
  a receive that will never come.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch

from mgrit_gru.core.trace import NULL_TRACER
from mgrit_gru.errors import InputError

try:  # mpi4py is a hard dependency, but the serial stand-in must work without it
    from mpi4py import MPI  # noqa: N811
except Exception:  # pragma: no cover - exercised only on broken installs
    MPI = None

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

#: The environment variable that overrides the detection of a CUDA-aware MPI.
CUDA_AWARE_ENV = "MGRIT_GRU_CUDA_AWARE"


def cuda_aware_mpi() -> bool:
    """Whether MPI can take CUDA device buffers directly.

    ``MGRIT_GRU_CUDA_AWARE=1`` (or ``0``) decides; otherwise mpi4py's
    ``MPI.Query_cuda_support()`` where this mpi4py and MPI have it, else
    False (device tensors are then staged through host buffers).
    """
    env = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    if env:
        if env in ("1", "true", "yes", "on"):
            return True
        if env in ("0", "false", "no", "off"):
            return False
        raise InputError(f"{CUDA_AWARE_ENV}={os.environ[CUDA_AWARE_ENV]!r}: expected 0 or 1")
    query = getattr(MPI, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:  # noqa: BLE001 - an MPI without the query
        return False


def _host_view(t: torch.Tensor):
    """The numpy view of a contiguous CPU tensor (what mpi4py takes as a buffer)."""
    try:
        return t.detach().numpy()
    except (TypeError, RuntimeError) as exc:
        raise InputError(f"a {t.dtype} tensor cannot travel over MPI ({exc})") from None


def _check(t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise InputError(f"MPI buffers must be contiguous tensors: got a non-contiguous "
                         f"{list(t.shape)} tensor (call .contiguous() first)")


class _HostPool:
    """Reusable host buffers for staging device tensors, per (dtype, size, pinned).

    A buffer is taken for one transfer and given back when it has completed
    (for a non-blocking one: at ``wait``).  Thread-safe.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, dtype: torch.dtype, n: int, pinned: bool) -> torch.Tensor:
        key = (dtype, n, pinned)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        # a host buffer on purpose (staging); pinned memory for fast device copies
        return torch.empty(n, dtype=dtype, device="cpu", pin_memory=pinned)

    def give(self, buf: torch.Tensor) -> None:
        key = (buf.dtype, buf.numel(), buf.is_pinned())
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < 8:
                free.append(buf)


class Request:
    """A pending non-blocking operation; keeps its buffer alive until waited on
    (and then runs its completion: a staged receive's copy to the device)."""

    __slots__ = ("_req", "_buf", "_done", "_trace")

    def __init__(self, req, buf, done: Callable[[], None] | None = None, trace=None):
        self._req, self._buf, self._done = req, buf, done
        self._trace = trace      # (tracer, request id) when traced

    def wait(self) -> None:
        if self._req is not None:
            if self._trace is None:
                self._req.Wait()
            else:
                tracer, rid = self._trace
                with tracer.comm("wait", request=rid):
                    self._req.Wait()
            done, self._req, self._buf, self._done = self._done, None, None, None
            if done is not None:
                done()


class Comm:
    """A (duplicated) communicator, or the serial stand-in when ``mpi_comm`` is None.

    ``stage=True`` sends every tensor through host staging buffers, CPU ones
    too (a test switch; by default only non-CPU tensors are staged, unless
    MPI is CUDA-aware).  ``cuda_aware``: None detects it (:func:`cuda_aware_mpi`).
    """

    def __init__(self, mpi_comm=None, *, stage: bool = False, cuda_aware: bool | None = None):
        self._c = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.stage = bool(stage)
        self._cuda_aware = cuda_aware
        self._pool = _HostPool()
        #: the timeline every call is recorded on (NULL_TRACER: none)
        self.tracer = NULL_TRACER

    @property
    def cuda_aware(self) -> bool:
        """Whether CUDA tensors go to MPI directly (detected once, on first use)."""
        if self._cuda_aware is None:
            self._cuda_aware = self._c is not None and cuda_aware_mpi()
        return self._cuda_aware

    # -- construction -----------------------------------------------------
    @classmethod
    def world(cls, *, stage: bool = False) -> "Comm":
        """A duplicate of ``MPI.COMM_WORLD`` (serial stand-in if MPI is absent)."""
        if MPI is None:
            return cls(None, stage=stage)
        return cls(MPI.COMM_WORLD.Dup(), stage=stage)

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
        """A sub-communicator (collective); it keeps this one's staging settings."""
        kw = {"stage": self.stage, "cuda_aware": self._cuda_aware}
        if self._c is None:
            return Comm(None, **kw)
        return Comm(self._c.Split(color, key), **kw)

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

    # -- buffers ----------------------------------------------------------
    def _direct(self, t: torch.Tensor) -> bool:
        """Whether ``t`` goes to MPI as it is (no staging)."""
        if self.stage:
            return False
        if t.device.type == "cpu":
            return True
        return t.device.type == "cuda" and self.cuda_aware

    def _outgoing(self, t: torch.Tensor):
        """``(MPI buffer, staging buffer or None)`` holding the values of ``t``."""
        _check(t)
        if self._direct(t):
            if t.device.type == "cpu":
                return _host_view(t), None
            torch.cuda.current_stream(t.device).synchronize()   # MPI knows no torch stream
            return t.detach(), None
        host = self._pool.take(t.dtype, t.numel(), t.device.type == "cuda")
        host.copy_(t.detach().view(-1))
        return _host_view(host), host

    def _incoming(self, out: torch.Tensor):
        """``(MPI buffer, completion)``: MPI writes the buffer, then ``completion()``
        (if not None) moves it into ``out``."""
        _check(out)
        if self._direct(out):
            if out.device.type == "cpu":
                return _host_view(out), None
            torch.cuda.current_stream(out.device).synchronize()
            return out.detach(), None
        host = self._pool.take(out.dtype, out.numel(), out.device.type == "cuda")

        def done():
            out.detach().view(-1).copy_(host)
            self._pool.give(host)
        return _host_view(host), done

    # -- point to point ---------------------------------------------------
    def send(self, t: torch.Tensor, dest: int, tag: int = 0) -> None:
        buf, host = self._outgoing(t)
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("send", dest, _nbytes(t), tag):
                self._c.Send(buf, dest=dest, tag=tag)
        else:
            self._c.Send(buf, dest=dest, tag=tag)
        if host is not None:
            self._pool.give(host)

    def recv(self, out: torch.Tensor, source: int, tag: int = 0) -> torch.Tensor:
        buf, done = self._incoming(out)
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("recv", source, _nbytes(out), tag):
                self._c.Recv(buf, source=source, tag=tag)
        else:
            self._c.Recv(buf, source=source, tag=tag)
        if done is not None:
            done()
        return out

    def isend(self, t: torch.Tensor, dest: int, tag: int = 0) -> Request:
        buf, host = self._outgoing(t)
        done = None if host is None else (lambda: self._pool.give(host))
        tracer = self.tracer
        if tracer.enabled:
            rid = tracer.request()
            with tracer.comm("isend", dest, _nbytes(t), tag, rid):
                req = self._c.Isend(buf, dest=dest, tag=tag)
            return Request(req, buf, done, (tracer, rid))
        return Request(self._c.Isend(buf, dest=dest, tag=tag), buf, done)

    def irecv(self, out: torch.Tensor, source: int, tag: int = 0) -> Request:
        buf, done = self._incoming(out)
        tracer = self.tracer
        if tracer.enabled:
            rid = tracer.request()
            with tracer.comm("irecv", source, _nbytes(out), tag, rid):
                req = self._c.Irecv(buf, source=source, tag=tag)
            return Request(req, buf, done, (tracer, rid))
        return Request(self._c.Irecv(buf, source=source, tag=tag), buf, done)

    # -- collectives ------------------------------------------------------
    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place allreduce of a contiguous tensor (on any device).

        With ``stage=True`` the MPI call runs even on one rank (so that the
        staging path can be tested)."""
        if self._c is None or (self.size == 1 and not self.stage):
            return t
        mpi_op = getattr(MPI, _OPS[op])
        buf, host = self._outgoing(t)
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("allreduce", nbytes=_nbytes(t)):
                self._c.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
        else:
            self._c.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
        if host is not None:
            t.detach().view(-1).copy_(host)
            self._pool.give(host)
        return t

    def allreduce_scalar(self, x: float, op: str = "sum") -> float:
        """Allreduce of one number as a float64 buffer (no pickling: the MPI call
        releases the GIL, so other threads run while this one waits)."""
        if self._c is None or self.size == 1:
            return float(x)
        buf = np.array([float(x)], dtype=np.float64)
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("allreduce", nbytes=8):
                self._c.Allreduce(MPI.IN_PLACE, buf, op=getattr(MPI, _OPS[op]))
        else:
            self._c.Allreduce(MPI.IN_PLACE, buf, op=getattr(MPI, _OPS[op]))
        return float(buf[0])

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        if self._c is None or self.size == 1:
            return obj
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("bcast", root, _pickled_size(obj) if self.rank == root else 0):
                return self._c.bcast(obj, root=root)
        return self._c.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        if self._c is None or self.size == 1:
            return [obj]
        tracer = self.tracer
        if tracer.enabled:
            with tracer.comm("allgather", nbytes=_pickled_size(obj)):
                return self._c.allgather(obj)
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
            tracer = self.tracer
            if tracer.enabled:
                with tracer.comm("barrier"):
                    self._c.Barrier()
            else:
                self._c.Barrier()

    def free(self) -> None:
        if self._c is not None and self._c != MPI.COMM_WORLD:
            self._c.Free()
            self._c = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pickled_size(obj: Any) -> int:
    """Bytes of a pickled object (what mpi4py sends for it; traced calls only)."""
    import pickle
    try:
        return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - an object mpi4py would refuse too
        return 0


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


#: Seconds between the last message and MPI_Abort (see :func:`abort_job`).
ABORT_FLUSH_SECONDS = 0.25


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
        # the launcher forwards our stderr asynchronously and MPI_Abort kills
        # its forwarders: give the reason just written time to get out
        time.sleep(ABORT_FLUSH_SECONDS)
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
                time.sleep(ROOT_GRACE_SECONDS)
                line = line.replace(f"{prog}:", f"{prog} (rank {rank}):", 1)
            _say(line)
            abort_job(code)
        _say(f"{prog}: error (rank {rank} of {n}): {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        _say(f"{prog}: aborting all {n} ranks")
        abort_job(EXIT_INTERNAL)
