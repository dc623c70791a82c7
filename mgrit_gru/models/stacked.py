"""Stacked recurrent cells: ``K`` layers of one cell, as ``torch.nn.GRU(num_layers=K)``.

Layer 1 reads the input; layer ``l > 1`` reads the *new* hidden state of layer
``l - 1`` of the same step. Every layer takes its own cell's step with the
step's ``dt`` (for the implicit GRU: its backward-Euler step; explicit cells
ignore ``dt``). A :class:`StackedCell` implements the whole cell API of
:mod:`mgrit_gru.models.cells` on one state tensor, so every propagator uses it
unchanged:

state
    ``s = [s_K | s_{K-1} | ... | s_1]``, the top layer first (each ``s_l`` is
    the layer cell's state: ``h_l``, LSTM ``[h_l | c_l]``), so that the hidden
    state of the stack, ``hidden(s)``, is ``s[..., :H]`` like every cell's: the
    pooling reads and the loss writes the top layer only. ``state_size = K S_1``.
projections
    ``input_projection(x)`` is layer 1's (``x W_ih_l0^T + b_ih_l0``): the one
    matmul over a whole sequence. ``hidden_projection(h)`` and the ``hw``
    buffers (``proj_size = G H``) are the *top* layer's, so that
    ``hidden_projection(hidden(s))`` is what ``step(..., hw_out=)`` writes and
    what ``linearize(..., hw=)`` reuses; the inner layers' projections are
    recomputed by :meth:`StackedCell.linearize` (see docs/layers.md).
Jacobian
    block lower triangular in layer order: ``ds_l'/ds_l`` on the diagonal and
    ``ds_l'/ds_{l-1}`` through ``xw_l = h_{l-1}' W_ih_l^T + b_ih_l``, so
    :meth:`StackedCell.vjp_state` runs the layers top-down composing the layer
    cells' VJPs. ``lin = (*lin_1, ..., *lin_K, h_1', ..., h_{K-1}')``: the
    layers' coefficients and the inputs of the inner layers (the new hidden
    states of the layers below), so that :meth:`StackedCell.param_grads` needs
    nothing else.
parameters
    registered on the stack with torch's names ``weight_ih_l0, weight_hh_l0,
    bias_ih_l0, bias_hh_l0, weight_ih_l1, ...`` (uniform in ``±1/sqrt(H)``, as
    torch): state dicts load into and from ``torch.nn.GRU`` / ``LSTM`` /
    ``RNN`` (:mod:`mgrit_gru.models.interop`).

The per-layer arithmetic is the layer cells' own (hand-written VJPs, no
autograd in ``step`` / ``linearize`` / ``vjp_*``): one private cell object per
layer whose ``_parameters`` are pointed at the stack's tensors at every call
(a few dict assignments), so that a temporary swap of the stack's parameters
(``bound_params``, ``torch.func.functional_call``) is seen by the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mgrit_gru.errors import InputError
from mgrit_gru.models.cells import (CELLS, Dt, Lin, RecurrentCell, _no_autograd, _positive_int,
                                    cell_class)

__all__ = ["StackedCell"]

_LAYER_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class StackedCell(RecurrentCell):
    """``layers`` stacked cells of kind ``cell`` (a registry name or a cell class).

    ``StackedCell("gru", D, H, 2)`` computes what ``torch.nn.GRU(D, H,
    num_layers=2)`` computes; ``hidden(s)`` is the top layer's hidden state.
    """

    def __init__(self, cell: str | type[RecurrentCell], input_size: int, hidden_size: int,
                 layers: int = 2, bias: bool = True, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        if isinstance(cell, str):
            cls = cell_class(cell)
        elif isinstance(cell, type) and issubclass(cell, RecurrentCell) \
                and not issubclass(cell, StackedCell):
            cls = cell
        else:
            raise InputError(f"cell: expected a cell name ({', '.join(CELLS)}) or a cell "
                             f"class, got {cell!r}")
        self.cell_class = cls
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.layers = _positive_int(layers, "layers")
        self.bias = bool(bias)
        self.gates = cls.gates
        self.state_factor = cls.state_factor * self.layers   # state size / hidden size
        kw = {"device": device, "dtype": dtype}
        gh, H = self.gates * hidden_size, hidden_size
        for l in range(self.layers):
            d = input_size if l == 0 else H
            self.register_parameter(f"weight_ih_l{l}", nn.Parameter(torch.empty(gh, d, **kw)))
            self.register_parameter(f"weight_hh_l{l}", nn.Parameter(torch.empty(gh, H, **kw)))
            if self.bias:
                self.register_parameter(f"bias_ih_l{l}", nn.Parameter(torch.empty(gh, **kw)))
                self.register_parameter(f"bias_hh_l{l}", nn.Parameter(torch.empty(gh, **kw)))
        # (layer cell name, stack name) pairs per layer
        names = _LAYER_NAMES if self.bias else _LAYER_NAMES[:2]
        self._names = tuple(tuple((n, f"{n}_l{l}") for n in names) for l in range(self.layers))
        # block of layer l in the state: the top layer first
        S1 = cls.state_factor * H
        self._slices = tuple(slice((self.layers - 1 - l) * S1, (self.layers - l) * S1)
                             for l in range(self.layers))
        self._cells = self._make_cells()
        self.reset_parameters()

    # ------------------------------------------------------------ plumbing
    def _make_cells(self) -> list[RecurrentCell]:
        """One parameterless (meta) cell per layer; :meth:`_bind` gives it tensors."""
        return [self.cell_class(self.input_size if l == 0 else self.hidden_size,
                                self.hidden_size, bias=self.bias, device="meta")
                for l in range(self.layers)]

    def _bind(self) -> list[RecurrentCell]:
        """The layer cells, their parameters pointed at the stack's current ones."""
        params = self._parameters
        for cell, names in zip(self._cells, self._names):
            inner = cell._parameters
            for name, outer in names:
                inner[name] = params[outer]
        return self._cells

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cells"]          # rebuilt on unpickling; they hold no state of their own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._cells = self._make_cells()

    def _split(self, lin: Lin) -> tuple[list[Lin], tuple[Tensor, ...]]:
        """``(per-layer lins, inner layers' inputs)`` of a stack's ``lin``."""
        n, K = self.cell_class.lin_size, self.layers
        if len(lin) != K * n + K - 1:
            raise ValueError(f"lin of {len(lin)} tensors is not that of this "
                             f"{K}-layer stack ({K * n + K - 1})")
        return [lin[l * n:(l + 1) * n] for l in range(K)], lin[K * n:]

    def _with_carry(self, g_l: Tensor, g_xw: Tensor | None, above: RecurrentCell) -> Tensor:
        """``g_l`` plus, on its hidden part, ``g_xw W_ih`` of the layer above."""
        if g_xw is None:
            return g_l
        H = self.hidden_size
        w = above.weight_ih
        if g_l.shape[-1] == H:
            if g_l.dim() == 2:
                return torch.addmm(g_l, g_xw, w)
            return torch.matmul(g_xw, w).add_(g_l)
        out = g_l.clone()
        if out.dim() == 2:
            out[:, :H].addmm_(g_xw, w)
        else:
            out[..., :H].add_(torch.matmul(g_xw, w))
        return out

    # --------------------------------------------------------------- sizes
    @property
    def proj_size(self) -> int:
        """Size of ``hw``: the top layer's hidden projection (``G * H``)."""
        return self.gates * self.hidden_size

    @property
    def param_names(self) -> tuple[str, ...]:
        """torch's names and order: ``weight_ih_l0, weight_hh_l0, bias_ih_l0, ...``."""
        return tuple(outer for names in self._names for _, outer in names)

    @property
    def weight_ih(self) -> Tensor:
        """Layer 1's input weight (the one that multiplies the input)."""
        return self._parameters["weight_ih_l0"]

    @property
    def cell_name(self) -> str:
        """Registry name of the layers' cell."""
        for name, cls in CELLS.items():
            if cls is self.cell_class:
                return name
        return self.cell_class.__name__

    def extra_repr(self) -> str:
        return (f"{self.cell_name!r}, {self.input_size}, {self.hidden_size}, "
                f"layers={self.layers}, bias={self.bias}")

    def layer_state(self, s: Tensor, layer: int) -> Tensor:
        """The block of layer ``layer`` (0 = the bottom one) of a state ``s [..., S]``."""
        return s[..., self._slices[layer]]

    def initial_state(self, batch_shape, device=None, dtype=None) -> Tensor:
        """Zero state ``[*batch_shape, S]`` (parameters' dtype/device by default)."""
        p = self.weight_ih
        return torch.zeros(*batch_shape, self.state_size,
                           device=p.device if device is None else device,
                           dtype=p.dtype if dtype is None else dtype)

    # --------------------------------------------------------- projections
    def input_projection(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Layer 1's ``xw = x W_ih_l0^T + b_ih_l0`` (any leading dims, one matmul)."""
        return self._bind()[0].input_projection(x, out)

    def hidden_projection(self, h: Tensor, out: Tensor | None = None) -> Tensor:
        """The top layer's ``hw = h W_hh^T + b_hh`` of its hidden state ``h = hidden(s)``."""
        return self._bind()[-1].hidden_projection(h, out)

    # ---------------------------------------------------------------- steps
    @_no_autograd
    def step(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0, *,
             out: Tensor | None = None, hw_out: Tensor | None = None) -> Tensor:
        """One step of every layer, bottom-up, without autograd (``out`` may be ``s``).

        ``hw_out`` receives the top layer's hidden projection of ``s``.
        """
        cells = self._bind()
        if out is None:
            out = s.new_empty(s.shape)
        top = self.layers - 1
        xin = xw_t
        for l, cell in enumerate(cells):
            new = out[..., self._slices[l]]
            cell.step(xin, s[..., self._slices[l]], dt, out=new,
                      hw_out=hw_out if l == top else None)
            if l < top:
                xin = cells[l + 1].input_projection(new[..., : self.hidden_size])
        return out

    def forward_state(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0) -> Tensor:
        """Differentiable step with the layer cells' plain torch ops (autograd reference)."""
        cells = self._bind()
        xin, news = xw_t, []
        for l, cell in enumerate(cells):
            new = cell.forward_state(xin, s[..., self._slices[l]], dt)
            news.append(new)
            if l < self.layers - 1:
                xin = cells[l + 1].input_projection(new[..., : self.hidden_size])
        return torch.cat(news[::-1], -1)

    # ----------------------------------------------------------- derivatives
    @_no_autograd
    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """``(*lin_1, ..., *lin_K, h_1', ..., h_{K-1}')`` at ``s_prev`` (any leading dims).

        Bottom-up: layer ``l``'s coefficients and new hidden state from one
        evaluation of its gates, then the next layer's input projection of it
        (one matmul over all leading dims). ``hw`` (the top layer's hidden
        projection of ``s_prev``) saves the top layer's hidden matmul.
        """
        cells = self._bind()
        top = self.layers - 1
        lins: list[Tensor] = []
        inputs: list[Tensor] = []
        xin = xw
        for l, cell in enumerate(cells):
            lin_l, h_new = cell._linearize(xin, s_prev[..., self._slices[l]], dt,
                                           hw if l == top else None, l < top)
            lins.extend(lin_l)
            if l < top:
                inputs.append(h_new)
                xin = cells[l + 1].input_projection(h_new)
        return (*lins, *inputs)

    @_no_autograd
    def vjp_state(self, lin: Lin, g: Tensor, *, acc: Tensor | None = None) -> Tensor:
        """``dL/ds_prev`` from ``g = dL/ds_new``: the layers top-down, each layer's
        adjoint plus ``g_xw W_ih`` of the layer above on its hidden part. With
        ``acc`` the result is added into ``acc`` in place (and returned)."""
        cells = self._bind()
        lins, _ = self._split(lin)
        result = g.new_zeros(g.shape) if acc is None else acc
        g_xw = None
        for l in range(self.layers - 1, -1, -1):
            sl = self._slices[l]
            g_l = self._with_carry(g[..., sl], g_xw, cells[l + 1] if g_xw is not None else None)
            sub = result[..., sl]
            direct = sub.dim() == 2 or sub.is_contiguous()
            if l > 0:
                prev, g_xw = cells[l]._vjp_both(lins[l], g_l, acc=sub if direct else None)
            else:
                prev = cells[l].vjp_state(lins[l], g_l, acc=sub if direct else None)
            if not direct:
                sub.add_(prev)
        return result

    @_no_autograd
    def vjp_proj(self, lin: Lin, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(dL/dxw, g_hw)``: ``dL/dxw`` of layer 1's input projection, and ``g_hw``
        packing what :meth:`param_grads` needs, ``[g_hw_1 | g_xw_2 | g_hw_2 | ... |
        g_xw_K | g_hw_K]`` (``(2K - 1) G H`` values per step)."""
        cells = self._bind()
        lins, _ = self._split(lin)
        g_xws: list[Tensor | None] = [None] * self.layers
        g_hws: list[Tensor | None] = [None] * self.layers
        g_xw = None
        for l in range(self.layers - 1, -1, -1):
            g_l = self._with_carry(g[..., self._slices[l]], g_xw,
                                   cells[l + 1] if g_xw is not None else None)
            g_xw, g_hws[l] = cells[l].vjp_proj(lins[l], g_l)
            g_xws[l] = g_xw
        packed = [g_hws[0]]
        for l in range(1, self.layers):
            packed += [g_xws[l], g_hws[l]]
        return g_xws[0], torch.cat(packed, -1)

    @_no_autograd
    def param_grads(self, x: Tensor, s_prev: Tensor, g_xw: Tensor, g_hw: Tensor,
                    lin: Lin | None = None) -> dict[str, Tensor]:
        """Parameter gradients summed over all leading dims (torch's names).

        ``g_xw``, ``g_hw`` from :meth:`vjp_proj` of ``lin``; ``lin`` (required)
        holds the inputs of the inner layers.
        """
        if lin is None:
            raise ValueError("a stacked cell's param_grads needs the lin of the steps")
        cells = self._bind()
        _, inputs = self._split(lin)
        gh = self.proj_size
        grads: dict[str, Tensor] = {}
        for l, cell in enumerate(cells):
            if l == 0:
                gx, ghw, inp = g_xw, g_hw[..., :gh], x
            else:
                off = (2 * l - 1) * gh
                gx, ghw, inp = g_hw[..., off:off + gh], g_hw[..., off + gh:off + 2 * gh], \
                    inputs[l - 1]
            part = cell.param_grads(inp, s_prev[..., self._slices[l]], gx, ghw)
            for name, outer in self._names[l]:
                grads[outer] = part[name]
        return grads

    def input_grad(self, g_xw: Tensor) -> Tensor:
        """``dL/dx`` from layer 1's ``g_xw``: ``g_xw W_ih_l0``."""
        return g_xw @ self.weight_ih

    def _linearize(self, xw, s_prev, dt, hw, want_new):   # pragma: no cover - not a layer
        raise TypeError("a stacked cell is not a layer of another stack")
