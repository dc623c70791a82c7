"""MGRIT on the implicit GRU: forward states, gradients and rank independence.

Truths: the serial step loop (forward states) and autograd BPTT of the serial
model (gradients).  Each check takes a communicator; the serial tests run it at
P = 1 and the ``mpi`` tests at the size mpiexec gives (CI: 2, 3 and 4).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mgrit_gru.models import MGRITOptions, MGRITPropagator
from mgrit_gru.core.comm import Comm
from mgrit_gru.models import AutogradPropagator, SequenceClassifier

D, H, C, B = 3, 8, 4, 5
TIGHT = MGRITOptions(levels=3, cfactor=4, fwd_iters=60, bwd_iters=60, fwd_tol=1e-13, bwd_tol=1e-13)


def _model(pooling="last", seed=0, cell="implicit-gru"):
    torch.manual_seed(seed)
    return SequenceClassifier(cell, D, H, C, pooling=pooling, dtype=torch.float64)


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([n, max(n - 3, 1), 1, max(n // 2, 1), min(7, n)])
    y = torch.randint(0, C, (B,), generator=g)
    return x, lengths, y


def _loss_and_grads(model, prop, x, lengths, y):
    model.propagator = prop
    model.zero_grad()
    loss = F.cross_entropy(model(x, lengths), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_forward_states_equal_serial(comm):
    for n in [37, 128]:
        model = _model()
        x, _, _ = _batch(n)
        prop = MGRITPropagator(comm, TIGHT)
        lo, hi, _, _, _, h, _ = prop.solve_states(model.cell, x)
        # the truth: the plain loop of the cell's differentiable step
        s = torch.zeros(B, H, dtype=torch.float64)
        states = [s]
        with torch.no_grad():
            xw = model.cell.input_projection(x)
            for t in range(n):
                s = model.cell.forward_state(xw[:, t], s)
                states.append(s)
        truth = torch.stack(states)[lo:hi]
        assert prop.last_stats["fwd_residual"] <= 1e-13
        assert torch.allclose(h, truth, rtol=0, atol=1e-10), (n, (h - truth).abs().max())


def check_gradients_equal_bptt(comm):
    # every cell: the kernels' fused paths (projection gradients, adjoint steps) per cell
    cases = [(pooling, n, "implicit-gru") for pooling in ["last", "mean"] for n in [37, 64]]
    cases += [("mean", 37, cell) for cell in ["gru", "lstm", "rnn"]]
    for pooling, n, cell in cases:
        model = _model(pooling, cell=cell)
        x, lengths, y = _batch(n, seed=n)
        l_ref, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
        prop = MGRITPropagator(comm, TIGHT)
        l_mg, g_mg = _loss_and_grads(model, prop, x, lengths, y)
        assert abs(l_ref - l_mg) < 1e-10
        assert prop.last_stats["bwd_residual"] <= 1e-13
        for name in g_ref:
            assert torch.allclose(g_mg[name], g_ref[name], rtol=0, atol=1e-9), \
                (pooling, n, cell, name)


def check_inexact_gradient_is_a_descent_direction(comm):
    """The cheap 2/1-iteration gradient is not exact, but it points downhill."""
    model = _model()
    x, lengths, y = _batch(128, seed=3)
    _, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    _, g_mg = _loss_and_grads(model, MGRITPropagator(comm, MGRITOptions()), x, lengths, y)
    a = torch.cat([g.flatten() for g in g_ref.values()])
    b = torch.cat([g.flatten() for g in g_mg.values()])
    assert not torch.allclose(a, b, atol=1e-12)       # really inexact (else the test proves nothing)
    assert float(a @ b) / float(a.norm() * b.norm()) > 0.9


def _train_three_steps(comm, relax):
    model = _model(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    prop = MGRITPropagator(comm, MGRITOptions(fwd_iters=2, bwd_iters=1, relax=relax))
    model.propagator = prop
    history = []
    for k in range(3):
        x, lengths, y = _batch(37, seed=10 + k)
        opt.zero_grad()
        loss = F.cross_entropy(model(x, lengths), y)
        loss.backward()
        opt.step()
        history.append((loss.item(), prop.last_info["fwd"].residuals, prop.last_info["bwd"].residuals))
    with torch.no_grad():
        loss = F.cross_entropy(model(*_batch(37, seed=99)[:2]), _batch(37, seed=99)[2]).item()
    return history, loss


def check_rank_independence(comm):
    for relax in ["F", "FCF"]:
        hist_p, loss_p = _train_three_steps(comm, relax)
        hist_1, loss_1 = _train_three_steps(Comm.serial(), relax)
        assert math.isclose(loss_p, loss_1, rel_tol=1e-12)
        for (lp, fp, bp), (l1, f1, b1) in zip(hist_p, hist_1):
            assert math.isclose(lp, l1, rel_tol=1e-12)
            assert len(fp) == len(f1) == 3 and len(bp) == len(b1) == 2
            for a, b in zip(fp + bp, f1 + b1):
                assert math.isclose(a, b, rel_tol=1e-12), (fp, f1, bp, b1)


TIGHT_KW = dict(fwd_iters=60, bwd_iters=60, fwd_tol=1e-13, bwd_tol=1e-13)


def _assert_grads_equal(got, want, atol=1e-9, what=""):
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=atol), (what, name)


def check_options_converge_to_bptt(comm):
    """Nested iteration, F-cycle, interval-mean coarse inputs, FCF, relative
    tolerances, and a skipped first relaxation with a tolerance (whose untouched
    zero guess of the adjoint has zero C-point residuals): at tight tolerances
    every one gives the exact gradient."""
    model = _model("mean")
    x, lengths, y = _batch(45, seed=8)
    l_ref, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    for kw in [dict(nested=True), dict(cycle="F", levels=4, cfactor=2), dict(coarse_input="mean"),
               dict(relax="FCF", nested=True), dict(skip_first_relax=True),
               dict(final_residual=False),      # the adjoint gets recomputed projections
               dict(fwd_iters=60, bwd_iters=60, fwd_rtol=1e-12, bwd_rtol=1e-12),
               dict(fwd_iters=60, bwd_iters=60, fwd_rtol=1e-12, bwd_rtol=1e-12, skip_first_relax=True)]:
        opts = MGRITOptions(**(kw if "fwd_rtol" in kw else dict(TIGHT_KW, **kw)))
        prop = MGRITPropagator(comm, opts)
        l_mg, g_mg = _loss_and_grads(model, prop, x, lengths, y)
        assert abs(l_ref - l_mg) < 1e-10, kw
        assert prop.last_stats["bwd_iters"] >= 1, kw
        _assert_grads_equal(g_mg, g_ref, what=kw)


def check_input_gradient(comm):
    """x.grad under MGRIT (a layer before the recurrence needs it) equals BPTT's."""
    for cell in ("implicit-gru", "lstm"):
        model = _model("mean", cell=cell)
        x, lengths, y = _batch(40, seed=9)
        grads = []
        for prop in (AutogradPropagator(), MGRITPropagator(comm, TIGHT)):
            model.propagator = prop
            xr = x.clone().requires_grad_(True)
            F.cross_entropy(model(xr, lengths), y).backward()
            grads.append(xr.grad)
        assert grads[1] is not None
        assert torch.allclose(grads[1], grads[0], rtol=0, atol=1e-10), cell


def check_warm_start(comm):
    """The second solve of the same sequences starts where the first ended;
    at tight tolerances a warm-started gradient is the exact one."""
    model = _model("mean")
    x, lengths, y = _batch(50, seed=10)
    ids = [7, 3, 11, 0, 5]
    prop = MGRITPropagator(comm, MGRITOptions(warm_start=True))
    first = None
    for k in range(2):
        prop.set_sample_ids(ids)
        _loss_and_grads(model, prop, x, lengths, y)
        if first is None:
            first = prop.last_info["fwd"].residuals
    again = prop.last_info["fwd"].residuals
    assert math.isclose(again[0], first[-1], rel_tol=1e-9)   # same weights: the last state
    assert again[-1] < first[-1]
    assert len(prop.warm) == 2 * len(ids)
    # exact at tight tolerances, after a weight change (a stale guess is only a guess)
    _, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    prop = MGRITPropagator(comm, MGRITOptions(warm_start=True, **TIGHT_KW))
    with torch.no_grad():
        prop.set_sample_ids(ids)
        model.propagator = prop
        model.cell.weight_hh.mul_(0.9)
        model(x, lengths)
        model.cell.weight_hh.div_(0.9)
    prop.set_sample_ids(ids)
    _, g_mg = _loss_and_grads(model, prop, x, lengths, y)
    _assert_grads_equal(g_mg, g_ref, what="warm")


def check_batch_shorter_than_time_ranks(comm):
    """Fewer steps than time ranks: serial on every rank, the exact gradient."""
    n = comm.size - 1
    if n < 1:
        return
    model = _model("last")
    x, lengths, y = _batch(n, seed=11)
    lengths = lengths.clamp(max=n)
    _, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    prop = MGRITPropagator(comm, MGRITOptions(), log=lambda line: None)
    _, g_mg = _loss_and_grads(model, prop, x, lengths, y)
    assert prop.last_stats["serial_fallback"] == 1.0
    _assert_grads_equal(g_mg, g_ref, atol=1e-12)


CHECKS = [check_forward_states_equal_serial, check_gradients_equal_bptt,
          check_inexact_gradient_is_a_descent_direction, check_rank_independence,
          check_options_converge_to_bptt, check_input_gradient, check_warm_start,
          check_batch_shorter_than_time_ranks]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_serial(check):
    check(Comm.serial())


@pytest.mark.mpi
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_mpi(check):
    check(Comm.world())


def test_batch_shorter_than_time_ranks_runs_serially():
    """Fewer steps than time ranks: the serial recurrence on every rank, counted."""
    class Fake(Comm):
        def __init__(self):
            super().__init__(None)
            self.size = 9
    model = _model()
    x, lengths, y = _batch(4, seed=5)
    lengths = lengths.clamp(max=4)
    l_ref, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    prop = MGRITPropagator(Fake(), MGRITOptions(), log=lambda line: None)
    l_mg, g_mg = _loss_and_grads(model, prop, x, lengths, y)
    assert prop.last_stats["serial_fallback"] == 1.0
    assert abs(l_ref - l_mg) < 1e-12
    for name in g_ref:
        torch.testing.assert_close(g_mg[name], g_ref[name], rtol=0, atol=1e-12)


def test_float32_forward_matches_serial():
    torch.manual_seed(0)
    model = SequenceClassifier("implicit-gru", D, H, C)
    x = torch.randn(B, 100, D)
    ref = model.features(x)
    model.propagator = MGRITPropagator(None, MGRITOptions(fwd_iters=50, fwd_tol=1e-7))
    assert torch.allclose(model.features(x), ref, atol=1e-5)


@pytest.mark.parametrize("opts", [MGRITOptions(), MGRITOptions(relax="FCF", cycle="F"), MGRITOptions(levels=1),
                                  MGRITOptions(fwd_iters=0), MGRITOptions(nested=True, relax="FCF"),
                                  # the last sweep did not step from every final state: the
                                  # access hook recomputes the stale projections
                                  MGRITOptions(final_residual=False),
                                  MGRITOptions(fwd_iters=0, skip_first_relax=True),
                                  MGRITOptions(final_residual=False, relax="FCF", nested=True)])
def test_saved_hidden_projections_are_those_of_the_final_states(opts):
    """The adjoint reuses the forward's projections: they must be those of the final
    states, whatever the last sweep stepped from."""
    model = _model()
    x, _, _ = _batch(37)
    *_, h, hw = MGRITPropagator(None, opts).solve_states(model.cell, x)
    assert hw is not None
    with torch.no_grad():
        # step by step, not one batched GEMM over all steps: a differently blocked
        # product may differ in the last bit (seen on AMD EPYC), so compare with a
        # float64 tolerance far below any stale projection's error (O(1e-3) here)
        for t in range(h.shape[0]):
            want = model.cell.hidden_projection(model.cell.hidden(h[t]))
            torch.testing.assert_close(hw[t], want, rtol=0, atol=1e-13)


def test_stale_projections_are_recomputed_in_one_call():
    """After a solve without its final residual the rows before the C-points were
    written after their last step: exactly those (and the last row) are recomputed,
    in one call of hidden_projection."""
    model = _model()
    x, _, _ = _batch(37)
    calls = []
    real = model.cell.hidden_projection

    def counting(h, out=None):
        if h.dim() == 3:                 # many rows at once; a step projects one [B, H]
            calls.append(h.shape[0])
        return real(h, out=out)
    model.cell.hidden_projection = counting
    try:
        MGRITPropagator(None, MGRITOptions(final_residual=False, relax="F")).solve_states(model.cell, x)
    finally:
        del model.cell.hidden_projection
    m = 4
    stale = len(range(m - 1, 37, m)) + 1    # rows c-1 of the C-points 4, 8, .., 36, and row 37
    assert calls == [stale], calls


def _stepper_cases():
    """(name, stepper factory) of every stepper of the package, on small problems."""
    from mgrit_gru.core.solver import MGRIT, MGRITSettings
    from mgrit_gru.core.stepper import DahlquistStepper
    from mgrit_gru.models.steppers import CellAdjointStepper, CellForwardStepper, Inputs

    def dahlquist():
        return DahlquistStepper(lam=torch.tensor([-0.3, -2.0], dtype=torch.float64), dt=0.1, state_shape=(2,)), \
            lambda u, t_from, t_to: u / (1 + torch.tensor([0.3, 2.0], dtype=torch.float64) * 0.1 * (t_to - t_from))

    def forward():
        model = _model()
        x, _, _ = _batch(16)
        with torch.no_grad():
            xw = model.cell.input_projection(x.transpose(0, 1).contiguous())
        st = CellForwardStepper(model.cell, xw, 0, B, inputs=Inputs(xw, 0, "end"))

        def truth(u, t_from, t_to):      # level 0: the cell's differentiable step, dt = 1
            with torch.no_grad():
                return model.cell.forward_state(xw[t_to - 1], u, float(t_to - t_from))
        return st, truth

    def adjoint():
        model = _model()
        n = 16
        x, _, _ = _batch(n)
        s = MGRITSettings(levels=2, cfactor=4)
        grid = MGRIT.make_grid(None, n, s, reverse=True)
        with torch.no_grad():
            xw = model.cell.input_projection(x.transpose(0, 1).contiguous())
            h = torch.zeros(n + 1, B, H, dtype=torch.float64)
            for t in range(n):
                h[t + 1] = model.cell.forward_state(xw[t], h[t])
        st = CellAdjointStepper(model.cell, grid, h, 0, xw, 0, B)

        def truth(g, s_from, s_to):      # autograd VJP of the forward step t -> t+1
            t = n - s_to
            hp = h[t].clone().requires_grad_(True)
            with torch.enable_grad():
                out = model.cell.forward_state(xw[t], hp)
                return torch.autograd.grad(out, hp, g)[0]
        return st, truth

    return [("dahlquist", dahlquist), ("forward", forward), ("adjoint", adjoint)]


@pytest.mark.parametrize("name,make", _stepper_cases(), ids=[c[0] for c in _stepper_cases()])
def test_stepper_conformance(name, make):
    """Every stepper keeps the protocol of mgrit_gru.core.stepper (XBraid's braid_TestAll):
    zeros/clone allocate on its device and dtype, clone is deep, step writes out and
    returns it, leaves u and rhs alone, adds rhs exactly once, and a fine step equals
    an independent truth (closed form, the cell's autograd step, autograd's VJP)."""
    st, truth = make()
    z = st.zeros(3)
    assert z.shape == (3, *st.state_shape) and z.dtype == st.dtype and z.device == st.device
    assert not z.any()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(st.state_shape, generator=g, dtype=st.dtype)
    c = st.clone(u)
    c += 1
    assert not torch.equal(c, u)                          # deep
    rhs = torch.randn(st.state_shape, generator=g, dtype=st.dtype)
    u0, rhs0 = u.clone(), rhs.clone()
    out = st.zeros()
    assert st.step(u, 3, 4, 0, out=out) is out
    plain = out.clone()
    torch.testing.assert_close(plain, truth(u, 3, 4), rtol=0, atol=1e-12)
    out2 = st.zeros()
    assert st.step(u, 3, 4, 0, rhs, out=out2) is out2
    torch.testing.assert_close(out2, plain + rhs, rtol=0, atol=1e-12)
    assert torch.equal(u, u0) and torch.equal(rhs, rhs0)  # inputs untouched (same tensors)
    # a coarse step (level 1, four intervals) runs and adds its rhs as well
    coarse = st.step(u, 4, 8, 1, out=st.zeros())
    torch.testing.assert_close(st.step(u, 4, 8, 1, rhs, out=st.zeros()), coarse + rhs, rtol=0, atol=1e-12)
    assert st.access(st.zeros(2), 0, bytes(2)) is None    # the hook exists (a no-op here)


def test_backward_uses_the_parameters_of_the_forward():
    """Parameters replaced between forward and backward (functional_call-like):
    the gradient is the one at the forward's parameters, not the cell's new ones."""
    model = _model("mean")
    x, lengths, y = _batch(30, seed=12)
    _, g_ref = _loss_and_grads(model, AutogradPropagator(), x, lengths, y)
    model.propagator = MGRITPropagator(None, TIGHT)
    model.zero_grad()
    old = {n: p for n, p in model.cell.named_parameters()}
    loss = F.cross_entropy(model(x, lengths), y)
    for name, p in old.items():        # new parameter objects with other values
        setattr(model.cell, name, torch.nn.Parameter(p.detach() * 1.5))
    loss.backward()
    for name, p in old.items():
        assert torch.allclose(p.grad, g_ref[f"cell.{name}"], rtol=0, atol=1e-9), name


def test_tolerance_below_dtype_reach_warns():
    lines = []
    torch.manual_seed(0)
    model = SequenceClassifier("implicit-gru", D, H, C)
    model.propagator = MGRITPropagator(None, MGRITOptions(fwd_iters=30, fwd_rtol=1e-12),
                                       log=lines.append)
    model(torch.randn(B, 40, D))
    assert any("below what float32 can reach" in line for line in lines), lines
