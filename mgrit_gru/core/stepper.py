"""The time-stepper protocol between the MGRIT solver and a model.

The solver (``mgrit.py``) never sees a GRU.  It solves

    u_0 = u0,        u_i = Phi_l(u_{i-1}) + g_i     (i = 1 .. n_l - 1)

on every level ``l`` of a time grid, where ``Phi_l`` is supplied by a
:class:`TimeStepper`.  States are torch tensors of one fixed shape; the
solver does the vector arithmetic (clone, add, sub, norm) with torch itself.

A stepper provides:

``step(u, t_from, t_to, level, out)``
    advance ``u`` from fine point ``t_from`` to fine point ``t_to``
    (``t_to - t_from`` fine intervals: 1 on level 0, ``m**l`` on level ``l``)
    and write the result into ``out`` (a different tensor of the same shape);
    return ``out``.
``state_shape``, ``dtype``
    shape and dtype of one state.

A tiny reference stepper, :class:`DahlquistStepper`, solves ``u' = lam u``
with backward Euler; its sequential solution is known in closed form, which
makes the solver testable without any neural network.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TimeStepper(Protocol):
    state_shape: tuple[int, ...]
    dtype: torch.dtype

    def step(self, u: torch.Tensor, t_from: int, t_to: int, level: int, out: torch.Tensor) -> torch.Tensor:
        ...


class DahlquistStepper:
    """Backward Euler for ``u' = lam * u`` with fine step ``dt``.

    One step over ``k`` fine intervals is ``u / (1 - lam * k * dt)``.  ``lam``
    may be a tensor of the state's shape (a diagonal linear system); states
    have shape ``state_shape``.
    """

    def __init__(self, lam, dt: float = 1.0, state_shape=(1,), dtype=torch.float64):
        self.state_shape = tuple(state_shape)
        self.dtype = dtype
        self.lam = torch.as_tensor(lam, dtype=dtype).expand(self.state_shape).clone()
        self.dt = float(dt)

    def factor(self, k: int) -> torch.Tensor:
        return 1.0 / (1.0 - self.lam * (k * self.dt))

    def step(self, u, t_from, t_to, level, out):
        return torch.mul(u, self.factor(t_to - t_from), out=out)

    def sequential(self, u0: torch.Tensor, n: int, rhs: torch.Tensor | None = None) -> torch.Tensor:
        """The fine-grid solution at all points ``0..n`` by the plain loop (the truth)."""
        u = torch.empty((n + 1, *self.state_shape), dtype=self.dtype)
        u[0] = u0
        f = self.factor(1)
        for i in range(1, n + 1):
            u[i] = u[i - 1] * f
            if rhs is not None:
                u[i] += rhs[i]
        return u
