"""The solver's programs for any number of ranks, without computing anything.

A *skeleton* run executes the real :class:`~mgrit_gru.core.solver.MGRIT` code
of one rank ``r`` of ``P`` with a stepper whose states are one number and
whose steps only count themselves, and a communicator that records every
call instead of making it (a receive returns whatever its buffer holds: no
value decides the control flow of a solve with a fixed iteration count).
What comes out is rank ``r``'s program for :func:`mgrit_gru.core.replay.replay`:
its communication calls in order, with the real peers, tags and message
sizes, and between them compute segments of ``sum over levels (steps on level
l) x cost[l]`` seconds.  With per-step costs measured in a trace, this
projects a traced run to ranks and lengths that were not traced; the
communication pattern is the solver's own, whatever it is.

Only :class:`~mgrit_gru.core.solver.MGRIT`'s use of the communicator is
recorded; what happens around a solve (the MGRIT propagator's projections,
allreduces, parameter gradients) is added by the caller with
:meth:`Skeleton.compute` and the recording communicator's methods.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mgrit_gru.core.replay import Op
from mgrit_gru.core.stepper import StepperBase
from mgrit_gru.core.trace import NULL_TRACER

__all__ = ["Skeleton", "SkeletonComm", "SkeletonStepper"]


class Skeleton:
    """The program of one rank under construction: ops, and the steps since
    the last call (``costs[level]`` seconds each, set per solve)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.costs: Sequence[float] = ()
        self.pending = 0.0
        self.steps: dict[int, int] = {}
        #: seconds of compute per level (steps) and under ``"other"`` (:meth:`compute`)
        self.seconds: dict[int | str, float] = {}
        self._req = 0

    def step(self, level: int) -> None:
        self.steps[level] = self.steps.get(level, 0) + 1
        cost = self.costs[min(level, len(self.costs) - 1)] if self.costs else 0.0
        self.seconds[level] = self.seconds.get(level, 0.0) + cost
        self.pending += cost

    def compute(self, seconds: float, what: str = "other") -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + seconds
        self.pending += seconds

    def flush(self) -> None:
        if self.pending > 0:
            self.ops.append(Op("compute", seconds=self.pending))
        self.pending = 0.0

    def call(self, kind: str, **kw: Any) -> None:
        self.flush()
        self.ops.append(Op(kind, **kw))

    def mark(self, name: str) -> None:
        self.call("mark", name=name)

    def request(self) -> int:
        self._req += 1
        return self._req


class _Request:
    def __init__(self, sk: Skeleton, rid: int):
        self.sk, self.rid = sk, rid

    def wait(self) -> None:
        self.sk.call("wait", request=self.rid)


class SkeletonComm:
    """Rank ``rank`` of ``size``: records each call in ``skeleton``; tensors
    travel as ``state_bytes`` per state row (the real state's size)."""

    tracer = NULL_TRACER

    def __init__(self, rank: int, size: int, skeleton: Skeleton, state_bytes: int):
        self.rank, self.size, self.sk, self.state_bytes = rank, size, skeleton, int(state_bytes)

    is_root = property(lambda self: self.rank == 0)

    def _bytes(self, t: torch.Tensor) -> int:
        """A tensor of skeleton states (float32, last dimension 1) travels as that
        many real states; anything else (e.g. float64 norms) as itself."""
        if t.dtype == SkeletonStepper.DTYPE and t.dim() and t.shape[-1] == 1:
            return max(t.numel(), 1) * self.state_bytes
        return t.numel() * t.element_size()

    def send(self, t, dest, tag=0):
        self.sk.call("send", peer=dest, nbytes=self._bytes(t), tag=tag)

    def recv(self, out, source, tag=0):
        self.sk.call("recv", peer=source, nbytes=self._bytes(out), tag=tag)
        return out

    def isend(self, t, dest, tag=0):
        rid = self.sk.request()
        self.sk.call("isend", peer=dest, nbytes=self._bytes(t), tag=tag, request=rid)
        return _Request(self.sk, rid)

    def irecv(self, out, source, tag=0):
        rid = self.sk.request()
        self.sk.call("irecv", peer=source, nbytes=self._bytes(out), tag=tag, request=rid)
        return _Request(self.sk, rid)

    def allreduce_(self, t, op="sum", nbytes: int | None = None):
        if self.size > 1:
            self.sk.call("allreduce", nbytes=self._bytes(t) if nbytes is None else nbytes)
        return t

    def allreduce_scalar(self, x, op="sum"):
        if self.size > 1:
            self.sk.call("allreduce", nbytes=8)
        return float(x)

    def barrier(self):
        if self.size > 1:
            self.sk.call("barrier")

    def bcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj] * self.size


class SkeletonStepper(StepperBase):
    """States of one float; a step counts itself on ``skeleton`` and copies its input."""

    DTYPE = torch.float32

    def __init__(self, skeleton: Skeleton):
        self.sk = skeleton
        self.state_shape = (1,)
        self.dtype = self.DTYPE
        self.device = torch.device("cpu")

    def step(self, u, t_from, t_to, level, rhs=None, *, out):
        self.sk.step(level)
        out.copy_(u)
        return out
