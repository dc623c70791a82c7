"""The MGRIT solver on the Dahlquist reference stepper (closed-form truth).

Each check is a function of a communicator: the serial tests run it at P=1,
the ``mpi`` tests at whatever size mpiexec gives (CI: 2 and 3).
"""
import math
import re
from pathlib import Path

import pytest
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError
from mgrit_gru.core.solver import MGRIT, MGRITSettings, SolverWorkspace
from mgrit_gru.core.stepper import DahlquistStepper, StepperBase, TimeStepper

U0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _stepper():
    # three decoupled modes, stiff to mild: coarse BE is not the fine BE to the power m
    return DahlquistStepper(lam=torch.tensor([-0.3, -2.0, -10.0]), dt=0.1, state_shape=(3,))


def _solve(comm, n, settings, rhs_seed=None, reverse=False, stepper=None):
    st = stepper or _stepper()
    solver = MGRIT(st, comm, n, settings, reverse=reverse)
    lo, hi = solver.fine_range.lo, solver.fine_range.hi
    rhs_full = None
    if rhs_seed is not None:
        g = torch.Generator().manual_seed(rhs_seed)
        rhs_full = torch.randn((n + 1, 3), generator=g, dtype=torch.float64)
    u, info = solver.solve(u0=U0, rhs=None if rhs_full is None else rhs_full[lo:hi])
    truth = st.sequential(U0, n, rhs_full)
    return u, truth[lo:hi], info


def check_converges_to_sequential(comm):
    for n in [1, 3, 16, 37, 128]:
        if n < comm.size:  # at most N time ranks
            continue
        for relax in ["F", "FCF"]:
            for levels in [1, 2, 3, 4]:
                for cycle in ["V", "F"]:
                    s = MGRITSettings(levels=levels, cfactor=4, max_iters=60, abs_tol=1e-13, relax=relax, cycle=cycle)
                    u, truth, info = _solve(comm, n, s, rhs_seed=n)
                    assert info.converged, (n, relax, levels, cycle, info.residuals)
                    assert torch.allclose(u, truth, rtol=0, atol=1e-11), (n, relax, levels, cycle)


def check_two_level_f_exact_after_nc_iterations(comm):
    m = 4
    for n in [8, 13, 20, 37]:
        nc = n // m  # coarse intervals: C-point k is exact after k iterations
        # (the error after nc-1 iterations shrinks like factor**(nc-1): check it on short grids)
        for iters, exact in [(nc - 1, False), (nc, True)] if n < 30 else [(nc, True)]:
            s = MGRITSettings(levels=2, cfactor=m, max_iters=iters, relax="F")
            # a growing mode, so the error left after nc-1 iterations is not masked by decay
            growing = DahlquistStepper(lam=torch.tensor([0.5, -0.5, 0.2]), dt=0.1, state_shape=(3,))
            u, truth, info = _solve(comm, n, s, stepper=growing)
            assert info.iterations == iters
            err = comm.allreduce_scalar(float((u - truth).abs().max()), "max")
            if exact:
                assert err < 1e-13, (n, iters, err)
            else:
                assert err > 1e-8, (n, iters, err)


def check_residuals_independent_of_p(comm):
    """Same iterations -> same residual history as the one-process solve."""
    for relax, levels, skip in [("F", 2, False), ("FCF", 3, False), ("FCF", 3, True), ("F", 4, True)]:
        s = MGRITSettings(levels=levels, cfactor=2 if levels == 4 else 4, max_iters=4, relax=relax,
                          skip_first_relax=skip)
        n = 37
        _, _, info_p = _solve(comm, n, s, rhs_seed=1)
        _, _, info_1 = _solve(Comm.serial(), n, s, rhs_seed=1)
        assert len(info_p.residuals) == len(info_1.residuals) == 5
        for a, b in zip(info_p.residuals, info_1.residuals):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), (info_p.residuals, info_1.residuals)
        # total work is independent of P too
        steps = [comm.allreduce_scalar(x, "sum") for x in info_p.steps]
        assert steps == [float(x) for x in info_1.steps]


def check_reverse_time(comm):
    """reverse=True solves the same problem in reversed indices, owned by the same ranks."""
    s = MGRITSettings(levels=3, cfactor=4, max_iters=50, abs_tol=1e-13)
    u, truth, info = _solve(comm, 37, s, rhs_seed=5, reverse=True)
    assert info.converged and torch.allclose(u, truth, atol=1e-11)


class Recording(DahlquistStepper):
    """Dahlquist, recording the value of every fine step from an owned row and the
    flags its access hook gets."""

    def __init__(self, lo, n, **kw):
        super().__init__(lam=torch.tensor([-0.3, -2.0, -10.0]), dt=0.1, state_shape=(3,), **kw)
        self.lo, self.n = lo, n
        self.last_from: dict[int, torch.Tensor] = {}
        self.accessed = None

    def step(self, u, t_from, t_to, level, rhs=None, *, out):
        if level == 0 and self.lo <= t_from < self.lo + self.n:
            self.last_from[t_from] = u.clone()
        return super().step(u, t_from, t_to, level, rhs, out=out)

    def access(self, u, first, fresh):
        self.accessed = (u.clone(), first, bytes(fresh))


FRESH_CASES = [dict(), dict(final_residual=False), dict(relax="FCF"), dict(relax="FCF", final_residual=False),
               dict(cycle="F", levels=4, cfactor=2), dict(nested=True), dict(skip_first_relax=True),
               dict(levels=1), dict(max_iters=0), dict(max_iters=0, skip_first_relax=True),
               dict(max_iters=0, skip_first_relax=True, final_residual=False)]


def check_access_flags(comm):
    """access gets this rank's final values; a row flagged fresh was stepped from last
    with exactly its final value (a copy of it: compared exactly); with the final
    residual every row but the last is fresh; without it the rows before the C-points
    are stale (they were corrected after their last step)."""
    n = 37
    for reverse in (False, True):
        for kw in FRESH_CASES:
            s = MGRITSettings(**dict(dict(levels=3, cfactor=4, max_iters=2), **kw))
            grid = MGRIT.make_grid(comm, n, s, reverse=reverse)
            r = grid.fine_range
            st = Recording(r.lo, r.size)
            solver = MGRIT(st, comm, grid, s)
            g = torch.Generator().manual_seed(3)
            rhs = torch.randn((n + 1, 3), generator=g, dtype=torch.float64)[r.lo:r.hi]
            u, info = solver.solve(u0=U0, rhs=rhs)
            got, first, fresh = st.accessed
            assert first == r.lo and len(fresh) == r.size and torch.equal(got, u), kw
            for k in range(r.size):
                if fresh[k]:
                    assert torch.equal(st.last_from[r.lo + k], u[k]), (kw, reverse, k)
            assert not fresh[-1]            # its step is the right neighbour's (or none)
            last_sweep_full = s.final_residual or s.levels == 1 or (
                s.max_iters == 0 and not s.skip_first_relax)
            if last_sweep_full and not (s.max_iters == 0 and s.skip_first_relax):
                assert all(fresh[:-1]), (kw, reverse, list(fresh))
            if not s.final_residual and s.levels > 1 and s.max_iters > 0:
                c_before = [k for k in range(r.size - 1) if (r.lo + k + 1) % s.cfactor == 0]
                assert c_before and not any(fresh[k] for k in c_before), (kw, reverse, list(fresh))


def check_halo(comm):
    """halo: each rank gets the value at the solver point before its first one from
    its owner (forward and reversed time); the rank owning point 0 gets none."""
    n = 37
    for reverse in (False, True):
        s = MGRITSettings(levels=3, cfactor=4, max_iters=50, abs_tol=1e-13)
        u, truth, info = _solve(comm, n, s, rhs_seed=2, reverse=reverse)
        solver = MGRIT(_stepper(), comm, n, s, reverse=reverse)
        lo = solver.fine_range.lo
        g = torch.Generator().manual_seed(2)
        full = _stepper().sequential(U0, n, torch.randn((n + 1, 3), generator=g, dtype=torch.float64))
        out = torch.full((3,), float("nan"), dtype=torch.float64)
        got = solver.halo(u, out)
        assert got == (lo > 0)
        if got:
            assert torch.allclose(out, full[lo - 1], rtol=0, atol=1e-11), (reverse, lo)
        else:
            assert torch.isnan(out).all()


def check_deferred_residuals_and_reused_buffers(comm):
    """Without a tolerance the residual norms are reduced once at the end: the
    same values as the per-iteration reduction a tolerance needs.  A workspace
    reused across solves gives the same answer as fresh buffers, and keeps its
    buffers (the second solve allocates nothing new)."""
    n = 75
    g = torch.Generator().manual_seed(5)
    rhs = [torch.randn((n + 1, 3), generator=g, dtype=torch.float64) for _ in range(2)]
    for cycle in ("V", "F"):
        base = dict(levels=3, cfactor=4, max_iters=4, relax="FCF", cycle=cycle, nested=True)
        infos = []
        for tol in (0.0, 1e-300):      # 1e-300: never met, but tested every iteration
            solver = MGRIT(_stepper(), comm, n, MGRITSettings(abs_tol=tol, **base))
            lo, hi = solver.fine_range.lo, solver.fine_range.hi
            infos.append(solver.solve(u0=U0, rhs=rhs[0][lo:hi])[1])
        deferred, immediate = infos
        assert len(deferred.residuals) == len(immediate.residuals) == 5
        assert not deferred.converged and not immediate.converged
        for a, b in zip(deferred.residuals, immediate.residuals):
            assert math.isclose(a, b, rel_tol=1e-12), (deferred.residuals, immediate.residuals)

        ws = SolverWorkspace()
        s = MGRITSettings(**base)
        fresh, _ = MGRIT(_stepper(), comm, n, s).solve(u0=U0, rhs=rhs[0][lo:hi])
        first, _ = MGRIT(_stepper(), comm, n, s, workspace=ws).solve(u0=U0, rhs=rhs[0][lo:hi])
        kept = {k: v for k, v in ws.free.items()}
        assert kept, "the coarse levels took no buffers from the workspace"
        MGRIT(_stepper(), comm, n, s, workspace=ws).solve(u0=U0, rhs=rhs[1][lo:hi])
        again, _ = MGRIT(_stepper(), comm, n, s, workspace=ws).solve(u0=U0, rhs=rhs[0][lo:hi])
        assert ws.free.keys() == kept.keys()
        assert all(ws.free[k] is v for k, v in kept.items())
        # the same operations in the same order: the same numbers, dirty buffers or not
        assert torch.equal(first, fresh) and torch.equal(again, fresh)
        truth = _stepper().sequential(U0, n, rhs[0])[lo:hi]
        assert (fresh - truth).abs().max() < (truth.abs().max() + 1)   # a sane solve


CHECKS = [check_converges_to_sequential, check_two_level_f_exact_after_nc_iterations,
          check_residuals_independent_of_p, check_reverse_time, check_access_flags, check_halo,
          check_deferred_residuals_and_reused_buffers]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_serial(check):
    check(Comm.serial())


@pytest.mark.mpi
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_mpi(check):
    check(Comm.world())


def test_fixed_iterations_and_tolerance_stop():
    st = _stepper()
    info = MGRIT(st, None, 64, MGRITSettings(levels=2, max_iters=3)).solve(u0=U0)[1]
    assert info.iterations == 3 and len(info.residuals) == 4 and not info.converged
    info = MGRIT(st, None, 64, MGRITSettings(levels=2, max_iters=50, rel_tol=1e-6)).solve(u0=U0)[1]
    assert info.converged and info.residuals[-1] <= 1e-6 * info.residuals[0]
    assert all(r < info.residuals[0] * 1e-6 for r in info.residuals[-1:])
    assert info.residuals[-2] > 1e-6 * info.residuals[0]  # stopped at the first iterate below tol


def test_step_counts_match_the_algorithm():
    """F-relaxation two-level: per iteration N-N/m fine F-steps + N/m residual steps + coarse."""
    n, m, k = 64, 4, 2
    st = _stepper()
    info = MGRIT(st, None, n, MGRITSettings(levels=2, cfactor=m, max_iters=k, relax="F")).solve(u0=U0)[1]
    nc = n // m
    f_sweep = n - nc
    # initial F-sweep + residual, then per iteration: FAS rhs (nc coarse), coarse sweep (nc), interp F-sweep, residual
    assert info.steps[0] == f_sweep + nc + k * (f_sweep + nc)
    assert info.steps[1] == k * (nc + nc)


def test_log_line_format():
    lines = []
    s = MGRITSettings(levels=2, max_iters=2, verbose=True)
    MGRIT(_stepper(), None, 32, s, log=lines.append).solve(u0=U0)
    assert len(lines) == 3
    fields = [x.strip() for x in lines[1].split("|")]
    assert fields[0].startswith("fwd iter") and fields[1].startswith("residual") and fields[3].endswith("s")


@pytest.mark.parametrize("kw", [dict(relax="X"), dict(cycle="W"), dict(max_iters=-1), dict(cfactor=1), dict(abs_tol=-1)])
def test_bad_settings(kw):
    with pytest.raises(InputError):
        MGRITSettings(**kw)


def test_final_residual_can_be_skipped():
    st = _stepper()
    a = MGRIT(st, None, 64, MGRITSettings(levels=3, max_iters=2)).solve(u0=U0)
    b = MGRIT(st, None, 64, MGRITSettings(levels=3, max_iters=2, final_residual=False)).solve(u0=U0)
    assert torch.equal(a[0], b[0])                       # same answer
    assert b[1].residuals == a[1].residuals[:-1]         # one residual fewer
    assert a[1].steps[0] - b[1].steps[0] == 64 // 4      # N/m fine steps saved


def test_grid_first_then_stepper_and_solver():
    """The grid exists before any stepper; the solver takes the stepper at construction
    and refuses a grid made for other settings; its stepper cannot be replaced."""
    s = MGRITSettings(levels=3, cfactor=4, max_iters=50, abs_tol=1e-13)
    grid = MGRIT.make_grid(None, 40, s, reverse=True)
    assert grid.reverse and grid.fine_range.lo == 0 and grid.fine_range.hi == 41
    solver = MGRIT(_stepper(), None, grid, s)
    assert solver.grid is grid and solver.N == 40 and solver.reverse
    with pytest.raises(AttributeError):
        solver.stepper = _stepper()
    with pytest.raises(ValueError, match="does not match"):
        MGRIT(_stepper(), None, grid, MGRITSettings(levels=2, cfactor=4))
    with pytest.raises(ValueError, match="contradicts"):
        MGRIT(_stepper(), None, grid, s, reverse=False)

    class NoAlloc:
        state_shape, dtype = (1,), torch.float64

        def step(self, u, t_from, t_to, level, rhs=None, *, out):
            return out.copy_(u)
    with pytest.raises(TypeError, match="zeros"):
        MGRIT(NoAlloc(), None, 10, s)
    assert isinstance(_stepper(), TimeStepper) and not isinstance(NoAlloc(), TimeStepper)


def test_rhs_is_added_by_the_stepper():
    """The solver hands g to the stepper: a stepper that ignored rhs gets the
    homogeneous solution, one that adds it the sequential truth with sources."""
    class IgnoresRhs(DahlquistStepper):
        def step(self, u, t_from, t_to, level, rhs=None, *, out):
            return super().step(u, t_from, t_to, level, None, out=out)
    n = 20
    rhs = torch.randn((n + 1, 3), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    s = MGRITSettings(levels=1)
    lam = torch.tensor([-0.3, -2.0, -10.0])
    kw = dict(lam=lam, dt=0.1, state_shape=(3,))
    u, _ = MGRIT(IgnoresRhs(**kw), None, n, s).solve(u0=U0, rhs=rhs)
    torch.testing.assert_close(u, DahlquistStepper(**kw).sequential(U0, n), rtol=0, atol=1e-14)
    u, _ = MGRIT(DahlquistStepper(**kw), None, n, s).solve(u0=U0, rhs=rhs)
    torch.testing.assert_close(u, DahlquistStepper(**kw).sequential(U0, n, rhs), rtol=0, atol=1e-14)


def test_own_stepper_example_of_the_docs():
    """The example of docs/mgrit.md ("Using the solver on your own stepper") runs and
    gives backward Euler's closed form."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "mgrit.md").read_text()
    part = doc.split("## Using the solver on your own stepper", 1)[1]
    code = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/mgrit.md", "exec"), scope)
    u, info, lo = scope["u"], scope["info"], scope["lo"]
    assert info.converged
    t = torch.arange(lo, lo + u.shape[0], dtype=torch.float64)
    want = (1.0 / 1.01) ** t
    torch.testing.assert_close(u, want.unsqueeze(1).expand_as(u), rtol=0, atol=1e-9)
    assert issubclass(scope["Decay"], StepperBase)
