"""The fused training step (mgrit_gru.models.fused_step, kernels.train_step)
against autograd through the plain AutogradPropagator, its fallbacks, and
ShardStep on the fused path against ShardStep on the autograd path.

float64 is compared to 1e-10, float32 to ~1e-5 (relative): the kernels
compute in another order (own exp/tanh in float32), never bitwise.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mgrit_gru.data import Split
from mgrit_gru.models import kernels
from mgrit_gru.models.classifier import SequenceClassifier
from mgrit_gru.models.fused_step import fused_loss_and_grads
from mgrit_gru.models.serial import AutogradPropagator, SerialPropagator
from mgrit_gru.training.update import ShardStep, TensorSplit

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rnn", "lstm", "gru", "implicit-gru")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}

pytestmark = [pytest.mark.timeout(900)]     # the first use may compile the kernels


@pytest.fixture(scope="module")
def built():
    if not kernels.available():
        pytest.skip(f"fused kernels unavailable: {kernels.build_info()['error']}")
    return True


def _model(kind, dtype, pooling, D=5, H=7, C=3, layers=1, propagator=None, seed=0):
    torch.manual_seed(seed)
    model = SequenceClassifier(kind, D, H, C, pooling=pooling, layers=layers, dtype=dtype,
                               propagator=propagator)
    with torch.no_grad():          # off the uniform init a bit: larger gradients
        for p in model.parameters():
            p.mul_(1.5)
    return model


def _batch(dtype, B=6, T=8, D=5, C=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, dtype=dtype, generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 2, 7][:B], dtype=torch.int64)   # max 7 < T, one of 1
    y = torch.randint(0, C, (B,), generator=g)
    return x, y, lengths


def _autograd(model, x, y, lengths, weight, dt):
    ref = copy.deepcopy(model)
    ref.propagator = AutogradPropagator(dt)
    loss = torch.nn.functional.cross_entropy(ref(x, lengths), y)
    (loss * weight).backward()
    return float(loss.detach()) * weight, {n: p.grad for n, p in ref.named_parameters()}


def _assert_close(model, loss, ref_loss, ref_grads, dtype):
    tol = TOL[dtype]
    assert loss == pytest.approx(ref_loss, rel=tol["rtol"], abs=tol["atol"])
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
        torch.testing.assert_close(p.grad, ref_grads[name], **tol, msg=name)
        assert float(ref_grads[name].abs().max()) > 0, name


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("pooling", ("last", "mean"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", (None, 2))
def test_matches_autograd(built, kind, pooling, dtype, chunk):
    dt = 0.7 if kind == "implicit-gru" else 1.0
    model = _model(kind, dtype, pooling, propagator=SerialPropagator(dt=dt, chunk=chunk))
    x, y, lengths = _batch(dtype)
    weight = 0.375
    ref_loss, ref_grads = _autograd(model, x, y, lengths, weight, dt)
    loss = fused_loss_and_grads(model, x, y, lengths, weight)
    assert loss is not None
    _assert_close(model, loss, ref_loss, ref_grads, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_no_lengths_no_bias_weight_one(built, kind):
    torch.manual_seed(3)
    cell_model = SequenceClassifier(kind, 4, 6, 2, pooling="last", dtype=torch.float64)
    from mgrit_gru.models.cells import make_cell
    cell = make_cell(kind, 4, 6, bias=False, dtype=torch.float64)
    model = SequenceClassifier(cell, num_classes=2, pooling="mean", dtype=torch.float64)
    model.head = torch.nn.Linear(6, 2, bias=False, dtype=torch.float64)
    for m in (cell_model, model):
        x = torch.randn(3, 5, 4, dtype=torch.float64)
        y = torch.tensor([0, 1, 1])
        ref_loss, ref_grads = _autograd(m, x, y, None, 1.0, 1.0)
        loss = fused_loss_and_grads(m, x, y, None, 1.0)
        assert loss is not None
        _assert_close(m, loss, ref_loss, ref_grads, torch.float64)


def test_fresh_grads_replace_old(built):
    model = _model("gru", torch.float64, "mean")
    x, y, lengths = _batch(torch.float64)
    fused_loss_and_grads(model, x, y, lengths, 1.0)
    first = {n: p.grad for n, p in model.named_parameters()}
    fused_loss_and_grads(model, x, y, lengths, 1.0)
    for n, p in model.named_parameters():
        assert p.grad is not first[n]                       # a fresh tensor,
        torch.testing.assert_close(p.grad, first[n], rtol=0, atol=0)   # not accumulated


def test_fallbacks(built, monkeypatch):
    x, y, lengths = _batch(torch.float32)
    from mgrit_gru.models import MGRITOptions, MGRITPropagator

    stack = _model("gru", torch.float32, "mean", layers=2)
    assert fused_loss_and_grads(stack, x, y, lengths, 1.0) is None
    mgrit = _model("gru", torch.float32, "mean", propagator=MGRITPropagator(None, MGRITOptions()))
    assert fused_loss_and_grads(mgrit, x, y, lengths, 1.0) is None
    auto = _model("gru", torch.float32, "mean", propagator=AutogradPropagator())
    assert fused_loss_and_grads(auto, x, y, lengths, 1.0) is None
    frozen = _model("lstm", torch.float32, "last")
    frozen.head.bias.requires_grad_(False)
    assert fused_loss_and_grads(frozen, x, y, lengths, 1.0) is None
    model = _model("rnn", torch.float32, "last")
    assert fused_loss_and_grads(model, x.double(), y, lengths, 1.0) is None      # dtype mismatch
    assert fused_loss_and_grads(model, x, y.int(), lengths, 1.0) is None         # labels int32
    assert fused_loss_and_grads(model, x, y + 5, lengths, 1.0) is None           # label range
    assert fused_loss_and_grads(model, x, y, lengths + 5, 1.0) is None           # lengths range
    handle = model.head.register_forward_hook(lambda *a: None)
    assert fused_loss_and_grads(model, x, y, lengths, 1.0) is None
    handle.remove()
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert fused_loss_and_grads(model, x, y, lengths, 1.0) is None
    assert all(p.grad is None for p in model.parameters())       # nothing touched


def test_disabled_by_environment():
    code = textwrap.dedent("""
        import torch
        from mgrit_gru.models.classifier import SequenceClassifier
        from mgrit_gru.models.fused_step import fused_loss_and_grads
        m = SequenceClassifier("gru", 3, 4, 2)
        x = torch.randn(2, 3, 3)
        assert fused_loss_and_grads(m, x, torch.tensor([0, 1]), None, 1.0) is None
        print("ok")
    """)
    env = dict(os.environ, MGRIT_GRU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def _split(dtype_np=np.float32, n=20, T=9, D=5, C=3, seed=2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, n).astype(np.int64)
    x = rng.standard_normal((n, T, D)).astype(dtype_np)
    y = rng.integers(0, C, n).astype(np.int64)
    return Split(x=x, y=y, lengths=lengths)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("kind", KINDS)
def test_shard_step_fused_equals_autograd(built, kind, dtype):
    data = TensorSplit(_split(), dtype)
    idx = np.array([3, 7, 1, 12, 19, 0, 5])
    model = _model(kind, dtype, "mean")
    twin = copy.deepcopy(model)
    x, y, lengths = data.take(idx)                 # the fused path applies to these batches
    assert fused_loss_and_grads(copy.deepcopy(model), x, y, lengths, 1.0) is not None
    for rank in range(2):                      # weight 3/7 and 4/7 shards
        fused, plain = ShardStep(data, rank, 2), ShardStep(data, rank, 2, fused=False)
        loss = pickle.loads(pickle.dumps(fused))(model, idx)
        ref = pickle.loads(pickle.dumps(plain))(twin, idx)
        tol = TOL[dtype]
        assert loss == pytest.approx(ref, rel=tol["rtol"], abs=tol["atol"])
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)


def test_releases_the_gil(built):
    """While a thread runs train_step on a long batch, the main thread keeps
    running Python code (a GIL-holding call would let none through)."""
    model = _model("implicit-gru", torch.float32, "mean", D=16, H=64)
    x = torch.randn(64, 400, 16)
    y = torch.zeros(64, dtype=torch.int64)
    window = {}

    def work():
        window["start"] = time.perf_counter()
        fused_loss_and_grads(model, x, y, None, 1.0)
        window["stop"] = time.perf_counter()

    fused_loss_and_grads(model, x, y, None, 1.0)            # warm up
    thread = threading.Thread(target=work)
    ticks = []
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    inside = [t for t in ticks if window["start"] + 1e-3 < t < window["stop"] - 1e-3]
    assert window["stop"] - window["start"] > 5e-3
    assert len(inside) > 10


@pytest.mark.parametrize("top, labels", [
    (1e37, [0, 1, 2, 1, 0, 1]),     # finite either way
    (2e38, [0, 0, 0, 0, 0, 1]),     # z - max = -4e38 overflows float32 in one row
    (1.5e38, [1, 1, 0, 0, 0, 0]),   # each row finite (3e38), their sum overflows
])
def test_float32_loss_overflows_like_autograd(built, top, labels):
    """A diverging float32 model: the loss is infinite on the fused path
    exactly when it is on the autograd path (the divergence checks rely on
    it), although float64 arithmetic would keep the last two finite."""
    model = _model("gru", torch.float32, "mean")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([top, -top, 0.0]))
    x, _, lengths = _batch(torch.float32, B=6)
    y = torch.tensor(labels)
    ref_loss, _ = _autograd(model, x, y, lengths, 1.0, 1.0)
    loss = fused_loss_and_grads(model, x, y, lengths, 1.0)
    assert loss is not None
    assert np.isfinite(loss) == np.isfinite(ref_loss), (loss, ref_loss)
    if np.isfinite(ref_loss):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
