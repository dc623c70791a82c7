"""Parallel-in-time propagator: forward and adjoint solved by MGRIT.

The time points of a batch (``0..N``, ``N`` = the longest sequence of the
batch) are split over the ranks of a *time communicator*; each rank owns a
contiguous chunk and holds the hidden states of its chunk only.

* forward: :class:`CellForwardStepper` (nonlinear; level ``l`` takes steps of
  ``dt = m**l`` and uses the input at each interval's end point), solved by
  FAS MGRIT from the zero initial guess;
* features: the pooled hidden states (last step of each sequence, or the mean
  over its steps) from the ranks that own them, one allreduce;
* backward: :class:`CellAdjointStepper` solves the discrete adjoint
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

Warm starts (``MGRITOptions.warm_start``): the training loop names the
sequences of each batch (:meth:`MGRITPropagator.set_sample_ids`); the final
forward states and adjoints of each sequence at this rank's level-1 points
(every ``m``-th point: all an initial F-sweep reads) are kept and are the
initial guess of that sequence's solves in the next epoch.  A batch shorter
than the number of time ranks is computed by the serial recurrence on every
rank (``last_stats["serial_fallback"]``).

Devices: every tensor follows the device and dtype of ``x`` (which must be
the cell's); the communicator stages device tensors through host buffers (or
passes them to a CUDA-aware MPI).  Warm starts are kept on that device too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mgrit_gru.core.comm import Comm
from mgrit_gru.core.solver import MGRIT, MGRITSettings, SolveInfo, SolverWorkspace
from mgrit_gru.errors import InputError
from mgrit_gru.models.cells import RecurrentCell
from mgrit_gru.models.common import (as_pooling, bound_params, check_inputs, flushing_denormals,
                                     param_names, project_inputs)
from mgrit_gru.models import kernels
from mgrit_gru.models.serial import SerialPropagator
from mgrit_gru.models.steppers import CellAdjointStepper, CellForwardStepper, Inputs

__all__ = ["MGRITOptions", "MGRITPropagator", "WarmStarts"]

COARSE_INPUTS = ("end", "mean")


@dataclass(frozen=True)
class MGRITOptions:
    """MGRIT settings of the propagator (defaults: the reference work's)."""

    levels: int = 3
    cfactor: int = 4
    fwd_iters: int = 2
    bwd_iters: int = 1
    fwd_tol: float = 0.0          # absolute; 0: run exactly fwd_iters
    bwd_tol: float = 0.0
    fwd_rtol: float = 0.0         # relative to the first residual; 0: off
    bwd_rtol: float = 0.0
    relax: str | Sequence[str] = ("F", "FCF")   # fine level F, coarse levels FCF
    bwd_relax: str | Sequence[str] | None = None   # the adjoint's; None: as relax
    skip_first_relax: bool = False
    cycle: str = "V"
    nested: bool = False          # nested iteration (full multigrid initial guess)
    bwd_nested: bool | None = None  # the adjoint's; None: as nested
    warm_start: bool = False      # initial guesses from the previous epoch's solutions
    warm_start_mb: float = 1024.0  # cap of the warm-start store per rank (MB)
    coarse_input: str = "end"     # input of a coarse step: "end" point or "mean" of the interval
    final_residual: bool = True   # the residual after the last iteration (N/m steps more)
    verbose: bool = False

    def __post_init__(self):
        if self.coarse_input not in COARSE_INPUTS:
            raise InputError(f"coarse_input must be one of {', '.join(COARSE_INPUTS)}, "
                             f"got {self.coarse_input!r}")
        if not self.warm_start_mb >= 0:
            raise InputError(f"warm_start_mb must be >= 0, got {self.warm_start_mb}")

    def settings(self, backward: bool) -> MGRITSettings:
        return MGRITSettings(
            levels=self.levels, cfactor=self.cfactor,
            max_iters=self.bwd_iters if backward else self.fwd_iters,
            abs_tol=self.bwd_tol if backward else self.fwd_tol,
            rel_tol=self.bwd_rtol if backward else self.fwd_rtol,
            relax=_relax_value(self.bwd_relax if backward and self.bwd_relax is not None
                               else self.relax),
            skip_first_relax=self.skip_first_relax, cycle=self.cycle,
            nested=self.bwd_nested if backward and self.bwd_nested is not None else self.nested,
            final_residual=self.final_residual, verbose=self.verbose,
        )


def _relax_value(relax) -> str | tuple[str, ...]:
    return relax if isinstance(relax, str) else tuple(relax)


class WarmStarts:
    """Per-rank store of each training sequence's last solution at this rank's
    level-1 points (an initial guess for its next solves).

    Entries are keyed by ``(kind, sequence id)`` and hold ``(first, n_total,
    values [n, S])``: the values at solver points ``first, first + m, ...``
    of a solve over ``n_total`` intervals.  Forward guesses are used where the
    points overlap (the states at a time do not depend on the padded length);
    adjoint guesses only for the same ``n_total`` (their solver index counts
    from the end).  At most ``limit_bytes`` are kept: sequences beyond that
    start cold (``dropped`` counts them).
    """

    def __init__(self, limit_bytes: float):
        self.limit = float(limit_bytes)
        self.bytes = 0
        self.dropped = 0
        self._entries: dict[tuple[str, int], tuple[int, int, Tensor]] = {}
        self.sources: dict[int, Tensor] = {}   # feature gradient of each kept adjoint

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def guess(self, kind: str, ids, first: int, m: int, n_total: int, shape, dtype, device=None):
        """``(guess [n, B, S], mask [n, B, 1])`` for the sequences ``ids``, or ``(None, None)``
        (on ``device``)."""
        n, B = shape[0], shape[1]
        guess = mask = None
        for b, key in enumerate(ids):
            entry = self._entries.get((kind, int(key)))
            if entry is None:
                continue
            f0, n0, vals = entry
            if kind != "fwd" and n0 != n_total:
                continue
            a, z = max(first, f0), min(first + m * n, f0 + m * vals.shape[0])
            if a >= z:
                continue
            if guess is None:
                guess = torch.zeros(shape, dtype=dtype, device=device)
                mask = torch.zeros((n, B, 1), dtype=torch.bool, device=device)
            rows = slice((a - first) // m, (z - first) // m)
            guess[rows, b] = vals[(a - f0) // m:(z - f0) // m]
            mask[rows, b] = True
        return guess, mask

    def store(self, kind: str, ids, first: int, n_total: int, values: Tensor) -> None:
        """Keep ``values [n, B, S]`` (this rank's level-1 points) of the sequences ``ids``."""
        for b, key in enumerate(ids):
            k = (kind, int(key))
            old = self._entries.get(k)
            size = values[:, b].numel() * values.element_size()
            have = 0 if old is None else old[2].numel() * old[2].element_size()
            if self.bytes - have + size > self.limit:
                self.dropped += old is None
                continue
            if old is not None and old[2].shape == values[:, b].shape:
                old[2].copy_(values[:, b])
                self._entries[k] = (first, n_total, old[2])
            else:
                self._entries[k] = (first, n_total, values[:, b].clone())
            self.bytes += size - have


class _MGRITFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prop, cell, x, lengths, steps, pooling, ids, *params):
        comm: Comm = prop.comm
        B, H, N = x.shape[0], cell.hidden_size, steps
        with comm.tracer.phase("fwd"):
            lo, hi, first_input, x_tm, xw, h, hw, inputs = prop._solve(cell, x, steps, ids)

        # features: this rank's share, summed over time ranks; the forward's step
        # count rides along in the same allreduce
        buf = x.new_zeros(B * H + 1)
        feat = buf[:-1].view(B, H)
        as_pooling(pooling).features(cell.hidden(h), lengths, lo, out=feat)
        buf[-1] = sum(prop.last_info["fwd"].steps)
        comm.allreduce_(buf)
        prop.last_stats["fwd_steps"] = float(buf[-1])
        ctx.save_for_backward(x, *params)
        ctx.prop, ctx.cell, ctx.pooling, ctx.ids = prop, cell, pooling, ids
        ctx.lengths, ctx.h, ctx.xw, ctx.x_tm, ctx.hw, ctx.inputs = lengths, h, xw, x_tm, hw, inputs
        ctx.lo, ctx.hi, ctx.N, ctx.first_input = lo, hi, N, first_input
        return feat.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_feat):
        prop, cell = ctx.prop, ctx.cell
        comm: Comm = prop.comm
        x, *params = ctx.saved_tensors
        names = param_names(cell)
        lo, hi, N, first_input = ctx.lo, ctx.hi, ctx.N, ctx.first_input
        h, xw, x_tm, lengths = ctx.h, ctx.xw, ctx.x_tm, ctx.lengths
        B, S = h.shape[1], h.shape[2]
        g_feat = g_feat.detach()
        # loss gradient w.r.t. the states of this rank's points (the adjoint's sources)
        src = h.new_zeros(hi - lo, B, S)
        as_pooling(ctx.pooling).sources(g_feat, lengths, lo, out=cell.hidden(src))
        settings = prop.options.settings(True)
        grid = MGRIT.make_grid(comm, N, settings, reverse=True)
        # the parameters of the forward, whatever the cell holds now; adjoints decay
        # through long sequences: float32 subnormals would make every step slow
        with torch.no_grad(), bound_params(cell, dict(zip(names, params))), \
                flushing_denormals(h.dtype == torch.float32):
            with comm.tracer.phase("adjoint_linearise"):
                adj = CellAdjointStepper(cell, grid, h, lo, xw, first_input, B, hw=ctx.hw,
                                         inputs=ctx.inputs)
            bwd_solver = MGRIT(adj, comm, grid, settings, log=prop.log,
                               workspace=prop._workspaces["bwd"])
            # solver rows run in reversed time: row k is forward point hi-1-k
            rhs = src.flip(0)
            u0 = rhs[0] if hi - 1 == N else None
            guess, mask = prop._guess("bwd", ctx.ids, bwd_solver, N, (B, S), h.dtype, g_feat)
            with comm.tracer.phase("bwd"):
                lam_rev, info = bwd_solver.solve(u0=u0, rhs=rhs, guess_c=guess, guess_mask=mask)
            prop._record("bwd", info)
            prop._keep("bwd", ctx.ids, bwd_solver, N, lam_rev, g_feat)
            # parameter VJPs of the steps t -> t+1 owned here need lam_{t+1}, in
            # forward order: lam_next[k] = lam at point lo+k+1 = lam_rev[n-2-k] (one
            # copy); lam at forward point hi is the solver point just before this
            # rank's first one
            n = hi - lo
            lam_next = h.new_empty(n, B, S)
            if n > 1:
                torch.index_select(lam_rev[:n - 1], 0,
                                   torch.arange(n - 2, -1, -1, device=h.device),
                                   out=lam_next[:-1])
            bwd_solver.halo(lam_rev, lam_next[-1])
            # the steps t -> t+1 owned here (t = lo..min(hi, N)-1) were linearised
            # for the adjoint's fine level: reuse them.  One buffer for the
            # allreduce: parameter gradients, the input gradient (if wanted) and
            # the adjoint's step count
            shapes = [p.shape for p in params]
            n_par = sum(p.numel() for p in params)
            want_x = ctx.needs_input_grad[2]
            n_x = x.numel() if want_x else 0
            flat = h.new_zeros(n_par + n_x + 1)
            views, offset = [], 0
            for shape in shapes:
                n = math.prod(shape)
                views.append(flat[offset:offset + n].view(shape))
                offset += n
            g_x = flat[n_par:n_par + n_x].view(x.shape) if want_x else None
            with comm.tracer.phase("param_grads"):
                if adj.kind is not None:     # fused projection gradients + chunk GEMMs
                    grads = _kernel_param_grads(adj.kind, cell, adj.fine_chunks, x_tm, xw,
                                                ctx.hw, h, lam_next, lo, first_input, g_x)
                    for name, view in zip(names, views):
                        view += grads[name]
                for t0, t1, lin in ([] if adj.kind is not None else adj.fine_chunks):
                    g_xw, g_hw = cell.vjp_proj(lin, lam_next[t0 - lo:t1 - lo])
                    local = cell.param_grads(x_tm[t0 - first_input:t1 - first_input],
                                             h[t0 - lo:t1 - lo], g_xw, g_hw, lin)
                    for name, view in zip(names, views):
                        view += local[name]
                    if g_x is not None:   # the step t -> t+1 reads input t
                        g_x[:, t0:t1] = cell.input_grad(g_xw).transpose(0, 1)
            flat[-1] = sum(info.steps)
            comm.allreduce_(flat)
            prop.last_stats["bwd_steps"] = float(flat[-1])
        ctx.h = ctx.xw = ctx.x_tm = ctx.hw = ctx.inputs = None
        return (None, None, g_x, None, None, None, None, *views)


def _kernel_param_grads(kind, cell, fine_chunks, x_tm, xw, hw, h, lam_next, lo, first_input,
                        g_x, max_chunk: int = 64):
    """Parameter gradients of this rank's fine steps ``t -> t+1`` from the adjoint
    ``lam_next[t - lo] = lam_{t+1}`` with the fused kernels: per chunk of up to
    ``max_chunk`` steps one elementwise ``proj_grads`` call and a few GEMMs
    (``kernels.ParamGrads``); ``g_x [B, T, D]`` (if given) receives ``dL/dx``."""
    acc = kernels.ParamGrads({name: getattr(cell, name) for name in param_names(cell)})
    H, B, GH = cell.hidden_size, h.shape[1], cell.proj_size
    # the stepper's fine chunks are consecutive ranges: merged into longer ones
    ranges = []
    for t0, t1, _ in fine_chunks:
        if ranges and ranges[-1][1] == t0 and t1 - ranges[-1][0] <= max_chunk:
            ranges[-1][1] = t1
        else:
            ranges.append([t0, t1])
    n_max = max((b - a for a, b in ranges), default=0)
    buf = xw.new_empty(2, n_max, B, GH)
    gxi = xw.new_empty(n_max, B, x_tm.shape[-1]) if g_x is not None else None
    for t0, t1 in ranges:
        n = t1 - t0
        g_xw, g_hw = buf[0, :n], buf[1, :n]
        i0, i1 = t0 - first_input, t1 - first_input
        s_prev = h[t0 - lo:t1 - lo]
        kernels.proj_grads(kind, xw[i0:i1], hw[t0 - lo:t1 - lo], s_prev, cell.weight_hh, 1.0,
                           lam_next[t0 - lo:t1 - lo], g_xw, g_hw)
        acc.add(x_tm[i0:i1], s_prev[..., :H], g_xw, g_hw)
        if g_x is not None:   # the step t -> t+1 reads input t
            g_x[:, t0:t1] = acc.input_grad(g_xw, gxi[:n]).transpose(0, 1)
    return acc.result()


class MGRITPropagator:
    """Propagator whose forward and backward are MGRIT solves across time ranks.

    Every rank of ``comm`` gets the same batch; each works on its chunk of
    time points.  ``last_stats`` holds the iterations, final residuals and
    step counts (all levels, summed over the time ranks) of the last forward
    and backward solve, and ``serial_fallback`` (1.0 when the batch was
    shorter than the time ranks and ran serially); ``last_info`` the full
    SolveInfos of this rank.  With ``options.warm_start`` the store of
    initial guesses is ``self.warm`` (a :class:`WarmStarts`).
    """

    def __init__(self, comm: Comm | None = None, options: MGRITOptions | None = None, log=None):
        self.comm = comm or Comm.serial()
        self.options = options or MGRITOptions()
        self.options.settings(False)   # validate early
        self.log = log or print
        self.last_stats: dict[str, float] = {}
        self.last_info: dict[str, SolveInfo] = {}
        self.warm = WarmStarts(self.options.warm_start_mb * 1e6) if self.options.warm_start else None
        self._ids = None
        self._serial = SerialPropagator()
        self._said: set[str] = set()
        # the solvers' coarse-level buffers, reused batch after batch (per thread)
        self._workspaces = {"fwd": SolverWorkspace(), "bwd": SolverWorkspace()}

    def set_sample_ids(self, ids) -> None:
        """Name the sequences of the next :meth:`features` call (indices into the
        training set; None: unnamed, no warm start).  Used once, then cleared."""
        self._ids = None if ids is None else [int(i) for i in ids]

    def _say(self, key: str, line: str) -> None:
        """Log ``line`` once per propagator, on rank 0 of the time communicator."""
        if key not in self._said:
            self._said.add(key)
            if self.comm.rank == 0:
                self.log(line)

    def _record(self, kind: str, info: SolveInfo) -> None:
        self.last_info[kind] = info
        self.last_stats[f"{kind}_iters"] = info.iterations
        self.last_stats[f"{kind}_residual"] = info.final_residual
        s = self.options.settings(kind == "bwd")
        if (s.abs_tol > 0 or s.rel_tol > 0) and not info.converged and len(info.residuals) > 2:
            # a stalled residual that misses its tolerance: below the dtype's reach?
            f = info.factors[-1]
            if f > 0.5:
                self._say(f"stall-{kind}",
                          f"warning: {kind} MGRIT residual stalls at {info.final_residual:.1e} "
                          f"(factor {f:.2f}) above its tolerance (abs {s.abs_tol:g}, rel "
                          f"{s.rel_tol:g}): probably below what the dtype can reach; every "
                          f"solve runs all {s.max_iters} iterations")

    def _guess(self, kind, ids, solver: MGRIT, N: int, state, dtype, g_feat=None):
        """Warm-start guess ``(guess_c, mask)`` of a solve, or ``(None, None)``.

        The adjoint is linear in the loss gradient of the features ``g_feat``,
        which changes between epochs far more than the weights do (it shrinks
        as a sequence is learnt, and turns): each sequence's previous adjoint is
        scaled by the projection ``<g, g_old> / |g_old|^2`` of its new feature
        gradient on its old one (its adjoint if the Jacobians had not changed
        and the new gradient were the projected one).
        """
        if self.warm is None or ids is None:
            return None, None
        n = len(range(*solver.c_rows.indices(solver.fine_range.size)))
        if n == 0:
            return None, None
        guess, mask = self.warm.guess(kind, ids, solver.c_first, solver.settings.cfactor, N,
                                      (n, *state), dtype, solver.stepper.device)
        if guess is not None and g_feat is not None:
            old = torch.zeros_like(g_feat)
            for b, key in enumerate(ids):
                src = self.warm.sources.get(int(key))
                if src is not None:
                    old[b] = src
            norm = (old * old).sum(1)
            scale = torch.where(norm > 0, (g_feat * old).sum(1) / norm.clamp_min(1e-300), 0.0)
            guess *= scale.view(1, -1, 1)
        return guess, mask

    def _keep(self, kind, ids, solver: MGRIT, N: int, u: Tensor, g_feat=None) -> None:
        if self.warm is not None and ids is not None:
            before = self.warm.dropped
            self.warm.store(kind, ids, solver.c_first, N, u[solver.c_rows])
            if g_feat is not None:
                for b, key in enumerate(ids):
                    if (kind, int(key)) in self.warm:
                        self.warm.sources[int(key)] = g_feat[b].clone()
            if self.warm.dropped > before:
                self._say("warm-full", f"warning: warm-start store full "
                          f"({self.options.warm_start_mb:g} MB per rank): further "
                          f"sequences start cold (raise --warm-start-mb)")

    def _check_tolerances(self, dtype: torch.dtype) -> None:
        o = self.options
        floor = 100 * torch.finfo(dtype).eps
        for kind, rtol in (("fwd", o.fwd_rtol), ("bwd", o.bwd_rtol)):
            if 0 < rtol < floor:
                self._say(f"rtol-{kind}", f"warning: {kind} relative tolerance {rtol:g} is "
                          f"below what {str(dtype).replace('torch.', '')} can reach (about "
                          f"{floor:.0e}): the solves will run all their iterations")

    def _solve(self, cell: RecurrentCell, x: Tensor, steps: int, ids=None):
        """Forward MGRIT solve (see :meth:`solve_states`), with warm starts for ``ids``."""
        N = steps
        if self.comm.size > N:
            raise InputError(
                f"--time-ranks {self.comm.size} is more than the sequence length {N}: "
                f"use at most {N} time ranks")
        self._check_tolerances(x.dtype)
        settings = self.options.settings(False)
        grid = MGRIT.make_grid(self.comm, N, settings)
        lo, hi = grid.fine_range.lo, grid.fine_range.hi
        max_stride = grid.levels[-1].stride
        # inputs this rank reads: x[lo-1 .. hi-1) plus a halo for the coarse steps
        # (the left one for interval means, the right one for the adjoint's steps)
        first_input = max(lo - max_stride, 0)
        last_input = min(hi - 1 + max_stride, N)
        x_tm = x[:, first_input:last_input].transpose(0, 1).contiguous()
        xw = project_inputs(cell, x_tm)
        inputs = Inputs(xw, first_input, self.options.coarse_input)
        B = x.shape[0]
        hw = x.new_empty(hi - lo, B, cell.proj_size)
        stepper = CellForwardStepper(cell, xw, first_input, B, hw=hw, lo=lo, inputs=inputs)
        solver = MGRIT(stepper, self.comm, grid, settings, log=self.log,
                       workspace=self._workspaces["fwd"])
        guess, mask = self._guess("fwd", ids, solver, N, (B, cell.state_size), x.dtype)
        with flushing_denormals(x.dtype == torch.float32):
            h, info = solver.solve(guess_c=guess, guess_mask=mask)
        self._record("fwd", info)
        self._keep("fwd", ids, solver, N, h)
        self.last_stats["serial_fallback"] = 0.0
        # the stepper's access hook made hw the hidden projections of the final
        # states (recomputing those whose last step was stale)
        assert stepper.hw_exact
        return lo, hi, first_input, x_tm, xw, h, hw, inputs

    @torch.no_grad()
    def solve_states(self, cell: RecurrentCell, x: Tensor, steps: int | None = None):
        """Forward MGRIT solve of ``x [B, T, D]`` over ``steps`` (default T) intervals.

        Returns ``(lo, hi, first_input, x_tm, xw, h, hw)``: this rank owns fine
        points ``lo..hi-1`` and ``h [hi-lo, B, S]`` are their states; ``x_tm``/``xw``
        are the inputs (time-major) and input projections it read, from input
        ``first_input`` on (its chunk plus the halos its coarse steps need);
        ``hw`` are the hidden projections of the final states (exact: those
        the last sweep did not compute from a final state are recomputed).
        """
        N = x.shape[1] if steps is None else steps
        return self._solve(cell, x, N)[:7]

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None, pooling: str = "last") -> Tensor:
        lengths, steps = check_inputs(cell, x, lengths, pooling)
        ids, self._ids = self._ids, None
        if ids is not None and len(ids) != x.shape[0]:
            raise InputError(f"set_sample_ids: {len(ids)} ids for a batch of {x.shape[0]}")
        if self.comm.size > steps:
            # fewer steps than time ranks: the serial recurrence on every rank
            self._say("fallback", f"a batch of {steps} steps is shorter than the "
                      f"{self.comm.size} time ranks: such batches run the serial "
                      f"recurrence on every time rank (counted as serial_batches)")
            P = float(self.comm.size)
            self.last_stats.update(fwd_iters=0.0, bwd_iters=0.0, fwd_residual=0.0,
                                   bwd_residual=0.0, fwd_steps=P * steps, bwd_steps=P * steps,
                                   serial_fallback=1.0)
            return self._serial.features(cell, x, lengths, pooling)
        params = [getattr(cell, name) for name in param_names(cell)]
        return _MGRITFunction.apply(self, cell, x, lengths, steps, pooling, ids, *params)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["warm"] = None if self.warm is None else WarmStarts(self.warm.limit)
        del state["_workspaces"]        # buffers are neither copied nor pickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspaces = {"fwd": SolverWorkspace(), "bwd": SolverWorkspace()}

    def __repr__(self) -> str:
        o = self.options
        return (f"MGRITPropagator(P={self.comm.size}, levels={o.levels}, cfactor={o.cfactor}, "
                f"iters={o.fwd_iters}/{o.bwd_iters})")
