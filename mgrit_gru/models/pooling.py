"""Pooling: from the hidden states of a sequence to its features, and back.

One object serves every propagator.  A propagator holds the hidden states of
a *window* of time points ``lo .. lo + n - 1`` (the whole sequence for the
serial ones, ``lo = 1``; a rank's chunk for MGRIT, whose point 0 is the
initial state); :meth:`Pooling.features` returns the window's share of the
features (the shares of disjoint windows sum to the features of the whole
sequence: one allreduce across time ranks), and :meth:`Pooling.sources`
gives the loss gradient with respect to the window's hidden states, which is
what the adjoint sweep (serial or MGRIT) takes as its right-hand side.

Kinds (``POOLINGS``):

``last``
    the hidden state at each sequence's own last point ``lengths[b]``;
``mean``
    the mean of the hidden states at points ``1 .. lengths[b]``.

Points past a sequence's length never reach its features or gradients; point
0 (the initial state) never does.  The lengths may stay on the host (index
bookkeeping); the results follow the device and dtype of the hidden states.

A loss at every time step (per-step outputs, e.g. sequence labelling) fits
the same two methods: its features are the hidden states themselves
(``[B, T, H]``: the window's rows, no reduction) and its sources are the
per-step output gradients ``g[:, t]`` written at every point of the window.
The adjoint solvers already accept a source at every point (the ``mean``
pooling uses that), so such a kind needs a ``Pooling`` subclass and a head
that maps ``[B, T, H]``, nothing in the solvers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mgrit_gru.errors import InputError

__all__ = ["POOLINGS", "Pooling"]

POOLINGS = ("last", "mean")


class Pooling:
    """Features of a window of hidden states and their adjoint sources."""

    def __init__(self, kind: str = "last") -> None:
        if kind not in POOLINGS:
            raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {kind!r}")
        self.kind = kind

    def weights(self, lengths: Tensor, lo: int, n: int, like: Tensor) -> Tensor:
        """``w [n, B, 1]``: the weight of point ``lo + i`` of sequence ``b`` in its
        features (``last``: 1 at ``lengths[b]``; ``mean``: ``1 / lengths[b]`` at
        ``1 .. lengths[b]``), on ``like``'s device and dtype."""
        t = torch.arange(lo, lo + n, device=like.device).unsqueeze(1)
        lens = lengths.to(like.device).unsqueeze(0)
        if self.kind == "last":
            w = (t == lens).to(like.dtype)
        else:
            w = ((t >= 1) & (t <= lens)).to(like.dtype) / lens.to(like.dtype)
        return w.unsqueeze(-1)

    def _owned(self, lengths: Tensor, lo: int, n: int, device) -> tuple[Tensor, Tensor]:
        """``(rows, batch)`` on ``device``: the rows of the window holding the last
        points it owns.  Found where the lengths are (the host, usually: no
        device synchronisation), then moved."""
        batch = torch.nonzero((lengths >= lo) & (lengths < lo + n)).flatten()
        return (lengths[batch] - lo).to(device), batch.to(device)

    def features(self, h: Tensor, lengths: Tensor, lo: int = 1, out: Tensor | None = None) -> Tensor:
        """The window's share ``[B, H]`` of the features of ``h [n, B, H]`` (points
        ``lo .. lo + n - 1``).  Differentiable in ``h`` when ``out`` is None;
        with ``out`` (``[B, H]``) the result is written there."""
        n, B = h.shape[0], h.shape[1]
        if self.kind == "last":
            if lo == 1 and n >= int(lengths.max()):   # the whole sequence: one gather
                value = h[lengths.to(h.device) - 1, torch.arange(B, device=h.device)]
            else:
                rows, batch = self._owned(lengths, lo, n, h.device)
                value = h.new_zeros(B, h.shape[2])
                value[batch] = h[rows, batch]
        else:
            value = (h * self.weights(lengths, lo, n, h)).sum(0)
        if out is None:
            return value
        return out.copy_(value)

    def sources(self, g_feat: Tensor, lengths: Tensor, lo: int, out: Tensor) -> Tensor:
        """The loss gradient with respect to the window's hidden states: ``out [n, B,
        H]`` (points ``lo .. lo + n - 1``) is set to ``dL/dh`` for the feature
        gradient ``g_feat [B, H]`` (zero where a point does not reach the features)."""
        n = out.shape[0]
        if self.kind == "last":
            out.zero_()
            rows, batch = self._owned(lengths, lo, n, out.device)
            out[rows, batch] = g_feat[batch].to(out.dtype)
        else:
            torch.mul(self.weights(lengths, lo, n, out), g_feat, out=out)
        return out

    def __repr__(self) -> str:
        return f"Pooling({self.kind!r})"
