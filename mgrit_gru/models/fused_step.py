"""A whole training minibatch in one GIL-free C++ call (docs/kernels.md, "Fused training step").

:func:`fused_loss_and_grads` computes the cross-entropy loss of a batch and
the gradients of every parameter of a :class:`SequenceClassifier` without
autograd: one :func:`mgrit_gru.models.kernels.train_step` call runs the input
projection, the forward sweep, the pooling, the linear head, the loss, its
gradients, the reverse sweep and the parameter-gradient GEMMs, with the GIL
released. What stays in Python (the checks below and the ``.grad``
assignments) is a few tens of microseconds per batch.

It applies to exactly a :class:`SequenceClassifier` (no subclass) whose
propagator is exactly a :class:`SerialPropagator`, whose head is a plain
``nn.Linear``, and whose cell is a single-layer kernel cell
(:func:`kernels.kind_of`: CPU, float32/float64, the kernels built and not
disabled by ``MGRIT_GRU_KERNELS=0``), all parameters requiring gradients
and no module or tensor hooks that autograd would run. Anything else
returns None, and the caller takes the autograd path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from mgrit_gru.models import kernels
from mgrit_gru.models.classifier import SequenceClassifier
from mgrit_gru.models.common import flushing_denormals, param_names
from mgrit_gru.models.serial import SerialPropagator

__all__ = ["fused_loss_and_grads"]


def _hooked(*modules: nn.Module) -> bool:
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


def fused_loss_and_grads(model: nn.Module, x: Tensor, y: Tensor, lengths=None,
                         weight: float = 1.0) -> float | None:
    """``weight * cross_entropy(model(x, lengths), y)`` and its gradients, fused.

    Sets every parameter's ``.grad`` to a fresh tensor (as ``p.grad = None``
    then ``(loss * weight).backward()`` would) and returns the weighted loss
    as a float (``float(loss) * weight``); returns None, touching nothing,
    when the fused path does not apply (see the module docstring). Honours
    the propagator's ``dt``, ``chunk`` (the kernels' backward chunk; None:
    their default) and ``flush_denormals``.
    """
    if type(model) is not SequenceClassifier or type(model.propagator) is not SerialPropagator:
        return None
    head, cell = model.head, model.cell
    if type(head) is not nn.Linear or not isinstance(x, Tensor) or x.dim() != 3:
        return None
    B = x.shape[0]
    if not B or not x.shape[1] or x.shape[2] != cell.input_size:
        return None
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (B,) \
            or y.device.type != "cpu":
        return None
    if lengths is not None and (not isinstance(lengths, Tensor) or lengths.shape != (B,)
                                or lengths.device.type != "cpu"
                                or lengths.dtype not in (torch.int64, torch.int32)):
        return None
    if model.pooling not in ("last", "mean"):
        return None
    kind = kernels.kind_of(cell, x, head.weight, head.bias)
    if kind is None:
        return None
    names = param_names(cell)
    params = {name: getattr(cell, name) for name in names}
    tensors = [*params.values(), head.weight] + ([] if head.bias is None else [head.bias])
    if not all(p is not None and p.requires_grad and not p._backward_hooks
               and not getattr(p, "_post_accumulate_grad_hooks", None) for p in tensors):
        return None
    if x.requires_grad or _hooked(model, cell, head):
        return None
    prop = model.propagator
    with flushing_denormals(prop.flush_denormals):
        out = kernels.train_step(kind, x, lengths, params, head.weight, head.bias, y,
                                 model.pooling, prop.dt, prop.chunk, weight)
    if out is None:
        return None
    loss, grads = out
    for name in names:
        params[name].grad = grads[name]
    head.weight.grad = grads["head.weight"]
    if head.bias is not None:
        head.bias.grad = grads["head.bias"]
    return loss * weight
