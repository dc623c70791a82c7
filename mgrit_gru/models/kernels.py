"""Fused C++ kernels of the recurrent cells (CPU, float32/float64), built on first use.

The serial recurrence spends most of its time in Python: per step one
``[B, H] x [H, G H]`` GEMM and a dozen small elementwise torch calls, each a
Python -> C++ dispatch holding the GIL. The kernels here do a whole step (the
GEMM through torch's BLAS, then one fused elementwise pass) and a whole
sequence (``forward_sweep``, ``backward_sweep``) in one C++ call that releases
the GIL, so that worker threads run their recurrences in parallel.

Entry points (``kind``: a cell registry name, ``"implicit-gru"``, ``"gru"``,
``"lstm"`` or ``"rnn"``; all tensors on the CPU, one dtype, rows with a unit
last stride; equations and layouts in docs/kernels.md):

``input_projection(x, w_ih, b_ih, out)``
    ``xw = x W_ih^T + b_ih`` for the whole sequence (own loop for small ``D``).
``forward_sweep(kind, xw, w_hh, b_hh, dt, states, hw)``
    ``states[t+1] = step(xw[t], states[t])`` for all ``t``, writing the hidden
    projections ``hw[t] = h_t W_hh^T + b_hh``; ``states[0]`` is given.
``backward_sweep(kind, xw, hw, s_prev, w_hh, dt, lam, g_xw, g_hw, lam_prev=None)``
    the reverse sweep: ``lam[t]`` holds the source terms ``dL/ds_{t+1}`` on
    entry and the adjoint on exit; ``g_xw``/``g_hw`` receive ``dL/dxw``,
    ``dL/dhw`` of every step; ``lam_prev`` (optional) receives (adds)
    ``dL/ds_0``. Parameter gradients are the caller's GEMMs
    (:func:`sweep_backward` does them, chunk by chunk).
``step(kind, xw_t, s, w_hh, b_hh, dt, out, hw_out=None, rhs=None)``
    one fused step (``+ rhs`` when given), the MGRIT forward stepper's.
``vjp_step(kind, xw_t, s, w_hh, b_hh, dt, g, out, hw=None, rhs=None, ...)``
    one adjoint step recomputing the gates: ``out = rhs + J^T g``.
``vjp_lin(kind, lin, g, w_hh, out, rhs=None)``
    the same from a cell's ``linearize`` tuple (the MGRIT adjoint stepper's).
``linearize(kind, xw, hw, s_prev, w_hh, dt)``
    a GRU cell's ``linearize`` tuple in one pass (LSTM/RNN: None).
``train_step(kind, x, lengths, params, head_w, head_b, y, pooling, dt, chunk, weight)``
    a whole training minibatch of a single-layer classifier (forward, pooling,
    linear head, cross-entropy, backward, all parameter gradients) in one
    call; :mod:`mgrit_gru.models.fused_step` is its caller.
``proj_grads(kind, xw, hw, s_prev, w_hh, dt, g, g_xw, g_hw)``
    ``dL/dxw``, ``dL/dhw`` of ``T`` steps from given adjoints ``g[t] =
    dL/ds_{t+1}`` (an MGRIT adjoint): elementwise, no recursion;
    :class:`ParamGrads` turns them into parameter gradients.

:func:`kind_of` gives a cell's ``kind`` when the kernels can run it on given
tensors (None: keep the torch path). :func:`available` says whether the
kernels can be used; it is False (and the
callers keep their pure-torch path) when ``MGRIT_GRU_KERNELS=0``, when there
is no C++ compiler or ninja, or when the build fails (one warning, once per
process). The build lands in ``$MGRIT_GRU_KERNEL_DIR`` (default: torch's
extension cache, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``),
in a folder named after a hash of the sources, flags and torch version: a
later process, or another MPI rank, imports the built module without a
compiler. Concurrent first builds take an ``flock`` on that folder (released
by the kernel if a builder dies), so only one rank compiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "available",
    "backward_sweep",
    "build_info",
    "forward_sweep",
    "input_projection",
    "kind_of",
    "linearize",
    "ParamGrads",
    "proj_grads",
    "step",
    "supports",
    "sweep_backward",
    "train_step",
    "vjp_lin",
    "vjp_step",
]

#: cell registry names -> kernel codes
KINDS = {"implicit-gru": 0, "gru": 1, "lstm": 2, "rnn": 3}
_GATES = {0: 3, 1: 3, 2: 4, 3: 1}

_SOURCES = (Path(__file__).resolve().parent / "csrc" / "kernels.cpp",)
_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG"]
_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_state: dict = {"module": None, "tried": False, "error": None, "path": None}


# ------------------------------------------------------------------ building
def _enabled() -> bool:
    return os.environ.get("MGRIT_GRU_KERNELS", "1").strip().lower() not in ("0", "false", "no",
                                                                             "off")


def _build_root() -> Path:
    root = os.environ.get("MGRIT_GRU_KERNEL_DIR")
    if root:
        return Path(root).expanduser()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")           # torch's own cache root
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root()) / f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"


def _module_name() -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {sys.platform}".encode())
    h.update(os.environ.get("CXX", "c++").encode())
    return f"mgrit_gru_kernels_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _exclusive(folder: Path):
    """An exclusive ``flock`` on ``folder/build.flock``: released when the holder
    exits or dies, unlike a lock file (a crashed builder cannot wedge others)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                      # no flock (Windows): torch's file baton only
        yield
        return
    with open(folder / "build.flock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library(folder: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _build():
    """Import the compiled module, building it first when needed."""
    name = _module_name()
    folder = _build_root() / name
    with _exclusive(folder):
        lib = _library(folder, name)
        if lib is None:
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH)")
            from torch.utils import cpp_extension
            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not available (pip install ninja)")
            stale = folder / "lock"                  # torch's baton: a dead builder's leftover,
            if stale.exists():                       # since every builder holds our flock
                stale.unlink()
            cpp_extension.load(name=name, sources=[str(s) for s in _SOURCES],
                               extra_cflags=_CFLAGS, build_directory=str(folder),
                               verbose=os.environ.get("MGRIT_GRU_KERNELS_VERBOSE") == "1")
            lib = _library(folder, name)
            if lib is None:
                raise RuntimeError(f"the build left no library in {folder}")
        module = sys.modules.get(name) or _import(name, lib)
    _state["path"] = str(lib)
    return module


def _module():
    """The compiled module, or None (built at most once per process)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            if _enabled():
                try:
                    _state["module"] = _build()
                except Exception as exc:          # noqa: BLE001 - any failure means fallback
                    _state["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    warnings.warn("mgrit_gru: fused C++ kernels unavailable, using the torch "
                                  f"path ({_state['error']})", RuntimeWarning, stacklevel=3)
            else:
                _state["error"] = "disabled by MGRIT_GRU_KERNELS=0"
            _state["tried"] = True
    return _state["module"]


def available() -> bool:
    """Whether the compiled kernels are usable (builds them on the first call)."""
    return _module() is not None


def build_info() -> dict:
    """``{"available", "path", "error", "enabled"}`` of this process's kernels."""
    ok = available()
    return {"available": ok, "path": _state["path"], "error": _state["error"],
            "enabled": _enabled()}


def supports(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: available, all on the CPU,
    all float32 or all float64 (``None`` entries are skipped)."""
    if not available():
        return False
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in _DTYPES or (dtype is not None
                                                               and t.dtype != dtype):
            return False
        dtype = t.dtype
    return True


def kind_of(cell, *tensors: Tensor | None) -> str | None:
    """The kernel kind of ``cell`` when the kernels can run it on ``tensors``
    (see :func:`supports`), else None: the cell must be exactly one of the four
    registered single-layer cells (a subclass may have changed the equations;
    a stack runs layer by layer on the torch path)."""
    from mgrit_gru.models.cells import CELLS          # lazy: cells may import this module
    for name, cls in CELLS.items():
        if type(cell) is cls:
            if name in KINDS and supports(cell.weight_hh, *tensors):
                return name
            return None
    return None


def _code(kind) -> int:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"kernels: unknown cell kind {kind!r} (one of {', '.join(KINDS)})") \
            from None


def _mod():
    mod = _module()
    if mod is None:
        raise RuntimeError(f"mgrit_gru kernels unavailable: {_state['error']}")
    return mod


# ------------------------------------------------------------------ kernels
def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, out: Tensor) -> Tensor:
    """``out = x W_ih^T + b_ih`` for any leading dims (``out`` contiguous).

    For small input sizes (``D <= 64``) an own register-blocked loop: BLAS runs
    a GEMM with such a small inner dimension several times slower (0.11 s vs
    0.02 s for ``[102400, 9] x [9, 300]`` here, docs/kernels.md); beyond, one
    BLAS GEMM.
    """
    D, G = x.shape[-1], w_ih.shape[0]
    _mod().input_projection(x.reshape(-1, D), w_ih, b_ih, out.view(-1, G))
    return out


def forward_sweep(kind: str, xw: Tensor, w_hh: Tensor, b_hh: Tensor | None, dt: float,
                  states: Tensor, hw: Tensor) -> Tensor:
    """Whole forward recurrence: ``states [T+1, B, S]`` (row 0 given) and
    ``hw [T, B, G H]`` written from ``xw [T, B, G H]``; returns ``states``."""
    _mod().forward_sweep(_code(kind), xw, w_hh, b_hh, float(dt), states, hw)
    return states


def backward_sweep(kind: str, xw: Tensor, hw: Tensor, s_prev: Tensor, w_hh: Tensor, dt: float,
                   lam: Tensor, g_xw: Tensor, g_hw: Tensor,
                   lam_prev: Tensor | None = None) -> Tensor:
    """Whole reverse sweep over ``T`` steps (see the module docstring); returns ``lam``.

    ``s_prev [T, B, S]`` are the states the steps started from (``states[:-1]``
    of :func:`forward_sweep`). For the LSTM and RNN ``g_xw`` may be ``g_hw``
    (they are equal). ``lam_prev`` lets a caller sweep in time chunks.
    """
    _mod().backward_sweep(_code(kind), xw, hw, s_prev, w_hh, float(dt), lam, g_xw, g_hw,
                          lam_prev)
    return lam


def step(kind: str, xw_t: Tensor, s: Tensor, w_hh: Tensor, b_hh: Tensor | None, dt: float,
         out: Tensor, hw_out: Tensor | None = None, rhs: Tensor | None = None) -> Tensor:
    """One fused step ``out = step(xw_t, s) (+ rhs)``; ``hw_out`` receives ``hw``."""
    return _mod().step(_code(kind), xw_t, s, w_hh, b_hh, dt, out, hw_out, rhs)


def vjp_step(kind: str, xw_t: Tensor, s: Tensor, w_hh: Tensor, b_hh: Tensor | None, dt: float,
             g: Tensor, out: Tensor, hw: Tensor | None = None, rhs: Tensor | None = None,
             g_xw_out: Tensor | None = None, g_hw_out: Tensor | None = None) -> Tensor:
    """One adjoint step at ``s``: ``out = rhs + (d step/d s)^T g`` (``rhs`` may be
    ``out`` to accumulate in place); ``hw`` is the step's hidden projection if
    kept (else recomputed from ``b_hh``); ``g_xw_out``/``g_hw_out`` receive
    ``dL/dxw_t``, ``dL/dhw_t``."""
    return _mod().vjp_step(_code(kind), xw_t, s, w_hh, b_hh, dt, g, out, hw, rhs, g_xw_out,
                           g_hw_out)


def vjp_lin(kind: str, lin, g: Tensor, w_hh: Tensor, out: Tensor, rhs: Tensor | None = None,
            g_hw_out: Tensor | None = None) -> Tensor:
    """``cell.vjp_state(lin, g)`` in one call: ``out = rhs + J^T g`` from the
    cell's ``lin`` tuple of one (batched) step; ``rhs`` may be ``out``."""
    return _mod().vjp_lin(_code(kind), list(lin), g, w_hh, out, rhs, g_hw_out)


def linearize(kind: str, xw: Tensor, hw: Tensor, s_prev: Tensor, w_hh: Tensor,
              dt: float) -> tuple | None:
    """``cell.linearize(xw, s_prev, dt, hw=hw)`` of a GRU cell in one fused
    pass (any leading dims, rows contiguous): ``(d, Chw [.., 3, H], C_n)``,
    fresh tensors. None for the LSTM and RNN (their torch ``linearize`` is
    used)."""
    if kind not in ("implicit-gru", "gru"):
        return None
    H = w_hh.shape[1]
    lead = xw.shape[:-1]
    d = xw.new_empty(*lead, H)
    chw = xw.new_empty(*lead, 3, H)
    cn = xw.new_empty(*lead, H)
    _mod().linearize_gru(_code(kind), xw.reshape(-1, 3 * H), hw.reshape(-1, 3 * H),
                         s_prev.reshape(-1, H), w_hh, float(dt), d.view(-1, H),
                         chw.view(-1, 3 * H), cn.view(-1, H))
    return d, chw, cn


def proj_grads(kind: str, xw: Tensor, hw: Tensor, s_prev: Tensor, w_hh: Tensor, dt: float,
               g: Tensor, g_xw: Tensor, g_hw: Tensor) -> tuple[Tensor, Tensor]:
    """``(g_xw, g_hw)`` of ``T`` steps ``s_prev[t] -> s_{t+1}`` from the adjoints
    ``g [T, B, S]`` (``dL/ds_{t+1}``); all ``[T, B, .]`` blocks contiguous. For
    the LSTM and RNN ``g_xw`` may be ``g_hw``."""
    _mod().proj_grads(_code(kind), xw, hw, s_prev, w_hh, float(dt), g, g_xw, g_hw)
    return g_xw, g_hw


_POOLING_CODES = {"last": 0, "mean": 1}


def train_step(kind: str, x: Tensor, lengths: Tensor | None, params: dict[str, Tensor],
               head_w: Tensor, head_b: Tensor | None, y: Tensor, pooling: str, dt: float,
               chunk: int | None = None, weight: float = 1.0):
    """One training minibatch in one GIL-free call: ``(loss, grads)`` or None.

    ``x [B, T, D]`` (batch-first, padded), ``lengths`` (int ``[B]`` on the
    CPU, or None: all ``T``), ``params`` the cell's (``weight_ih``,
    ``weight_hh``, optionally ``bias_ih``, ``bias_hh``), the linear head
    ``head_w [C, H]``, ``head_b [C]`` (or None), int64 labels ``y [B]``.
    Runs :func:`input_projection` and :func:`forward_sweep` over the first
    ``max(lengths)`` steps, the ``pooling`` (``"last"``/``"mean"``), the
    head, the cross-entropy averaged over the batch, then the gradients of
    ``weight * loss``: the pooling's adjoint sources and the reverse sweep
    with the parameter-gradient GEMMs of :func:`sweep_backward` (``chunk``
    steps per chunk, None: its default). ``loss`` is the unweighted mean
    cross-entropy (a float), ``grads`` ``{name: grad}`` with the cell's
    names plus ``"head.weight"`` (and ``"head.bias"``). None when the
    lengths or labels are out of range (the torch path reports those).
    """
    code = _code(kind)
    loss, grads = _mod().train_step(
        code, x, lengths, params["weight_ih"], params["weight_hh"], params.get("bias_ih"),
        params.get("bias_hh"), head_w, head_b, y, _POOLING_CODES[pooling], float(dt),
        int(chunk or 0), float(weight))
    if not grads:
        return None
    names = ["weight_ih", "weight_hh"]
    if params.get("bias_ih") is not None:
        names += ["bias_ih", "bias_hh"]
    names.append("head.weight")
    if head_b is not None:
        names.append("head.bias")
    return loss, dict(zip(names, grads))


class ParamGrads:
    """Parameter (and input) gradients accumulated over chunks of steps.

    ``add(x, h, g_xw, g_hw)`` takes a chunk's inputs ``x [n, B, D]``, the
    hidden parts of the states its steps started from ``h [n, B, H]`` and its
    projection gradients ``[n, B, G H]``; four GEMM/GEMV calls per chunk, into
    transposed accumulators (``[D, G H] = x^T g_xw`` is ~5x faster than
    ``[G H, D] = g_xw^T x`` for small ``D`` with MKL, docs/kernels.md).
    ``input_grad(g_xw, out)`` writes ``dL/dx = g_xw W_ih`` of a chunk.
    ``result()`` gives ``{name: grad}`` in the parameters' layout.
    """

    def __init__(self, params: dict[str, Tensor]):
        w_ih, w_hh = params["weight_ih"], params["weight_hh"]
        self.w_ih = w_ih
        GH, H = w_hh.shape
        self.gw_ih_t = w_ih.new_zeros(w_ih.shape[1], GH)
        self.gw_hh_t = w_hh.new_zeros(H, GH)
        self.bias = params.get("bias_ih") is not None
        self.gb_ih = w_hh.new_zeros(GH) if self.bias else None
        self.gb_hh = w_hh.new_zeros(GH) if self.bias else None
        self._ones = w_hh.new_ones(0)

    def add(self, x: Tensor, h: Tensor, g_xw: Tensor, g_hw: Tensor) -> None:
        n = g_xw.shape[0] * g_xw.shape[1]
        GH = g_xw.shape[-1]
        gx2, gh2 = g_xw.reshape(n, GH), g_hw.reshape(n, GH)
        with torch.no_grad():
            self.gw_ih_t.addmm_(x.reshape(n, -1).t(), gx2)
            self.gw_hh_t.addmm_(h.reshape(n, h.shape[-1]).t(), gh2)
            if self.bias:
                if self._ones.numel() < n:
                    self._ones = gx2.new_ones(n)
                self.gb_ih.addmv_(gx2.t(), self._ones[:n])
                self.gb_hh.addmv_(gh2.t(), self._ones[:n])

    def input_grad(self, g_xw: Tensor, out: Tensor) -> Tensor:
        n = g_xw.shape[0] * g_xw.shape[1]
        with torch.no_grad():
            torch.mm(g_xw.reshape(n, g_xw.shape[-1]), self.w_ih, out=out.view(n, -1))
        return out

    def result(self) -> dict[str, Tensor]:
        grads = {"weight_ih": self.gw_ih_t.t().contiguous(),
                 "weight_hh": self.gw_hh_t.t().contiguous()}
        if self.bias:
            grads["bias_ih"], grads["bias_hh"] = self.gb_ih, self.gb_hh
        return grads


# ------------------------------------------------------- chunked backward
def sweep_backward(kind: str, x: Tensor, xw: Tensor, hw: Tensor, states: Tensor,
                   params: dict[str, Tensor], dt: float, lam: Tensor, *,
                   chunk: int | None = None, input_grad: bool = False,
                   work: dict | None = None):
    """Reverse sweep and parameter gradients, in time chunks from the end.

    ``x [T, B, D]`` (time-major inputs), ``xw``/``hw [T, B, G H]``, ``states
    [T+1, B, S]`` and ``params`` (``weight_ih``, ``weight_hh``, optionally
    ``bias_ih``, ``bias_hh``) as the forward used them; ``lam [T, B, S]``
    holds the loss sources and is overwritten with the adjoints. Per chunk of
    ``chunk`` steps (default ``max(16, 2048 // B)``; 16 to 64 steps are within
    ~10 % of each other at B=32 and B=100, 16 the best at B=100, see
    docs/kernels.md; small batches take longer chunks so that the per-chunk
    calls stay cheap): one :func:`backward_sweep` call, then the parameter
    gradients in four GEMM/sum calls accumulated over chunks (so ``g_xw`` /
    ``g_hw`` exist for one chunk at a time; ``work``, a dict, keeps those
    buffers for the next call). Returns ``(grads, g_x)`` with ``g_x [T, B, D]``
    when ``input_grad`` (else None).
    """
    T, B, GH = xw.shape
    w_hh = params["weight_hh"]
    H = w_hh.shape[1]
    if chunk is None:
        chunk = max(16, 2048 // B)
    chunk = max(1, min(int(chunk), T))
    code = _code(kind)
    mod = _mod()
    with torch.no_grad():
        buf = None if work is None else work.get("kernels_g")
        if buf is None or buf.numel() < 2 * chunk * B * GH or buf.dtype != xw.dtype:
            buf = torch.empty(2 * chunk * B * GH, dtype=xw.dtype)
            if work is not None:
                work["kernels_g"] = buf
        acc = ParamGrads(params)
        g_x = xw.new_empty(T, B, params["weight_ih"].shape[1]) if input_grad else None
        for stop in range(T, 0, -chunk):
            start = max(stop - chunk, 0)
            n = stop - start
            g_xw = buf[: n * B * GH].view(n, B, GH)
            g_hw = buf[chunk * B * GH: (chunk + n) * B * GH].view(n, B, GH)
            mod.backward_sweep(code, xw[start:stop], hw[start:stop], states[start:stop], w_hh,
                               float(dt), lam[start:stop], g_xw, g_hw,
                               lam[start - 1] if start > 0 else None)
            acc.add(x[start:stop], states[start:stop, :, :H], g_xw, g_hw)
            if g_x is not None:
                acc.input_grad(g_xw, g_x[start:stop])
    return acc.result(), g_x
