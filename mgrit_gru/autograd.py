"""Parallel-in-time propagator: forward and adjoint solved by MGRIT.

The time points of a batch (``0..N``, ``N`` = the longest sequence of the
batch) are split over the ranks of a *time communicator*; each rank owns a
contiguous chunk and holds the hidden states of its chunk only.

* forward: :class:`GRUForwardStepper` (nonlinear; level ``l`` takes steps of
  ``dt = m**l`` and uses the input at each interval's end point), solved by
  FAS MGRIT from the zero initial guess;
* features: the pooled hidden states (last step of each sequence, or the mean
  over its steps) from the ranks that own them, one allreduce;
* backward: :class:`GRUAdjointStepper` solves the discrete adjoint
  ``lam_t = J_{t+1}^T lam_{t+1} + dL/dh_t`` in reversed time with the same
  solver: a *linear* stepper whose level-``l`` step is the vector-Jacobian
  product of the level-``l`` forward step, evaluated at the forward states;
  the loss gradient with respect to the hidden states enters as the
  right-hand side (wherever the sequences end, on whatever rank);
* parameter gradients: after the adjoint solve, every rank evaluates the
  parameter VJPs of its own fine steps in a few batched matmuls; the sums are
  allreduced over the time ranks, so every rank holds the same gradient.

With tight tolerances the result equals the serial propagator (tests); with
the defaults of the reference work (2 forward, 1 backward iteration) it is an
inexact but cheap gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mgrit_gru.cells import RecurrentCell, select_lin
from mgrit_gru.comm import Comm
from mgrit_gru.errors import InputError
from mgrit_gru.mgrit import MGRIT, MGRITSettings, SolveInfo
from mgrit_gru.model import _check_inputs, _flushing_denormals, _mean_weights, _param_names

__all__ = ["GRUAdjointStepper", "GRUForwardStepper", "MGRITOptions", "MGRITPropagator"]


@dataclass(frozen=True)
class MGRITOptions:
    """MGRIT settings of the propagator (defaults: the reference work's)."""

    levels: int = 3
    cfactor: int = 4
    fwd_iters: int = 2
    bwd_iters: int = 1
    fwd_tol: float = 0.0          # absolute; 0: run exactly fwd_iters
    bwd_tol: float = 0.0
    relax: str | Sequence[str] = ("F", "FCF")   # fine level F, coarse levels FCF
    skip_first_relax: bool = False
    cycle: str = "V"
    final_residual: bool = True   # the residual after the last iteration (N/m steps more)
    verbose: bool = False

    def settings(self, backward: bool) -> MGRITSettings:
        return MGRITSettings(
            levels=self.levels, cfactor=self.cfactor,
            max_iters=self.bwd_iters if backward else self.fwd_iters,
            abs_tol=self.bwd_tol if backward else self.fwd_tol,
            relax=self.relax if isinstance(self.relax, str) else tuple(self.relax),
            skip_first_relax=self.skip_first_relax, cycle=self.cycle,
            final_residual=self.final_residual, verbose=self.verbose,
        )


class GRUForwardStepper:
    """Forward steps of a cell on a rank's chunk.

    ``xw[i]`` is the input projection of input ``x[first_input + i]``; the step
    to fine point ``t`` reads input ``t - 1`` (the interval's end point).

    With ``hw`` (a ``[hi - lo, B, G*H]`` buffer for the rank's points ``lo..hi-1``)
    every fine step from an owned point writes its hidden projection
    ``h_t W_hh^T + b_hh`` there: the last sweep of a solve that ends with its
    final residual has then stepped from every owned point's final state except
    the last one (whose step belongs to the right neighbour), and the adjoint's
    linearisation reuses them instead of recomputing the GEMMs.
    """

    def __init__(self, cell: RecurrentCell, xw: Tensor, first_input: int, batch: int,
                 hw: Tensor | None = None, lo: int = 0):
        self.cell = cell
        self.xw = xw
        self.first_input = first_input
        self.state_shape = (batch, cell.state_size)
        self.dtype = xw.dtype
        self.hw, self.lo = hw, lo
        self.hw_written = torch.zeros(0 if hw is None else hw.shape[0], dtype=torch.bool)

    def step(self, u, t_from, t_to, level, out):
        hw_out = None
        if self.hw is not None and t_to - t_from == 1 and 0 <= t_from - self.lo < self.hw.shape[0]:
            hw_out = self.hw[t_from - self.lo]
            self.hw_written[t_from - self.lo] = True
        return self.cell.step(self.xw[t_to - 1 - self.first_input], u, float(t_to - t_from),
                              out=out, hw_out=hw_out)


class GRUAdjointStepper:
    """Adjoint steps in reversed time ``s = N - t``.

    The step from solver point ``s-k`` to ``s`` maps ``lam`` at forward point
    ``t + k`` to forward point ``t = N - s``: the transposed Jacobian of the
    forward step ``t -> t + k`` (``dt = k``, input ``t + k - 1``) at the forward
    state ``h_t``.  The owner of ``t`` computes it.  All linearisations are
    made once, before the solve, in chunks of ``chunk`` steps (a whole chunk in
    one call; small chunks keep the temporaries in cache), and reused by every
    iteration.  ``fine_chunks`` keeps the level-0 chunks ``(t0, t1, lin)``
    (steps ``t -> t+1``, ``t0 <= t < t1``) for the parameter gradients.
    """

    def __init__(self, cell: RecurrentCell, solver: MGRIT, states: Tensor, t_lo: int,
                 xw: Tensor, first_input: int, batch: int, chunk: int = 16,
                 hw: Tensor | None = None):
        self.cell = cell
        self.N = solver.N
        self.state_shape = (batch, cell.state_size)
        self.dtype = states.dtype
        self.lins: list[dict[int, tuple]] = []
        self.fine_chunks: list[tuple[int, int, tuple]] = []
        for level in solver.levels:
            rng = solver.partition.range(level.index, solver.position)
            k = level.stride
            # forward start points t of this rank's steps on this level, ascending
            ts = sorted(self.N - j * k for j in range(max(rng.lo, 1), rng.hi))
            lins: dict[int, tuple] = {}
            for c in range(0, len(ts), chunk):
                tc = ts[c:c + chunk]
                if k == 1:   # consecutive points: slices, no copies
                    t0, t1 = tc[0], tc[-1] + 1
                    lin = cell.linearize(xw[t0 - first_input:t1 - first_input],
                                         states[t0 - t_lo:t1 - t_lo], 1.0,
                                         hw=None if hw is None else hw[t0 - t_lo:t1 - t_lo])
                    self.fine_chunks.append((t0, t1, lin))
                else:
                    t = torch.tensor(tc, dtype=torch.long)
                    lin = cell.linearize(xw[t + k - 1 - first_input], states[t - t_lo], float(k))
                for i, t_i in enumerate(tc):
                    lins[self.N - t_i] = select_lin(lin, i)
            self.lins.append(lins)

    def step(self, u, s_from, s_to, level, out):
        return out.copy_(self.cell.vjp_state(self.lins[level][s_to], u))


class _MGRITFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prop, cell, x, lengths, steps, pooling, *params):
        comm: Comm = prop.comm
        B, H, N = x.shape[0], cell.hidden_size, steps
        lo, hi, first_input, x_tm, xw, h, hw = prop.solve_states(cell, x, steps)

        # features: this rank's share, summed over time ranks
        t_idx = torch.arange(lo, hi)
        feat = torch.zeros(B, H, dtype=x.dtype)
        if pooling == "last":
            mine = (lengths >= lo) & (lengths < hi)
            b = torch.nonzero(mine).flatten()
            feat[b] = h[lengths[b] - lo, b, :H]
        else:
            w = _mean_weights(lengths, N, h)   # w[t-1]: weight of point t = [t <= len] / len
            # hidden state at point t (t >= 1) is step t's output: weight index t - 1
            wt = torch.zeros(hi - lo, B, 1, dtype=x.dtype)
            pos = t_idx >= 1
            wt[pos] = w[t_idx[pos] - 1]
            feat = (h[:, :, :H] * wt).sum(0)
        comm.allreduce_(feat)
        ctx.prop, ctx.cell, ctx.pooling = prop, cell, pooling
        ctx.lengths, ctx.h, ctx.xw, ctx.x_tm, ctx.hw = lengths, h, xw, x_tm, hw
        ctx.lo, ctx.hi, ctx.N, ctx.first_input = lo, hi, N, first_input
        return feat

    @staticmethod
    def backward(ctx, g_feat):
        prop, cell = ctx.prop, ctx.cell
        comm: Comm = prop.comm
        lo, hi, N, first_input = ctx.lo, ctx.hi, ctx.N, ctx.first_input
        h, xw, x_tm, lengths = ctx.h, ctx.xw, ctx.x_tm, ctx.lengths
        B, S, H = h.shape[1], h.shape[2], cell.hidden_size
        g_feat = g_feat.detach()
        # loss gradient w.r.t. the states of this rank's points (the adjoint's sources)
        src = torch.zeros(hi - lo, B, S, dtype=h.dtype)
        if ctx.pooling == "last":
            mine = (lengths >= lo) & (lengths < hi)
            b = torch.nonzero(mine).flatten()
            src[lengths[b] - lo, b, :H] = g_feat[b]
        else:
            w = _mean_weights(lengths, N, h)
            t_idx = torch.arange(lo, hi)
            pos = t_idx >= 1
            src[pos, :, :H] = w[t_idx[pos] - 1] * g_feat
        bwd_solver = MGRIT(None, comm, N, prop.options.settings(True), reverse=True, log=prop.log)
        # adjoints decay through long sequences: float32 subnormals would make every step slow
        with torch.no_grad(), _flushing_denormals(h.dtype == torch.float32):
            adj = GRUAdjointStepper(cell, bwd_solver, h, lo, xw, first_input, B, hw=ctx.hw)
            bwd_solver.stepper = adj
            # solver rows run in reversed time: row k is forward point hi-1-k
            rhs = src.flip(0)
            u0 = rhs[0] if hi - 1 == N else None
            lam_rev, info = bwd_solver.solve(u0=u0, rhs=rhs)
            prop._record("bwd", info)
            lam = lam_rev.flip(0)                  # lam[t - lo], t = lo..hi-1
            # parameter VJPs of the steps t -> t+1 owned here need lam_{t+1}: get lam_hi
            lam_next = torch.empty(hi - lo, B, S, dtype=h.dtype)
            lam_next[:-1] = lam[1:]
            req = None
            if lo > 0:
                req = comm.isend(lam[0].contiguous(), comm.rank - 1, tag=900)
            if hi <= N:
                comm.recv(lam_next[-1], comm.rank + 1, tag=900)
            if req is not None:
                req.wait()
            # the steps t -> t+1 owned here (t = lo..min(hi, N)-1) were linearised
            # for the adjoint's fine level: reuse them
            grads = {name: torch.zeros_like(getattr(cell, name)) for name in _param_names(cell)}
            for t0, t1, lin in adj.fine_chunks:
                g_xw, g_hw = cell.vjp_proj(lin, lam_next[t0 - lo:t1 - lo])
                local = cell.param_grads(x_tm[t0 - first_input:t1 - first_input],
                                         h[t0 - lo:t1 - lo], g_xw, g_hw)
                for name in grads:
                    grads[name] += local[name]
            flat = torch.cat([grads[name].reshape(-1) for name in grads])
            comm.allreduce_(flat)
            out, offset = [], 0
            for name in grads:
                n = grads[name].numel()
                out.append(flat[offset:offset + n].view_as(grads[name]))
                offset += n
        ctx.h = ctx.xw = ctx.x_tm = ctx.hw = None
        return (None, None, None, None, None, None, *out)


class MGRITPropagator:
    """Propagator whose forward and backward are MGRIT solves across time ranks.

    Every rank of ``comm`` gets the same batch; each works on its chunk of
    time points.  ``last_stats`` holds the iterations and final residuals of
    the last forward and backward solve, ``last_info`` the full SolveInfos.
    """

    def __init__(self, comm: Comm | None = None, options: MGRITOptions | None = None, log=None):
        self.comm = comm or Comm.serial()
        self.options = options or MGRITOptions()
        self.options.settings(False)   # validate early
        self.log = log or print
        self.last_stats: dict[str, float] = {}
        self.last_info: dict[str, SolveInfo] = {}

    def _record(self, kind: str, info: SolveInfo) -> None:
        self.last_info[kind] = info
        self.last_stats[f"{kind}_iters"] = info.iterations
        self.last_stats[f"{kind}_residual"] = info.final_residual

    @torch.no_grad()
    def solve_states(self, cell: RecurrentCell, x: Tensor, steps: int | None = None):
        """Forward MGRIT solve of ``x [B, T, D]`` over ``steps`` (default T) intervals.

        Returns ``(lo, hi, first_input, x_tm, xw, h, hw)``: this rank owns fine
        points ``lo..hi-1`` and ``h [hi-lo, B, S]`` are their states; ``x_tm``/``xw``
        are the inputs (time-major) and input projections it read, from input
        ``first_input`` on (its chunk plus the halo its adjoint steps need);
        ``hw`` are the hidden projections of the final states (None when the
        solve did not end with a sweep from every final state).
        """
        N = x.shape[1] if steps is None else steps
        if self.comm.size > N:
            raise InputError(
                f"--time-ranks {self.comm.size} is more than the sequence length {N}: "
                f"use at most {N} time ranks")
        solver = MGRIT(None, self.comm, N, self.options.settings(False), log=self.log)
        lo, hi = solver.fine_range.lo, solver.fine_range.hi
        max_stride = solver.levels[-1].stride
        # inputs this rank reads: x[lo-1 .. hi-1) plus a halo for the adjoint's coarse steps
        first_input = max(lo - 1, 0)
        last_input = min(hi - 1 + max_stride, N)
        x_tm = x[:, first_input:last_input].transpose(0, 1).contiguous()
        xw = cell.input_projection(x_tm)
        B = x.shape[0]
        hw = torch.empty(hi - lo, B, cell.gates * cell.hidden_size, dtype=x.dtype)
        stepper = GRUForwardStepper(cell, xw, first_input, B, hw=hw, lo=lo)
        solver.stepper = stepper
        with _flushing_denormals(x.dtype == torch.float32):
            h, info = solver.solve()
        self._record("fwd", info)
        # valid only if the solve ended with its final residual (the sweep after
        # the last correction then stepped from every final state) and every
        # owned point but the last was stepped from
        if self.options.final_residual and bool(stepper.hw_written[:-1].all()):
            cell.hidden_projection(cell.hidden(h[-1]), out=hw[-1])
        else:
            hw = None
        return lo, hi, first_input, x_tm, xw, h, hw

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None, pooling: str = "last") -> Tensor:
        lengths, steps = _check_inputs(cell, x, lengths, pooling)
        params = [getattr(cell, name) for name in _param_names(cell)]
        return _MGRITFunction.apply(self, cell, x, lengths, steps, pooling, *params)

    def __repr__(self) -> str:
        o = self.options
        return (f"MGRITPropagator(P={self.comm.size}, levels={o.levels}, cfactor={o.cfactor}, "
                f"iters={o.fwd_iters}/{o.bwd_iters})")
