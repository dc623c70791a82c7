"""Fused C++ kernels (mgrit_gru.models.kernels) against the cells' pure-torch
methods, against autograd and torch.nn.GRU/LSTM/RNN, the fallback path, the
build cache shared by concurrent builders, and the release of the GIL.

float64 is compared tightly (1e-12), float32 loosely (1e-5): the kernels
block their arithmetic differently from the torch path (own exp/tanh in
float32), so nothing is compared bitwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from mgrit_gru.models import kernels
from mgrit_gru.models.cells import make_cell, select_lin

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("implicit-gru", "gru", "lstm", "rnn")
DTYPES = (torch.float64, torch.float32)
SHAPES = [(5, 3, 4, 6), (3, 1, 2, 1), (4, 2, 3, 17)]     # (T, B, D, H): batch 1, hidden 1, odd H
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# the first use may compile the kernels (about a minute on a loaded 2-core machine)
pytestmark = [pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def built():
    if not kernels.available():
        pytest.skip(f"fused kernels unavailable: {kernels.build_info()['error']}")
    return True


def _setup(kind, dtype, T, B, D, H, seed=0):
    torch.manual_seed(seed)
    cell = make_cell(kind, D, H, dtype=dtype).requires_grad_(False)
    with torch.no_grad():          # move the parameters off the uniform init a bit
        for p in cell.parameters():
            p.mul_(1.5)
    x = torch.randn(T, B, D, dtype=dtype)
    s0 = 0.5 * torch.randn(B, cell.state_size, dtype=dtype)
    return cell, x, cell.input_projection(x), s0


def _torch_sweep(cell, xw, s0, dt):
    T, B = xw.shape[:2]
    states = xw.new_empty(T + 1, B, cell.state_size)
    hw = xw.new_empty(T, B, cell.proj_size)
    states[0] = s0
    for t in range(T):
        cell.step(xw[t], states[t], dt, out=states[t + 1], hw_out=hw[t])
    return states, hw


def _kernel_sweep(kind, cell, xw, s0, dt):
    T, B = xw.shape[:2]
    states = xw.new_empty(T + 1, B, cell.state_size)
    hw = xw.new_empty(T, B, cell.proj_size)
    states[0] = s0
    kernels.forward_sweep(kind, xw, cell.weight_hh, cell.bias_hh, dt, states, hw)
    return states, hw


def _torch_backward(cell, xw, states, hw, lam, dt):
    """The reverse sweep of models/serial.py with the cells' VJPs."""
    lam = lam.clone()
    T = xw.shape[0]
    lin = cell.linearize(xw, states[:-1], dt, hw=hw)
    for j in range(T - 1, 0, -1):
        cell.vjp_state(select_lin(lin, j), lam[j], acc=lam[j - 1])
    g0 = cell.vjp_state(select_lin(lin, 0), lam[0])
    g_xw, g_hw = cell.vjp_proj(lin, lam)
    return lam, g_xw, g_hw, g0


# ------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("T, B, D, H", SHAPES)
@pytest.mark.parametrize("dt", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_sweep_equals_cell_steps(built, kind, dtype, dt, T, B, D, H):
    cell, _, xw, s0 = _setup(kind, dtype, T, B, D, H)
    want_s, want_hw = _torch_sweep(cell, xw, s0, dt)
    got_s, got_hw = _kernel_sweep(kind, cell, xw, s0, dt)
    torch.testing.assert_close(got_s, want_s, **TOL[dtype])
    torch.testing.assert_close(got_hw, want_hw, **TOL[dtype])


@pytest.mark.parametrize("T, B, D, H", SHAPES)
@pytest.mark.parametrize("dt", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_sweep_equals_cell_vjps(built, kind, dtype, dt, T, B, D, H):
    cell, _, xw, s0 = _setup(kind, dtype, T, B, D, H)
    states, hw = _torch_sweep(cell, xw, s0, dt)
    src = torch.randn(T, B, cell.state_size, dtype=dtype)
    want_lam, want_gx, want_gh, want_g0 = _torch_backward(cell, xw, states, hw, src, dt)

    lam = src.clone()
    g_xw, g_hw = torch.empty_like(hw), torch.empty_like(hw)
    g0 = torch.zeros_like(s0)
    kernels.backward_sweep(kind, xw, hw, states[:-1], cell.weight_hh, dt, lam, g_xw, g_hw,
                           lam_prev=g0)
    for got, want in [(lam, want_lam), (g_xw, want_gx), (g_hw, want_gh), (g0, want_g0)]:
        torch.testing.assert_close(got, want, **TOL[dtype])

    # in time chunks, chained through lam_prev: the same adjoints
    lam2 = src.clone()
    g_xw2, g_hw2 = torch.empty_like(hw), torch.empty_like(hw)
    for stop in range(T, 0, -2):
        a = max(stop - 2, 0)
        kernels.backward_sweep(kind, xw[a:stop], hw[a:stop], states[a:stop], cell.weight_hh, dt,
                               lam2[a:stop], g_xw2[a:stop], g_hw2[a:stop],
                               lam2[a - 1] if a > 0 else None)
    torch.testing.assert_close(lam2, want_lam, **TOL[dtype])
    torch.testing.assert_close(g_xw2, want_gx, **TOL[dtype])


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_sweep_backward_matches_autograd(built, kind, dtype, chunk):
    """Parameter and input gradients of ``sum(src * states[1:])`` against
    autograd through the cells' differentiable ``forward_state``."""
    T, B, D, H = 7, 3, 4, 5
    dt = 1.7
    cell, x, xw, s0 = _setup(kind, dtype, T, B, D, H)
    src = torch.randn(T, B, cell.state_size, dtype=dtype)

    ref = make_cell(kind, D, H, dtype=dtype)
    ref.load_state_dict(cell.state_dict())
    xr = x.clone().requires_grad_()
    s, loss = s0, 0
    xw_r = ref.input_projection(xr)
    for t in range(T):
        s = ref.forward_state(xw_r[t], s, dt)
        loss = loss + (src[t] * s).sum()
    loss.backward()

    states, hw = _kernel_sweep(kind, cell, xw, s0, dt)
    params = {n: getattr(cell, n) for n in cell.param_names}
    work = {}
    for _ in range(2):                       # the second call reuses the work buffers
        grads, g_x = kernels.sweep_backward(kind, x, xw, hw, states, params, dt, src.clone(),
                                            chunk=chunk, input_grad=True, work=work)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol)
    torch.testing.assert_close(g_x, xr.grad, **tol)


def test_sweep_backward_without_bias(built):
    T, B, D, H = 5, 2, 3, 4
    cell = make_cell("implicit-gru", D, H, bias=False, dtype=torch.float64)
    x = torch.randn(T, B, D, dtype=torch.float64)
    s0 = torch.zeros(B, H, dtype=torch.float64)
    with torch.no_grad():
        xw = cell.input_projection(x)
    states, hw = _kernel_sweep("implicit-gru", cell, xw, s0, 1.0)
    lam = torch.randn(T, B, H, dtype=torch.float64)
    want_lam, g_xw, g_hw, _ = _torch_backward(cell, xw, states, hw, lam, 1.0)
    want = cell.param_grads(x, states[:-1], g_xw, g_hw)
    params = {n: getattr(cell, n) for n in cell.param_names}
    grads, g_x = kernels.sweep_backward("implicit-gru", x, xw, hw, states, params, 1.0, lam,
                                        chunk=2)
    assert set(grads) == {"weight_ih", "weight_hh"} and g_x is None
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam, want_lam, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, module", [("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM),
                                          ("rnn", torch.nn.RNN)])
def test_forward_sweep_equals_torch_nn(built, kind, module):
    """An independent truth: torch's own recurrent layers, float32."""
    torch.manual_seed(3)
    T, B, D, H = 50, 4, 3, 8
    ref = module(D, H)
    cell = make_cell(kind, D, H).requires_grad_(False)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
    x = torch.randn(T, B, D)
    with torch.no_grad():
        out, _ = ref(x)
        xw = cell.input_projection(x)
    states, _ = _kernel_sweep(kind, cell, xw, torch.zeros(B, cell.state_size), 1.0)
    torch.testing.assert_close(states[1:, :, :H], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [1, 9, 64, 65, 130])           # own loop up to 64, BLAS beyond
@pytest.mark.parametrize("G", [3, 64, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_projection(built, dtype, G, D):
    torch.manual_seed(4)
    x = torch.randn(5, 7, D, dtype=dtype)
    w = torch.randn(G, D, dtype=dtype)
    b = torch.randn(G, dtype=dtype)
    want = x @ w.t() + b
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    out = torch.empty(5, 7, G, dtype=dtype)
    assert kernels.input_projection(x, w, b, out) is out
    torch.testing.assert_close(out, want, **tol)
    got = torch.empty(7, 5, G, dtype=dtype)
    kernels.input_projection(x.transpose(0, 1), w, None, got)      # a strided x is copied
    torch.testing.assert_close(got, (x @ w.t()).transpose(0, 1), **tol)


@pytest.mark.parametrize("kind", ["implicit-gru", "lstm"])
def test_intra_op_threads(built, kind):
    """With two torch threads the rows are split between them (at::parallel_for)."""
    cell, _, xw, s0 = _setup(kind, torch.float32, 6, 200, 3, 40)
    want_s, want_hw = _torch_sweep(cell, xw, s0, 1.0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got_s, got_hw = _kernel_sweep(kind, cell, xw, s0, 1.0)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_hw, want_hw, rtol=1e-5, atol=1e-5)


def test_strided_rows(built):
    """Row tensors may be views with a larger row stride (only the last dim
    must be unit-stride): xw padded, states inside a wider buffer."""
    kind, dtype, T, B, D, H = "implicit-gru", torch.float64, 4, 3, 2, 5
    cell, _, xw, s0 = _setup(kind, dtype, T, B, D, H)
    want_s, want_hw = _torch_sweep(cell, xw, s0, 1.3)
    wide = torch.zeros(T, B, 3 * H + 7, dtype=dtype)
    wide[..., :3 * H] = xw
    big = torch.zeros(T + 1, B, H + 3, dtype=dtype)
    states = big[..., :H]
    states[0] = s0
    hw = torch.empty(T, B, 3 * H, dtype=dtype)
    kernels.forward_sweep(kind, wide[..., :3 * H], cell.weight_hh, cell.bias_hh, 1.3, states, hw)
    torch.testing.assert_close(states, want_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hw, want_hw, rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise(built):
    cell, _, xw, s0 = _setup("gru", torch.float64, 3, 2, 2, 4)
    states = torch.zeros(4, 2, 4, dtype=torch.float64)
    hw = torch.empty(3, 2, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="T\\+1 rows"):
        kernels.forward_sweep("gru", xw, cell.weight_hh, cell.bias_hh, 1.0, states[:3], hw)
    with pytest.raises(RuntimeError, match="dtype|float"):
        kernels.forward_sweep("gru", xw.float(), cell.weight_hh, cell.bias_hh, 1.0, states, hw)
    with pytest.raises(RuntimeError, match="w_hh"):
        kernels.forward_sweep("lstm", xw, cell.weight_hh, cell.bias_hh, 1.0, states, hw)
    with pytest.raises(RuntimeError, match="unit stride"):
        kernels.forward_sweep("gru", xw.transpose(1, 2).contiguous().transpose(1, 2),
                              cell.weight_hh, cell.bias_hh, 1.0, states, hw)
    with pytest.raises(RuntimeError, match="dt"):
        kernels.forward_sweep("gru", xw, cell.weight_hh, cell.bias_hh, 0.0, states, hw)
    with pytest.raises(ValueError, match="unknown cell kind"):
        kernels.forward_sweep("gru2", xw, cell.weight_hh, cell.bias_hh, 1.0, states, hw)


# ------------------------------------------------------------ per-step
@pytest.mark.parametrize("B, H", [(3, 6), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_step_and_vjp_step(built, kind, dtype, B, H):
    D, dt = 3, 4.0                                 # a coarse-level step
    cell, _, xw, s = _setup(kind, dtype, 1, B, D, H)
    xw, S, GH = xw[0], cell.state_size, cell.proj_size
    rhs = torch.randn(B, S, dtype=dtype)
    tol = TOL[dtype]

    want_hw = torch.empty(B, GH, dtype=dtype)
    want = cell.step(xw, s, dt, hw_out=want_hw)
    out, hw = torch.empty(B, S, dtype=dtype), torch.empty(B, GH, dtype=dtype)
    assert kernels.step(kind, xw, s, cell.weight_hh, cell.bias_hh, dt, out, hw_out=hw) is out
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(hw, want_hw, **tol)
    kernels.step(kind, xw, s, cell.weight_hh, cell.bias_hh, dt, out, rhs=rhs)   # no hw_out
    torch.testing.assert_close(out, want + rhs, **tol)

    g = torch.randn(B, S, dtype=dtype)
    lin = cell.linearize(xw, s, dt)
    want_gs = cell.vjp_state(lin, g)
    want_gx, want_gh = cell.vjp_proj(lin, g)
    gx, gh = torch.empty(B, GH, dtype=dtype), torch.empty(B, GH, dtype=dtype)
    kernels.vjp_step(kind, xw, s, cell.weight_hh, cell.bias_hh, dt, g, out, hw=hw,
                     g_xw_out=gx, g_hw_out=gh)
    torch.testing.assert_close(out, want_gs, **tol)
    torch.testing.assert_close(gx, want_gx, **tol)
    torch.testing.assert_close(gh, want_gh, **tol)
    # without hw: recomputed from b_hh
    kernels.vjp_step(kind, xw, s, cell.weight_hh, cell.bias_hh, dt, g, out, rhs=rhs)
    torch.testing.assert_close(out, want_gs + rhs, **tol)
    acc = rhs.clone()                               # rhs is out: accumulate in place
    kernels.vjp_step(kind, xw, s, cell.weight_hh, cell.bias_hh, dt, g, acc, hw=hw, rhs=acc)
    torch.testing.assert_close(acc, want_gs + rhs, **tol)

    # from the cell's lin, as the MGRIT adjoint stepper holds it
    kernels.vjp_lin(kind, lin, g, cell.weight_hh, out)
    torch.testing.assert_close(out, want_gs, **tol)
    acc = rhs.clone()
    kernels.vjp_lin(kind, lin, g, cell.weight_hh, acc, rhs=acc)
    torch.testing.assert_close(acc, cell.vjp_state(lin, g, acc=rhs.clone()), **tol)
    # a lin of a whole chunk, indexed per step (views into [T, ...] tensors)
    cell2, _, xw2, s2 = _setup(kind, dtype, 4, B, D, H, seed=1)
    states, hw2 = _torch_sweep(cell2, xw2, s2, dt)
    chunk_lin = cell2.linearize(xw2, states[:-1], dt, hw=hw2)
    for j in range(4):
        lj = select_lin(chunk_lin, j)
        kernels.vjp_lin(kind, lj, g, cell2.weight_hh, out, rhs=rhs)
        torch.testing.assert_close(out, cell2.vjp_state(lj, g, acc=rhs.clone()), **tol)


def test_float32_math_accuracy(built):
    """The kernels' own float32 exp / tanh / sigmoid against float64 torch,
    over the whole range, the tiny and huge arguments, inf and NaN."""
    x = torch.cat([torch.linspace(-90, 90, 20001), torch.linspace(-1, 1, 20001),
                   torch.logspace(-30, 1, 500), -torch.logspace(-30, 1, 500),
                   torch.tensor([0.0, -0.0, 0.625, -0.625, 1e-45, 200.0, -200.0])])
    e, th, sg = kernels._mod().simd_probe(x)
    xd = x.double()
    ok = xd.abs() < 87
    rel = ((e.double() - xd.exp()).abs() / xd.exp())[ok]
    assert rel.max() < 5e-7
    assert (th.double() - xd.tanh()).abs().max() < 2.5e-7
    rel_th = ((th.double() - xd.tanh()).abs() / xd.tanh().abs().clamp_min(1e-300))[xd != 0]
    assert rel_th.max() < 1e-6                      # relative too: the polynomial near 0
    assert (sg.double() - xd.sigmoid()).abs().max() < 2e-7
    assert (th.abs() <= 1).all() and ((sg >= 0) & (sg <= 1)).all()
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    e, th, sg = kernels._mod().simd_probe(special)
    assert th[0] == 1 and th[1] == -1 and sg[0] == 1 and sg[1] < 1e-37
    assert e[2].isnan() and th[2].isnan() and sg[2].isnan()


def test_kind_of(built):
    t32 = torch.zeros(2, 3)
    for kind in KINDS:
        assert kernels.kind_of(make_cell(kind, 3, 4), t32) == kind
        assert kernels.kind_of(make_cell(kind, 3, 4), t32.double()) is None     # dtype mismatch
        assert kernels.kind_of(make_cell(kind, 3, 4, dtype=torch.float64), t32.double()) == kind
    assert kernels.kind_of(make_cell("gru", 3, 4, layers=2), t32) is None
    assert kernels.kind_of(make_cell("gru", 3, 4).half()) is None

    class Custom(type(make_cell("gru", 3, 4))):
        pass
    assert kernels.kind_of(Custom(3, 4), t32) is None


# ------------------------------------------------------------ the GIL
def test_sweeps_release_the_gil(built):
    """While a worker thread is inside forward_sweep / backward_sweep, the main
    thread runs Python code: its loop iterations fall inside the middle third
    of each call's time window. A GIL-holding call lets none through there:
    the main thread may run only at the window's ends, between the worker's
    clock readings and the call (up to ~30 ms seen here). The check itself was
    tried on a GIL-holding C call (``sum(range(5 * 10**6))``, ~0.1 s): 0
    iterations in the middle third, against ~10^4 for these sweeps. float64
    (scalar libm) makes calls of ~0.1 s from modest buffers."""
    T, B, H = 100, 32, 256
    cell, _, xw, s0 = _setup("implicit-gru", torch.float64, T, B, 4, H)
    states = torch.empty(T + 1, B, H, dtype=torch.float64)
    states[0] = s0
    hw = torch.empty(T, B, 3 * H, dtype=torch.float64)
    lam = torch.randn(T, B, H, dtype=torch.float64)
    gx, gh = torch.empty_like(hw), torch.empty_like(hw)
    calls = {
        "forward": lambda: kernels.forward_sweep("implicit-gru", xw, cell.weight_hh,
                                                 cell.bias_hh, 1.0, states, hw),
        "backward": lambda: kernels.backward_sweep("implicit-gru", xw, hw, states[:-1],
                                                   cell.weight_hh, 1.0, lam, gx, gh)}
    windows = {name: [] for name in calls}

    def worker():
        for _ in range(3):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                windows[name].append((t0, time.perf_counter()))

    stamps = []
    th = threading.Thread(target=worker)
    th.start()
    while th.is_alive():
        sum(range(100))
        stamps.append(time.perf_counter())
    th.join()
    for name, spans in windows.items():
        if min(t1 - t0 for t0, t1 in spans) < 0.02:
            pytest.skip(f"{name} sweeps too fast to judge: {spans}")
        inside = [sum(1 for s in stamps if t0 + (t1 - t0) / 3 < s < t1 - (t1 - t0) / 3)
                  for t0, t1 in spans]
        assert sum(n >= 10 for n in inside) >= 2, (
            f"{name}_sweep: main-thread iterations in the middle third of each call: {inside} "
            f"(calls of {[round(t1 - t0, 3) for t0, t1 in spans]} s): the GIL was held")


# ------------------------------------------------------ fallback and build
def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


def test_disabled_by_environment():
    res = _run_python("""
        from mgrit_gru.models import kernels
        print(kernels.available(), kernels.supports(), kernels.build_info()["error"])
    """, MGRIT_GRU_KERNELS="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["False", "False"] and "MGRIT_GRU_KERNELS=0" in res.stdout


def test_failed_build_falls_back_with_one_warning(tmp_path):
    res = _run_python("""
        import warnings
        from mgrit_gru.models import kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            flags = [kernels.available() for _ in range(3)]
        print(flags, len(caught))
        print(kernels.build_info()["error"])
        try:
            kernels.forward_sweep("gru", None, None, None, 1.0, None, None)
        except RuntimeError as exc:
            print("raised", exc)
    """, MGRIT_GRU_KERNEL_DIR=str(tmp_path), CXX="no-such-compiler-mgrit")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "[False, False, False] 1"
    assert "no C++ compiler" in lines[1]
    assert lines[2].startswith("raised mgrit_gru kernels unavailable")


def test_supports():
    t32, t64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    ok = kernels.available()
    assert kernels.supports(t32, None, t32) is ok
    assert kernels.supports(t64) is ok
    assert not kernels.supports(t32, t64)
    assert not kernels.supports(torch.zeros(2, dtype=torch.int64))
    if torch.cuda.is_available():
        assert not kernels.supports(t32.cuda())


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(built, tmp_path):
    """Three processes (as MPI ranks) start on an empty cache at once: one
    compiles, all import the same library, later processes need no compiler;
    a stale lock file of torch's (a builder killed mid-build) does not wedge them."""
    code = """
        from mgrit_gru.models import kernels
        print(kernels.available(), kernels.build_info()["path"])
    """
    name = kernels._module_name()           # a builder that died left torch's lock file
    (tmp_path / name).mkdir()
    (tmp_path / name / "lock").touch()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                                       MGRIT_GRU_KERNEL_DIR=str(tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=850) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split()[0] == "True", err
    assert len({out.split()[1] for out, _ in outs}) == 1
    res = _run_python(code, MGRIT_GRU_KERNEL_DIR=str(tmp_path), PATH="/nonexistent")
    assert res.returncode == 0 and res.stdout.split()[0] == "True", res.stderr


# ------------------------------------------------------ projection gradients
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_proj_grads_and_param_grads_equal_the_cells(built, kind, dtype):
    """proj_grads from given adjoints = the cell's vjp_proj; ParamGrads over two
    chunks = the cell's param_grads and input_grad of the whole sequence."""
    T, B, D, H, dt = 6, 3, 4, 5, 1.7
    cell, x, xw, s0 = _setup(kind, dtype, T, B, D, H)
    states, hw = _kernel_sweep(kind, cell, xw, s0, dt)
    g = torch.randn(T, B, cell.state_size, dtype=dtype)
    lin = cell.linearize(xw, states[:-1], dt, hw=hw)
    ref_xw, ref_hw = cell.vjp_proj(lin, g)
    got_xw = torch.full_like(ref_xw, float("nan"))
    got_hw = torch.full_like(ref_hw, float("nan"))
    kernels.proj_grads(kind, xw, hw, states[:-1], cell.weight_hh, dt, g, got_xw, got_hw)
    torch.testing.assert_close(got_xw, ref_xw, **TOL[dtype])
    torch.testing.assert_close(got_hw, ref_hw, **TOL[dtype])

    ref = cell.param_grads(x, states[:-1], ref_xw, ref_hw, lin)
    acc = kernels.ParamGrads({n: getattr(cell, n) for n in cell.param_names})
    g_x = torch.empty(T, B, D, dtype=dtype)
    for a, b in ((0, 4), (4, T)):
        acc.add(x[a:b], states[a:b, :, :H], got_xw[a:b], got_hw[a:b])
        acc.input_grad(got_xw[a:b], g_x[a:b])
    got = acc.result()
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL[dtype])
    torch.testing.assert_close(g_x, cell.input_grad(ref_xw), **TOL[dtype])


def test_proj_grads_rejects_strided_blocks(built):
    cell, x, xw, s0 = _setup("gru", torch.float64, 4, 3, 2, 5)
    states, hw = _kernel_sweep("gru", cell, xw, s0, 1.0)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    gx, gh = torch.empty_like(xw), torch.empty_like(xw)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.proj_grads("gru", xw[::2], hw[::2], states[:-1:2], cell.weight_hh, 1.0, g[::2],
                           gx[:2], gh[:2])
    with pytest.raises(RuntimeError, match="two buffers"):
        kernels.proj_grads("gru", xw, hw, states[:-1], cell.weight_hh, 1.0, g, gx, gx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dt", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_linearize_equals_the_cells(built, kind, dtype, dt):
    """The GRUs' fused linearisation = cell.linearize (every part); the LSTM and
    RNN have none (None: the torch linearize runs)."""
    cell, x, xw, s0 = _setup(kind, dtype, 5, 3, 4, 7)
    states, hw = _kernel_sweep(kind, cell, xw, s0, dt)
    got = kernels.linearize(kind, xw, hw, states[:-1], cell.weight_hh, dt)
    if kind not in ("implicit-gru", "gru"):
        assert got is None
        return
    ref = cell.linearize(xw, states[:-1], dt, hw=hw)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[dtype])
