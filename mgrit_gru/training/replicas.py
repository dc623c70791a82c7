"""Replicas of the model and the optimizer state the workers share.

A worker's *replica* is a deep copy of the model with a propagator of its own
(:func:`replicate`; for a thread, :func:`thread_propagator`). The global
model's optimizer state is created before it is shared
(:func:`materialize_state`), and each worker builds its own optimizer
instance over the shared parameters and state (:func:`optimizer_from_spec`).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch.optim import optimizer as _opt


def replicate(model: torch.nn.Module, propagator: Any = None) -> torch.nn.Module:
    """A deep copy of ``model`` whose ``propagator`` attribute is ``propagator``.

    The model's own propagator is neither copied nor touched (it may hold a
    communicator). Models without a ``propagator`` attribute are deep-copied.
    """
    if not hasattr(model, "propagator"):
        return copy.deepcopy(model)
    saved = model.propagator
    model.propagator = None
    try:
        clone = copy.deepcopy(model)
    finally:
        model.propagator = saved
    clone.propagator = propagator
    return clone


def thread_propagator(propagator: Any) -> Any:
    """The propagator of a worker thread: a deep copy, or, for one that owns a
    communicator (``comm``), a shallow copy with a new communicator split from
    it (collective over that communicator) and fresh statistics."""
    comm = getattr(propagator, "comm", None)
    if comm is None:
        return copy.deepcopy(propagator)
    clone = copy.copy(propagator)
    clone.comm = comm.split(0, comm.rank)
    for name in ("last_stats", "last_info"):
        if isinstance(getattr(clone, name, None), dict):
            setattr(clone, name, {})
    return clone


def communicates(propagator: Any) -> bool:
    """Whether ``propagator`` owns a communicator (it cannot run in a child process)."""
    return getattr(propagator, "comm", None) is not None


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state of every parameter that has none, equal to
    the state the optimizer would create itself, so that it can be shared
    before the first update.

    The state is created the optimizer's own way, by one step with zero
    gradients and learning rate 0, after which step counters are reset to 0.
    That is exact for SGD and Adam (zero moments); a RuntimeError says so if
    the step moved a parameter.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if not optimizer.state.get(p)]
    if not missing:
        return
    grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    before = [p.detach().clone() for p in missing]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if any(p is q for q in missing) else None
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
    for p, old in zip(missing, before):
        if not torch.equal(p, old):
            raise RuntimeError(f"cannot share the state of {type(optimizer).__name__}: "
                               f"a zero step moved the parameters")
        step = optimizer.state.get(p, {}).get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            optimizer.state[p]["step"] = 0


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of the optimizer's state (to share them)."""
    return [v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


def optimizer_from_spec(spec: tuple, params: Sequence[torch.Tensor], *,
                        private: bool = False) -> torch.optim.Optimizer:
    """An optimizer over ``params`` from ``(class, defaults, state_dict)``; its
    state tensors are those of the state dict (shared), or copies of them."""
    cls, defaults, state = spec
    opt = cls(params, **defaults)
    opt.load_state_dict(copy.deepcopy(state) if private else state)
    return opt


@torch.no_grad()
def copy_state(dst: torch.optim.Optimizer, dst_params: Sequence[torch.Tensor],
               src: torch.optim.Optimizer, src_params: Sequence[torch.Tensor]) -> None:
    """Copy the optimizer state of ``src_params`` in ``src`` into that of
    ``dst_params`` in ``dst`` (same optimizer class, state already created)."""
    for p, q in zip(dst_params, src_params):
        target = dst.state[p]
        for key, value in src.state[q].items():
            if isinstance(value, torch.Tensor):
                target[key].copy_(value)
            else:
                target[key] = value


@torch.no_grad()
def copy_params(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Copy the tensors ``src`` into ``dst`` (one multi-tensor call where
    torch has it: fewer GIL-holding dispatches per update)."""
    dst, src = list(dst), list(src)
    if _FOREACH_COPY is not None and dst:
        _FOREACH_COPY(dst, src)
        return
    for d, s in zip(dst, src):
        d.copy_(s)


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def flat_views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``params``, one after the other."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` is exactly ``p -= lr * p.grad`` per tensor:
    a ``torch.optim.SGD`` without momentum, weight decay, maximize, the fused
    kernel or any step hook, float learning rates."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _opt._global_optimizer_pre_hooks or _opt._global_optimizer_post_hooks):
        return False
    return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0
               and not g.get("maximize") and not g.get("fused") and not g.get("differentiable")
               and isinstance(g.get("lr"), (float, int)) and not isinstance(g.get("lr"), bool)
               for g in optimizer.param_groups)


@torch.no_grad()
def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, with plain SGD as one multi-tensor call.

    torch's SGD without momentum or weight decay applies ``p.add_(p.grad,
    alpha=-lr)`` to every parameter with a gradient, behind a Python
    framework (hooks, profiler labels, option dispatch) that costs about
    0.1 ms right after a minibatch, several times the arithmetic; this does
    the same arithmetic (``torch._foreach_add_``, per tensor on the CPU: the
    same values bit for bit, tests/test_strategies.py) in one call. Any other
    optimizer, or SGD with other options or hooks, takes its own ``step()``.
    """
    if not _plain_sgd(optimizer) or _FOREACH_ADD is None:
        optimizer.step()
        return
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if any(p.grad.is_sparse for p in params):
            optimizer.step()
            return
        _FOREACH_ADD(params, [p.grad for p in params], alpha=-group["lr"])


_FOREACH_ADD = getattr(torch, "_foreach_add_", None)
