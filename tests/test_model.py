"""Serial propagators and the classifier: hand-written backward == autograd,
finite differences, padding invariance, input errors."""

import copy
import pickle

import pytest
import torch
from torch.func import functional_call

from mgrit_gru.models.cells import CELLS, ImplicitGRUCell, make_cell
from mgrit_gru.errors import InputError
from mgrit_gru.models import AutogradPropagator, SequenceClassifier, SerialPropagator, flush_is_on

F64 = torch.float64
LENGTHS = torch.tensor([9, 4, 1, 7, 9])


def _grads(cell, prop, x, lengths, pooling, g):
    """Features and the gradients of ``<features, g>`` (parameters, then x)."""
    for p in cell.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    feats = prop.features(cell, x, lengths, pooling)
    (feats * g).sum().backward()
    return feats.detach(), [p.grad for p in cell.parameters()] + [x.grad]


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("name,dt", [("implicit-gru", 1.0), ("implicit-gru", 4.0),
                                     ("gru", 1.0), ("lstm", 1.0), ("rnn", 1.0)])
def test_serial_equals_autograd(name, dt, pooling):
    torch.manual_seed(0)
    cell = make_cell(name, 3, 4, dtype=F64)
    x = torch.randn(5, 9, 3, dtype=F64)
    g = torch.randn(5, 4, dtype=F64)
    ref, ref_grads = _grads(cell, AutogradPropagator(dt), x, LENGTHS, pooling, g)
    for chunk in (None, 1, 4, 100):                     # auto, step by step, .., all
        feats, grads = _grads(cell, SerialPropagator(dt, chunk=chunk), x, LENGTHS, pooling, g)
        torch.testing.assert_close(feats, ref, rtol=0, atol=1e-12)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_serial_equals_autograd_float32():
    torch.manual_seed(1)
    cell = ImplicitGRUCell(3, 8)
    x, g = torch.randn(4, 30, 3), torch.randn(4, 8)
    ref, ref_grads = _grads(cell, AutogradPropagator(), x, None, "last", g)
    feats, grads = _grads(cell, SerialPropagator(), x, None, "last", g)
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["implicit-gru", "lstm"])
def test_serial_gradcheck(name):
    torch.manual_seed(2)
    model = SequenceClassifier(name, input_size=2, hidden_size=3, num_classes=2,
                               pooling="mean", propagator=SerialPropagator(dt=2.0, chunk=2),
                               dtype=F64)
    names = [f"cell.{n}" for n, _ in model.cell.named_parameters()]
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)
    x = torch.randn(3, 5, 2, dtype=F64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])

    def f(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x, lengths))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("prop", [AutogradPropagator(), SerialPropagator(chunk=3)],
                         ids=["autograd", "serial"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_padding_never_matters(name, prop, pooling):
    torch.manual_seed(3)
    cell = make_cell(name, 3, 4, dtype=F64)
    B, T = 5, 9
    x = torch.randn(B, T, 3, dtype=F64)
    for b, n in enumerate(LENGTHS.tolist()):
        x[b, n:] = 100.0 * torch.randn(T - n, 3, dtype=F64)    # garbage padding
    g = torch.randn(B, 4, dtype=F64)
    feats, grads = _grads(cell, prop, x, LENGTHS, pooling, g)
    total = [torch.zeros_like(p) for p in grads[:-1]]
    for b, n in enumerate(LENGTHS.tolist()):
        alone, alone_grads = _grads(cell, prop, x[b:b + 1, :n], None, pooling, g[b:b + 1])
        torch.testing.assert_close(feats[b:b + 1], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(grads[-1][b:b + 1, :n], alone_grads[-1], rtol=0, atol=1e-12)
        assert (grads[-1][b, n:] == 0).all()
        total = [t + a for t, a in zip(total, alone_grads[:-1])]
    for a, b in zip(grads[:-1], total):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["implicit-gru"])
def test_classifier_gradient_equals_finite_differences(name):
    torch.manual_seed(4)
    model = SequenceClassifier(name, input_size=2, hidden_size=3, num_classes=3,
                               pooling="mean", dtype=F64)
    x = torch.randn(4, 5, 2, dtype=F64)
    y = torch.tensor([0, 2, 1, 2])
    lengths = torch.tensor([5, 3, 1, 4])
    loss_fn = torch.nn.CrossEntropyLoss()

    def loss():
        return loss_fn(model(x, lengths), y)

    model.zero_grad()
    loss().backward()
    eps = 1e-6
    with torch.no_grad():
        for p in model.parameters():
            fd = torch.empty_like(p)
            flat, fd_flat = p.view(-1), fd.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = loss().item()
                flat[i] = old - eps
                down = loss().item()
                flat[i] = old
                fd_flat[i] = (up - down) / (2 * eps)
            torch.testing.assert_close(p.grad, fd, rtol=1e-6, atol=1e-9)


def test_two_forwards_before_backward_keep_their_buffers():
    torch.manual_seed(5)
    cell = ImplicitGRUCell(3, 4, dtype=F64)
    prop = SerialPropagator(chunk=2)
    x1, x2 = torch.randn(2, 6, 3, dtype=F64), torch.randn(2, 6, 3, dtype=F64)
    with torch.no_grad():
        prop.features(cell, x1)                  # buffers go back to the pool at once
    loss = prop.features(cell, x1).sum() + prop.features(cell, x2, pooling="mean").pow(2).sum()
    loss.backward()
    got = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    ref = AutogradPropagator()
    (ref.features(cell, x1).sum() + ref.features(cell, x2, pooling="mean").pow(2).sum()).backward()
    for a, b in zip(got, cell.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=1e-12)


def test_repeated_backward_recomputes_the_sweep():
    torch.manual_seed(8)
    cell = ImplicitGRUCell(2, 3, dtype=F64)
    x = torch.randn(2, 4, 2, dtype=F64)
    prop = SerialPropagator()
    out = prop.features(cell, x).sum()
    out.backward(retain_graph=True)
    first = [p.grad.clone() for p in cell.parameters()]
    prop.features(cell, 2 * x).sum().backward()       # reuses the pooled buffers meanwhile
    cell.zero_grad()
    out.backward()
    for a, p in zip(first, cell.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=1e-14)


@pytest.mark.parametrize("initially", [False, True])
def test_flush_mode_is_restored(initially):
    torch.set_flush_denormal(initially)
    try:
        cell = ImplicitGRUCell(2, 3)
        SerialPropagator().features(cell, torch.randn(2, 4, 2)).sum().backward()
        assert flush_is_on() == initially
    finally:
        torch.set_flush_denormal(False)


def test_classifier_api_and_propagator_swap():
    torch.manual_seed(6)
    model = SequenceClassifier("gru", input_size=3, hidden_size=4, num_classes=2)
    assert isinstance(model.propagator, SerialPropagator)
    assert model.cell.weight_hh.dtype == torch.float32 and model.head.weight.dtype == torch.float32
    x = torch.randn(3, 5, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(x, [5, 2, 3])
    model.propagator = AutogradPropagator()
    b = model(x, torch.tensor([5, 2, 3]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert a.shape == (3, 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # a cell instance is used as is; copies and pickles work
    cell = make_cell("rnn", 3, 4, dtype=F64)
    m2 = SequenceClassifier(cell, num_classes=2, dtype=F64)
    assert m2.cell is cell
    assert m2(x.double()).dtype == F64
    pickle.loads(pickle.dumps(copy.deepcopy(m2)))(x.double())


@pytest.mark.parametrize("kwargs,option", [
    (dict(cell="gruu", input_size=3, hidden_size=4, num_classes=2), "cell"),
    (dict(cell="gru", input_size=3, hidden_size=4, num_classes=0), "num_classes"),
    (dict(cell="gru", hidden_size=4, num_classes=2), "input_size"),
    (dict(cell="gru", input_size=3, hidden_size=4, num_classes=2, pooling="max"), "pooling"),
    (dict(cell=ImplicitGRUCell(3, 4), hidden_size=5, num_classes=2), "hidden_size"),
])
def test_classifier_rejects_bad_options(kwargs, option):
    with pytest.raises(InputError, match=option) as err:
        SequenceClassifier(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prop", [AutogradPropagator(), SerialPropagator()],
                         ids=["autograd", "serial"])
@pytest.mark.parametrize("x,lengths,option", [
    (torch.randn(2, 5, 4), None, "x"),                        # wrong input size
    (torch.randn(2, 5), None, "x"),                           # not 3-D
    (torch.randn(2, 5, 3, dtype=F64), None, "x"),             # wrong dtype
    (torch.randn(2, 5, 3), [5, 6], "lengths"),                # longer than padded
    (torch.randn(2, 5, 3), [0, 5], "lengths"),                # empty sequence
    (torch.randn(2, 5, 3), [5], "lengths"),                   # one per sequence
    (torch.randn(2, 5, 3), [2.0, 5.0], "lengths"),            # not integers
])
def test_propagators_reject_bad_batches(prop, x, lengths, option):
    model = SequenceClassifier("implicit-gru", input_size=3, hidden_size=4, num_classes=2,
                               propagator=prop)
    with pytest.raises(InputError, match=f"^{option}:") as err:
        model(x, lengths)
    assert "\n" not in str(err.value)


def test_propagator_options_are_checked():
    with pytest.raises(InputError, match="dt"):
        SerialPropagator(dt=0.0)
    with pytest.raises(InputError, match="chunk"):
        SerialPropagator(chunk=0)
    with pytest.raises(InputError, match="dt"):
        AutogradPropagator(dt=-1.0)


def test_functional_call_parameters_are_used_forward_and_backward():
    """Parameters substituted by torch.func.functional_call are the ones the
    serial propagator uses, in the forward and in the (later) backward."""
    torch.manual_seed(7)
    model = SequenceClassifier("implicit-gru", input_size=2, hidden_size=3, num_classes=2,
                               dtype=F64)
    x = torch.randn(2, 4, 2, dtype=F64)
    zeros = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, zeros, (x,)), torch.zeros(2, 2, dtype=F64))

    other = {k: (2 * v).detach().requires_grad_() for k, v in model.named_parameters()}
    functional_call(model, other, (x,)).pow(2).sum().backward()
    got = [other[k].grad for k in other]
    model.propagator = AutogradPropagator()
    ref = {k: v.detach().clone().requires_grad_() for k, v in other.items()}
    functional_call(model, ref, (x,)).pow(2).sum().backward()
    for a, k in zip(got, ref):
        torch.testing.assert_close(a, ref[k].grad, rtol=0, atol=1e-12)
