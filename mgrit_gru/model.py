"""Sequence classifier and the serial time propagators.

A *propagator* maps ``(cell, x [B, T, D], lengths, pooling) -> features
[B, H]`` as a differentiable function of the cell's parameters:

* :class:`AutogradPropagator` -- plain loop of differentiable steps, autograd
  BPTT (the reference in tests);
* :class:`SerialPropagator` -- plain loop of ``cell.step`` in the forward, the
  cells' hand-written VJPs in the backward (the default);
* ``MGRITPropagator`` (``mgrit_gru.mgrit``) -- same signature, solved in
  parallel in time.

Pooling: ``"last"`` takes the hidden state at each sequence's own last step
``lengths[b]``; ``"mean"`` averages the hidden states of steps
``1..lengths[b]``. Steps past a sequence's length never reach its features
or the gradients. The initial state is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mgrit_gru.cells import RecurrentCell, make_cell, select_lin
from mgrit_gru.errors import InputError

__all__ = ["AutogradPropagator", "POOLINGS", "SequenceClassifier", "SerialPropagator"]

POOLINGS = ("last", "mean")


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


class _SerialFunction(torch.autograd.Function):
    """Forward: one input-projection GEMM, then the step loop into a
    preallocated state buffer. Backward: one whole-sequence ``linearize``,
    a reverse loop of ``vjp_state``, then a few big GEMMs for the parameters."""

    @staticmethod
    def forward(ctx, cell, x, lengths, steps, pooling, dt, *params):
        x_tm = x[:, :steps].transpose(0, 1).contiguous()       # [T, B, D]
        xw = cell.input_projection(x_tm)                        # [T, B, G*H]
        B = x.shape[0]
        states = torch.empty(steps + 1, B, cell.state_size, dtype=x.dtype, device=x.device)
        states[0].zero_()
        s = states[0]
        for t in range(steps):
            s = cell.step(xw[t], s, dt)
            states[t + 1] = s
        ctx.cell, ctx.pooling, ctx.dt, ctx.T = cell, pooling, dt, x.shape[1]
        ctx.lengths, ctx.x_tm, ctx.xw, ctx.states = lengths, x_tm, xw, states
        return _pool(cell.hidden(states[1:]), lengths, pooling)

    @staticmethod
    def backward(ctx, g_feat):
        cell, lengths = ctx.cell, ctx.lengths
        x_tm, xw, states = ctx.x_tm, ctx.xw, ctx.states
        steps, B = xw.shape[0], xw.shape[1]
        H = cell.hidden_size
        g_feat = g_feat.contiguous()

        # lam[t] = dL/ds_{t+1}: start from the loss source terms.
        lam = torch.zeros(steps, B, cell.state_size, dtype=xw.dtype, device=xw.device)
        if ctx.pooling == "last":
            batch = torch.arange(B, device=xw.device)
            lam[lengths.to(xw.device) - 1, batch, :H] = g_feat
        else:
            torch.mul(_mean_weights(lengths, steps, xw), g_feat, out=lam[..., :H])

        lin = cell.linearize(xw, states[:-1], ctx.dt)
        for t in range(steps - 1, 0, -1):
            lam[t - 1].add_(cell.vjp_state(select_lin(lin, t), lam[t]))
        g_xw, g_hw = cell.vjp_proj(lin, lam)
        del lin, lam
        grads = cell.param_grads(x_tm, states[:-1], g_xw, g_hw)

        g_x = None
        if ctx.needs_input_grad[1]:
            g_x = g_xw.new_zeros(B, ctx.T, cell.input_size)
            g_x[:, :steps] = (g_xw @ cell.weight_ih).transpose(0, 1)
        ctx.x_tm = ctx.xw = ctx.states = None
        return (None, g_x, None, None, None, None,
                *(grads[name] for name in _param_names(cell)))


class SerialPropagator:
    """Default propagator: serial step loop, hand-written VJP backward.

    Gradients flow to the cell's parameters and to ``x``; the padded steps past
    ``max(lengths)`` are never computed.
    """

    def __init__(self, dt: float = 1.0) -> None:
        self.dt = _check_dt(dt)

    def features(self, cell: RecurrentCell, x: Tensor, lengths=None,
                 pooling: str = "last") -> Tensor:
        """Pooled hidden states ``[B, H]`` of the batch ``x [B, T, D]``."""
        lengths, steps = _check_inputs(cell, x, lengths, pooling)
        params = [getattr(cell, name) for name in _param_names(cell)]
        return _SerialFunction.apply(cell, x, lengths, steps, pooling, self.dt, *params)

    def __repr__(self) -> str:
        return f"SerialPropagator(dt={self.dt})"


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
