"""The sequence classifier: a recurrent cell, a pooling and a linear head."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from mgrit_gru.errors import InputError
from mgrit_gru.models.cells import RecurrentCell, make_cell
from mgrit_gru.models.pooling import POOLINGS
from mgrit_gru.models.serial import SerialPropagator

__all__ = ["SequenceClassifier"]


class SequenceClassifier(nn.Module):
    """Recurrent cell + pooling + linear head: ``logits = head(features(x))``.

    ``cell`` is a registry name (``mgrit_gru.models.cells.CELLS``) or a cell instance.
    ``layers`` stacks that many cells (as ``torch.nn.GRU``'s ``num_layers``; a
    name's default 1, a given cell's own); the head reads the top layer.
    The propagator can be swapped at any time (``model.propagator = ...``)
    without touching the parameters. Plain-torch twin for deployment:
    :func:`mgrit_gru.models.interop.to_torch_classifier`.
    """

    def __init__(self, cell="implicit-gru", input_size: int | None = None,
                 hidden_size: int | None = None, num_classes: int | None = None,
                 pooling: str = "last", propagator=None, layers: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        if isinstance(cell, RecurrentCell):
            for option, value, have in (("input_size", input_size, cell.input_size),
                                        ("hidden_size", hidden_size, cell.hidden_size)):
                if value is not None and value != have:
                    raise InputError(f"{option}: {value} does not match the given cell's {have}")
            if layers is not None and layers != cell.layers:
                raise InputError(f"layers: {layers!r} does not match the given cell's "
                                 f"{cell.layers}")
            cell = cell.to(dtype)
        else:
            for option, value in (("input_size", input_size), ("hidden_size", hidden_size)):
                if value is None:
                    raise InputError(f"{option}: required when the cell is given by name")
            cell = make_cell(cell, input_size, hidden_size, dtype=dtype,
                             layers=1 if layers is None else layers)
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
