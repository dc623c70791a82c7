"""Sequence classifier and the serial time propagators.

A *propagator* maps ``(cell, x [B, T, D], lengths, pooling) -> features
[B, H]`` as a differentiable function of the cell's parameters:

* :class:`AutogradPropagator` -- plain loop of differentiable steps, autograd
  BPTT (the reference in tests);
* :class:`SerialPropagator` -- plain loop of ``cell.step`` in the forward, the
  cells' hand-written VJPs in the backward (the default);
* ``MGRITPropagator`` (``mgrit_gru.models``) -- same signature, solved in
  parallel in time.

Pooling: ``"last"`` takes the hidden state at each sequence's own last step
``lengths[b]``; ``"mean"`` averages the hidden states of steps
``1..lengths[b]``. Steps past a sequence's length never reach its features
or the gradients. The initial state is zero.
"""

from __future__ import annotations


import torch
from torch import Tensor

from mgrit_gru.errors import InputError
from mgrit_gru.models import kernels
from mgrit_gru.models.cells import RecurrentCell, select_lin
from mgrit_gru.models.common import (Workspace, as_pooling, bound_params, check_dt, check_inputs,
                                     flushing_denormals, param_names, project_inputs)

__all__ = ["AutogradPropagator", "SerialPropagator"]

CHUNK_VALUES = 80_000       # hidden values per linearised chunk (measured, see SerialPropagator)


class AutogradPropagator:
    """Reference propagator: a loop of differentiable steps, autograd BPTT."""

    def __init__(self, dt: float = 1.0) -> None:
        self.dt = check_dt(dt)

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None,
                 pooling: str = "last") -> Tensor:
        """Pooled hidden states ``[B, H]`` of the batch ``x [B, T, D]``."""
        lengths, steps = check_inputs(cell, x, lengths, pooling)
        xw = cell.input_projection(x[:, :steps])
        s = cell.initial_state((x.shape[0],), x.device, x.dtype)
        hs = []
        for t in range(steps):
            s = cell.forward_state(xw[:, t], s, self.dt)
            hs.append(cell.hidden(s))
        return as_pooling(pooling).features(torch.stack(hs), lengths, lo=1)

    def __repr__(self) -> str:
        return f"AutogradPropagator(dt={self.dt})"


def _sweep(cell: RecurrentCell, x: Tensor, steps: int, dt: float, work: Workspace):
    """Forward sweep into pooled buffers: ``(bufs, x_tm, xw, hw, states)``."""
    B = x.shape[0]
    kw = {"dtype": x.dtype, "device": x.device}
    bufs = {}

    def take(role, *shape):
        bufs[role], view = work.take(role, shape, **kw)
        return view

    gh = cell.proj_size
    x_tm = take("x", steps, B, cell.input_size)
    x_tm.copy_(x[:, :steps].transpose(0, 1))
    xw = project_inputs(cell, x_tm, take("xw", steps, B, gh))
    hw = take("hw", steps, B, gh)
    states = take("states", steps + 1, B, cell.state_size)
    states[0].zero_()
    kind = kernels.kind_of(cell, x)
    if kind is not None:        # fused C++ sweep, GIL released (models/kernels.py)
        kernels.forward_sweep(kind, xw, cell.weight_hh, cell.bias_hh, dt, states, hw)
        return bufs, x_tm, xw, hw, states
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
        dt, chunk, flush, work, kchunk = opts
        with flushing_denormals(flush):
            bufs, x_tm, xw, hw, states = _sweep(cell, x, steps, dt, work)
            features = as_pooling(pooling).features(cell.hidden(states[1:]), lengths, lo=1)
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
        dt, chunk, flush, work, kchunk = ctx.opts
        x, *params = ctx.saved_tensors
        cell = ctx.cell
        with bound_params(cell, dict(zip(param_names(cell), params))), flushing_denormals(flush):
            if ctx.sweep is None:
                ctx.sweep = _sweep(cell, x, ctx.steps, dt, work)
            bufs, *sweep = ctx.sweep
            ctx.sweep = None
            grads, g_x = _serial_backward(ctx, cell, *sweep, g_feat.contiguous(), dt, chunk, bufs)
        work.give(bufs)
        return (None, g_x, None, None, None, None,
                *(grads[name] for name in param_names(cell)))


def _serial_backward(ctx, cell, x_tm, xw, hw, states, g_feat, dt, chunk, bufs):
    """Reverse sweep of :class:`_SerialFunction`: ``(param grads, dL/dx or None)``."""
    lengths = ctx.lengths
    steps, B = xw.shape[0], xw.shape[1]
    H = cell.hidden_size

    # lam[t] = dL/ds_{t+1}, initialised with the loss source terms.
    bufs["lam"], lam = ctx.opts[3].take("lam", (steps, B, cell.state_size), xw.dtype, xw.device)
    if H < cell.state_size:
        lam[..., H:].zero_()
    as_pooling(ctx.pooling).sources(g_feat, lengths, 1, out=lam[..., :H])

    g_x = None
    if ctx.needs_input_grad[1]:
        g_x = xw.new_zeros(B, ctx.saved_tensors[0].shape[1], cell.input_size)
    kind = kernels.kind_of(cell, xw)
    if kind is not None:        # fused reverse sweep + chunked parameter-gradient GEMMs
        params = {name: getattr(cell, name) for name in param_names(cell)}
        grads, g_x_tm = kernels.sweep_backward(kind, x_tm, xw, hw, states, params, dt, lam,
                                               chunk=ctx.opts[4], input_grad=g_x is not None,
                                               work=ctx.opts[3].free)
        if g_x is not None:
            g_x[:, :steps] = g_x_tm.transpose(0, 1)
        return grads, g_x
    grads = None
    for stop in range(steps, 0, -chunk):
        start = max(stop - chunk, 0)
        lin = cell.linearize(xw[start:stop], states[start:stop], dt, hw=hw[start:stop])
        for j in range(stop - start - 1, -1 if start > 0 else 0, -1):
            cell.vjp_state(select_lin(lin, j), lam[start + j], acc=lam[start + j - 1])
        g_xw, g_hw = cell.vjp_proj(lin, lam[start:stop])
        part = cell.param_grads(x_tm[start:stop], states[start:stop], g_xw, g_hw, lin)
        if grads is None:
            grads = part
        else:
            for name, value in part.items():
                grads[name].add_(value)
        if g_x is not None:
            g_x[:, start:stop] = cell.input_grad(g_xw).transpose(0, 1)
    return grads, g_x


class SerialPropagator:
    """Default propagator: serial step loop, hand-written VJP backward.

    Gradients flow to the cell's parameters and to ``x``; the padded steps past
    ``max(lengths)`` are never computed.

    The four registered single-layer cells on the CPU run the fused C++
    kernels of :mod:`mgrit_gru.models.kernels` (one call per sweep, GIL
    released; docs/kernels.md); other cells, stacks, GPUs, or
    ``MGRIT_GRU_KERNELS=0`` take the torch path below.

    ``chunk``: time steps linearised per call in the backward. ``None`` picks
    about ``CHUNK_VALUES / (batch * hidden)`` steps on the torch path, so that
    a chunk's coefficient tensors stay in cache (8 steps at batch 100, hidden
    100; one call for the whole sequence is about 1.6x slower there, see
    docs/performance.md), and the kernels' own default
    (:func:`~mgrit_gru.models.kernels.sweep_backward`) on the kernel path.
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
        self.dt = check_dt(dt)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                  or chunk < 1):
            raise InputError(f"chunk: expected a positive integer or None, got {chunk!r}")
        self.chunk = chunk
        self.flush_denormals = bool(flush_denormals)
        self._work = Workspace()

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None,
                 pooling: str = "last") -> Tensor:
        """Pooled hidden states ``[B, H]`` of the batch ``x [B, T, D]``."""
        lengths, steps = check_inputs(cell, x, lengths, pooling)
        params = [getattr(cell, name) for name in param_names(cell)]
        chunk = self.chunk or max(1, CHUNK_VALUES // (x.shape[0] * cell.hidden_size))
        opts = (self.dt, chunk, self.flush_denormals, self._work, self.chunk)
        return _SerialFunction.apply(cell, x, lengths, steps, pooling, opts, *params)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_work"]          # per-thread buffers are neither copied nor pickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._work = Workspace()

    def __repr__(self) -> str:
        return (f"SerialPropagator(dt={self.dt}, chunk={self.chunk}, "
                f"flush_denormals={self.flush_denormals})")


