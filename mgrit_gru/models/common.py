"""Helpers shared by the propagators: input checks, parameter binding,
subnormal flushing and per-thread buffer pools."""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import Tensor

from mgrit_gru.errors import InputError
from mgrit_gru.models.pooling import POOLINGS, Pooling
from mgrit_gru.models import kernels
from mgrit_gru.models.cells import RecurrentCell



def check_dt(dt) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise InputError(f"dt: expected a positive number, got {dt!r}")
    return float(dt)


def as_pooling(pooling: str | Pooling) -> Pooling:
    """The :class:`Pooling` named by ``pooling`` (a kind or a Pooling)."""
    return pooling if isinstance(pooling, Pooling) else Pooling(pooling)


def check_inputs(cell: RecurrentCell, x: Tensor, lengths, pooling) -> tuple[Tensor, int]:
    """Validate a batch; return the lengths (int64 ``[B]``, on the host) and ``max(lengths)``.

    ``x`` must have the dtype and device of the cell's parameters.  The
    lengths stay on the host on purpose: they are index bookkeeping (loop
    bounds, windows), read there without a device synchronisation.
    """
    if isinstance(pooling, Pooling):
        pooling = pooling.kind
    if pooling not in POOLINGS:
        raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != cell.input_size:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"x: expected a [batch, time, {cell.input_size}] tensor, got {shape}")
    first = next(cell.parameters())
    if x.dtype != first.dtype:
        raise InputError(f"x: dtype {x.dtype} does not match the model's {first.dtype}")
    if x.device != first.device:
        raise InputError(f"x: device {x.device} does not match the model's {first.device}")
    B, T = x.shape[0], x.shape[1]
    if B == 0 or T == 0:
        raise InputError(f"x: empty batch of shape {list(x.shape)}")
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device="cpu"), T   # host: bookkeeping
    lengths = torch.as_tensor(lengths, device="cpu")   # host: index bookkeeping
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
        raise InputError(f"lengths: expected {B} integers, got a {lengths.dtype} tensor "
                         f"of shape {list(lengths.shape)}")
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise InputError(f"lengths: values must lie in 1..{T} (the padded length), "
                         f"got {lo}..{hi}")
    return lengths, hi


def project_inputs(cell: RecurrentCell, x_tm: Tensor, out: Tensor | None = None) -> Tensor:
    """``cell.input_projection(x_tm)``, through the kernels' small-``D`` loop
    when they can run the cell (several times faster than BLAS for ``D <= 64``,
    docs/kernels.md); ``out`` must then be contiguous."""
    if kernels.kind_of(cell, x_tm) is None:
        return cell.input_projection(x_tm, out=out)
    if out is None:
        out = x_tm.new_empty(*x_tm.shape[:-1], cell.proj_size)
    return kernels.input_projection(x_tm, cell.weight_ih, cell.bias_ih, out)


def param_names(cell: RecurrentCell) -> tuple[str, ...]:
    """The cell's parameter names, in :meth:`RecurrentCell.param_grads` order."""
    return tuple(cell.param_names)


def flush_is_on() -> bool:
    """Whether this thread flushes float32 subnormals to zero (probe: 1e-40 * 1).

    A CPU probe on purpose: the flush mode is the CPU thread's."""
    return bool(torch.full((), 1e-40, dtype=torch.float32, device="cpu") * 1.0 == 0)


@contextlib.contextmanager
def flushing_denormals(enabled: bool):
    """Flush subnormals to zero on this thread for the block, then restore.

    The CPU mode is per thread, so other threads are not affected.
    """
    turn_on = enabled and not flush_is_on()
    if turn_on:
        turn_on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if turn_on:
            torch.set_flush_denormal(False)


class Workspace(threading.local):
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
def bound_params(cell: RecurrentCell, params: dict[str, Tensor]):
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


