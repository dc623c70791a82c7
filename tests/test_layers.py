"""Stacked layers (``--layers K``): equality with ``torch.nn.GRU`` / ``LSTM`` /
``RNN(num_layers=K)`` both ways, the hand-written VJPs against autograd, MGRIT
against the serial loop, the training path and bad input.

Truths: torch's multi-layer modules (explicit cells), independent single
cells composed by hand (the implicit GRU), autograd BPTT of the stack's
differentiable step, the serial propagator (MGRIT).
"""
import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mgrit_gru import limits
from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError
from mgrit_gru.models import (AutogradPropagator, MGRITOptions, MGRITPropagator,
                              SequenceClassifier, SerialPropagator, StackedCell, from_torch,
                              from_torch_state, from_torch_state_dict, make_cell, select_lin,
                              to_torch, to_torch_classifier, to_torch_state, to_torch_state_dict)
from mgrit_gru.models.cells import CELLS

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64
TORCH = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
ALL = sorted(CELLS)
TIGHT = MGRITOptions(levels=3, cfactor=4, fwd_iters=60, bwd_iters=60, fwd_tol=1e-13,
                     bwd_tol=1e-13)


def _states(cell, x, dt=1.0):
    """All states ``[T + 1, B, S]`` of the functional step loop from zero."""
    with torch.no_grad():
        xw = cell.input_projection(x.transpose(0, 1))
        s = [cell.initial_state((x.shape[0],))]
        for t in range(x.shape[1]):
            s.append(cell.step(xw[t], s[-1], dt))
    return torch.stack(s)


def _torch_features(out, lengths, pooling):
    """Features from torch's ``[B, T, H]`` outputs, written out independently."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        rows.append(out[b, n - 1] if pooling == "last" else out[b, :n].mean(0))
    return torch.stack(rows)


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ torch
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(TORCH))
def test_equals_torch_both_ways(name, layers):
    """float32, max abs diff <= 1e-6: all hidden states, the final state of every
    layer (torch's h_n / c_n), serial features with both poolings."""
    torch.manual_seed(10 + layers)
    D, H, B, T = 5, 7, 4, 13
    x = torch.randn(B, T, D)
    lengths = torch.tensor([13, 9, 1, 6])
    ref = TORCH[name](D, H, num_layers=layers, batch_first=True)
    # torch -> ours (state dict), ours -> torch (state dict), and the module helpers
    ours = make_cell(name, D, H, layers=layers)
    ours.load_state_dict(from_torch_state_dict(ours, ref.state_dict()))
    mine = make_cell(name, D, H, layers=layers)
    back = TORCH[name](D, H, num_layers=layers, batch_first=True)
    back.load_state_dict(to_torch_state_dict(mine))
    pairs = [(ours, ref), (mine, back), (from_torch(ref), ref), (mine, to_torch(mine))]
    assert _max_diff(pairs[0][0].weight_ih, ref.weight_ih_l0) == 0     # the weights moved
    for cell, module in pairs:
        assert cell.layers == layers and isinstance(cell, StackedCell) == (layers > 1)
        with torch.no_grad():
            out, hn = module(x)
            states = _states(cell, x)
            feats = {p: SerialPropagator().features(cell, x, lengths, p) for p in ("last", "mean")}
        assert _max_diff(cell.hidden(states[1:]).transpose(0, 1), out) <= 1e-6
        want = torch.cat(hn, -1) if name == "lstm" else hn
        got = to_torch_state(cell, states[-1])
        got = torch.cat(got, -1) if name == "lstm" else got
        assert got.shape == (layers, B, (2 if name == "lstm" else 1) * H)
        assert _max_diff(got, want) <= 1e-6
        assert _max_diff(from_torch_state(cell, hn), states[-1]) <= 1e-6
        for pooling, f in feats.items():
            assert _max_diff(f, _torch_features(out, lengths, pooling)) <= 1e-6, pooling
    # a stack's state dict *is* torch's: same keys, shapes and order, strict both ways
    if layers > 1:
        assert [(k, v.shape) for k, v in mine.state_dict().items()] == \
               [(k, v.shape) for k, v in back.state_dict().items()]
        back.load_state_dict(mine.state_dict())
        mine.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("name", sorted(TORCH))
def test_without_bias_equals_torch(name):
    torch.manual_seed(3)
    ref = TORCH[name](3, 4, num_layers=2, bias=False, batch_first=True)
    cell = from_torch(ref)
    assert set(cell.param_names) == {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                     "weight_hh_l1"}
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        assert _max_diff(cell.hidden(_states(cell, x)[1:]).transpose(0, 1), ref(x)[0]) <= 1e-6


@pytest.mark.parametrize("name", sorted(TORCH))
def test_from_torch_cell_forms(name):
    """``nn.GRUCell`` / ``LSTMCell`` / ``RNNCell`` become our single cells."""
    torch.manual_seed(2)
    ref = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn": nn.RNNCell}[name](3, 4)
    cell = from_torch(ref)
    assert type(cell) is CELLS[name] and cell.layers == 1
    x = torch.randn(5, 3)
    with torch.no_grad():
        want = ref(x)
        got = cell.step(cell.input_projection(x), cell.initial_state((5,)))
    want = torch.cat(want, -1) if name == "lstm" else want
    assert _max_diff(got, want) <= 1e-6


def test_implicit_gru_has_no_torch_counterpart():
    cell = make_cell("implicit-gru", 3, 4, layers=2)
    for convert in (to_torch, to_torch_state_dict, lambda c: from_torch_state_dict(c, {})):
        with pytest.raises(InputError, match="no torch counterpart") as err:
            convert(cell)
        assert "\n" not in str(err.value) and "backward-Euler" in str(err.value)


@pytest.mark.parametrize("module, match", [
    (nn.GRU(3, 4, num_layers=2, bidirectional=True), "bidirectional"),
    (nn.LSTM(3, 4, proj_size=2), "proj_size"),
    (nn.RNN(3, 4, nonlinearity="relu"), "nonlinearity"),
    (nn.Linear(3, 4), "expected torch.nn.GRU"),
])
def test_from_torch_rejects_what_has_no_counterpart(module, match):
    with pytest.raises(InputError, match=match) as err:
        from_torch(module)
    assert "\n" not in str(err.value)


def test_state_dict_of_another_depth_is_rejected():
    cell = make_cell("gru", 3, 4, layers=2)
    with pytest.raises(InputError, match="3 layer") as err:
        from_torch_state_dict(cell, nn.GRU(3, 4, num_layers=3).state_dict())
    assert "missing nothing" in str(err.value) and "weight_ih_l2" in str(err.value)
    with pytest.raises(InputError, match="1 layer.*missing .*weight_ih_l1"):
        from_torch_state_dict(cell, nn.GRU(3, 4).state_dict())
    # a single cell takes torch's l0 names and the *Cell names
    single = make_cell("gru", 3, 4)
    single.load_state_dict(from_torch_state_dict(single, nn.GRU(3, 4).state_dict()))
    single.load_state_dict(from_torch_state_dict(single, nn.GRUCell(3, 4).state_dict()))


# ----------------------------------------------- stack vs composed cells
def _composed_step(layers, xw, s, dt):
    """One stacked step written out with independent single cells (the layout
    of the docs: the top layer's block first)."""
    S1 = layers[0].state_size
    K = len(layers)
    blocks = [s[..., (K - 1 - l) * S1:(K - l) * S1] for l in range(K)]
    news, xin = [], xw
    for l, cell in enumerate(layers):
        news.append(cell.forward_state(xin, blocks[l], dt))
        if l + 1 < K:
            nxt = layers[l + 1]
            xin = news[-1][..., :cell.hidden_size] @ nxt.weight_ih.T + nxt.bias_ih
    return torch.cat(news[::-1], -1)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 4.0),
                                     ("gru", 1.0), ("lstm", 1.0), ("rnn", 1.0)])
def test_step_equals_composed_single_cells(name, dt, layers):
    torch.manual_seed(4)
    D, H, B = 3, 5, 6
    stack = make_cell(name, D, H, layers=layers, dtype=F64)
    singles = []
    for l in range(layers):
        c = make_cell(name, D if l == 0 else H, H, dtype=F64)
        c.load_state_dict({k: getattr(stack, f"{k}_l{l}") for k in c.param_names})
        singles.append(c)
    x, s = torch.randn(B, D, dtype=F64), torch.randn(B, stack.state_size, dtype=F64)
    with torch.no_grad():
        xw = stack.input_projection(x)
        want = _composed_step(singles, xw, s, dt)
        out, hw = torch.empty_like(s), torch.empty(B, stack.proj_size, dtype=F64)
        stepped = stack.step(xw, s, dt, out=out, hw_out=hw)
        in_place = stack.step(xw, s.clone(), dt)
        aliased = s.clone()
        stack.step(xw, aliased, dt, out=aliased)
        differentiable = stack.forward_state(xw, s, dt)
    tol = dict(rtol=0, atol=1e-13)
    for got in (stepped, in_place, aliased, differentiable):
        torch.testing.assert_close(got, want, **tol)
    assert stepped.data_ptr() == out.data_ptr()
    # hw_out is the top layer's hidden projection of s: hidden_projection(hidden(s))
    top = singles[-1]
    torch.testing.assert_close(hw, top.hidden_projection(s[..., :H]), **tol)
    torch.testing.assert_close(hw, stack.hidden_projection(stack.hidden(s)), **tol)
    torch.testing.assert_close(stack.hidden(want), want[..., :H], **tol)


# -------------------------------------------------------------- VJPs
@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 16.0),
                                     ("gru", 1.0), ("lstm", 1.0), ("rnn", 1.0)])
def test_stack_vjps_equal_autograd(name, dt, layers):
    """linearize / vjp_state / vjp_proj / param_grads / input_grad of many steps
    at once against autograd of the differentiable step."""
    torch.manual_seed(5)
    D, H, T, B = 3, 4, 3, 5
    cell = make_cell(name, D, H, layers=layers, dtype=F64)
    x = torch.randn(T, B, D, dtype=F64)
    s = torch.randn(T, B, cell.state_size, dtype=F64)
    g = torch.randn(T, B, cell.state_size, dtype=F64)
    with torch.no_grad():
        xw = cell.input_projection(x)
        lin = cell.linearize(xw, s, dt)
        g_prev = cell.vjp_state(lin, g)
        acc0 = torch.randn(T, B, cell.state_size, dtype=F64)
        acc = cell.vjp_state(lin, g, acc=acc0.clone())
        g_xw, g_hw = cell.vjp_proj(lin, g)
        grads = cell.param_grads(x, s, g_xw, g_hw, lin)
        g_x = cell.input_grad(g_xw)
        # one step of a many-step lin equals that step alone, with the saved hw
        one = cell.linearize(xw[1], s[1], dt, hw=cell.hidden_projection(cell.hidden(s[1])))
        acc2 = torch.randn(B, cell.state_size, dtype=F64)
        step_acc = cell.vjp_state(select_lin(lin, 1), g[1], acc=acc2.clone())
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    cell.zero_grad()
    (cell.forward_state(cell.input_projection(xr), sr, dt) * g).sum().backward()
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(g_prev, sr.grad, **tol)
    torch.testing.assert_close(acc, acc0 + sr.grad, **tol)
    torch.testing.assert_close(step_acc, acc2 + sr.grad[1], **tol)
    torch.testing.assert_close(g_x, xr.grad, **tol)
    assert list(grads) == list(cell.param_names)
    for n, p in cell.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **tol, msg=n)
    for a, b in zip(select_lin(lin, 1), one):
        torch.testing.assert_close(a, b, **tol)


def test_functional_api_records_no_graph():
    cell = make_cell("lstm", 3, 4, layers=2)
    x, s = torch.randn(2, 3), torch.randn(2, cell.state_size)
    xw = cell.input_projection(x).detach()
    lin = cell.linearize(xw, s)
    g_xw, g_hw = cell.vjp_proj(lin, s)
    outs = [cell.step(xw, s), cell.vjp_state(lin, s), g_xw, g_hw, *lin,
            *cell.param_grads(x, s, g_xw, g_hw, lin).values()]
    assert torch.is_grad_enabled()
    assert not any(t.requires_grad for t in outs)
    with pytest.raises(ValueError, match="needs the lin"):
        cell.param_grads(x, s, g_xw, g_hw)


def _loss_and_grads(cell, prop, x, lengths, pooling, w):
    cell.zero_grad()
    x = x.clone().requires_grad_()
    feats = prop.features(cell, x, lengths, pooling)
    loss = (feats * w).sum() + (feats ** 2).sum()
    loss.backward()
    return feats.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in cell.named_parameters()}}


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("name", ALL)
def test_serial_gradients_equal_autograd_bptt(name, pooling):
    """Serial propagator (hand-written VJPs) vs autograd BPTT, K = 2, float64."""
    torch.manual_seed(6)
    D, H, B, T = 3, 5, 4, 23
    cell = make_cell(name, D, H, layers=2, dtype=F64)
    x = torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([23, 17, 1, 9])
    w = torch.randn(B, H, dtype=F64)
    for chunk in (None, 4):
        f_ref, g_ref = _loss_and_grads(cell, AutogradPropagator(), x, lengths, pooling, w)
        f, g = _loss_and_grads(cell, SerialPropagator(chunk=chunk), x, lengths, pooling, w)
        torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-12)
        assert set(g) == set(g_ref) == {"x", *cell.param_names}
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=1e-10, msg=k)
        assert g["x"][3, 9:].abs().max() == 0        # padded steps get no gradient


def test_swapped_parameters_are_seen_by_every_layer():
    """functional_call / bound_params swap the stack's parameters; the layers see it
    (forward, and the serial backward that runs after the swap is undone)."""
    torch.manual_seed(7)
    cell = make_cell("gru", 3, 4, layers=3, dtype=F64)
    other = make_cell("gru", 3, 4, layers=3, dtype=F64)
    x = torch.randn(2, 8, 3, dtype=F64)
    prop = SerialPropagator()

    class Wrap(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x):
            return prop.features(self.cell, x)

    params = {f"cell.{n}": p.detach().clone().requires_grad_()
              for n, p in other.named_parameters()}
    feats = functional_call(Wrap(cell), params, (x,))
    feats.sum().backward()
    want = prop.features(other, x)
    want.sum().backward()
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-14)
    for n, p in other.named_parameters():
        torch.testing.assert_close(params[f"cell.{n}"].grad, p.grad, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in cell.parameters())


def test_copies_and_pickles_are_independent():
    torch.manual_seed(8)
    cell = make_cell("implicit-gru", 3, 4, layers=2)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        want = SerialPropagator().features(cell, x)
        for clone in (copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))):
            torch.testing.assert_close(SerialPropagator().features(clone, x), want,
                                       rtol=0, atol=0)
            clone.weight_hh_l1.add_(1.0)
            assert _max_diff(SerialPropagator().features(clone, x), want) > 1e-3
        torch.testing.assert_close(SerialPropagator().features(cell, x), want, rtol=0, atol=0)
    assert make_cell("gru", 3, 4, layers=2).to(F64).initial_state((2,)).dtype == F64


@pytest.mark.parametrize("name", ALL)
def test_initialisation_like_torch(name):
    torch.manual_seed(9)
    H = 16
    cell = make_cell(name, 3, H, layers=3)
    bound = H ** -0.5
    names = [n for n, _ in cell.named_parameters()]
    assert names == [f"{k}_l{l}" for l in range(3) for k in
                     ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert names == list(cell.param_names)
    for n, p in cell.named_parameters():
        assert p.dtype == torch.float32
        assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, n
    G = CELLS[name].gates
    assert cell.weight_ih_l0.shape == (G * H, 3) and cell.weight_ih_l2.shape == (G * H, H)
    assert cell.state_size == 3 * CELLS[name].state_factor * H and cell.proj_size == G * H


# -------------------------------------------------------------- MGRIT
def check_mgrit_layers_equal_serial(comm):
    """MGRIT at tight tolerance gives the serial features and gradients (K = 2,
    float64), P = comm.size; N = 37 is divided by neither 2 nor 3."""
    for i, name in enumerate(ALL):
        torch.manual_seed(20 + i)
        D, H, B, T = 3, 4, 5, 37
        cell = make_cell(name, D, H, layers=2, dtype=F64)
        x = torch.randn(B, T, D, dtype=F64)
        lengths = torch.tensor([37, 30, 1, 18, 7])
        w = torch.randn(B, H, dtype=F64)
        pooling = ("last", "mean")[i % 2]
        f_ref, g_ref = _loss_and_grads(cell, SerialPropagator(), x, lengths, pooling, w)
        prop = MGRITPropagator(comm, TIGHT)
        f, g = _loss_and_grads(cell, prop, x, lengths, pooling, w)
        assert prop.last_stats["serial_fallback"] == 0.0
        assert prop.last_stats["fwd_residual"] <= 1e-13
        assert prop.last_stats["bwd_residual"] <= 1e-13
        torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-10)
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=1e-9, msg=(name, k))
        # the forward states of this rank's points (every layer) are the serial ones
        lo, hi, *_, h, _ = prop.solve_states(cell, x)
        torch.testing.assert_close(h, _states(cell, x)[lo:hi], rtol=0, atol=1e-10)


@pytest.mark.parametrize("opts", [MGRITOptions(), MGRITOptions(fwd_iters=0),
                                  MGRITOptions(relax="FCF", cycle="F")])
def test_mgrit_saved_projections_are_the_top_layers(opts):
    """The forward's saved ``hw`` (reused by the adjoint) is the top layer's hidden
    projection of every final state."""
    torch.manual_seed(21)
    cell = make_cell("implicit-gru", 3, 4, layers=2, dtype=F64)
    x = torch.randn(3, 29, 3, dtype=F64)
    *_, h, hw = MGRITPropagator(None, opts).solve_states(cell, x)
    with torch.no_grad():
        for t in range(h.shape[0]):      # step by step: differently blocked GEMMs
            want = h[t, :, :4] @ cell.weight_hh_l1.T + cell.bias_hh_l1
            torch.testing.assert_close(hw[t], want, rtol=0, atol=1e-13)


def test_mgrit_layers_serial():
    check_mgrit_layers_equal_serial(Comm.serial())


@pytest.mark.mpi
def test_mgrit_layers_mpi():
    check_mgrit_layers_equal_serial(Comm.world())


# ----------------------------------------------------- training path
def test_classifier_layers():
    torch.manual_seed(11)
    model = SequenceClassifier("lstm", 3, 4, 2, layers=2)
    assert model.cell.layers == 2 and model.head.in_features == 4
    assert SequenceClassifier(model.cell, num_classes=2).cell.layers == 2
    with pytest.raises(InputError, match="layers: 3 does not match"):
        SequenceClassifier(model.cell, num_classes=2, layers=3)
    # the plain-torch twin gives the same logits
    x, lengths = torch.randn(3, 9, 3), torch.tensor([9, 4, 1])
    for pooling in ("last", "mean"):
        model.pooling = pooling
        twin = to_torch_classifier(model)
        with torch.no_grad():
            assert _max_diff(twin(x, lengths), model(x, lengths)) <= 1e-6


def _deployment_code():
    """The plain-torch deployment example of docs/layers.md."""
    text = (ROOT / "docs" / "layers.md").read_text()
    section = text.split("## Running a trained model with plain torch", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_train_with_layers_then_plain_torch(tmp_path, capsys):
    """``mgrit-gru train --layers 2`` completes; its checkpoint has torch's names
    and the docs' plain-torch code predicts what the model predicts."""
    from mgrit_gru.cli import main
    from mgrit_gru.data import load_dataset
    from mgrit_gru.training.config import make_config
    from mgrit_gru.training.loop import build_model

    out = tmp_path / "run"
    args = ["train", "--data", "synthetic:24", "--epochs", "1", "--max-train", "16",
            "--max-test", "8", "--hidden", "6", "--threads", "1", "--progress", "off",
            "--cell", "gru", "--layers", "2", "--out", str(out)]
    assert main(args) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["layers"] == 2
    keys = {k for k in state["model"] if k.startswith("cell.")}
    assert keys == {f"cell.{k}_l{l}" for l in range(2)
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    ds = load_dataset("synthetic:24", max_train=16, max_test=8)
    model = build_model(make_config(dict(cell="gru", hidden=6, layers=2)), ds)
    model.load_state_dict(state["model"])
    namespace = {}
    exec(compile(_deployment_code(), "docs/layers.md", "exec"), namespace)
    rnn, head, pooling = namespace["load_plain_torch"](out / "checkpoint.pt")
    assert isinstance(rnn, nn.GRU) and rnn.num_layers == 2
    x = torch.as_tensor(ds.test.x)
    lengths = torch.full((x.shape[0],), x.shape[1]) if ds.test.lengths is None \
        else torch.as_tensor(ds.test.lengths)
    with torch.no_grad():
        logits = namespace["predict"](rnn, head, pooling, x, lengths)
        assert _max_diff(logits, model(x, lengths)) <= 1e-5


def test_train_mgrit_implicit_gru_layers(tmp_path):
    from mgrit_gru.training.config import make_config
    from mgrit_gru.training.loop import train
    config = make_config(dict(data="synthetic:24", out=str(tmp_path / "run"), epochs=1,
                              max_train=16, max_test=8, hidden=6, threads=1, progress="off",
                              layers=3, propagator="mgrit"))
    metrics = train(config, Comm.serial())
    assert metrics["config"]["layers"] == 3
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in metrics["epochs"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert "cell.weight_hh_l2" in state["model"] and "cell.weight_hh" not in state["model"]


def test_memory_estimate_counts_layers():
    from mgrit_gru.data import load_dataset
    from mgrit_gru.training.config import make_config
    from mgrit_gru.training.loop import build_model
    ds = load_dataset("synthetic:32", max_train=8, max_test=4)
    parts = {}
    for cell in ("implicit-gru", "lstm"):
        for layers in (1, 3):
            config = make_config({"hidden": 7, "cell": cell, "layers": layers})
            n_params = sum(p.numel() for p in build_model(config, ds).parameters())
            parts[cell, layers] = limits.estimate_memory(config, ds)
            assert parts[cell, layers]["parameters"] == n_params * 4 * 5
        # per step and sample every further layer adds its projections (2 G H),
        # its state and its adjoint (2 S_1)
        G, f, H = CELLS[cell].gates, CELLS[cell].state_factor, 7
        batch = min(make_config({}).batch_size, len(ds.train))
        added = 2 * (2 * G * H + 2 * f * H) * ds.train.seq_len * batch * 4
        assert parts[cell, 3]["training"] == parts[cell, 1]["training"] + added
        assert parts[cell, 3]["evaluation"] > parts[cell, 1]["evaluation"]


# ---------------------------------------------------------- bad input
@pytest.mark.parametrize("layers", [0, -1, 2.5, "2", True])
def test_bad_layers_one_line_error(layers):
    for make in (lambda: make_cell("gru", 3, 4, layers=layers),
                 lambda: StackedCell("gru", 3, 4, layers),
                 lambda: SequenceClassifier("gru", 3, 4, 2, layers=layers)):
        with pytest.raises(InputError, match="layers: expected a positive integer") as err:
            make()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "1025"])
def test_bad_layers_flag(value, tmp_path, capsys):
    from mgrit_gru.cli import main
    assert main(["train", "--layers", value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers" in err


def test_bad_layer_cell():
    with pytest.raises(InputError, match="unknown cell"):
        make_cell("gruu", 3, 4, layers=2)
    with pytest.raises(InputError, match="cell"):
        StackedCell(nn.GRU, 3, 4, 2)
