"""Sequence classifier and the serial time propagators.

A *propagator* maps ``(cell, x [B, T, D], lengths, pooling) -> features
[B, H]`` as a differentiable function of the cell's parameters:

* :class:`AutogradPropagator` -- plain loop of differentiable steps, autograd
  BPTT (the reference in tests);
* :class:`SerialPropagator` -- plain loop of ``cell.step`` in the forward, the
  cells' hand-written VJPs in the backward (the default);
* ``MGRITPropagator`` (``mgrit_gru.autograd``) -- same signature, solved in
  parallel in time.

Pooling: ``"last"`` takes the hidden state at each sequence's own last step
``lengths[b]``; ``"mean"`` averages the hidden states of steps
``1..lengths[b]``. Steps past a sequence's length never reach its features
or the gradients. The initial state is zero.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import Tensor, nn

from mgrit_gru.cells import RecurrentCell, make_cell, select_lin
from mgrit_gru.errors import InputError

__all__ = ["AutogradPropagator", "POOLINGS", "SequenceClassifier", "SerialPropagator"]

POOLINGS = ("last", "mean")
CHUNK_VALUES = 80_000       # hidden values per linearised chunk (measured, see SerialPropagator)


def _check_dt(dt) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise InputError(f"dt: expected a positive number, got {dt!r}")
    return float(dt)


def _check_inputs(cell: RecurrentCell, x: Tensor, lengths, pooling: str) -> tuple[Tensor, int]:
    """Validate a batch; return the lengths (int64 ``[B]``) and ``max(lengths)``."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != cell.input_size:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"x: expected a [batch, time, {cell.input_size}] tensor, got {shape}")
    if x.dtype != cell.weight_ih.dtype:
        raise InputError(f"x: dtype {x.dtype} does not match the model's {cell.weight_ih.dtype}")
    B, T = x.shape[0], x.shape[1]
    if B == 0 or T == 0:
        raise InputError(f"x: empty batch of shape {list(x.shape)}")
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64), T
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
        raise InputError(f"lengths: expected {B} integers, got a {lengths.dtype} tensor "
                         f"of shape {list(lengths.shape)}")
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise InputError(f"lengths: values must lie in 1..{T} (the padded length), "
                         f"got {lo}..{hi}")
    return lengths, hi


def _mean_weights(lengths: Tensor, steps: int, like: Tensor) -> Tensor:
    """``w[t, b] = [t < lengths[b]] / lengths[b]`` as ``[steps, B, 1]``."""
    t = torch.arange(steps).unsqueeze(1)
    w = (t < lengths).to(like.dtype) / lengths.to(like.dtype)
    return w.unsqueeze(-1).to(like.device)


def _pool(h_seq: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """Features ``[B, H]`` from the hidden states ``h_seq [T, B, H]`` of steps 1..T."""
    if pooling == "last":
        batch = torch.arange(h_seq.shape[1], device=h_seq.device)
        return h_seq[lengths.to(h_seq.device) - 1, batch]
    w = _mean_weights(lengths, h_seq.shape[0], h_seq)
    return (h_seq * w).sum(0)


class AutogradPropagator:
    """Reference propagator: a loop of differentiable steps, autograd BPTT."""

    def __init__(self, dt: float = 1.0) -> None:
        self.dt = _check_dt(dt)

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None,
                 pooling: str = "last") -> Tensor:
        """Pooled hidden states ``[B, H]`` of the batch ``x [B, T, D]``."""
        lengths, steps = _check_inputs(cell, x, lengths, pooling)
        xw = cell.input_projection(x[:, :steps])
        s = cell.initial_state((x.shape[0],), x.device, x.dtype)
        hs = []
        for t in range(steps):
            s = cell.forward_state(xw[:, t], s, self.dt)
            hs.append(cell.hidden(s))
        return _pool(torch.stack(hs), lengths, pooling)

    def __repr__(self) -> str:
        return f"AutogradPropagator(dt={self.dt})"


def _param_names(cell: RecurrentCell) -> tuple[str, ...]:
    return ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if cell.bias \
        else ("weight_ih", "weight_hh")


def _flush_is_on() -> bool:
    """Whether this thread flushes float32 subnormals to zero (probe: 1e-40 * 1)."""
    return bool(torch.full((), 1e-40, dtype=torch.float32) * 1.0 == 0)


@contextlib.contextmanager
def _flushing_denormals(enabled: bool):
    """Flush subnormals to zero on this thread for the block, then restore.

    The CPU mode is per thread, so other threads are not affected.
    """
    turn_on = enabled and not _flush_is_on()
    if turn_on:
        turn_on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if turn_on:
            torch.set_flush_denormal(False)


class _Workspace(threading.local):
    """Per-thread reusable flat buffers of the serial sweep.

    Fresh multi-megabyte tensors are mapped from the OS on every call and pay
    one page fault per 4 KiB page on first touch (about 50 ms per 100 MB
    here); reusing buffers removes that cost. A buffer is owned by one
    forward/backward pair at a time: it is removed from the pool while in use
    and returned after the backward (or at once when no gradient is needed).
    """

    def __init__(self) -> None:
        self.free: dict[str, Tensor] = {}

    def take(self, role: str, shape, dtype, device) -> tuple[Tensor, Tensor]:
        """``(flat buffer, view of the requested shape)`` for ``role``."""
        n = math.prod(shape)
        buf = self.free.pop(role, None)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(n, dtype=dtype, device=device)
        return buf, buf[:n].view(shape)

    def give(self, buffers: dict[str, Tensor]) -> None:
        """Return buffers to the pool (keeping the larger one per role)."""
        for role, buf in buffers.items():
            old = self.free.get(role)
            if old is None or old.numel() < buf.numel():
                self.free[role] = buf


@contextlib.contextmanager
def _bound(cell: RecurrentCell, params: dict[str, Tensor]):
    """Make ``cell`` use ``params`` for the block (no-op when they are its own).

    The autograd function saves the parameter tensors its forward used; a
    backward that runs after e.g. ``torch.func.functional_call`` has restored
    the module must still differentiate with those tensors.
    """
    if all(getattr(cell, name) is p for name, p in params.items()):
        yield
        return
    old = {name: cell._parameters[name] for name in params}
    cell._parameters.update(params)
    try:
        yield
    finally:
        cell._parameters.update(old)


def _sweep(cell: RecurrentCell, x: Tensor, steps: int, dt: float, work: _Workspace):
    """Forward sweep into pooled buffers: ``(bufs, x_tm, xw, hw, states)``."""
    B = x.shape[0]
    kw = {"dtype": x.dtype, "device": x.device}
    bufs = {}

    def take(role, *shape):
        bufs[role], view = work.take(role, shape, **kw)
        return view

    gh = cell.gates * cell.hidden_size
    x_tm = take("x", steps, B, cell.input_size)
    x_tm.copy_(x[:, :steps].transpose(0, 1))
    xw = cell.input_projection(x_tm, out=take("xw", steps, B, gh))
    hw = take("hw", steps, B, gh)
    states = take("states", steps + 1, B, cell.state_size)
    states[0].zero_()
    for t in range(steps):
        cell.step(xw[t], states[t], dt, out=states[t + 1], hw_out=hw[t])
    return bufs, x_tm, xw, hw, states


class _SerialFunction(torch.autograd.Function):
    """Serial sweep with hand-written VJPs.

    Forward: one input-projection GEMM, then the step loop writing states and
    hidden projections into pooled ``[T, ...]`` buffers. Backward, over time
    chunks from the end: ``linearize`` the chunk in one call, sweep it with
    ``vjp_state``, then ``vjp_proj`` and the parameter gradients of the whole
    chunk in a few GEMMs. The buffers go back to the pool after the first
    backward; a repeated backward (``retain_graph``) recomputes the sweep.
    """

    @staticmethod
    def forward(ctx, cell, x, lengths, steps, pooling, opts, *params):
        dt, chunk, flush, work = opts
        with _flushing_denormals(flush):
            bufs, x_tm, xw, hw, states = _sweep(cell, x, steps, dt, work)
            features = _pool(cell.hidden(states[1:]), lengths, pooling)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, *params)
            ctx.cell, ctx.lengths, ctx.steps, ctx.pooling, ctx.opts = \
                cell, lengths, steps, pooling, opts
            ctx.sweep = bufs, x_tm, xw, hw, states
        else:
            work.give(bufs)
        return features

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_feat):
        dt, chunk, flush, work = ctx.opts
        x, *params = ctx.saved_tensors
        cell = ctx.cell
        with _bound(cell, dict(zip(_param_names(cell), params))), _flushing_denormals(flush):
            if ctx.sweep is None:
                ctx.sweep = _sweep(cell, x, ctx.steps, dt, work)
            bufs, *sweep = ctx.sweep
            ctx.sweep = None
            grads, g_x = _serial_backward(ctx, cell, *sweep, g_feat.contiguous(), dt, chunk, bufs)
        work.give(bufs)
        return (None, g_x, None, None, None, None,
                *(grads[name] for name in _param_names(cell)))


def _serial_backward(ctx, cell, x_tm, xw, hw, states, g_feat, dt, chunk, bufs):
    """Reverse sweep of :class:`_SerialFunction`: ``(param grads, dL/dx or None)``."""
    lengths = ctx.lengths
    steps, B = xw.shape[0], xw.shape[1]
    H = cell.hidden_size

    # lam[t] = dL/ds_{t+1}, initialised with the loss source terms.
    bufs["lam"], lam = ctx.opts[3].take("lam", (steps, B, cell.state_size), xw.dtype, xw.device)
    lam.zero_()
    if ctx.pooling == "last":
        lam[lengths.to(xw.device) - 1, torch.arange(B, device=xw.device), :H] = g_feat
    else:
        torch.mul(_mean_weights(lengths, steps, xw), g_feat, out=lam[..., :H])

    g_x = None
    if ctx.needs_input_grad[1]:
        g_x = xw.new_zeros(B, ctx.saved_tensors[0].shape[1], cell.input_size)
    grads = None
    for stop in range(steps, 0, -chunk):
        start = max(stop - chunk, 0)
        lin = cell.linearize(xw[start:stop], states[start:stop], dt, hw=hw[start:stop])
        for j in range(stop - start - 1, -1 if start > 0 else 0, -1):
            cell.vjp_state(select_lin(lin, j), lam[start + j], acc=lam[start + j - 1])
        g_xw, g_hw = cell.vjp_proj(lin, lam[start:stop])
        part = cell.param_grads(x_tm[start:stop], states[start:stop], g_xw, g_hw)
        if grads is None:
            grads = part
        else:
            for name, value in part.items():
                grads[name].add_(value)
        if g_x is not None:
            g_x[:, start:stop] = (g_xw @ cell.weight_ih).transpose(0, 1)
    return grads, g_x


class SerialPropagator:
    """Default propagator: serial step loop, hand-written VJP backward.

    Gradients flow to the cell's parameters and to ``x``; the padded steps past
    ``max(lengths)`` are never computed.

    ``chunk``: time steps linearised per call in the backward. ``None`` picks
    about ``CHUNK_VALUES / (batch * hidden)`` steps, so that a chunk's
    coefficient tensors stay in cache (8 steps at batch 100, hidden 100; one
    call for the whole sequence is about 1.6x slower there, see
    docs/performance.md).
    ``flush_denormals``: flush float32 subnormals (``< 1.2e-38``) to zero on
    the calling thread while the propagator runs, and restore the previous
    mode afterwards. Adjoints decay through long sequences and subnormal
    arithmetic is many times slower on x86; the flushed values lie far below
    float32 resolution of any gradient they would be added to.

    The sweep buffers (about ``T B (2 G H + 2 S + D)`` values: input and
    hidden projections, states, adjoints, inputs) are kept per thread and
    reused by the next call; they are freed with the propagator.
    """

    def __init__(self, dt: float = 1.0, chunk: int | None = None,
                 flush_denormals: bool = True) -> None:
        self.dt = _check_dt(dt)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                  or chunk < 1):
            raise InputError(f"chunk: expected a positive integer or None, got {chunk!r}")
        self.chunk = chunk
        self.flush_denormals = bool(flush_denormals)
        self._work = _Workspace()

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None,
                 pooling: str = "last") -> Tensor:
        """Pooled hidden states ``[B, H]`` of the batch ``x [B, T, D]``."""
        lengths, steps = _check_inputs(cell, x, lengths, pooling)
        params = [getattr(cell, name) for name in _param_names(cell)]
        chunk = self.chunk or max(1, CHUNK_VALUES // (x.shape[0] * cell.hidden_size))
        opts = (self.dt, chunk, self.flush_denormals, self._work)
        return _SerialFunction.apply(cell, x, lengths, steps, pooling, opts, *params)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_work"]          # per-thread buffers are neither copied nor pickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._work = _Workspace()

    def __repr__(self) -> str:
        return (f"SerialPropagator(dt={self.dt}, chunk={self.chunk}, "
                f"flush_denormals={self.flush_denormals})")


class SequenceClassifier(nn.Module):
    """Recurrent cell + pooling + linear head: ``logits = head(features(x))``.

    ``cell`` is a registry name (``mgrit_gru.cells.CELLS``) or a cell instance.
    The propagator can be swapped at any time (``model.propagator = ...``)
    without touching the parameters.
    """

    def __init__(self, cell="implicit-gru", input_size: int | None = None,
                 hidden_size: int | None = None, num_classes: int | None = None,
                 pooling: str = "last", propagator=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        if isinstance(cell, RecurrentCell):
            for option, value, have in (("input_size", input_size, cell.input_size),
                                        ("hidden_size", hidden_size, cell.hidden_size)):
                if value is not None and value != have:
                    raise InputError(f"{option}: {value} does not match the given cell's {have}")
            cell = cell.to(dtype)
        else:
            for option, value in (("input_size", input_size), ("hidden_size", hidden_size)):
                if value is None:
                    raise InputError(f"{option}: required when the cell is given by name")
            cell = make_cell(cell, input_size, hidden_size, dtype=dtype)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes: expected a positive integer, got {num_classes!r}")
        self.cell = cell
        self.head = nn.Linear(cell.hidden_size, num_classes, dtype=dtype)
        self.pooling = pooling
        self.propagator = SerialPropagator() if propagator is None else propagator

    def features(self, x: Tensor, lengths=None) -> Tensor:
        """Pooled recurrent features ``[B, H]``."""
        return self.propagator.features(self.cell, x, lengths, self.pooling)

    def forward(self, x: Tensor, lengths=None) -> Tensor:
        """Logits ``[B, C]`` of the batch ``x [B, T, D]`` (padded past ``lengths``)."""
        return self.head(self.features(x, lengths))

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, propagator={self.propagator!r}"
