"""The time steppers of a recurrent cell for the MGRIT solver: forward steps
and the adjoint's transposed-Jacobian steps (any cell of ``models.cells``).

Both implement the protocol of ``mgrit_gru.core.stepper`` (``step`` with the
right-hand side, ``zeros``/``clone``, ``access``) and use only the cell API
(``input_projection``, ``hidden_projection``, ``step``, ``linearize``,
``vjp_state``, ``hidden``, ``state_size``, ``proj_size``).  Every tensor they
make follows the device and dtype of the input projections / states.
"""

from __future__ import annotations


import torch
from torch import Tensor

from mgrit_gru.core.grid import TimeGrid
from mgrit_gru.core.stepper import StepperBase
from mgrit_gru.models import kernels
from mgrit_gru.models.cells import RecurrentCell, select_lin

__all__ = ["CellAdjointStepper", "CellForwardStepper", "Inputs"]


class Inputs:
    """Input projections of the steps of a rank's chunk.

    ``xw[i]`` is the projection of input ``first + i``.  The fine step to point
    ``t`` reads input ``t - 1``; a coarse step over ``k`` intervals to point
    ``t`` reads input ``t - 1`` (``"end"``: the interval's end point) or the
    mean of the projections of inputs ``t - k .. t - 1`` (``"mean"``, from a
    float64 running sum: one subtraction per coarse step).
    """

    def __init__(self, xw: Tensor, first: int, mode: str = "end"):
        self.xw, self.first, self.mode = xw, first, mode
        self._cum = None
        self._level: dict[int, tuple[int, Tensor]] = {}
        if mode == "mean":
            cum = xw.new_zeros((xw.shape[0] + 1, *xw.shape[1:]), dtype=torch.float64)
            torch.cumsum(xw, 0, dtype=torch.float64, out=cum[1:])
            self._cum = cum

    def interval(self, t_to, k: int) -> Tensor:
        """Projection(s) for the step(s) ``t_to - k -> t_to`` (``t_to``: int or LongTensor)."""
        if k == 1 or self._cum is None:
            return self.xw[t_to - 1 - self.first]
        a = t_to - self.first
        return ((self._cum[a] - self._cum[a - k]) / k).to(self.xw.dtype)

    def at_multiple(self, t_to: int, k: int) -> Tensor:
        """:meth:`interval` for ``t_to`` a multiple of ``k``, the means of a level
        computed once (the forward's coarse steps end at multiples of their stride)."""
        if k == 1 or self._cum is None:
            return self.xw[t_to - 1 - self.first]
        entry = self._level.get(k)
        if entry is None:
            j0 = -(-(self.first + k) // k)
            j1 = (self.first + self.xw.shape[0]) // k
            ends = torch.arange(j0, max(j1 + 1, j0), device=self.xw.device) * k
            entry = self._level[k] = (j0, self.interval(ends, k))
        j0, means = entry
        return means[t_to // k - j0]


class CellForwardStepper(StepperBase):
    """Forward steps of a cell on a rank's chunk.

    ``xw[i]`` is the input projection of input ``x[first_input + i]``; the step
    to fine point ``t`` reads input ``t - 1`` (the interval's end point).

    With ``hw`` (a ``[hi - lo, B, proj_size]`` buffer for the rank's points
    ``lo..hi-1``) every fine step from an owned point writes its hidden
    projection ``hw_t`` (``h_t W_hh^T + b_hh`` for one cell) there, and at the
    end of the solve :meth:`access` recomputes, in one batched call of
    ``cell.hidden_projection``, the rows whose last fine step did not use the
    final state (the solver's ``fresh`` flags): ``hw`` then holds exactly the
    hidden projections of the final states, which the adjoint's linearisation
    reuses instead of recomputing the GEMMs.  (``hw_exact`` says it has.)
    """

    def __init__(self, cell: RecurrentCell, xw: Tensor, first_input: int, batch: int,
                 hw: Tensor | None = None, lo: int = 0, inputs: Inputs | None = None):
        self.cell = cell
        self.xw = xw
        self.first_input = first_input
        self.inputs = inputs or Inputs(xw, first_input)
        self.state_shape = (batch, cell.state_size)
        self.dtype = xw.dtype
        self.device = xw.device
        self.hw, self.lo = hw, lo
        self.hw_exact = False
        self.kind = kernels.kind_of(cell, xw)       # fused C++ step, or None: torch path

    def step(self, u, t_from, t_to, level, rhs=None, *, out):
        k = t_to - t_from
        hw_out = None
        if self.hw is not None and k == 1 and 0 <= t_from - self.lo < self.hw.shape[0]:
            hw_out = self.hw[t_from - self.lo]
        xw = self.inputs.at_multiple(t_to, k)
        if self.kind is not None:
            cell = self.cell
            return kernels.step(self.kind, xw, u, cell.weight_hh, cell.bias_hh, float(k), out,
                                hw_out, rhs)
        self.cell.step(xw, u, float(k), out=out, hw_out=hw_out)
        if rhs is not None:
            out += rhs
        return out

    def access(self, u: Tensor, first: int, fresh: bytes) -> None:
        """Recompute the hidden projections of the rows whose last step was stale."""
        self.hw_exact = False
        hw = self.hw
        if hw is None:
            return
        if first != self.lo or u.shape[0] != hw.shape[0]:
            raise ValueError(f"access: rows {first}..{first + u.shape[0] - 1} are not the "
                             f"stepper's {self.lo}..{self.lo + hw.shape[0] - 1}")
        stale = [k for k, f in enumerate(fresh) if not f]
        if stale:
            cell = self.cell
            a, b = stale[0], stale[-1] + 1
            if b - a == len(stale):          # one contiguous run (often just the last row)
                cell.hidden_projection(cell.hidden(u[a:b]), out=hw[a:b])
            else:
                # stale rows are index bookkeeping: the list is on the host, the index on u's device
                rows = torch.tensor(stale, dtype=torch.long, device=u.device)
                hw.index_copy_(0, rows, cell.hidden_projection(cell.hidden(u.index_select(0, rows))))
        self.hw_exact = True


class CellAdjointStepper(StepperBase):
    """Adjoint steps in reversed time ``s = N - t``.

    The step from solver point ``s-k`` to ``s`` maps ``lam`` at forward point
    ``t + k`` to forward point ``t = N - s``: the transposed Jacobian of the
    forward step ``t -> t + k`` (``dt = k``, input ``t + k - 1``) at the forward
    state ``h_t``.  The owner of ``t`` computes it.  All linearisations are
    made once, before the solve, in chunks of ``chunk`` steps (a whole chunk in
    one call; small chunks keep the temporaries in cache), and reused by every
    iteration.  ``fine_chunks`` keeps the level-0 chunks ``(t0, t1, lin)``
    (steps ``t -> t+1``, ``t0 <= t < t1``) for the parameter gradients.

    ``grid`` is the reversed :class:`~mgrit_gru.core.grid.TimeGrid` of the
    adjoint solve (``MGRIT.make_grid(..., reverse=True)``), made before the
    stepper and given to the solver as well.  A step with a right-hand side
    starts from it and accumulates the vector-Jacobian product into it.
    """

    def __init__(self, cell: RecurrentCell, grid: TimeGrid, states: Tensor, t_lo: int,
                 xw: Tensor, first_input: int, batch: int, chunk: int = 16,
                 hw: Tensor | None = None, inputs: Inputs | None = None):
        if not grid.reverse:
            raise ValueError("the adjoint stepper needs a grid in reversed time")
        inputs = inputs or Inputs(xw, first_input)
        self.cell = cell
        self.N = grid.n_intervals
        self.state_shape = (batch, cell.state_size)
        self.dtype = states.dtype
        self.device = states.device
        self.lins: list[dict[int, tuple]] = []
        self.fine_chunks: list[tuple[int, int, tuple]] = []
        self.kind = kernels.kind_of(cell, states)   # fused C++ VJP, or None: torch path

        def linearize(xw_, s_, dt, hw_):
            # the GRUs' linearisation in one fused pass when the kernels run the cell
            if self.kind is not None and hw_ is not None:
                lin = kernels.linearize(self.kind, xw_, hw_, s_, cell.weight_hh, dt)
                if lin is not None:
                    return lin
            return cell.linearize(xw_, s_, dt, hw=hw_)
        for level in grid.levels:
            rng = grid.range(level.index)
            k = level.stride
            # forward start points t of this rank's steps on this level, ascending
            ts = sorted(self.N - j * k for j in range(max(rng.lo, 1), rng.hi))
            lins: dict[int, tuple] = {}
            for c in range(0, len(ts), chunk):
                tc = ts[c:c + chunk]
                if k == 1:   # consecutive points: slices, no copies
                    t0, t1 = tc[0], tc[-1] + 1
                    lin = linearize(xw[t0 - first_input:t1 - first_input],
                                    states[t0 - t_lo:t1 - t_lo], 1.0,
                                    None if hw is None else hw[t0 - t_lo:t1 - t_lo])
                    self.fine_chunks.append((t0, t1, lin))
                else:
                    t = torch.tensor(tc, dtype=torch.long, device=states.device)
                    # a coarse step from point t reads h_t: its hidden projection is
                    # the fine one of point t (no GEMM)
                    lin = linearize(inputs.interval(t + k, k), states[t - t_lo], float(k),
                                    None if hw is None else hw[t - t_lo])
                for i, t_i in enumerate(tc):
                    lins[self.N - t_i] = select_lin(lin, i)
            self.lins.append(lins)

    def step(self, u, s_from, s_to, level, rhs=None, *, out):
        lin = self.lins[level][s_to]
        if self.kind is not None:
            return kernels.vjp_lin(self.kind, lin, u, self.cell.weight_hh, out, rhs)
        if rhs is None:
            return out.copy_(self.cell.vjp_state(lin, u))
        out.copy_(rhs)
        self.cell.vjp_state(lin, u, acc=out)
        return out


