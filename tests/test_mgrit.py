"""The MGRIT solver on the Dahlquist reference stepper (closed-form truth).

Each check is a function of a communicator: the serial tests run it at P=1,
the ``mpi`` tests at whatever size mpiexec gives (CI: 2 and 3).
"""
import math

import pytest
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError
from mgrit_gru.core.solver import MGRIT, MGRITSettings
from mgrit_gru.core.stepper import DahlquistStepper

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


CHECKS = [check_converges_to_sequential, check_two_level_f_exact_after_nc_iterations,
          check_residuals_independent_of_p, check_reverse_time]


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
