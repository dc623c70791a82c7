"""Recurrent cells: the only module that knows cell equations.

Four cells share torch's parameter layout (``weight_ih [G*H, D]``,
``weight_hh [G*H, H]``, ``bias_ih [G*H]``, ``bias_hh [G*H]``, uniform
initialisation in ``(-1/sqrt(H), 1/sqrt(H))``; gate order r, z, n for the GRUs
and i, f, g, o for the LSTM), so state dicts load both ways with
``torch.nn.GRUCell`` / ``LSTMCell`` / ``RNNCell``:

* :class:`ImplicitGRUCell` -- backward Euler step of the GRU ODE
  ``h' = (1 - z) (n - h)``: with ``a = dt (1 - z)``,
  ``h_new = (h + a n) / (1 + a)``, stable for every ``dt > 0``;
* :class:`GRUCell` -- classic GRU, ``h_new = z h + (1 - z) n``;
* :class:`LSTMCell` -- classic LSTM, state ``s = [h | c]``;
* :class:`RNNCell` -- Elman cell with tanh.

Besides the torch-like call (``cell(x, h)``, ``cell(x, h, dt)``, LSTM
``cell(x, (h, c))``) every cell exposes the functional API of
``docs/interfaces.md`` on one state tensor ``s [..., S]``, for any leading
(batch, time, ...) dims:

``input_projection(x, out=None)`` / ``hidden_projection(h, out=None)``
    ``xw = x W_ih^T + b_ih`` (one matmul for a whole sequence) and
    ``hw = h W_hh^T + b_hh``.
``step(xw_t, s, dt=1.0, *, out=None, hw_out=None)``
    one step, no autograd, fused in-place kernels on fresh buffers. ``out``
    receives the new state; ``hw_out`` receives the hidden projection
    ``hw = h W_hh^T + b_hh`` so that :meth:`linearize` can skip its matmul.
``forward_state(xw_t, s, dt=1.0)``
    the same step written with plain differentiable torch ops (autograd
    reference, used by :class:`mgrit_gru.models.AutogradPropagator`).
``linearize(xw, s_prev, dt=1.0, *, hw=None) -> lin``
    coefficient tensors of the step's Jacobian at ``s_prev``; ``hw`` is the
    hidden projection of ``s_prev`` if the caller kept it.
``vjp_state(lin, g, *, acc=None)``
    ``dL/ds_prev`` from ``g = dL/ds_new``: a few elementwise ops and one
    matmul, cheap enough to apply many times to the same ``lin``. With ``acc``
    the result is added into ``acc`` in place (and ``acc`` returned; with more
    than one leading dim ``acc`` must be contiguous).
``vjp_proj(lin, g) -> (g_xw, g_hw)``
    gradients with respect to ``xw`` and ``hw``.
``param_grads(x, s_prev, g_xw, g_hw)``
    parameter gradients summed over all leading dims with single matmuls.

``lin`` is a tuple of tensors that all carry the leading dims of the call;
:func:`select_lin` indexes it (e.g. one time step of a whole-chunk ``lin``).
``dt`` may be a float or a tensor broadcastable to the state; explicit cells
accept and ignore it. The functional methods never record autograd graphs.

Stacks of ``K`` cells (``make_cell(..., layers=K)``, as ``torch.nn.GRU``'s
``num_layers``) are :class:`mgrit_gru.models.stacked.StackedCell`: the same API
on the concatenated state of the layers (docs/layers.md).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgrit_gru.errors import InputError

__all__ = [
    "CELLS",
    "GRUCell",
    "ImplicitGRUCell",
    "LSTMCell",
    "RNNCell",
    "RecurrentCell",
    "cell_class",
    "cell_name",
    "make_cell",
    "select_lin",
]

Lin = tuple[Tensor, ...]
Dt = float | Tensor


def _no_autograd(fn):
    """Run ``fn`` with autograd off; cheaper than ``torch.no_grad()`` as a
    decorator when grad mode is already off (the hot loops)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def select_lin(lin: Lin, index) -> Lin:
    """Index every tensor of ``lin`` along its leading dims (``lin[t]``)."""
    return tuple(part[index] for part in lin)


def _positive_int(value, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{option}: expected a positive integer, got {value!r}")
    return value


def _flat(t: Tensor) -> Tensor:
    """Merge the leading dims: ``[..., k] -> [N, k]`` (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


def _addmm_into(acc: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """``acc += a @ w`` in place, one GEMM for any leading dims."""
    if acc.dim() == 2:
        return acc.addmm_(a, w)
    acc.view(-1, acc.shape[-1]).addmm_(_flat(a), w)
    return acc


def _linear(a: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None) -> Tensor:
    """``a w^T + b``; with ``out`` one GEMM into it (``out`` viewable as 2-D)."""
    if out is None:
        return F.linear(a, w, b)
    if a.dim() != 2:
        _linear(_flat(a), w, b, out.view(-1, out.shape[-1]))
        return out
    if b is None:
        return torch.mm(a, w.t(), out=out)
    return torch.addmm(b, a, w.t(), out=out)


def _one_plus_dt_one_minus(z: Tensor, dt: Dt) -> Tensor:
    """``1 + dt (1 - z)`` on a fresh buffer (one kernel for a scalar ``dt``)."""
    if isinstance(dt, Tensor):
        return torch.mul(z, -dt).add_(1.0 + dt)
    return torch.rsub(z, 1.0 + dt, alpha=dt)


class RecurrentCell(nn.Module):
    """Parameters, projections and parameter gradients shared by all cells.

    Subclasses set ``gates`` and ``state_factor`` (state size / hidden size)
    and implement ``step``, ``forward_state``, ``linearize``, ``vjp_state`` and
    ``vjp_proj``.
    """

    gates: int = 1
    state_factor: int = 1
    #: stacked layers (:class:`mgrit_gru.models.stacked.StackedCell` has more)
    layers: int = 1
    #: number of tensors in a ``lin`` of one cell
    lin_size: int = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.bias = bool(bias)
        kw = {"device": device, "dtype": dtype}
        gh = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gh, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(gh, hidden_size, **kw))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(gh, **kw))
            self.bias_hh = nn.Parameter(torch.empty(gh, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        """Size ``S`` of the state tensor (``H``; LSTM: ``2H``)."""
        return self.state_factor * self.hidden_size

    @property
    def proj_size(self) -> int:
        """Size of a hidden projection ``hw`` (``G * H``): the ``hw_out`` buffers."""
        return self.gates * self.hidden_size

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters, in the order of :meth:`param_grads`' keys."""
        return ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if self.bias \
            else ("weight_ih", "weight_hh")

    def reset_parameters(self) -> None:
        """Uniform initialisation in ``(-1/sqrt(H), 1/sqrt(H))``, as torch."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    # ------------------------------------------------------------------ state
    def hidden(self, s: Tensor) -> Tensor:
        """The hidden part ``h = s[..., :H]`` of a state."""
        return s[..., : self.hidden_size]

    def initial_state(self, batch_shape, device=None, dtype=None) -> Tensor:
        """Zero state ``[*batch_shape, S]`` (parameters' dtype/device by default)."""
        return torch.zeros(*batch_shape, self.state_size,
                           device=self.weight_hh.device if device is None else device,
                           dtype=self.weight_hh.dtype if dtype is None else dtype)

    # ------------------------------------------------------------ projections
    def input_projection(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``xw = x W_ih^T + b_ih`` for any leading dims, one matmul.

        ``out`` (optional, contiguous) receives the result, without autograd.
        """
        return _linear(x, self.weight_ih, self.bias_ih, out)

    def hidden_projection(self, h: Tensor, out: Tensor | None = None) -> Tensor:
        """``hw = h W_hh^T + b_hh`` for any leading dims, one matmul.

        ``out`` (optional) receives the result, without autograd.
        """
        return _linear(h, self.weight_hh, self.bias_hh, out)

    def _projection(self, h: Tensor, hw: Tensor | None, hw_out: Tensor | None) -> Tensor:
        """``hw`` as given, else computed (into ``hw_out`` when given)."""
        return self.hidden_projection(h, hw_out) if hw is None else hw

    @_no_autograd
    def param_grads(self, x: Tensor, s_prev: Tensor, g_xw: Tensor,
                    g_hw: Tensor, lin: Lin | None = None) -> dict[str, Tensor]:
        """Parameter gradients summed over all leading dims.

        ``x [..., D]`` is the input and ``s_prev [..., S]`` the state each step
        started from; ``g_xw``, ``g_hw`` come from :meth:`vjp_proj` of ``lin``
        (the linearisation of the same steps: a single cell does not need it, a
        stack of cells reads its inner layers' inputs there). Each weight
        gradient is one matmul over the flattened leading dims.
        """
        gx, gh = _flat(g_xw), _flat(g_hw)
        grads = {
            "weight_ih": gx.t() @ _flat(x),
            "weight_hh": gh.t() @ _flat(self.hidden(s_prev)),
        }
        if self.bias:
            grads["bias_ih"] = gx.sum(0)
            grads["bias_hh"] = gh.sum(0)
        return grads

    def input_grad(self, g_xw: Tensor) -> Tensor:
        """``dL/dx`` from ``g_xw = dL/dxw`` (any leading dims): ``g_xw W_ih``."""
        return g_xw @ self.weight_ih

    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """Jacobian coefficients of the step at ``s_prev`` (any leading dims)."""
        return self._linearize(xw, s_prev, dt, hw, False)[0]

    def _linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt, hw: Tensor | None,
                   want_new: bool) -> tuple[Lin, Tensor | None]:
        """``(lin, h_new)``: :meth:`linearize` and, with ``want_new``, the new hidden
        state of the step from the same gates (a stack feeds it to the next layer)."""
        raise NotImplementedError

    def _vjp_both(self, lin: Lin, g: Tensor, acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(vjp_state(lin, g, acc=acc), vjp_proj(lin, g)[0])`` sharing their work."""
        return self.vjp_state(lin, g, acc=acc), self.vjp_proj(lin, g)[0]

    @_no_autograd
    def vjp(self, xw_t: Tensor, s: Tensor, g: Tensor, dt: Dt = 1.0):
        """Convenience: ``(g_s_prev, g_xw, g_hw)`` for one (batched) step."""
        lin = self.linearize(xw_t, s, dt)
        g_xw, g_hw = self.vjp_proj(lin, g)
        return self.vjp_state(lin, g), g_xw, g_hw

    # ------------------------------------------------------- torch-like call
    def forward(self, input: Tensor, hx: Tensor | None = None, dt: Dt = 1.0) -> Tensor:
        """Torch-like differentiable call ``cell(x, h[, dt]) -> h_new``.

        ``input`` is ``[B, D]`` or ``[D]``; ``hx`` defaults to zeros.
        """
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        if hx is None:
            hx = self.initial_state(input.shape[:-1], input.device, input.dtype)
        out = self.forward_state(self.input_projection(input), hx, dt)
        return out.squeeze(0) if unbatched else out


class _GRUFamily(RecurrentCell):
    """Shared gates and VJP of the two GRU cells.

    Both GRU steps depend on ``h`` directly (coefficient ``d``) and through
    the pre-activations ``x_r + h_r``, ``x_z + h_z``, ``x_n + r h_n``
    (coefficients ``C_r``, ``C_z``, ``C_n``), so for ``g = dL/dh_new``:
    ``g_hw = g (.) [C_r, C_z, C_n r]``, ``g_xw = g (.) [C_r, C_z, C_n]`` and
    ``g_h_prev = g (.) d + g_hw W_hh``.
    ``lin = (d [.., H], Chw = [C_r, C_z, C_n r] [.., 3, H], C_n [.., H])``.
    """

    gates = 3
    lin_size = 3

    def _gates(self, xw: Tensor, h: Tensor, hw: Tensor | None = None,
               hw_out: Tensor | None = None):
        """``(rz, n, hw_n)``: ``rz = [r | z]`` and ``n`` on fresh buffers."""
        H2 = 2 * self.hidden_size
        hw = self._projection(h, hw, hw_out)
        rz = torch.add(xw[..., :H2], hw[..., :H2]).sigmoid_()
        hn = hw[..., H2:]
        n = torch.addcmul(xw[..., H2:], rz[..., : self.hidden_size], hn).tanh_()
        return rz, n, hn

    def _lin(self, direct: Tensor, rz: Tensor, n: Tensor, hn: Tensor, c_n: Tensor,
             c_z_base: Tensor) -> Lin:
        """Assemble ``lin`` from ``C_n`` and ``C_z / (z (1 - z))``."""
        H = self.hidden_size
        slope = torch.rsub(rz, 1.0).mul_(rz)                   # [r(1-r) | z(1-z)]
        r = rz[..., :H]
        chw = torch.empty(*n.shape[:-1], 3, H, dtype=n.dtype, device=n.device)
        torch.mul(c_n, hn, out=chw[..., 0, :]).mul_(slope[..., :H])
        torch.mul(c_z_base, slope[..., H:], out=chw[..., 1, :])
        torch.mul(c_n, r, out=chw[..., 2, :])
        return direct, chw, c_n

    @_no_autograd
    def vjp_state(self, lin: Lin, g: Tensor, *, acc: Tensor | None = None) -> Tensor:
        """``dL/dh_prev = g (.) d + (g (.) Chw) W_hh`` (2 elementwise ops + 1 GEMM)."""
        direct, chw, _ = lin
        g_hw = torch.mul(chw, g.unsqueeze(-2)).flatten(-2)
        if acc is None:
            acc = torch.mul(g, direct)
        else:
            acc.addcmul_(g, direct)
        return _addmm_into(acc, g_hw, self.weight_hh)

    @_no_autograd
    def vjp_proj(self, lin: Lin, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(dL/dxw, dL/dhw)``: they differ only in the n block."""
        _, chw, c_n = lin
        g_hw = torch.mul(chw, g.unsqueeze(-2)).flatten(-2)
        g_xw = g_hw.clone()
        torch.mul(g, c_n, out=g_xw[..., 2 * self.hidden_size:])
        return g_xw, g_hw

    @_no_autograd
    def _vjp_both(self, lin: Lin, g: Tensor, acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(dL/dh_prev, dL/dxw)``: ``g_hw`` feeds the GEMM, then becomes ``g_xw``."""
        direct, chw, c_n = lin
        g_hw = torch.mul(chw, g.unsqueeze(-2)).flatten(-2)
        if acc is None:
            acc = torch.mul(g, direct)
        else:
            acc.addcmul_(g, direct)
        _addmm_into(acc, g_hw, self.weight_hh)
        torch.mul(g, c_n, out=g_hw[..., 2 * self.hidden_size:])
        return acc, g_hw

    def _torch_gates(self, xw_t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, n)`` with plain differentiable torch ops (the autograd references)."""
        x_r, x_z, x_n = xw_t.chunk(3, -1)
        h_r, h_z, h_n = self.hidden_projection(s).chunk(3, -1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return z, n


class ImplicitGRUCell(_GRUFamily):
    """Implicit (backward Euler) GRU cell, stable for any ``dt > 0``.

    With ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``
    and ``a = dt (1 - z)``: ``h_new = (h + a n) / (1 + a)``, i.e.
    ``(h_new - h) / dt = (1 - z) (n - h_new)``. ``h_new`` is a convex
    combination of ``h`` and ``n``, so ``|h_new| <= max(|h|, 1)``.
    """

    @_no_autograd
    def step(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0, *,
             out: Tensor | None = None, hw_out: Tensor | None = None) -> Tensor:
        """One step without autograd: ``h_new = n + q (h - n)``, ``q = 1/(1+a)``."""
        rz, n, _ = self._gates(xw_t, s, hw_out=hw_out)
        q = _one_plus_dt_one_minus(rz[..., self.hidden_size:], dt).reciprocal_()
        return torch.lerp(n, s, q, out=out)

    def forward_state(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0) -> Tensor:
        """Differentiable step with plain torch ops (autograd reference)."""
        z, n = self._torch_gates(xw_t, s)
        a = dt * (1 - z)
        return (s + a * n) / (1 + a)

    @_no_autograd
    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """Jacobian coefficients of the step at ``s_prev`` (any leading dims).

        ``d = q = 1/(1+a)``, ``C_n = a q (1 - n^2) = (1 - q)(1 - n^2)``,
        ``C_r = C_n h_n r (1 - r)``,
        ``C_z = -dt (n - h_new) q z (1 - z) = dt q^2 (h - n) z (1 - z)``.
        """
        return self._linearize(xw, s_prev, dt, hw, False)[0]

    @_no_autograd
    def _linearize(self, xw, s_prev, dt, hw, want_new):
        rz, n, hn = self._gates(xw, s_prev, hw)
        q = _one_plus_dt_one_minus(rz[..., self.hidden_size:], dt).reciprocal_()
        h_new = torch.lerp(n, s_prev, q) if want_new else None
        one_minus_q = torch.rsub(q, 1.0)
        c_n = torch.mul(n, n).mul_(one_minus_q).neg_().add_(one_minus_q)
        c_z_base = torch.sub(s_prev, n).mul_(q).mul_(torch.mul(q, dt))
        return self._lin(q, rz, n, hn, c_n, c_z_base), h_new


class GRUCell(_GRUFamily):
    """Classic GRU cell (torch's equations): ``h_new = z h + (1 - z) n``."""

    @_no_autograd
    def step(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0, *,
             out: Tensor | None = None, hw_out: Tensor | None = None) -> Tensor:
        """One step without autograd; ``dt`` is ignored."""
        rz, n, _ = self._gates(xw_t, s, hw_out=hw_out)
        return torch.lerp(n, s, rz[..., self.hidden_size:], out=out)

    def forward_state(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0) -> Tensor:
        """Differentiable step with plain torch ops; ``dt`` is ignored."""
        z, n = self._torch_gates(xw_t, s)
        return z * s + (1 - z) * n

    @_no_autograd
    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """``d = z``, ``C_n = (1 - z)(1 - n^2)``, ``C_r = C_n h_n r (1 - r)``,
        ``C_z = (h - n) z (1 - z)``; ``dt`` is ignored."""
        return self._linearize(xw, s_prev, dt, hw, False)[0]

    @_no_autograd
    def _linearize(self, xw, s_prev, dt, hw, want_new):
        rz, n, hn = self._gates(xw, s_prev, hw)
        z = rz[..., self.hidden_size:]
        h_new = torch.lerp(n, s_prev, z) if want_new else None
        one_minus_z = torch.rsub(z, 1.0)
        c_n = torch.mul(n, n).mul_(one_minus_z).neg_().add_(one_minus_z)
        return self._lin(z.contiguous(), rz, n, hn, c_n, torch.sub(s_prev, n)), h_new


class RNNCell(RecurrentCell):
    """Elman RNN cell with tanh: ``h_new = tanh(xw + h W_hh^T + b_hh)``."""

    gates = 1

    @_no_autograd
    def step(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0, *,
             out: Tensor | None = None, hw_out: Tensor | None = None) -> Tensor:
        """One step without autograd; ``dt`` is ignored."""
        hw = self.hidden_projection(s, hw_out)
        return torch.add(hw, xw_t, out=out).tanh_()

    def forward_state(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0) -> Tensor:
        """Differentiable step with plain torch ops; ``dt`` is ignored."""
        return torch.tanh(xw_t + self.hidden_projection(s))

    @_no_autograd
    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """``lin = (1 - h_new^2,)``."""
        return self._linearize(xw, s_prev, dt, hw, False)[0]

    @_no_autograd
    def _linearize(self, xw, s_prev, dt, hw, want_new):
        h_new = torch.add(self._projection(s_prev, hw, None), xw).tanh_()
        slope = torch.mul(h_new, h_new) if want_new else h_new.mul_(h_new)
        return (slope.neg_().add_(1.0),), (h_new if want_new else None)

    @_no_autograd
    def vjp_state(self, lin: Lin, g: Tensor, *, acc: Tensor | None = None) -> Tensor:
        """``dL/dh_prev = (g (.) (1 - h_new^2)) W_hh``."""
        g_pre = torch.mul(g, lin[0])
        if acc is None:
            return torch.matmul(g_pre, self.weight_hh)
        return _addmm_into(acc, g_pre, self.weight_hh)

    @_no_autograd
    def vjp_proj(self, lin: Lin, g: Tensor) -> tuple[Tensor, Tensor]:
        """``g_xw = g_hw = g (.) (1 - h_new^2)`` (the same tensor, twice)."""
        g_pre = torch.mul(g, lin[0])
        return g_pre, g_pre

    @_no_autograd
    def _vjp_both(self, lin: Lin, g: Tensor, acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g_pre = torch.mul(g, lin[0])
        if acc is None:
            return torch.matmul(g_pre, self.weight_hh), g_pre
        return _addmm_into(acc, g_pre, self.weight_hh), g_pre


class LSTMCell(RecurrentCell):
    """Classic LSTM cell (torch's equations), state ``s = [h | c]``.

    ``i, f, o = σ(.)``, ``g = tanh(.)``, ``c_new = f c + i g``,
    ``h_new = o tanh(c_new)``.
    """

    gates = 4
    state_factor = 2
    lin_size = 4

    def _activations(self, xw: Tensor, h: Tensor, hw: Tensor | None = None,
                     hw_out: Tensor | None = None) -> Tensor:
        """Activated gates ``[.., 4H]`` (i, f, g, o) on a fresh buffer."""
        H = self.hidden_size
        act = torch.add(self._projection(h, hw, hw_out), xw)
        act[..., : 2 * H].sigmoid_()
        act[..., 2 * H: 3 * H].tanh_()
        act[..., 3 * H:].sigmoid_()
        return act

    @_no_autograd
    def step(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0, *,
             out: Tensor | None = None, hw_out: Tensor | None = None) -> Tensor:
        """One step without autograd; ``dt`` is ignored."""
        H = self.hidden_size
        i, f, g, o = self._activations(xw_t, s[..., :H], hw_out=hw_out).chunk(4, -1)
        if out is None:
            out = torch.empty_like(s)
        c_new = out[..., H:]
        torch.mul(f, s[..., H:], out=c_new).addcmul_(i, g)
        torch.tanh(c_new, out=out[..., :H]).mul_(o)
        return out

    def forward_state(self, xw_t: Tensor, s: Tensor, dt: Dt = 1.0) -> Tensor:
        """Differentiable step with plain torch ops; ``dt`` is ignored."""
        h, c = s.chunk(2, -1)
        i, f, g, o = (xw_t + self.hidden_projection(h)).chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return torch.cat((h_new, c_new), -1)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None,
                dt: Dt = 1.0) -> tuple[Tensor, Tensor]:
        """Torch-like call ``cell(x, (h, c)) -> (h_new, c_new)``."""
        s = None if hx is None else torch.cat(tuple(hx), -1)
        out = super().forward(input, s, dt)
        return out[..., : self.hidden_size], out[..., self.hidden_size:]

    @_no_autograd
    def linearize(self, xw: Tensor, s_prev: Tensor, dt: Dt = 1.0, *,
                  hw: Tensor | None = None) -> Lin:
        """``lin = (K, C3, C_o, f)`` with ``K = o (1 - tanh(c_new)^2)``,
        ``C3 = [g i (1-i), c f (1-f), i (1 - g^2)]``,
        ``C_o = tanh(c_new) o (1 - o)``; then ``dc = g_c + g_h K``,
        ``g_pre = [dc C3, g_h C_o]``, ``g_c_prev = dc f``; ``dt`` is ignored."""
        return self._linearize(xw, s_prev, dt, hw, False)[0]

    @_no_autograd
    def _linearize(self, xw, s_prev, dt, hw, want_new):
        H = self.hidden_size
        c = s_prev[..., H:]
        i, f, g, o = self._activations(xw, s_prev[..., :H], hw).chunk(4, -1)
        tc = torch.mul(f, c).addcmul_(i, g).tanh_()
        h_new = torch.mul(tc, o) if want_new else None
        k = torch.mul(tc, tc).neg_().add_(1.0).mul_(o)
        c3 = torch.empty(*tc.shape[:-1], 3, H, dtype=tc.dtype, device=tc.device)
        torch.mul(i, i, out=c3[..., 0, :]).neg_().add_(i).mul_(g)    # i (1 - i) g
        torch.mul(f, f, out=c3[..., 1, :]).neg_().add_(f).mul_(c)    # f (1 - f) c
        torch.mul(g, g, out=c3[..., 2, :]).neg_().add_(1.0).mul_(i)
        c_o = tc.mul_(o).mul_(torch.rsub(o, 1.0))
        return (k, c3, c_o, f.contiguous()), h_new

    def _g_pre(self, lin: Lin, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_pre [.., 4H], dc [.., H])`` for ``g = [g_h | g_c]``."""
        H = self.hidden_size
        k, c3, c_o, _ = lin
        g_h = g[..., :H]
        dc = torch.addcmul(g[..., H:], g_h, k)
        g_pre = torch.empty(*g.shape[:-1], 4 * H, dtype=g.dtype, device=g.device)
        g_pre4 = g_pre.unflatten(-1, (4, H))
        torch.mul(c3, dc.unsqueeze(-2), out=g_pre4[..., :3, :])
        torch.mul(c_o, g_h, out=g_pre4[..., 3, :])
        return g_pre, dc

    @_no_autograd
    def vjp_state(self, lin: Lin, g: Tensor, *, acc: Tensor | None = None) -> Tensor:
        """``[g_h_prev | g_c_prev] = [g_pre W_hh | dc (.) f]``."""
        return self._vjp_both(lin, g, acc)[0]

    @_no_autograd
    def _vjp_both(self, lin: Lin, g: Tensor, acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        g_pre, dc = self._g_pre(lin, g)
        if acc is None:
            acc = torch.empty_like(g)
            torch.mul(dc, lin[3], out=acc[..., H:])
            torch.matmul(g_pre, self.weight_hh, out=acc[..., :H])
            return acc, g_pre
        acc[..., H:].addcmul_(dc, lin[3])
        if acc.dim() == 2:
            acc[:, :H].addmm_(g_pre, self.weight_hh)
        else:
            acc[..., :H].add_(torch.matmul(g_pre, self.weight_hh))
        return acc, g_pre

    @_no_autograd
    def vjp_proj(self, lin: Lin, g: Tensor) -> tuple[Tensor, Tensor]:
        """``g_xw = g_hw = g_pre`` (the same tensor, twice)."""
        g_pre, _ = self._g_pre(lin, g)
        return g_pre, g_pre


CELLS: dict[str, type[RecurrentCell]] = {
    "implicit-gru": ImplicitGRUCell,
    "gru": GRUCell,
    "lstm": LSTMCell,
    "rnn": RNNCell,
}


def make_cell(name: str, input_size: int, hidden_size: int, *, bias: bool = True,
              dtype: torch.dtype = torch.float32, device=None, layers: int = 1) -> RecurrentCell:
    """Build a cell by registry name (``InputError`` for unknown names); ``layers``
    stacked cells (each fed the hidden state of the one below, as
    ``torch.nn.GRU(num_layers=layers)``): a
    :class:`~mgrit_gru.models.stacked.StackedCell` when ``layers > 1``."""
    layers = _positive_int(layers, "layers")
    cls = cell_class(name)
    if layers == 1:
        return cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    from mgrit_gru.models.stacked import StackedCell
    return StackedCell(name, input_size, hidden_size, layers, bias=bias, device=device,
                       dtype=dtype)


def cell_class(name: str) -> type[RecurrentCell]:
    """The cell class of registry name ``name`` (``InputError`` for unknown names)."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise InputError(f"cell: unknown cell {name!r} (choose from {', '.join(CELLS)})") from None


def cell_name(cell: RecurrentCell) -> str:
    """The registry name of ``cell`` (of its layers' cell for a stack)."""
    cls = getattr(cell, "cell_class", type(cell))
    for name, c in CELLS.items():
        if c is cls:
            return name
    raise InputError(f"cell: {type(cell).__name__} is not a registered cell")
