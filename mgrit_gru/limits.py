"""Resource limits: what a run may ask of the machine, checked before it allocates.

Bad sizes (a hidden size of 10^6, a million workers, a data file declaring
hundreds of GB) must end in one line of :class:`~mgrit_gru.errors.InputError`
before anything large is allocated, not in a ``MemoryError`` traceback (or the
kernel's OOM killer) minutes into a run. This module holds the estimates:

* :func:`available_memory` -- bytes this process may still allocate: the
  smallest of ``MemAvailable`` (``/proc/meminfo``), the free part of the
  cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) and
  ``os.sysconf`` free pages;
* :func:`usable_cores` -- the cores this process may run on (its CPU affinity);
* :func:`estimate_memory` -- the bytes one rank of a training run needs, by
  part (parameters with their gradients and optimizer state, the sweep buffers
  of training and evaluation, the float64 copy of the data, the confusion
  matrix, the warm-start store);
* :func:`check_resources` -- the check :func:`mgrit_gru.training.loop.train` makes
  right after loading the data set.

The data reader (:mod:`mgrit_gru.data`) checks the declared shapes of a file
against :func:`available_memory` before reading it (:func:`check_read`).

No torch here: :mod:`mgrit_gru.data` (numpy/h5py only) imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mgrit_gru.errors import InputError

__all__ = [
    "CELL_SHAPES",
    "CORES_FACTOR",
    "MAX_CLASSES",
    "MAX_SYNTHETIC_LENGTH",
    "available_memory",
    "check_read",
    "check_resources",
    "estimate_memory",
    "format_bytes",
    "ranks_per_node",
    "usable_cores",
]

#: Largest number of classes a data set may have (labels 0..MAX_CLASSES-1).
#: The evaluation keeps a classes x classes confusion matrix in float64 (and
#: a few copies of it); at 4096 classes that is 134 MB per copy.
MAX_CLASSES = 4096

#: Longest ``synthetic:LEN`` sequence (besides the memory estimate).
MAX_SYNTHETIC_LENGTH = 10_000_000

#: ``workers`` (and ``threads``) times the ranks on a node may be at most this
#: many times the usable cores.
CORES_FACTOR = 4

#: Gates and state size / hidden size of each cell (``mgrit_gru.models.cells``;
#: tests/test_bad_inputs.py compares the two).
CELL_SHAPES = {"implicit-gru": (3, 1), "gru": (3, 1), "lstm": (4, 2), "rnn": (1, 1)}

#: Smallest evaluation batch (``mgrit_gru.training.evaluation.EVAL_BATCH``).
_EVAL_BATCH = 256

_MEMINFO = Path("/proc/meminfo")
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


# --------------------------------------------------------------------------- #
# the machine
# --------------------------------------------------------------------------- #
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _file_cache(stat: Path) -> int:
    """Reclaimable page cache of a cgroup (``inactive_file`` of memory.stat)."""
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_free() -> int | None:
    """Free bytes under this process's cgroup memory limit (None: no limit)."""
    for limit_file, usage_file, root in (
            (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current", _CGROUP_V2),
            (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes",
             _CGROUP_V1)):
        limit = _read_int(limit_file)
        if limit is None or limit >= 1 << 60:  # "max" or the v1 "unlimited" value
            continue
        usage = _read_int(usage_file) or 0
        return max(0, limit - usage + _file_cache(root / "memory.stat"))
    return None


def available_memory() -> int:
    """Bytes this process may still allocate (the smallest known bound)."""
    bounds = []
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                bounds.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    if not bounds:
        try:
            bounds.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    cgroup = _cgroup_free()
    if cgroup is not None:
        bounds.append(cgroup)
    return min(bounds) if bounds else 1 << 62


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ranks_per_node(comm: Any) -> int:
    """Ranks of ``comm`` (a :class:`mgrit_gru.core.comm.Comm`) on this rank's node
    (collective; 1 for a serial communicator)."""
    node_size = getattr(comm, "node_size", None)
    return 1 if node_size is None else int(node_size())


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 kB'`` (powers of 1000, like ``MemAvailable`` in GB)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def check_read(where: str, what: str, nbytes: int, hint: str) -> None:
    """InputError unless ``nbytes`` (reading ``what`` of ``where``) fit in memory."""
    avail = available_memory()
    if nbytes > avail:
        raise InputError(f"{where}: {what} needs about {format_bytes(nbytes)} of memory, more "
                         f"than the {format_bytes(avail)} available; {hint}")


# --------------------------------------------------------------------------- #
# a run's memory
# --------------------------------------------------------------------------- #
def _value(config: Any, name: str, default: Any) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def estimate_memory(config: Any, dataset: Any) -> dict[str, int]:
    """Bytes one rank of a run of ``config`` on ``dataset`` needs, by part.

    A rough upper estimate from the sizes alone (the loaded data themselves
    are not counted: they are in memory already):

    ``parameters``
        ``P`` values (cell ``G H (d + H + 2)`` and ``G H (2 H + 2)`` per further
        layer of ``layers``, head ``H C + C``) x 5 (weights, gradient, Adam's
        two moments, the allreduce buffer), plus 2 per further worker of a
        strategy.
    ``training``
        the sweep buffers of a training batch, ``T B (d + K (2 G H + 2 S_1))``
        values (``K`` layers of state size ``S_1`` each: every layer's
        projections, state and adjoint; for ``K = 1`` the serial sweep's
        buffers), x2 under MGRIT (the coarse levels; ``T`` is then the rank's
        chunk) and autograd (its graph).
    ``evaluation``
        the same for an evaluation batch (``max(batch_size, 256)``, at most
        the test set).
    ``data_copy``
        with ``dtype = float64`` the data as float64 tensors.
    ``confusion``
        ``C^2`` float64 counts, 4 copies.
    ``warm_start``
        with ``warm_start``: the store, up to ``warm_start_mb`` (a state holds
        all ``K`` layers).
    """
    dtype = _value(config, "dtype", "float32")
    b = 8 if dtype == "float64" else 4
    cell = _value(config, "cell", "implicit-gru")
    gates, state_factor = CELL_SHAPES.get(cell, (4, 2))
    hidden = int(_value(config, "hidden", 32))
    layers = int(_value(config, "layers", 1))
    workers = int(_value(config, "workers", 1))
    batch = int(_value(config, "batch_size", 32))
    propagator = _value(config, "propagator", "serial")
    time_ranks = int(_value(config, "time_ranks", 1))
    d = int(dataset.input_size)
    classes = int(dataset.num_classes)
    train, test = dataset.train, dataset.test
    n_train, n_test = len(train), len(test)

    params = _cell_params(gates, hidden, d, layers) + hidden * classes + classes
    # values per step and sample: every layer's projections, state and adjoint
    step = layers * (2 * gates * hidden + 2 * state_factor * hidden) + d
    train_steps = train.seq_len
    factor = 1
    if propagator == "mgrit":
        train_steps = -(-train_steps // max(1, time_ranks))
        factor = 2
    elif propagator == "autograd":
        factor = 2
    train_batch = min(batch, n_train)
    eval_batch = min(max(batch, _EVAL_BATCH), n_test)
    parts = {
        "parameters": params * b * (5 + 2 * max(0, workers - 1)),
        "training": train_steps * train_batch * step * b * factor,
        "evaluation": test.seq_len * eval_batch * step * b,
        "data_copy": (n_train * train.seq_len + n_test * test.seq_len) * d * 8
        if dtype == "float64" else 0,
        "confusion": classes * classes * 8 * 4,
        "warm_start": 0,
    }
    if _value(config, "warm_start", False) and propagator == "mgrit":
        store = n_train * train_steps * layers * state_factor * hidden * b * 2
        parts["warm_start"] = min(store, int(float(_value(config, "warm_start_mb", 0.0)) * 1e6))
    return parts


def _cell_params(gates: int, hidden: int, d: int, layers: int) -> int:
    """Parameters of ``layers`` stacked cells (layer 1 reads ``d`` inputs, the
    others the ``hidden`` outputs of the layer below)."""
    return gates * hidden * (d + hidden + 2) + (layers - 1) * gates * hidden * (2 * hidden + 2)


_PART_NAMES = {
    "parameters": "parameters, gradients and optimizer state ({params:.3g} parameters: "
                  "hidden {hidden}{layers}, {classes} classes, {workers} worker(s))",
    "training": "training sweep buffers (batch {batch}, {steps} steps, hidden {hidden}"
                "{layers})",
    "evaluation": "evaluation sweep buffers ({eval_batch} sequences, {test_steps} steps, "
                  "hidden {hidden}{layers})",
    "data_copy": "the data as float64 (dtype float64)",
    "confusion": "the confusion matrix ({classes} classes)",
    "warm_start": "the warm-start store (warm_start_mb)",
}

_PART_OPTIONS = {
    "parameters": "--hidden or --layers",
    "training": "--batch-size, --hidden, --layers or --max-len",
    "evaluation": "--hidden, --layers, --max-test or --max-len",
    "data_copy": "--dtype float32 or --max-train",
    "confusion": "the data's classes", "warm_start": "--warm-start-mb",
}


def check_resources(config: Any, dataset: Any, ranks_per_node: int) -> None:
    """Raise :class:`InputError` unless the run fits this node.

    ``config`` is the run's (resolved) :class:`~mgrit_gru.training.config.TrainConfig`,
    ``dataset`` the loaded :class:`~mgrit_gru.data.Dataset` and
    ``ranks_per_node`` the ranks of the job on this node (they share its
    memory and cores; see :func:`ranks_per_node`). Checks:

    * ``workers x ranks_per_node`` and ``threads x ranks_per_node`` at most
      ``CORES_FACTOR`` (4) times the usable cores;
    * :func:`estimate_memory` x ``ranks_per_node`` at most
      :func:`available_memory`.
    """
    rpn = int(ranks_per_node)
    if rpn < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node!r}")
    cores = usable_cores()
    on_node = f" x {rpn} ranks on this node" if rpn > 1 else ""
    for name, flag in (("workers", "--workers"), ("threads", "--threads")):
        value = int(_value(config, name, 1))
        if value * rpn > CORES_FACTOR * cores:
            most = max(1, CORES_FACTOR * cores // rpn)
            raise InputError(f"option {name} ({flag}): {value}{on_node} is more than "
                             f"{CORES_FACTOR}x the {cores} usable cores (at most {most} per rank "
                             f"here)")
    parts = estimate_memory(config, dataset)
    per_rank = sum(parts.values())
    need = per_rank * rpn
    avail = available_memory()
    if need <= avail:
        return
    big = max(parts, key=parts.get)
    hidden = int(_value(config, "hidden", 32))
    batch = int(_value(config, "batch_size", 32))
    d, classes = int(dataset.input_size), int(dataset.num_classes)
    gates = CELL_SHAPES.get(_value(config, "cell", "implicit-gru"), (4, 2))[0]
    layers = int(_value(config, "layers", 1))
    detail = _PART_NAMES[big].format(
        params=float(_cell_params(gates, hidden, d, layers) + hidden * classes + classes),
        hidden=hidden, layers=f" x {layers} layers" if layers > 1 else "",
        classes=classes, workers=int(_value(config, "workers", 1)),
        batch=min(batch, len(dataset.train)), steps=dataset.train.seq_len,
        eval_batch=min(max(batch, _EVAL_BATCH), len(dataset.test)),
        test_steps=dataset.test.seq_len)
    prefix = "option hidden (--hidden): " if big == "parameters" else ""
    raise InputError(
        f"{prefix}the run needs about {format_bytes(per_rank)} of memory per rank{on_node}"
        f"{f' ({format_bytes(need)})' if rpn > 1 else ''}, more than the "
        f"{format_bytes(avail)} available; the largest part is {format_bytes(parts[big])} for "
        f"{detail}: reduce {_PART_OPTIONS[big]}")
