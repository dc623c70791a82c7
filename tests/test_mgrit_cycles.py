"""Nested iteration, the F-cycle, tolerances after a skipped relaxation.

Truths: the closed-form sequential solution of the Dahlquist stepper, and an
independently coded reference MGRIT (serial, whole arrays, plain numpy, a few
dozen lines written from the algorithm's definition) whose residual history
the parallel solver must reproduce for V- and F-cycles.
"""
import math

import numpy as np
import pytest
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.core.solver import MGRIT, MGRITSettings
from mgrit_gru.core.stepper import DahlquistStepper

LAM, DT = -1.5, 0.1


def _stepper():
    return DahlquistStepper(lam=LAM, dt=DT, state_shape=(1,))


# --------------------------------------------------------------------------- #
# reference: serial FAS MGRIT on whole numpy arrays (one scalar mode)
# --------------------------------------------------------------------------- #
class Reference:
    """u_i = a_l u_{i-1} + g_i on level l (a_l: backward Euler over m**l steps).

    One iteration: on the fine level (FCF or F relaxation), the C-point
    residual, FAS restriction by injection, the level-1 problem solved by one
    cycle of the given kind, correction, F-relaxation. A V-cycle on level l:
    relax, restrict, V on l+1, correct. An F-cycle on level l: relax,
    restrict, F on l+1, correct, relax, restrict, V on l+1, correct. The
    coarsest level: a sequential sweep.
    """

    def __init__(self, n, m, levels, relax):
        self.m, self.relax = m, relax
        self.sizes = [n + 1]
        while len(self.sizes) < levels and (self.sizes[-1] - 1) // m >= 1:
            self.sizes.append((self.sizes[-1] - 1) // m + 1)
        self.L = len(self.sizes)
        self.a = [1.0 / (1.0 - LAM * DT * m ** l) for l in range(self.L)]

    def f_relax(self, l, u, g):
        for i in range(1, len(u)):
            if i % self.m:
                u[i] = self.a[l] * u[i - 1] + g[i]

    def c_relax(self, l, u, g):
        for i in range(self.m, len(u), self.m):
            u[i] = self.a[l] * u[i - 1] + g[i]

    def residual(self, l, u, g):
        r = np.zeros_like(u)
        r[1:] = g[1:] + self.a[l] * u[:-1] - u[1:]
        return r

    def do_relax(self, l, u, g):
        self.f_relax(l, u, g)
        if self.relax == "FCF":
            self.c_relax(l, u, g)
            self.f_relax(l, u, g)

    def correct(self, l, u, g, kind):
        m = self.m
        r = self.residual(l, u, g)
        v = u[::m].copy()
        gc = np.zeros_like(v)
        gc[0] = v[0]
        gc[1:] = r[m::m] + v[1:] - self.a[l + 1] * v[:-1]
        uc = v.copy()
        self.cycle(l + 1, uc, gc, kind)
        u[::m] += uc - v
        self.f_relax(l, u, g)

    def cycle(self, l, u, g, kind):
        if l == self.L - 1:
            for i in range(1, len(u)):
                u[i] = self.a[l] * u[i - 1] + g[i]
            return
        self.do_relax(l, u, g)
        self.correct(l, u, g, kind)
        if kind == "F":
            self.do_relax(l, u, g)
            self.correct(l, u, g, "V")

    def solve(self, u0, g, iters, kind):
        u = np.zeros(self.sizes[0])
        u[0] = u0
        self.f_relax(0, u, g)
        res = [self.norm(u, g)]
        for _ in range(iters):
            if self.relax == "FCF":
                self.c_relax(0, u, g)
                self.f_relax(0, u, g)
            self.correct(0, u, g, kind)
            res.append(self.norm(u, g))
        return u, res

    def norm(self, u, g):
        r = self.residual(0, u, g)
        return math.sqrt(float(np.sum(r[self.m::self.m] ** 2)))


def _rhs(n, seed=3):
    return torch.randn((n + 1, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mgrit(comm, n, settings, rhs, reverse=False):
    solver = MGRIT(_stepper(), comm, n, settings, reverse=reverse)
    lo, hi = solver.fine_range.lo, solver.fine_range.hi
    return solver.solve(u0=torch.tensor([1.0], dtype=torch.float64), rhs=rhs[lo:hi]), (lo, hi)


def check_cycles_match_the_reference(comm):
    n, m = 64, 2
    rhs = _rhs(n)
    for levels in (3, 4, 5):
        for relax in ("F", "FCF"):
            for kind in ("V", "F"):
                ref = Reference(n, m, levels, relax)
                _, want = ref.solve(1.0, rhs[:, 0].numpy().copy(), 4, kind)
                s = MGRITSettings(levels=levels, cfactor=m, max_iters=4, relax=relax, cycle=kind)
                (_, info), _ = _mgrit(comm, n, s, rhs)
                assert len(info.residuals) == len(want)
                # round-off: relative to the first residual (the blocking differs)
                for a, b in zip(info.residuals, want):
                    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12 * want[0]), (
                        levels, relax, kind, info.residuals, want)


def check_f_cycle_iteration_counts(comm):
    """Iterations to a tolerance: equal to the reference's, and the F-cycle needs
    no more than the V-cycle."""
    n, m, tol = 64, 2, 1e-10
    rhs = _rhs(n, seed=4)
    for levels in (3, 4):
        counts = {}
        for kind in ("V", "F"):
            _, res = Reference(n, m, levels, "F").solve(1.0, rhs[:, 0].numpy().copy(), 40, kind)
            want = next(k for k, r in enumerate(res) if r <= tol)
            s = MGRITSettings(levels=levels, cfactor=m, max_iters=40, abs_tol=tol, relax="F", cycle=kind)
            (_, info), _ = _mgrit(comm, n, s, rhs)
            assert info.converged and info.iterations == want, (levels, kind, info.residuals, res)
            counts[kind] = want
        assert counts["F"] <= counts["V"]


def check_nested_iteration(comm):
    """Converges to the sequential answer; its residual history is that of one
    process; it starts closer than a zero guess."""
    n = 61
    rhs = _rhs(n, seed=5)
    truth = _stepper().sequential(torch.tensor([1.0], dtype=torch.float64), n, rhs)
    for levels, relax, kind in ((2, "F", "V"), (3, "FCF", "V"), (4, "F", "F")):
        for reverse in (False, True):
            s = MGRITSettings(levels=levels, cfactor=2, max_iters=50, abs_tol=1e-13,
                              relax=relax, cycle=kind, nested=True)
            (u, info), (lo, hi) = _mgrit(comm, n, s, rhs, reverse=reverse)
            assert info.converged
            assert torch.allclose(u, truth[lo:hi], rtol=0, atol=1e-11)
            (_, one), _ = _mgrit(Comm.serial(), n, s, rhs, reverse=reverse)
            assert info.iterations == one.iterations
            for a, b in zip(info.residuals, one.residuals):
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12 * one.residuals[0])
            cold = MGRITSettings(levels=levels, cfactor=2, max_iters=0, relax=relax, cycle=kind)
            (_, zero), _ = _mgrit(comm, n, cold, rhs, reverse=reverse)
            assert info.residuals[0] < zero.residuals[0]


def check_tolerance_after_skipped_relaxation(comm):
    """A zero guess and a right-hand side at F-points only: every C-point residual
    of the untouched guess is 0. The solve must not stop there."""
    n, m = 48, 4
    rhs = _rhs(n, seed=6)
    rhs[::m] = 0
    truth = _stepper().sequential(torch.zeros(1, dtype=torch.float64), n, rhs)
    for tol in (dict(abs_tol=1e-12), dict(rel_tol=1e-12)):
        s = MGRITSettings(levels=3, cfactor=m, max_iters=40, skip_first_relax=True, **tol)
        solver = MGRIT(_stepper(), comm, n, s)
        lo, hi = solver.fine_range.lo, solver.fine_range.hi
        u, info = solver.solve(u0=torch.zeros(1, dtype=torch.float64), rhs=rhs[lo:hi])
        assert info.residuals[0] == 0.0          # the trap
        assert info.iterations >= 1 and info.converged, (tol, info.residuals)
        err = comm.allreduce_scalar(float((u - truth[lo:hi]).abs().max()), "max")
        assert err < 1e-10, (tol, err)


def check_guess_at_c_points(comm):
    """An initial guess at the level-1 points: the exact answer there converges at once."""
    n = 40
    rhs = _rhs(n, seed=7)
    truth = _stepper().sequential(torch.tensor([1.0], dtype=torch.float64), n, rhs)
    s = MGRITSettings(levels=3, cfactor=4, max_iters=5, abs_tol=1e-12)
    solver = MGRIT(_stepper(), comm, n, s)
    lo, hi = solver.fine_range.lo, solver.fine_range.hi
    guess = truth[lo:hi][solver.c_rows]
    u, info = solver.solve(u0=torch.tensor([1.0], dtype=torch.float64), rhs=rhs[lo:hi], guess_c=guess)
    assert info.converged and info.iterations == 0
    assert torch.allclose(u, truth[lo:hi], rtol=0, atol=1e-12)
    # masked: only where the mask is true
    mask = torch.zeros_like(guess, dtype=torch.bool)
    u, info = solver.solve(u0=torch.tensor([1.0], dtype=torch.float64), rhs=rhs[lo:hi],
                           guess_c=guess, guess_mask=mask)
    assert info.iterations > 0


CHECKS = [check_cycles_match_the_reference, check_f_cycle_iteration_counts, check_nested_iteration,
          check_tolerance_after_skipped_relaxation, check_guess_at_c_points]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_serial(check):
    check(Comm.serial())


@pytest.mark.mpi
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_mpi(check):
    check(Comm.world())


@pytest.mark.parametrize("levels", [3, 4, 5])
def test_f_cycle_sweeps_the_coarsest_level_levels_minus_1_times(levels):
    """Hand count: F(l) calls F(l+1) and V(l+1), so from the fine level an
    F-iteration reaches level k k times; the coarsest level (its sweep and the
    FAS right-hand side of it) costs L-1 times the V-cycle's steps, the fine
    level the same."""
    n, m, k = 64, 2, 3
    rhs = _rhs(n)
    steps = {}
    for kind in ("V", "F"):
        s = MGRITSettings(levels=levels, cfactor=m, max_iters=k, relax="F", cycle=kind)
        (_, info), _ = _mgrit(Comm.serial(), n, s, rhs)
        steps[kind] = info.steps
    assert steps["F"][0] == steps["V"][0]
    assert steps["F"][-1] == (levels - 1) * steps["V"][-1], steps
