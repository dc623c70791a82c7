"""Round trips with plain torch: our GRU / LSTM / RNN cells and stacks <->
``torch.nn.GRU`` / ``LSTM`` / ``RNN`` with the same ``num_layers``.

The equations, gate orders (GRU ``r, z, n`` with ``n = tanh(x_n + r (h W_hn^T +
b_hn))``; LSTM ``i, f, g, o``) and parameter shapes are torch's, so the
conversion only renames keys: a single cell's ``weight_ih`` is torch's
``weight_ih_l0``, a :class:`~mgrit_gru.models.stacked.StackedCell` already has
torch's names. States: ours is one tensor ``[..., S]`` (a stack's layers top
first, an LSTM layer ``[h | c]``), torch's ``h_n [K, B, H]`` (LSTM ``(h_n,
c_n)``), layer 0 first.

The implicit GRU (backward Euler, ``h' = (h + a n) / (1 + a)``) has no torch
counterpart: converting it is an :class:`~mgrit_gru.errors.InputError`.

* :func:`to_torch` / :func:`from_torch`: modules;
* :func:`to_torch_state_dict` / :func:`from_torch_state_dict`: state dicts;
* :func:`to_torch_state` / :func:`from_torch_state`: recurrent states;
* :class:`TorchClassifier` / :func:`to_torch_classifier`: a trained
  :class:`~mgrit_gru.models.classifier.SequenceClassifier` as plain torch
  (recurrent module + pooling + linear head), for deployment without this
  package (docs/layers.md shows the same in a few lines of torch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mgrit_gru.errors import InputError
from mgrit_gru.models.cells import RecurrentCell, cell_name, make_cell
from mgrit_gru.models.pooling import POOLINGS

__all__ = ["TORCH_MODULES", "TorchClassifier", "from_torch", "from_torch_state",
           "from_torch_state_dict", "to_torch", "to_torch_classifier", "to_torch_state",
           "to_torch_state_dict"]

#: Our registry name -> torch's multi-layer module.
TORCH_MODULES: dict[str, type[nn.Module]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
_TORCH_CELLS = {nn.GRUCell: "gru", nn.LSTMCell: "lstm", nn.RNNCell: "rnn"}
_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _torch_kind(cell: RecurrentCell) -> str:
    """Registry name of ``cell``'s torch counterpart (InputError when it has none)."""
    if not isinstance(cell, RecurrentCell):
        raise InputError(f"cell: expected a recurrent cell of mgrit_gru.models, got "
                         f"{type(cell).__name__}")
    name = cell_name(cell)
    if name not in TORCH_MODULES:
        raise InputError(
            f"cell: {name} has no torch counterpart (torch.nn.GRU takes the explicit step "
            f"h' = z h + (1 - z) n, the implicit GRU the backward-Euler step "
            f"h' = (h + dt (1 - z) n) / (1 + dt (1 - z))): only gru, lstm and rnn models "
            f"convert to and from torch")
    return name


def to_torch_state_dict(cell: RecurrentCell) -> dict[str, Tensor]:
    """``cell``'s parameters under torch's multi-layer names (``weight_ih_l0``, ...)."""
    _torch_kind(cell)
    state = cell.state_dict()
    if cell.layers > 1:
        return dict(state)
    return {f"{k}_l0": v for k, v in state.items()}


def from_torch_state_dict(cell: RecurrentCell, state_dict: dict) -> dict[str, Tensor]:
    """A torch ``nn.GRU`` / ``LSTM`` / ``RNN`` state dict (or, for a single cell,
    an ``nn.GRUCell`` / ... one) under ``cell``'s own names, ready for
    ``cell.load_state_dict``. InputError naming the keys that do not fit."""
    _torch_kind(cell)
    state = dict(state_dict)
    want = set(cell.state_dict())
    if cell.layers == 1 and not set(state) & want:
        state = {k[:-3] if k.endswith("_l0") else k: v for k, v in state.items()}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        layers = {int(k.rsplit("_l", 1)[1]) for k in state if k.rsplit("_l", 1)[-1].isdigit()}
        found = f" (it has {max(layers) + 1} layer(s))" if layers else ""
        raise InputError(f"state dict: does not fit a {cell.layers}-layer {cell_name(cell)} "
                         f"cell{found}: missing {', '.join(missing) or 'nothing'}; unexpected "
                         f"{', '.join(extra) or 'nothing'}")
    return state


def to_torch(cell: RecurrentCell, batch_first: bool = True) -> nn.Module:
    """The ``torch.nn.GRU`` / ``LSTM`` / ``RNN`` (``num_layers = cell.layers``) that
    computes what ``cell`` computes, on the cell's dtype and device."""
    kind = _torch_kind(cell)
    p = cell.weight_ih
    module = TORCH_MODULES[kind](cell.input_size, cell.hidden_size, num_layers=cell.layers,
                                 bias=cell.bias, batch_first=batch_first, dtype=p.dtype,
                                 device=p.device)
    module.load_state_dict(to_torch_state_dict(cell))
    return module


def from_torch(module: nn.Module) -> RecurrentCell:
    """Our cell (``layers = num_layers``; a single cell for one layer) with the
    weights of ``module``: ``nn.GRU``, ``nn.LSTM``, ``nn.RNN`` (tanh) or their
    ``*Cell`` forms. Bidirectional modules, LSTM projections (``proj_size``) and
    ReLU RNNs have no counterpart here (InputError). Dropout between layers acts
    only in torch's training mode; the cell computes torch's evaluation mode."""
    kind = _TORCH_CELLS.get(type(module))
    layers = 1
    if kind is None:
        for name, cls in TORCH_MODULES.items():
            if type(module) is cls:
                kind = name
        if kind is None:
            raise InputError(f"module: expected torch.nn.GRU, LSTM or RNN (or their Cell "
                             f"forms), got {type(module).__name__}")
        if module.bidirectional:
            raise InputError(f"module: a bidirectional {type(module).__name__} has no "
                             f"counterpart here (the propagators run forward in time)")
        if getattr(module, "proj_size", 0):
            raise InputError(f"module: an LSTM with proj_size={module.proj_size} has no "
                             f"counterpart here")
        layers = module.num_layers
    if getattr(module, "nonlinearity", "tanh") != "tanh":
        raise InputError(f"module: an RNN with nonlinearity={module.nonlinearity!r} has no "
                         f"counterpart here (the rnn cell uses tanh)")
    p = next(module.parameters())
    cell = make_cell(kind, module.input_size, module.hidden_size, bias=module.bias,
                     dtype=p.dtype, device=p.device, layers=layers)
    cell.load_state_dict(from_torch_state_dict(cell, module.state_dict()))
    return cell


def to_torch_state(cell: RecurrentCell, s: Tensor):
    """Our state ``s [B, S]`` as torch's ``h_n [K, B, H]`` (LSTM ``(h_n, c_n)``)."""
    _torch_kind(cell)
    H, K = cell.hidden_size, cell.layers
    blocks = [cell.layer_state(s, l) if K > 1 else s for l in range(K)]
    h = torch.stack([b[..., :H] for b in blocks])
    if cell_name(cell) == "lstm":
        return h, torch.stack([b[..., H:] for b in blocks])
    return h


def from_torch_state(cell: RecurrentCell, hx) -> Tensor:
    """Torch's ``h_n [K, B, H]`` (LSTM ``(h_n, c_n)``) as our state ``[B, S]``."""
    _torch_kind(cell)
    if cell_name(cell) == "lstm":
        h, c = hx
        blocks = [torch.cat((h[l], c[l]), -1) for l in range(cell.layers)]
    else:
        blocks = list(hx.unbind(0))
    if len(blocks) != cell.layers:
        raise InputError(f"state: {len(blocks)} layer(s) for a {cell.layers}-layer cell")
    return torch.cat(blocks[::-1], -1)        # our layout: the top layer first


class TorchClassifier(nn.Module):
    """Plain-torch twin of a :class:`SequenceClassifier`: ``rnn`` (an ``nn.GRU`` /
    ``LSTM`` / ``RNN``, batch first), the pooling (``"last"``: the top layer's
    output at each sequence's own last step; ``"mean"``: its mean over steps
    ``1 .. lengths[b]``) and the linear ``head``."""

    def __init__(self, rnn: nn.Module, head: nn.Linear, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.rnn, self.head, self.pooling = rnn, head, pooling

    def features(self, x: Tensor, lengths=None) -> Tensor:
        out = self.rnn(x)[0]                                  # [B, T, H], top layer
        B, T = out.shape[0], out.shape[1]
        lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
        lengths = lengths.to(device=out.device, dtype=torch.long)
        if self.pooling == "last":
            return out[torch.arange(B, device=out.device), lengths - 1]
        mask = torch.arange(T, device=out.device).unsqueeze(0) < lengths.unsqueeze(1)
        return (out * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1).to(out.dtype)

    def forward(self, x: Tensor, lengths=None) -> Tensor:
        return self.head(self.features(x, lengths))


def to_torch_classifier(model) -> TorchClassifier:
    """A trained :class:`SequenceClassifier` as a :class:`TorchClassifier`
    (copies of its weights; the implicit GRU has no torch counterpart)."""
    head = nn.Linear(model.head.in_features, model.head.out_features,
                     dtype=model.head.weight.dtype, device=model.head.weight.device)
    head.load_state_dict(model.head.state_dict())
    return TorchClassifier(to_torch(model.cell), head, model.pooling)
