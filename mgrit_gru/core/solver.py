"""One FAS MGRIT solver, written once for one and for many ranks.

Solves ``u_0 = u0, u_i = Phi(u_{i-1}) + g_i`` (``i = 1..N``) for a
:class:`~mgrit_gru.core.stepper.TimeStepper` whose ``Phi`` may be nonlinear,
with the full approximation scheme (FAS) on a hierarchy of time grids
(``grid.py``), each rank owning a contiguous block of time points.

One iteration (cycle) on level ``l`` < coarsest:

1. relaxation: F (``F``) or F, C, F (``FCF``); optionally skipped on the
   first cycle (``skip_first_relax``: useful when the initial guess is poor);
2. the residual at the C-points ``r_j = g_j + Phi(u_{j-1}) - u_j`` (zero at
   F-points after an F-sweep);
3. injection ``v = u[C]`` and the FAS right-hand side
   ``g^c_j = r_{jm} + v_j - Phi^c(v_{j-1})``;
4. the coarse problem solved by one cycle on level ``l + 1``, on the
   coarsest level by a sequential sweep pipelined across ranks;
5. correction ``u[C] += u^c - v`` and an F-sweep (ideal interpolation).

Cycles (XBraid's ordering). ``V``: every level does steps 1-5 once, with a
V-cycle below it.  ``F``: the fine level does steps 1-5 once per iteration,
its level-1 problem solved by an F-cycle; an F-cycle on a coarse level ``l``
is a coarse-grid correction with an F-cycle on ``l + 1`` followed by a
relaxation and a coarse-grid correction with a V-cycle on ``l + 1``.  So an
F-iteration reaches level ``l >= 1`` ``l`` times where a V-iteration reaches
it once (the coarsest level: ``L - 1`` sweeps per iteration on ``L`` levels).

Nested iteration (``nested``, full multigrid): before the first iteration
the problem is solved on the coarsest level by a sequential sweep, then, on
the way up, each level's C-points take the values of the level below (its
F-points filled by an F-sweep) and the level gets one cycle of the chosen
kind; the fine grid starts from the interpolated level-1 solution.  Coarse
right-hand sides are the fine one injected (``g^{l+1}_j = m g^l_{jm}``, the
rate of a step of ``m`` intervals): only the guess depends on it.

On the fine level, the C-point residual is computed after every cycle: it
is the residual norm reported and tested for convergence, and it doubles as
the first C-relaxation of the next cycle, so it costs no extra step.

Steps are counted per level on every rank (``SolveInfo.steps``): they are the
currency of the performance model in docs/performance.md.

The stepper (``mgrit_gru.core.stepper``) adds the right-hand side itself
(``step(u, t_from, t_to, level, rhs, out=)``), allocates every tensor the
solver holds (``zeros``, ``clone``: the solver runs on the stepper's device)
and is told at the end of each solve which of this rank's final fine values
its last fine step used (``access``).  For that the solver keeps, on the fine
level only, one host-side flag per owned point (a ``bytearray``, no tensor):
set when a fine step is taken from the point, cleared whenever the point's
value is written (sweeps, C-relaxation, coarse correction, nested iteration,
guesses).

The grid and partition come first (:meth:`MGRIT.make_grid`, a
:class:`~mgrit_gru.core.grid.TimeGrid`): a stepper that needs them (the
adjoint linearises this rank's steps of every level) is built from the same
grid as the solver, which takes its stepper at construction.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError
from mgrit_gru.core.grid import Level, LevelRange, TimeGrid
from mgrit_gru.core.trace import traced


@dataclass(frozen=True)
class MGRITSettings:
    """Solver settings (immutable; one object per solve kind)."""

    levels: int = 3
    cfactor: int = 4
    max_iters: int = 10
    abs_tol: float = 0.0          # stop when residual <= abs_tol ...
    rel_tol: float = 0.0          # ... or residual <= rel_tol * first residual (0: off)
    relax: str | tuple[str, ...] = "FCF"   # per level; the last entry repeats
    skip_first_relax: bool = False
    cycle: str = "V"               # "V" or "F"
    nested: bool = False           # nested iteration: initial guess from the coarsest level up
    min_coarse_points: int = 2
    final_residual: bool = True    # compute the residual after the last iteration too
    verbose: bool = False          # one log line per iteration on position 0

    def __post_init__(self):
        relax = (self.relax,) if isinstance(self.relax, str) else tuple(self.relax)
        for r in relax:
            if r not in ("F", "FCF"):
                raise InputError(f"relax must be 'F' or 'FCF' (per level), got {r!r}")
        object.__setattr__(self, "relax", relax)
        if self.cycle not in ("V", "F"):
            raise InputError(f"cycle must be 'V' or 'F', got {self.cycle!r}")
        if self.max_iters < 0:
            raise InputError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.abs_tol < 0 or self.rel_tol < 0:
            raise InputError("tolerances must be >= 0")
        if self.cfactor < 2:
            raise InputError(f"cfactor must be >= 2, got {self.cfactor}")
        if self.levels < 1:
            raise InputError(f"levels must be >= 1, got {self.levels}")

    def relax_on(self, level: int) -> str:
        return self.relax[min(level, len(self.relax) - 1)]


@dataclass
class SolveInfo:
    """What a solve did. Residuals are C-point residual norms on the fine grid."""

    residuals: list[float] = field(default_factory=list)  # [0]: before any coarse correction
    iterations: int = 0
    converged: bool = False
    steps: list[int] = field(default_factory=list)        # this rank's step count per level
    seconds: float = 0.0
    iteration_seconds: list[float] = field(default_factory=list)
    n_levels: int = 0

    @property
    def factors(self) -> list[float]:
        r = self.residuals
        return [r[k] / r[k - 1] if r[k - 1] > 0 else float("nan") for k in range(1, len(r))]

    @property
    def final_residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")

    def as_dict(self) -> dict:
        return {
            "residuals": self.residuals,
            "factors": self.factors,
            "iterations": self.iterations,
            "converged": self.converged,
            "steps_per_level": self.steps,
            "seconds": self.seconds,
            "iteration_seconds": self.iteration_seconds,
            "levels": self.n_levels,
        }


#: The phase of the halo messages (tags are 16 * level + phase; phases 1-6 are the cycles').
_HALO_PHASE = 7


class SolverWorkspace(threading.local):
    """Buffers of a solver's coarse levels and temporaries, kept across solves.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first
    touch (about 37 ms per 100 MB here, against 3.6 ms reused); the solver's
    per-level values, residuals, FAS right-hand sides and restricted values
    are the same shapes from one batch to the next.  Give one workspace to
    every solve of the same kind (a propagator keeps one per direction); it is
    per thread, so threads sharing a propagator do not share buffers.  The
    fine level's values are returned to the caller and never pooled.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, torch.Tensor] = {}

    def take(self, key: tuple, n: int, stepper) -> torch.Tensor:
        """``[n, *state_shape]`` rows of the buffer ``key`` (values undefined)."""
        buf = self.free.get(key)
        shape = tuple(stepper.state_shape)
        if (buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != shape
                or buf.dtype != stepper.dtype or buf.device != torch.device(stepper.device)):
            buf = stepper.zeros(max(n, 1))
            self.free[key] = buf
        return buf[:n]


class _LevelData:
    """Per-level state of one rank: its points' values, right-hand side, ghost.

    On the fine level ``fresh[k]`` (host-side) says whether the last fine step
    taken from row ``k`` used its current value (see the module docstring).
    ``take(name, n)`` gives a buffer of ``n`` state rows of this level (from
    the solver's workspace); the fine level's values are always fresh."""

    def __init__(self, level: Level, rng: LevelRange, stepper, take):
        self.level = level
        self.rng = rng
        self.take = lambda name, n: take((name, level.index), n)
        if level.index == 0:
            self.u = stepper.zeros(rng.size)
        else:
            self.u = self.take("u", rng.size)
            self.u.zero_()
        self.g: torch.Tensor | None = None   # None: zero right-hand side (except point 0)
        self.v: torch.Tensor | None = None   # restricted values (FAS correction)
        self.ghost = self.take("ghost", 1)[0]
        self.ghost.zero_()
        self.fresh: bytearray | None = bytearray(rng.size) if level.index == 0 else None
        m = level.cfactor
        self.c_rows = [j - rng.lo for j in range(rng.lo, rng.hi) if j % m == 0 and j > 0]
        # the same rows as a strided slice (views instead of gathers)
        k0 = -(-max(rng.lo, 1) // m) * m - rng.lo
        self.c_slice = slice(k0, max(rng.size, k0), m)
        # all C-points including point 0: the points of the next level
        k0 = -(-rng.lo // m) * m - rng.lo
        self.c_slice_all = slice(k0, max(rng.size, k0), m)

    def written(self, rows: slice) -> None:
        """Rows ``rows`` of the fine values were written: their steps are stale."""
        if self.fresh is not None:
            n = len(range(*rows.indices(self.rng.size)))
            if n:
                self.fresh[rows] = bytes(n)


class MGRIT:
    """FAS MGRIT for one stepper on one time communicator.

    ``grid``: the :class:`~mgrit_gru.core.grid.TimeGrid` of the solve (from
    :meth:`make_grid`), or the number of fine intervals ``N`` (the grid is
    then made here, in reversed time if ``reverse``).  In reversed time point
    ``s`` of the solver is fine point ``N - s`` of the forward grid and is
    owned by the rank that owns that forward point; rank order is reversed
    (used for adjoints).  The stepper is fixed at construction.
    ``workspace``: a :class:`SolverWorkspace` whose buffers this solver reuses
    (give the same one to the solves of every batch; default: its own).
    """

    def __init__(self, stepper, comm: Comm | None, grid: TimeGrid | int, settings: MGRITSettings,
                 reverse: bool | None = None, log: Callable[[str], None] | None = None,
                 workspace: SolverWorkspace | None = None):
        missing = [name for name in ("step", "zeros", "clone") if not callable(getattr(stepper, name, None))]
        if missing:
            raise TypeError(f"the stepper {type(stepper).__name__} lacks {', '.join(missing)} "
                            f"(see mgrit_gru.core.stepper; StepperBase provides zeros and clone)")
        self.comm = comm or Comm.serial()
        self.settings = settings
        if not isinstance(grid, TimeGrid):
            grid = self.make_grid(self.comm, int(grid), settings, bool(reverse))
        elif reverse is not None and bool(reverse) != grid.reverse:
            raise ValueError(f"reverse={reverse} contradicts the grid's reverse={grid.reverse}")
        want = (settings.cfactor, settings.levels, settings.min_coarse_points, self.comm.size, self.comm.rank)
        have = (grid.cfactor, grid.max_levels, grid.min_points, grid.size, grid.rank)
        if want != have:
            raise ValueError(f"the grid (cfactor, levels, min points, size, rank) {have} does not "
                             f"match the settings and communicator {want}")
        self.grid = grid
        self._stepper = stepper
        self._access = getattr(stepper, "access", None)
        self.shape = tuple(stepper.state_shape)
        self.dtype = stepper.dtype
        self.log = log or print
        self._data: list[_LevelData] | None = None
        self.steps = [0] * len(self.levels)
        self.workspace = workspace if workspace is not None else SolverWorkspace()

    @classmethod
    def make_grid(cls, comm: Comm | None, n_intervals: int, settings: MGRITSettings,
                  reverse: bool = False) -> TimeGrid:
        """The grid and partition of a solve of ``n_intervals`` intervals with
        ``settings`` on ``comm``, before any stepper exists."""
        comm = comm or Comm.serial()
        return TimeGrid.build(n_intervals, settings.cfactor, settings.levels, comm.size, comm.rank,
                              reverse=reverse, min_points=settings.min_coarse_points)

    # the grid's answers, as attributes of the solver
    stepper = property(lambda self: self._stepper, doc="The stepper (fixed at construction).")
    N = property(lambda self: self.grid.n_intervals)
    reverse = property(lambda self: self.grid.reverse)
    levels = property(lambda self: self.grid.levels)
    partition = property(lambda self: self.grid.partition)
    position = property(lambda self: self.grid.position)
    fine_range = property(lambda self: self.grid.fine_range,
                          doc="This rank's fine points, in solver (possibly reversed) indices.")
    c_rows = property(lambda self: self.grid.c_rows,
                      doc="This rank's level-1 points as rows of its fine values.")
    c_first = property(lambda self: self.grid.c_first, doc="Solver index of the first c_rows point.")

    # ------------------------------------------------------------------ helpers
    def _tag(self, level: int, phase: int) -> int:
        return 16 * level + phase

    def _rank_of(self, position: int) -> int:
        return self.grid.rank_of(position)

    def _step(self, L: _LevelData, k: int, out: torch.Tensor,
              rhs: torch.Tensor | None = None) -> torch.Tensor:
        """out = Phi(value before row k) + rhs, from level point lo+k-1 to lo+k."""
        j = L.rng.lo + k
        s = L.level.stride
        self.steps[L.level.index] += 1
        if k == 0:
            prev = L.ghost
        else:
            prev = L.u[k - 1]
            if L.fresh is not None:
                L.fresh[k - 1] = 1
        return self._stepper.step(prev, (j - 1) * s, j * s, L.level.index, rhs, out=out)

    def _run(self, L: _LevelData, a: int, b: int) -> None:
        """Sequential sweep over level points a..b-1: u_j = Phi(u_{j-1}) + g_j."""
        lo = L.rng.lo
        u, g, fresh = L.u, L.g, L.fresh
        for j in range(max(a, 1), b):
            k = j - lo
            self._step(L, k, u[k], None if g is None else g[k])
            if fresh is not None:
                fresh[k] = 0

    def _phi_prev(self, L: _LevelData, rows: Sequence[int], out: torch.Tensor, phase: int,
                  need: Callable[[int], bool]) -> torch.Tensor:
        """out[i] = Phi(u at point (lo + rows[i]) - 1); ghost exchanged as needed.

        The ghost's receive is posted first and waited for only before the
        one row that reads it (row 0), so the other rows overlap the message;
        the send to the right neighbour goes out before any step."""
        r = L.rng
        if r.empty:
            return out
        tag = self._tag(L.level.index, phase)
        send = recv = None
        if r.left is not None and need(r.lo):
            recv = self.comm.irecv(L.ghost, self._rank_of(r.left), tag)
        if r.right is not None and need(r.hi):
            send = self.comm.isend(L.u[-1], self._rank_of(r.right), tag)
        first = 1 if rows and rows[0] == 0 else 0
        for i in range(first, len(rows)):
            self._step(L, rows[i], out[i])
        if recv is not None:
            recv.wait()
        if first:
            self._step(L, 0, out[0])
        if send is not None:
            send.wait()
        return out

    def halo(self, u: torch.Tensor, out: torch.Tensor) -> bool:
        """The value at the solver point just before this rank's first fine point.

        ``u`` are this rank's fine values (e.g. a solution of :meth:`solve`,
        rows in solver order): its last row goes to the rank owning the next
        solver point, and ``out`` receives the value at point ``lo - 1`` from
        the rank owning it (the solver's rank mapping and tag space: in a
        reversed solve these are the forward neighbours the other way round).
        Collective over the neighbours; returns False (``out`` untouched) on
        the rank owning point 0.
        """
        r = self.fine_range
        tag = self._tag(0, _HALO_PHASE)
        req = None
        if r.right is not None:
            req = self.comm.isend(u[-1], self._rank_of(r.right), tag)
        if r.left is not None:
            self.comm.recv(out, self._rank_of(r.left), tag)
        if req is not None:
            req.wait()
        return r.left is not None

    # ------------------------------------------------------------- relaxation
    @traced("f_relax", lambda self, L: L.level.index)
    def _f_relax(self, L: _LevelData) -> None:
        r = L.rng
        if r.empty:
            return
        m = L.level.cfactor
        lo, hi = r.lo, r.hi
        tag = self._tag(L.level.index, 1)
        first_c = -(-lo // m) * m
        right_needs = r.right is not None and hi % m != 0
        req = None
        if first_c < hi:
            last_c = ((hi - 1) // m) * m
            # the interval reaching into the right neighbour first, so it can start early
            self._run(L, last_c + 1, hi)
            if right_needs:
                req = self.comm.isend(L.u[-1], self._rank_of(r.right), tag)
            c = first_c
            while c < last_c:
                self._run(L, c + 1, c + m)
                c += m
            if lo % m != 0:
                self.comm.recv(L.ghost, self._rank_of(r.left), tag)
                self._run(L, lo, first_c)
        else:  # only F-points: one piece of an interval that started on the left
            self.comm.recv(L.ghost, self._rank_of(r.left), tag)
            self._run(L, lo, hi)
            if right_needs:
                req = self.comm.isend(L.u[-1], self._rank_of(r.right), tag)
        if req is not None:
            req.wait()

    @traced(lambda self, L, phase: "c_relax" if phase == 2 else "residual",
            lambda self, L, phase: L.level.index)
    def _residual(self, L: _LevelData, phase: int) -> torch.Tensor:
        """C-point residuals r = g + Phi(u_{j-1}) - u_j at this rank's C-points (j > 0)."""
        m = L.level.cfactor
        rows = L.c_rows
        # one buffer per level: every residual is consumed before the level's next one
        r = L.take("r", len(rows))
        self._phi_prev(L, rows, r, phase, lambda j: j % m == 0)
        if rows:
            r -= L.u[L.c_slice]
            if L.g is not None:
                r += L.g[L.c_slice]
        return r

    def _relax(self, L: _LevelData, first: bool) -> None:
        if first and self.settings.skip_first_relax:
            return
        self._f_relax(L)
        if self.settings.relax_on(L.level.index) == "FCF":
            r = self._residual(L, phase=2)
            if L.c_rows:
                L.u[L.c_slice] += r
                L.written(L.c_slice)
            self._f_relax(L)

    @traced("coarsest", lambda self, L: L.level.index)
    def _sequential(self, L: _LevelData) -> None:
        """Coarsest level: exact sweep, pipelined across ranks."""
        r = L.rng
        if r.empty:
            return
        tag = self._tag(L.level.index, 3)
        if r.left is not None:
            self.comm.recv(L.ghost, self._rank_of(r.left), tag)
        self._run(L, r.lo, r.hi)
        if r.right is not None:
            self.comm.send(L.u[-1], self._rank_of(r.right), tag)

    # --------------------------------------------------------- coarse grids
    @traced("coarse_correct", lambda self, l, *a: l + 1)
    def _coarse_correct(self, l: int, r: torch.Tensor, first: bool, kind: str) -> None:
        """Restrict level l's C-point values and residual, cycle level l+1, correct level l."""
        F, C = self._data[l], self._data[l + 1]
        # injection: the coarse points are exactly this rank's C-points of level l
        n = C.rng.size
        C.v = C.take("v", n)
        C.v.copy_(F.u[F.c_slice_all])
        C.u.copy_(C.v)
        # FAS right-hand side: g_c = R r + A_c(v),  A_c(v)_j = v_j - Phi_c(v_{j-1});
        # the rows j > 0 of level l+1 are level l's residual rows, in the same order.
        # The buffer "g" may hold the nested iteration's right-hand side of this
        # level: no longer needed once a correction replaces it.
        g = C.take("g", n)
        g.copy_(C.v)
        k0 = 1 if C.rng.lo == 0 else 0
        rows = list(range(k0, n))
        # phi: level l+1 has no residual of its own before _cycle(l+1) below
        phi = C.take("r", len(rows))
        self._phi_prev(C, rows, phi, phase=4, need=lambda j: j > 0)
        if rows:
            g[k0:] += r
            g[k0:] -= phi
        C.g = g
        self._cycle(l + 1, first, kind)
        if C.rng.size:
            F.u[F.c_slice_all] += C.u - C.v
            F.written(F.c_slice_all)
        self._f_relax(F)

    @traced("cycle", lambda self, l, *a: l)
    def _cycle(self, l: int, first: bool, kind: str) -> None:
        """One cycle on coarse level ``l >= 1`` (``kind``: ``V`` or ``F``)."""
        L = self._data[l]
        if L.level.coarsest:
            self._sequential(L)
            return
        self._relax(L, first)
        r = self._residual(L, phase=5)
        self._coarse_correct(l, r, first, kind)
        if kind == "F":
            # F-cycle: then one more relaxation and a correction by a V-cycle
            self._relax(L, False)
            r = self._residual(L, phase=5)
            self._coarse_correct(l, r, False, "V")

    # ------------------------------------------------------------------ solve
    @staticmethod
    def _local_sq(r: torch.Tensor) -> torch.Tensor:
        """This rank's share of the squared residual norm (a float64 0-d tensor)."""
        if not r.numel():
            return torch.zeros((), dtype=torch.float64, device=r.device)
        return torch.linalg.vector_norm(r.reshape(-1), dtype=torch.float64).square()

    def _norm(self, r: torch.Tensor) -> float:
        return math.sqrt(self.comm.allreduce_scalar(float(self._local_sq(r)), "sum"))

    def _record_residual(self, r: torch.Tensor, info: SolveInfo, deferred: list | None) -> None:
        """The global residual norm now, or (``deferred``, a list) this rank's
        share kept for one allreduce of all of them at the end of the solve."""
        if deferred is None:
            info.residuals.append(self._norm(r))
        else:
            deferred.append(self._local_sq(r))

    def _deferred_norms(self, info: SolveInfo, deferred: list | None) -> None:
        if deferred:
            sq = torch.stack(deferred).to(device="cpu", dtype=torch.float64)
            self.comm.allreduce_(sq)
            info.residuals.extend(math.sqrt(max(float(v), 0.0)) for v in sq)

    def solve(self, u0: torch.Tensor | None = None, rhs: torch.Tensor | None = None,
              u_init: torch.Tensor | None = None, guess_c: torch.Tensor | None = None,
              guess_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveInfo]:
        """Solve; return this rank's fine-level values ``[n_local, *shape]`` and the info.

        ``u0``: value at point 0 (needed only on the rank owning it; zeros if
        None).  ``rhs``: fine-level right-hand side for this rank's points
        (row 0 of the rank owning point 0 is ignored), None for zero.
        ``u_init``: initial guess for this rank's points (zeros if None).
        ``guess_c``: initial guess at this rank's level-1 points only (rows
        ``self.c_rows`` of the fine values, the first at solver index
        ``self.c_first``): all an initial F-sweep reads.  With ``guess_mask``
        (a bool tensor broadcastable to ``guess_c``) it replaces the solver's
        own initial values (zeros, or nested iteration's) only where true
        (e.g. the sequences of a batch that have a warm start).  With a
        guess the initial F-relaxation always runs.
        Rows are in solver order (reversed time if ``reverse``).  Tensors
        given on another device or dtype are moved to the stepper's.  At the
        end the stepper's ``access`` (if any) gets the final fine values.
        """
        s = self.settings
        t_start = time.perf_counter()
        self.steps = [0] * len(self.levels)
        take = lambda key, n: self.workspace.take(key, n, self._stepper)   # noqa: E731
        self._data = [_LevelData(lev, self.grid.range(lev.index), self._stepper, take)
                      for lev in self.levels]
        fine = self._data[0]
        here = fine.u
        if u_init is not None:
            fine.u.copy_(u_init)
        if rhs is not None:
            fine.g = rhs.to(device=here.device, dtype=here.dtype)
        if fine.rng.lo == 0:
            if u0 is not None:
                fine.u[0] = u0
            else:
                fine.u[0] = 0
            # point 0 is fixed: keep it in g as well so coarse levels inherit it via v
        info = SolveInfo(n_levels=len(self.levels))
        # without a tolerance or a log line nothing decides on a residual before
        # the end: one allreduce of all of them then, not a global sync per iteration
        deferred = None if (s.abs_tol > 0 or s.rel_tol > 0 or s.verbose) else []
        if fine.level.coarsest:  # one level: MGRIT is the sequential sweep
            self._sequential(fine)
            info.iterations = 1
            self._record_residual(self._residual(fine, phase=6), info, deferred)
            info.converged = True
            self._deferred_norms(info, deferred)
            return self._finish(fine, info, t_start)

        kind = s.cycle
        guessed = s.nested or guess_c is not None
        if s.nested:
            self._nested(kind)
        if guess_c is not None:
            view = fine.u[self.c_rows]
            if guess_mask is None:
                view.copy_(guess_c)
            else:
                view.copy_(torch.where(guess_mask.to(here.device), guess_c.to(here), view))
            fine.written(self.c_rows)
            if fine.rng.lo == 0:
                fine.u[0] = 0 if u0 is None else u0
        # skip_first_relax skips the sweep from an initial guess of zeros only
        skipped = s.skip_first_relax and not guessed
        if not skipped:
            self._f_relax(fine)
        k = 0
        t_it = time.perf_counter()
        r = self._residual(fine, phase=6)
        self._record_residual(r, info, deferred)
        self._log_iter(0, info, time.perf_counter() - t_it)
        while True:
            # (deferred: no tolerance, exactly max_iters iterations)
            if deferred is None and self._converged(info, k, skipped):
                info.converged = True
                break
            if k == s.max_iters:
                break
            t_it = time.perf_counter()
            first = k == 0 and skipped
            if s.relax_on(0) == "FCF" and not first:
                if fine.c_rows:
                    fine.u[fine.c_slice] += r          # C-relaxation from the residual just computed
                    fine.written(fine.c_slice)
                self._f_relax(fine)
                r = self._residual(fine, phase=5)
            self._coarse_correct(0, r, first, kind)
            k += 1
            if k == s.max_iters and not s.final_residual:
                # the last correction's residual is not needed to decide anything:
                # save its N/m steps (residuals[-1] is then the one before it)
                info.iteration_seconds.append(time.perf_counter() - t_it)
                break
            r = self._residual(fine, phase=6)
            self._record_residual(r, info, deferred)
            info.iteration_seconds.append(time.perf_counter() - t_it)
            self._log_iter(k, info, info.iteration_seconds[-1])
        info.iterations = k
        self._deferred_norms(info, deferred)
        return self._finish(fine, info, t_start)

    def _converged(self, info: SolveInfo, k: int, skipped: bool) -> bool:
        """Whether the last residual meets a tolerance.

        After a skipped first relaxation the residual of the untouched guess is
        not the residual of the problem (the C-point residual of a zero guess
        vanishes while the F-points are still wrong): no convergence test
        before one cycle has run, and the relative tolerance is relative to the
        first residual after it."""
        s = self.settings
        if k == 0 and skipped:
            return False
        res = info.residuals[-1]
        r0 = info.residuals[1 if skipped else 0]
        return (s.abs_tol > 0 and res <= s.abs_tol) or (s.rel_tol > 0 and res <= s.rel_tol * r0)

    @traced("nested")
    def _nested(self, kind: str) -> None:
        """Nested iteration: the fine level's C-point values from the coarse levels."""
        data = self._data
        fine = data[0]
        # coarse right-hand sides: injection of the level above, times the stride ratio
        for l in range(1, len(data)):
            F, C = data[l - 1], data[l]
            if F.g is None:
                C.g = None
            else:
                C.g = C.take("g", C.rng.size)
                torch.mul(F.g[F.c_slice_all], float(F.level.cfactor), out=C.g)
            if C.rng.lo == 0 and fine.rng.lo == 0:
                C.u[0] = fine.u[0]
        self._sequential(data[-1])
        for l in range(len(data) - 2, -1, -1):
            F, C = data[l], data[l + 1]
            if C.rng.size:
                F.u[F.c_slice_all] = C.u
                F.written(F.c_slice_all)
            if l > 0:
                # one cycle of level l's own problem; its first F-sweep interpolates
                self._cycle(l, False, kind)

    def _finish(self, fine: _LevelData, info: SolveInfo, t_start: float):
        u = fine.u
        if self._access is not None:
            self._access(u, fine.rng.lo, bytes(fine.fresh))
        info.steps = list(self.steps)
        info.seconds = time.perf_counter() - t_start
        self._data = None
        return u, info

    def _log_iter(self, k: int, info: SolveInfo, seconds: float) -> None:
        if not self.settings.verbose or self.comm.rank != 0:
            return
        res = info.residuals[-1]
        fac = info.factors[-1] if k > 0 else float("nan")
        self.log(f"{'bwd' if self.reverse else 'fwd'} iter {k:3d} | residual {res:.3e} | factor {fac:.3f} | {seconds:.3f} s")
