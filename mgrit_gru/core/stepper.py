"""The time-stepper protocol between the MGRIT solver and a model.

The solver (``mgrit_gru.core.solver``) never sees a GRU.  It solves

    u_0 = u0,        u_i = Phi_l(u_{i-1}) + g_i     (i = 1 .. n_l - 1)

on every level ``l`` of a time grid, where ``Phi_l`` is supplied by a
:class:`TimeStepper`, in the spirit of XBraid's callbacks (``step``,
``init``/``clone``, ``access``).  States are torch tensors of one fixed shape
on one device; the solver does the vector arithmetic (add, sub, norm) with
torch itself, on whatever device the stepper's states live.

A stepper provides:

``state_shape``, ``dtype``, ``device``
    shape, dtype and device of one state.
``step(u, t_from, t_to, level, rhs=None, *, out) -> out``
    ``out = Phi_level(u) + rhs``: advance ``u`` from fine point ``t_from``
    to fine point ``t_to`` (``t_to - t_from`` fine intervals: 1 on level 0,
    ``m**l`` on level ``l``; in solver indices, i.e. reversed time for a
    reversed solve), add the right-hand side ``rhs`` (a state, or None for
    zero) and write the result into ``out`` (a different tensor of the same
    shape); return ``out``.  The right-hand side is the stepper's to add, as
    XBraid's ``step`` receives ``fstop``: a stepper may fuse it (the adjoint
    starts from it and accumulates its vector-Jacobian product into it).
    ``u`` and ``rhs`` are never ``out``.
``zeros(*leading) -> Tensor``
    a zero tensor ``[*leading, *state_shape]`` on the stepper's device and
    dtype: every tensor the solver holds is allocated through it (or is a
    ``new_*``/``*_like`` of one), so the solver follows the stepper's device.
``clone(u) -> Tensor``
    a deep copy of a state (or a stack of states).
``access(u, first, fresh)`` (optional)
    called once at the end of every solve with this rank's final fine
    values ``u [n, *state_shape]`` (row ``k`` is solver point ``first + k``)
    and ``fresh``, a ``bytes`` of length ``n``: ``fresh[k]`` is 1 when the
    last fine step the solver took from row ``k`` used row ``k``'s final
    value (no sweep, relaxation, correction or guess wrote row ``k`` after
    that step), 0 otherwise (never stepped from here, e.g. this rank's last
    point, whose step is the right neighbour's).  A stepper that keeps
    by-products of its fine steps (the forward's hidden projections) knows
    from it which of them are exact and which it must recompute.  The flags
    are host-side bookkeeping of the solver, no tensor.

:class:`StepperBase` implements ``zeros``, ``clone`` and a no-op ``access``
from ``state_shape``, ``dtype`` and ``device``.

A tiny reference stepper, :class:`DahlquistStepper`, solves ``u' = lam u``
with backward Euler; its sequential solution is known in closed form, which
makes the solver testable without any neural network.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DahlquistStepper", "StepperBase", "TimeStepper"]


@runtime_checkable
class TimeStepper(Protocol):
    state_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def step(self, u: torch.Tensor, t_from: int, t_to: int, level: int,
             rhs: torch.Tensor | None = None, *, out: torch.Tensor) -> torch.Tensor:
        ...

    def zeros(self, *leading: int) -> torch.Tensor:
        ...

    def clone(self, u: torch.Tensor) -> torch.Tensor:
        ...


class StepperBase:
    """Allocation and a no-op access hook from ``state_shape``, ``dtype``, ``device``.

    Subclasses set the three attributes and implement :meth:`step`.
    """

    state_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")

    def zeros(self, *leading: int) -> torch.Tensor:
        return torch.zeros((*leading, *self.state_shape), dtype=self.dtype, device=self.device)

    def clone(self, u: torch.Tensor) -> torch.Tensor:
        return u.clone()

    def access(self, u: torch.Tensor, first: int, fresh: bytes) -> None:
        return None

    def step(self, u, t_from, t_to, level, rhs=None, *, out):  # pragma: no cover - abstract
        raise NotImplementedError


class DahlquistStepper(StepperBase):
    """Backward Euler for ``u' = lam * u`` with fine step ``dt``.

    One step over ``k`` fine intervals is ``u / (1 - lam * k * dt)``.  ``lam``
    may be a tensor of the state's shape (a diagonal linear system); states
    have shape ``state_shape`` and live on ``device``.
    """

    def __init__(self, lam, dt: float = 1.0, state_shape=(1,), dtype=torch.float64, device=None):
        self.state_shape = tuple(state_shape)
        self.dtype = dtype
        self.device = torch.device("cpu" if device is None else device)
        self.lam = torch.as_tensor(lam, dtype=dtype, device=self.device).expand(
            self.state_shape).clone()
        self.dt = float(dt)
        self._factors: dict[int, torch.Tensor] = {}

    def factor(self, k: int) -> torch.Tensor:
        f = self._factors.get(k)
        if f is None:
            f = self._factors[k] = 1.0 / (1.0 - self.lam * (k * self.dt))
        return f

    def step(self, u, t_from, t_to, level, rhs=None, *, out):
        torch.mul(u, self.factor(t_to - t_from), out=out)
        if rhs is not None:
            out += rhs
        return out

    def sequential(self, u0: torch.Tensor, n: int, rhs: torch.Tensor | None = None) -> torch.Tensor:
        """The fine-grid solution at all points ``0..n`` by the plain loop (the truth)."""
        u = self.zeros(n + 1)
        u[0] = u0
        f = self.factor(1)
        for i in range(1, n + 1):
            u[i] = u[i - 1] * f
            if rhs is not None:
                u[i] += rhs[i]
        return u
