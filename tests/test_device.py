"""The engine on every device present: ``cpu`` always, ``cuda`` when there is one.

Truths: the CPU results (the serial propagator, autograd BPTT, the Dahlquist
closed form) at the tolerances of the CPU suite (tests/test_model.py,
tests/test_mgrit_gru.py, tests/test_mgrit.py).  Comm's staging of device
tensors through host buffers is exercised on the CPU (``stage=True``), at one
rank here and at the size mpiexec gives in the ``mpi`` tests.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from mgrit_gru.core.comm import Comm
from mgrit_gru.core.solver import MGRIT, MGRITSettings
from mgrit_gru.core.stepper import DahlquistStepper
from mgrit_gru.errors import InputError
from mgrit_gru.models import (AutogradPropagator, MGRITOptions, MGRITPropagator, SequenceClassifier,
                              SerialPropagator)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
]
from test_mgrit_gru import C, D, H, _batch  # noqa: E402  (the same batches)
TIGHT = MGRITOptions(levels=3, cfactor=4, fwd_iters=60, bwd_iters=60, fwd_tol=1e-13, bwd_tol=1e-13)


def _model(pooling="last", seed=0):
    torch.manual_seed(seed)
    return SequenceClassifier("implicit-gru", D, H, C, pooling=pooling, dtype=torch.float64)


def _run(model, prop, x, lengths, y, device):
    """Loss, parameter gradients and x.grad of one batch with ``model`` moved to
    ``device`` (a copy); everything returned on the CPU."""
    model = copy.deepcopy(model).to(device)
    model.propagator = prop
    xd = x.to(device).requires_grad_(True)
    loss = F.cross_entropy(model(xd, lengths), y.to(device))
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    return loss.item(), grads, xd.grad.cpu()


def _assert_close_grads(got, want, atol):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_serial_propagator_on_device(device, pooling):
    model = _model(pooling)
    x, lengths, y = _batch(29)
    l_cpu, g_cpu, x_cpu = _run(model, SerialPropagator(chunk=4), x, lengths, y, "cpu")
    l_ref, g_ref, x_ref = _run(model, AutogradPropagator(), x, lengths, y, "cpu")
    l_dev, g_dev, x_dev = _run(model, SerialPropagator(chunk=4), x, lengths, y, device)
    assert abs(l_dev - l_cpu) < 1e-12 and abs(l_dev - l_ref) < 1e-12
    _assert_close_grads(g_dev, g_cpu, 1e-10)
    _assert_close_grads(g_dev, g_ref, 1e-10)
    torch.testing.assert_close(x_dev, x_ref, rtol=0, atol=1e-10)


def check_mgrit_on_device(comm, device, opts=TIGHT):
    """Converged MGRIT on ``device``: the loss and gradients of autograd BPTT on the CPU."""
    for pooling in ("last", "mean"):
        model = _model(pooling)
        x, lengths, y = _batch(37, seed=3)
        l_ref, g_ref, x_ref = _run(model, AutogradPropagator(), x, lengths, y, "cpu")
        prop = MGRITPropagator(comm, opts)
        l_dev, g_dev, x_dev = _run(model, prop, x, lengths, y, device)
        assert abs(l_dev - l_ref) < 1e-10, (device, pooling)
        assert prop.last_stats["fwd_residual"] <= 1e-13 and prop.last_stats["bwd_residual"] <= 1e-13
        _assert_close_grads(g_dev, g_ref, 1e-9)
        torch.testing.assert_close(x_dev, x_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_mgrit_on_device(device):
    check_mgrit_on_device(Comm.serial(), device)


@pytest.mark.parametrize("device", DEVICES)
def test_mgrit_inexact_on_device_equals_cpu(device):
    """The default (2/1 iterations, inexact) gradient is the same function of the
    data on every device: the device result equals the CPU result to round-off."""
    model = _model("mean")
    x, lengths, y = _batch(45, seed=4)
    opts = MGRITOptions(nested=True, relax="FCF", final_residual=False)
    l_cpu, g_cpu, x_cpu = _run(model, MGRITPropagator(None, opts), x, lengths, y, "cpu")
    l_dev, g_dev, x_dev = _run(model, MGRITPropagator(None, opts), x, lengths, y, device)
    assert abs(l_dev - l_cpu) < 1e-12
    _assert_close_grads(g_dev, g_cpu, 1e-10)
    torch.testing.assert_close(x_dev, x_cpu, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_solver_follows_the_stepper_device(device):
    """Every tensor of the solver lives on the stepper's device; the answer is the
    closed-form sequential one."""
    st = DahlquistStepper(lam=torch.tensor([-0.3, -2.0, -10.0], dtype=torch.float64), dt=0.1,
                          state_shape=(3,), device=device)
    u0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rhs = torch.randn((38, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = MGRITSettings(levels=3, cfactor=4, max_iters=50, abs_tol=1e-13, nested=True)
    u, info = MGRIT(st, None, 37, s).solve(u0=u0.to(device), rhs=rhs.to(device))
    assert u.device.type == torch.device(device).type and info.converged
    truth = DahlquistStepper(lam=torch.tensor([-0.3, -2.0, -10.0], dtype=torch.float64), dt=0.1,
                             state_shape=(3,)).sequential(u0, 37, rhs)
    torch.testing.assert_close(u.cpu(), truth, rtol=0, atol=1e-11)


def test_model_and_input_on_different_devices_is_an_input_error():
    model = _model()
    x = _batch(10)[0].to(torch.float32)
    with pytest.raises(InputError, match="dtype"):
        model(x)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(InputError, match="device"):
        meta.propagator.features(meta.cell, _batch(10)[0], None, "last")


# --------------------------------------------------------------------------- #
# Comm: the staging path, on the CPU
# --------------------------------------------------------------------------- #
def check_staging(comm):
    """Ring send/recv, isend/irecv and allreduce through staging buffers give what the
    direct path gives; the buffers are reused; bad tensors are one InputError line."""
    assert comm.stage
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    for dtype in (torch.float32, torch.float64, torch.int64):
        x = torch.arange(15, dtype=dtype).view(3, 5) + comm.rank
        req = comm.isend(x, right, tag=11)
        y = comm.recv(torch.zeros_like(x), left, tag=11)
        req.wait()
        assert torch.equal(y, torch.arange(15, dtype=dtype).view(3, 5) + left)
        out = torch.zeros_like(x)
        rreq = comm.irecv(out, left, tag=12)
        comm.send(x, right, tag=12)
        rreq.wait()
        assert torch.equal(out, y)
        s = comm.allreduce_(x.clone())
        total = sum(torch.arange(15, dtype=dtype).view(3, 5) + r for r in range(comm.size))
        assert torch.equal(s, total)
    pooled = sum(len(v) for v in comm._pool._free.values())
    for _ in range(5):                       # the same sizes again: no new buffers
        comm.allreduce_(torch.ones(3, 5))
    assert sum(len(v) for v in comm._pool._free.values()) == pooled
    with pytest.raises(InputError, match="contiguous") as err:
        comm.isend(torch.zeros(4, 4).t(), right)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="bfloat16") as err:
        comm.allreduce_(torch.zeros(3, dtype=torch.bfloat16))
    assert "\n" not in str(err.value)


def test_staging_on_cpu():
    check_staging(Comm.world(stage=True))


def test_staged_mgrit_equals_direct():
    """The propagator through a staging communicator: the same numbers (the same
    operations in the same order; only the transport differs)."""
    model = _model("mean")
    x, lengths, y = _batch(40, seed=6)
    a = _run(model, MGRITPropagator(Comm.world(stage=True), MGRITOptions()), x, lengths, y, "cpu")
    b = _run(model, MGRITPropagator(Comm.serial(), MGRITOptions()), x, lengths, y, "cpu")
    assert a[0] == b[0]
    for name in b[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def test_cuda_aware_override(monkeypatch):
    from mgrit_gru.core.comm import CUDA_AWARE_ENV, cuda_aware_mpi
    monkeypatch.setenv(CUDA_AWARE_ENV, "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv(CUDA_AWARE_ENV, "0")
    assert cuda_aware_mpi() is False
    monkeypatch.setenv(CUDA_AWARE_ENV, "maybe")
    with pytest.raises(InputError, match=CUDA_AWARE_ENV):
        cuda_aware_mpi()
    monkeypatch.delenv(CUDA_AWARE_ENV)
    assert isinstance(cuda_aware_mpi(), bool)
    assert Comm.serial().cuda_aware is False


@pytest.mark.mpi
def test_staging_mpi():
    check_staging(Comm.world(stage=True))


@pytest.mark.mpi
@pytest.mark.parametrize("device", DEVICES)
def test_mgrit_on_device_mpi(device):
    check_mgrit_on_device(Comm.world(), device)


@pytest.mark.mpi
def test_staged_mgrit_on_cpu_mpi():
    """The whole converged propagator with every message staged: BPTT's gradient."""
    check_mgrit_on_device(Comm.world(stage=True), "cpu")
