"""Cells: equality with torch's cells, hand-written VJPs against autograd,
stability of the implicit GRU for huge time steps."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mgrit_gru.models.cells import CELLS, ImplicitGRUCell, make_cell, select_lin
from mgrit_gru.errors import InputError

TORCH_CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn": nn.RNNCell}
F64 = torch.float64


def _state(cell, *lead, dtype=F64, scale=1.0):
    return scale * torch.randn(*lead, cell.state_size, dtype=dtype)


# --------------------------------------------------------------------- torch
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(TORCH_CELLS))
def test_explicit_cells_equal_torch_both_ways(name, bias):
    torch.manual_seed(0)
    D, H, B = 7, 5, 6
    ref = TORCH_CELLS[name](D, H, bias=bias)
    ours = make_cell(name, D, H, bias=bias)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, D)
    h = torch.randn(B, H)
    hx = (h, torch.randn(B, H)) if name == "lstm" else h
    with torch.no_grad():
        expect = ref(x, hx)
        got = ours(x, hx)
        # the functional step on the state tensor gives the same
        s = torch.cat(hx, -1) if name == "lstm" else hx
        stepped = ours.step(ours.input_projection(x), s)
        # unbatched input, like torch
        single = ours(x[0], tuple(t[0] for t in hx) if name == "lstm" else h[0])
        # zero initial state by default
        zero_ref, zero_ours = ref(x), ours(x)
    expect_s = torch.cat(expect, -1) if name == "lstm" else expect
    for a, b in [(got, expect), (zero_ours, zero_ref)]:
        for u, v in zip(a, b) if name == "lstm" else [(a, b)]:
            torch.testing.assert_close(u, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(stepped, expect_s, rtol=0, atol=1e-6)
    first = torch.cat(single, -1) if name == "lstm" else single
    torch.testing.assert_close(first, expect_s[0], rtol=0, atol=1e-6)

    back = TORCH_CELLS[name](D, H, bias=bias)
    back.load_state_dict(make_cell(name, D, H, bias=bias).state_dict())
    ours2 = make_cell(name, D, H, bias=bias)
    ours2.load_state_dict(back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(ours2(x, hx), -1) if name == "lstm" else ours2(x, hx),
                                   torch.cat(back(x, hx), -1) if name == "lstm" else back(x, hx),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_initialisation_like_torch(name):
    torch.manual_seed(1)
    H = 16
    cell = make_cell(name, 3, H)
    bound = H ** -0.5
    for p in cell.parameters():
        assert p.dtype == torch.float32
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.5 * bound        # uniform, not zeros
    assert make_cell(name, 3, H, dtype=F64).weight_hh.dtype == F64


def test_make_cell_rejects_bad_input():
    with pytest.raises(InputError, match="cell") as err:
        make_cell("gruu", 3, 4)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="hidden_size"):
        make_cell("gru", 3, 0)
    with pytest.raises(InputError, match="input_size"):
        make_cell("lstm", 2.5, 4)
    for layers in (0, -1, 1.5, "2", True):
        with pytest.raises(InputError, match="layers: expected a positive integer") as err:
            make_cell("gru", 3, 4, layers=layers)
        assert "\n" not in str(err.value)
    assert make_cell("gru", 3, 4, layers=1).layers == 1
    assert make_cell("gru", 3, 4, layers=2).layers == 2


@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 8.0), ("gru", 1.0),
                                     ("lstm", 1.0), ("rnn", 1.0)])
def test_shared_work_helpers_of_stacks(name, dt):
    """What a stack asks of its layers: ``_linearize(want_new=True)`` gives the
    step's new hidden state with the same ``lin``; ``_vjp_both`` equals
    ``vjp_state`` and ``vjp_proj``'s ``g_xw`` (with and without ``acc``)."""
    torch.manual_seed(12)
    cell = make_cell(name, 3, 5, dtype=F64)
    x, s, g = torch.randn(4, 3, dtype=F64), _state(cell, 4), _state(cell, 4)
    with torch.no_grad():
        xw = cell.input_projection(x)
        lin, h_new = cell._linearize(xw, s, dt, None, True)
        assert cell._linearize(xw, s, dt, None, False)[1] is None
        for a, b in zip(lin, cell.linearize(xw, s, dt)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(h_new, cell.hidden(cell.step(xw, s, dt)), rtol=0, atol=1e-15)
        prev, g_xw = cell._vjp_both(lin, g)
        acc0 = _state(cell, 4)
        acc, _ = cell._vjp_both(lin, g, acc=acc0.clone())
    torch.testing.assert_close(prev, cell.vjp_state(lin, g), rtol=0, atol=1e-15)
    torch.testing.assert_close(g_xw, cell.vjp_proj(lin, g)[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(acc, acc0 + prev, rtol=0, atol=1e-14)


# ----------------------------------------------------------- implicit cell
def _implicit_reference(cell, x, h, dt):
    """The implicit GRU written out from its definition."""
    H = cell.hidden_size
    xw = x @ cell.weight_ih.T + cell.bias_ih
    hw = h @ cell.weight_hh.T + cell.bias_hh
    r = torch.sigmoid(xw[:, :H] + hw[:, :H])
    z = torch.sigmoid(xw[:, H:2 * H] + hw[:, H:2 * H])
    n = torch.tanh(xw[:, 2 * H:] + r * hw[:, 2 * H:])
    return z, n


@pytest.mark.parametrize("dt", [0.25, 1.0, 4.0, 16.0])
def test_implicit_cell_is_backward_euler(dt):
    torch.manual_seed(2)
    cell = ImplicitGRUCell(4, 6, dtype=F64)
    x, h = torch.randn(5, 4, dtype=F64), torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        z, n = _implicit_reference(cell, x, h, dt)
        h_new = cell(x, h, dt)
        # (h_new - h) / dt = (1 - z)(n - h_new): the backward Euler residual
        torch.testing.assert_close((h_new - h) / dt, (1 - z) * (n - h_new), rtol=0, atol=1e-13)
        torch.testing.assert_close(cell.step(cell.input_projection(x), h, dt), h_new,
                                   rtol=0, atol=1e-14)
        # a tensor dt broadcasts per sample
        dts = torch.full((5, 1), dt, dtype=F64)
        torch.testing.assert_close(cell.step(cell.input_projection(x), h, dts), h_new,
                                   rtol=0, atol=1e-14)
        # step writes into out= / hw_out= buffers
        out, hw = torch.empty_like(h), torch.empty(5, 18, dtype=F64)
        cell.step(cell.input_projection(x), h, dt, out=out, hw_out=hw)
        torch.testing.assert_close(out, h_new, rtol=0, atol=1e-14)
        torch.testing.assert_close(hw, cell.hidden_projection(h), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("dt", [1e3, 1e6])
def test_implicit_cell_stable_where_explicit_euler_blows_up(dt, dtype):
    torch.manual_seed(3)
    D, H, B, steps = 3, 8, 16, 60
    cell = ImplicitGRUCell(D, H, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(10.0 * H ** 0.5)               # weights of size ~10
    xs = 3.0 * torch.randn(steps, B, D, dtype=dtype)
    h0 = 2.0 * torch.rand(B, H, dtype=dtype) - 1.0
    h0[0, 0] = 1.7                                # max |h0| > 1
    bound = max(h0.abs().max().item(), 1.0) * (1 + 8 * torch.finfo(dtype).eps)
    h_imp, h_exp = h0.clone(), h0.clone()
    with torch.no_grad():
        for t in range(steps):
            xw = cell.input_projection(xs[t])
            h_imp = cell.step(xw, h_imp, dt)
            assert h_imp.abs().max() <= bound
            h_pub = cell(xs[t], h_imp, dt)
            assert h_pub.abs().max() <= bound
            z, n = _implicit_reference(cell, xs[t], h_exp, dt)
            h_exp = h_exp + dt * (1 - z) * (n - h_exp)     # explicit Euler, same gates
        q, chw, c_n = cell.linearize(cell.input_projection(xs[0]), h_imp, dt)
    assert all(torch.isfinite(c).all() for c in (q, chw, c_n))
    assert (q > 0).all() and (q <= 1).all()
    assert not torch.isfinite(h_exp).all() or h_exp.abs().max() > 1e6


# -------------------------------------------------------------------- VJPs
def _autograd_vjp(cell, x, s, g, dt):
    """Per-sample ``(g_s_prev, g_xw, g_hw)`` and parameter gradients by autograd.

    Per-sample biases (one row per sample) turn the bias gradients into the
    gradients with respect to ``xw`` and ``hw``.
    """
    N = x.shape[0]
    params = {
        "weight_ih": cell.weight_ih.detach().clone().requires_grad_(),
        "weight_hh": cell.weight_hh.detach().clone().requires_grad_(),
        "bias_ih": cell.bias_ih.detach().expand(N, -1).clone().requires_grad_(),
        "bias_hh": cell.bias_hh.detach().expand(N, -1).clone().requires_grad_(),
    }
    s = s.clone().requires_grad_()
    H = cell.hidden_size
    hx = (s[:, :H], s[:, H:]) if isinstance(cell, CELLS["lstm"]) else s
    out = functional_call(cell, params, (x, hx, dt))
    out = torch.cat(out, -1) if isinstance(out, tuple) else out
    (out * g).sum().backward()
    return s.grad, params


@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 4.0),
                                     ("implicit-gru", 16.0), ("gru", 1.0), ("lstm", 1.0),
                                     ("rnn", 1.0)])
def test_hand_vjp_equals_autograd(name, dt):
    torch.manual_seed(4)
    D, H, T, B = 3, 5, 3, 4
    cell = make_cell(name, D, H, dtype=F64)
    x = torch.randn(T, B, D, dtype=F64)
    s = _state(cell, T, B)
    g = _state(cell, T, B)
    with torch.no_grad():
        xw = cell.input_projection(x)
        lin = cell.linearize(xw, s, dt)                    # all T steps at once
        g_prev = cell.vjp_state(lin, g)
        g_xw, g_hw = cell.vjp_proj(lin, g)
        grads = cell.param_grads(x, s, g_xw, g_hw)
        acc0 = _state(cell, T, B)
        acc = cell.vjp_state(lin, g, acc=acc0.clone())
        conv = cell.vjp(xw, s, g, dt)
        one = cell.linearize(xw[1], s[1], dt, hw=cell.hidden_projection(cell.hidden(s[1])))
    flat = lambda t: t.reshape(T * B, -1)                  # noqa: E731
    ref_prev, p = _autograd_vjp(cell, flat(x), flat(s), flat(g), dt)
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(flat(g_prev), ref_prev, **tol)
    torch.testing.assert_close(flat(g_xw), p["bias_ih"].grad, **tol)
    torch.testing.assert_close(flat(g_hw), p["bias_hh"].grad, **tol)
    torch.testing.assert_close(grads["weight_ih"], p["weight_ih"].grad, **tol)
    torch.testing.assert_close(grads["weight_hh"], p["weight_hh"].grad, **tol)
    torch.testing.assert_close(grads["bias_ih"], p["bias_ih"].grad.sum(0), **tol)
    torch.testing.assert_close(grads["bias_hh"], p["bias_hh"].grad.sum(0), **tol)
    torch.testing.assert_close(acc, acc0 + g_prev, **tol)
    for a, b in zip(conv, (g_prev, g_xw, g_hw)):
        torch.testing.assert_close(a, b, **tol)
    # one step of a whole-sequence lin equals that step linearised alone
    for a, b in zip(select_lin(lin, 1), one):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_param_grads_without_bias(name):
    torch.manual_seed(5)
    cell = make_cell(name, 3, 4, bias=False, dtype=F64)
    x, s = torch.randn(6, 3, dtype=F64), _state(cell, 6)
    g = _state(cell, 6)
    with torch.no_grad():
        lin = cell.linearize(cell.input_projection(x), s)
        grads = cell.param_grads(x, s, *cell.vjp_proj(lin, g))
    assert set(grads) == {"weight_ih", "weight_hh"}
    hx = (s[:, :4], s[:, 4:]) if name == "lstm" else s
    out = cell(x, hx)
    out = torch.cat(out, -1) if isinstance(out, tuple) else out
    (out * g).sum().backward()
    torch.testing.assert_close(grads["weight_hh"], cell.weight_hh.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["weight_ih"], cell.weight_ih.grad, rtol=0, atol=1e-10)


class _HandStep(torch.autograd.Function):
    """One cell step whose backward is the cell's hand-written VJP."""

    @staticmethod
    def forward(ctx, cell, dt, x, s, *params):
        xw = cell.input_projection(x)
        ctx.cell, ctx.dt = cell, dt
        ctx.save_for_backward(x, xw, s)
        return cell.step(xw, s, dt)

    @staticmethod
    def backward(ctx, g):
        x, xw, s = ctx.saved_tensors
        cell = ctx.cell
        lin = cell.linearize(xw, s, ctx.dt)
        g_xw, g_hw = cell.vjp_proj(lin, g)
        grads = cell.param_grads(x, s, g_xw, g_hw)
        return (None, None, g_xw @ cell.weight_ih, cell.vjp_state(lin, g),
                *(grads[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))


class _HandStepModule(nn.Module):
    """Wraps a cell so that ``functional_call`` can substitute its parameters."""

    def __init__(self, cell, dt):
        super().__init__()
        self.cell, self.dt = cell, dt

    def forward(self, x, s):
        c = self.cell
        return _HandStep.apply(c, self.dt, x, s, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)


@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 16.0),
                                     ("gru", 1.0), ("lstm", 1.0), ("rnn", 1.0)])
def test_hand_vjp_gradcheck(name, dt):
    torch.manual_seed(6)
    module = _HandStepModule(make_cell(name, 2, 3, dtype=F64), dt)
    x = torch.randn(4, 2, dtype=F64, requires_grad=True)
    s = _state(module.cell, 4).requires_grad_()
    names = [f"cell.{n}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    params = tuple(module.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def f(x, s, *ps):
        return functional_call(module, dict(zip(names, ps)), (x, s))

    assert torch.autograd.gradcheck(f, (x, s, *params))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_functional_api_records_no_graph(name):
    cell = make_cell(name, 3, 4)
    x, s = torch.randn(2, 3), _state(cell, 2, dtype=torch.float32)
    xw = cell.input_projection(x).detach()
    lin = cell.linearize(xw, s)
    outs = [cell.step(xw, s), cell.vjp_state(lin, s), *cell.vjp_proj(lin, s), *lin,
            *cell.param_grads(x, s, *cell.vjp_proj(lin, s)).values()]
    assert torch.is_grad_enabled()
    assert not any(t.requires_grad for t in outs)
