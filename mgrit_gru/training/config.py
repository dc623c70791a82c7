"""Training configuration: one frozen dataclass, loaded from defaults < TOML < CLI.

Every option is a field of :class:`TrainConfig`. Each field carries its help
text and, for choices, the allowed values in its metadata; the CLI builds its
flags from these fields, so a new option needs to be added only here.

A TOML config file is a flat table whose keys are the field names::

    data = "default"
    cell = "implicit-gru"
    hidden = 32
    propagator = "mgrit"
    relax = ["FCF", "F"]      # or one string for every level

Values are validated in ``TrainConfig.__post_init__``; a bad value raises
:class:`~mgrit_gru.errors.InputError` naming the option.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from mgrit_gru.errors import InputError

CELLS = ("implicit-gru", "gru", "lstm", "rnn")
POOLINGS = ("last", "mean")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda", "auto")
PROPAGATORS = ("serial", "autograd", "mgrit")
RELAXATIONS = ("F", "FCF")
CYCLES = ("V", "F")
COARSE_INPUTS = ("end", "mean")
STRATEGIES = ("sequential", "mutex", "averaging", "hogwild")
MUTEX_ORDERS = ("fixed", "arrival")
#: Where the data-parallel workers run (``auto``: the training loop and the
#: strategies choose, see ``worker_backend`` below and docs/strategies.md).
WORKER_BACKENDS = ("auto", "process", "thread")
PROGRESS = ("auto", "on", "off")
DIVERGENCE = ("stop", "skip-batch")
#: Signals that may stop a run cleanly besides SIGTERM (SIGUSR1 is taken by
#: MPICH's MPI_Init, SIGINT ends a run at once).
STOP_SIGNALS = ("USR2", "HUP", "ALRM", "XCPU", "none")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         kind: str | None = None):
    """A dataclass field with its CLI help text, choices and value kind.

    ``kind`` is one of ``int``, ``float``, ``str``, ``bool``, ``relax``; it
    defaults to the type of ``default`` (it must be given when the default is
    ``None``).
    """
    if kind is None:
        kind = type(default).__name__
    return field(default=default,
                 metadata={"help": help, "choices": choices, "kind": kind})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (see docs/usage.md).

    ``None`` for ``out``, ``threads`` and ``time_ranks`` means "decided at run
    time" (see :func:`mgrit_gru.training.setup.resolve_config`); ``None`` for
    ``max_train``, ``max_test`` and ``max_len`` means "no limit".
    """

    # data and model
    data: str = _opt("default", "data set: 'default', a built-in name (see "
                     "'mgrit-gru datasets') or a path to an HDF5 file")
    cell: str = _opt("implicit-gru", "recurrent cell", choices=CELLS)
    hidden: int = _opt(32, "hidden size")
    layers: int = _opt(1, "stacked recurrent layers, each fed the hidden states of the "
                       "one below (as torch.nn.GRU's num_layers)")
    pooling: str = _opt("mean", "features fed to the classifier head: the "
                        "last hidden state or the mean over time",
                        choices=POOLINGS)
    dtype: str = _opt("float32", "floating-point type of the model and data",
                      choices=DTYPES)
    device: str = _opt("cpu", "where the model and the batches live: cpu, cuda (this "
                       "rank's GPU, local rank modulo the GPUs of the node) or auto "
                       "(cuda when torch sees a GPU)", choices=DEVICES)
    max_train: int | None = _opt(None, "use at most this many training "
                                 "sequences", kind="int")
    max_test: int | None = _opt(None, "use at most this many test sequences",
                                kind="int")
    max_len: int | None = _opt(None, "cut sequences to at most this many time "
                               "steps", kind="int")
    # optimisation
    epochs: int = _opt(20, "number of epochs")
    batch_size: int = _opt(32, "minibatch size (global, over all data groups)")
    bucket_by_length: bool = _opt(True, "minibatches of sequences of similar lengths "
                                  "(length bucketing, shuffled between epochs, from the "
                                  "seed) when the training sequences' lengths vary; "
                                  "--no-bucket-by-length: uniformly random minibatches")
    lr: float = _opt(0.01, "learning rate")
    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS)
    seed: int = _opt(0, "random seed (initial weights and shuffling)")
    # parallelism
    propagator: str = _opt("serial", "how the recurrence is solved: serial "
                           "(hand-written backward), autograd (plain BPTT) "
                           "or mgrit (parallel in time)", choices=PROPAGATORS)
    time_ranks: int | None = _opt(None, "MPI ranks per time group (default: all "
                                  "ranks for mgrit, else 1); the remaining "
                                  "factor forms data groups", kind="int")
    strategy: str = _opt("sequential", "data-parallel strategy inside a rank",
                         choices=STRATEGIES)
    workers: int = _opt(1, "workers (K) of the data-parallel strategy")
    mutex_order: str = _opt("fixed", "order of the mutex strategy's updates: fixed (minibatch "
                            "j is update j: deterministic, composes with MPI ranks) or "
                            "arrival (whoever finishes first updates, as a plain lock: "
                            "faster, not reproducible, one rank only)",
                            choices=MUTEX_ORDERS)
    worker_backend: str = _opt("auto", "where the strategy's workers run: auto (threads for "
                               "a run of under 10,000 minibatches, where processes' start-up "
                               "is not repaid, and where the propagator communicates over "
                               "MPI or the model is on a GPU; processes otherwise), process "
                               "or thread (docs/strategies.md)",
                               choices=WORKER_BACKENDS)
    threads: int = _opt(1, "torch threads per rank (the per-step operations are "
                              "small: more threads rarely pay, and on a busy "
                              "machine they cost up to 6x)")
    # MGRIT
    levels: int = _opt(3, "MGRIT levels")
    cfactor: int = _opt(4, "MGRIT coarsening factor")
    fwd_iters: int = _opt(2, "MGRIT iterations of the forward solve")
    bwd_iters: int = _opt(1, "MGRIT iterations of the backward (adjoint) solve")
    fwd_tol: float = _opt(0.0, "forward residual tolerance (0: run exactly "
                          "fwd_iters iterations)")
    bwd_tol: float = _opt(0.0, "backward residual tolerance (0: run exactly "
                          "bwd_iters iterations)")
    fwd_rtol: float = _opt(0.0, "forward tolerance relative to the first residual "
                           "(0: off; fwd_iters is then the cap)")
    bwd_rtol: float = _opt(0.0, "backward tolerance relative to the first residual "
                           "(0: off; bwd_iters is then the cap)")
    nested: bool = _opt(True, "nested iteration: initial guess of each solve from "
                        "the coarsest level up (full multigrid)")
    warm_start: bool = _opt(False, "initial guess of a training sequence's forward and "
                            "adjoint solves from its solution of the previous epoch")
    warm_start_mb: float = _opt(1024.0, "memory cap per rank of the warm-start store "
                                "in MB (sequences beyond it start cold)")
    coarse_input: str = _opt("end", "input of a coarse step: the input at the interval's "
                             "end point or the mean of the interval's input projections",
                             choices=COARSE_INPUTS)
    relax: str | tuple[str, ...] = _opt("FCF", "relaxation: F or FCF, or a "
                                        "comma-separated list per level from "
                                        "the finest (the last entry repeats)",
                                        kind="relax")
    bwd_relax: str | tuple[str, ...] | None = _opt(None, "relaxation of the backward "
                                                   "(adjoint) solve, as relax (default: "
                                                   "the same as relax)", kind="relax")
    cycle: str = _opt("V", "MGRIT cycle", choices=CYCLES)
    final_residual: bool = _opt(True, "compute the MGRIT residual after the last "
                                "iteration too (N/m more steps per solve)")
    skip_first_relax: bool = _opt(False, "skip the relaxation on the first "
                                  "down-cycle of each solve")
    exact_last_epochs: int = _opt(0, "train the last N epochs with the exact serial "
                                  "recurrence (with propagator = mgrit)")
    grad_check_every: int = _opt(0, "every N epochs compare the MGRIT gradient of a fixed "
                                 "probe batch with the exact one (0: off)")
    # output
    out: str | None = _opt(None, "run folder (default: runs/<timestamp>-<cell>)",
                           kind="str")
    eval_every: int = _opt(1, "evaluate on the test set every N epochs (and "
                           "after the last)")
    checkpoint_every: int = _opt(1, "write checkpoint.pt every N epochs (and "
                                 "after the last)")
    trace: bool = _opt(False, "write each rank's timeline of the first trace_batches "
                       "batches of the run's first epoch to trace/ in the run folder "
                       "(Chrome trace / Perfetto JSON, docs/usage.md)")
    trace_batches: int = _opt(4, "batches recorded by --trace")
    progress: str = _opt("auto", "progress bar over batches (auto: when stderr "
                         "is a terminal)", choices=PROGRESS)
    # reliability (docs/reliability.md)
    checkpoint_seconds: float = _opt(0.0, "also write a checkpoint inside an epoch when this "
                                     "many seconds have passed since the last one (0: off)")
    checkpoint_batches: int = _opt(0, "also write a checkpoint inside an epoch every N "
                                   "batches (0: off)")
    sync_batches: int = _opt(0, "batches between the points inside an epoch where a run may "
                             "stop or checkpoint (0: 1 for sequential; for the strategies "
                             "with workers, whose pipeline drains there, workers x max(16, "
                             "ceil(2**17 / (batch_size x padded length))))")
    stop_signal: str = _opt("USR2", "signal that, like SIGTERM, makes the run checkpoint at "
                            "the next batch and exit with code 75 (not USR1: MPICH takes "
                            "it)", choices=STOP_SIGNALS)
    on_divergence: str = _opt("stop", "a non-finite loss, gradient or MGRIT residual: stop "
                              "the run (exit code 3) or skip the batch (counted in "
                              "metrics.json)", choices=DIVERGENCE)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        for name in ("relax", "bwd_relax"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) > self.levels:
                raise InputError(
                    f"option {name} ({flag(name)}): {len(value)} entries for "
                    f"levels = {self.levels} (at most one per level; the last one repeats)")

    def to_dict(self) -> dict[str, Any]:
        """The options as plain TOML/JSON-able values (``None`` left out,
        tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_POSITIVE = {"hidden", "layers", "epochs", "batch_size", "workers", "threads", "levels",
             "time_ranks", "max_train", "max_test", "max_len", "eval_every",
             "checkpoint_every", "fwd_iters", "bwd_iters", "trace_batches"}


_NON_NEGATIVE = {"exact_last_epochs", "grad_check_every", "checkpoint_batches",
                 "sync_batches"}


#: Integers are 64-bit signed, as in TOML (config.toml is written back).
INT_MAX = 2 ** 63 - 1

#: Upper bounds of options beyond INT_MAX, independent of the machine (the
#: machine's limits, cores and memory, are checked by
#: :func:`mgrit_gru.limits.check_resources` once the data are loaded).
_INT_UPPER = {"threads": 65536, "workers": 65536, "layers": 1024}


def flag(name: str) -> str:
    """The CLI flag of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (one line, whatever the value)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _show_path(path: Path) -> str:
    text = str(path)
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= 300 else text[:300] + "..."


def _check(f: dataclasses.Field, value: Any) -> Any:
    """Validate (and normalise) one option value; InputError naming it."""
    name, meta = f.name, f.metadata
    kind, choices = meta["kind"], meta["choices"]
    where = f"option {name} ({flag(name)})"
    if value is None:
        if f.default is None:
            return None
        raise InputError(f"{where}: a value is required")
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {_short(value)}")
        if abs(value) > INT_MAX:
            raise InputError(f"{where}: {_short(value)} is out of the 64-bit integer range "
                             f"(at most {INT_MAX})")
        if value > _INT_UPPER.get(name, INT_MAX):
            raise InputError(f"{where}: must be at most {_INT_UPPER[name]}, got {value}")
        if name in _POSITIVE and value < 1:
            raise InputError(f"{where}: must be at least 1, got {value}")
        if name in _NON_NEGATIVE and value < 0:
            raise InputError(f"{where}: must be >= 0, got {value}")
        if name == "seed" and value < 0:
            raise InputError(f"{where}: must be >= 0, got {value}")
        if name == "cfactor" and value < 2:
            raise InputError(f"{where}: must be at least 2, got {value}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {_short(value)}")
        if isinstance(value, int) and abs(value) > INT_MAX:
            raise InputError(f"{where}: {_short(value)} is out of range (a 64-bit integer "
                             "or a float is expected)")
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"{where}: must be finite, got {value}")
        if name == "lr" and value <= 0:
            raise InputError(f"{where}: must be > 0, got {value}")
        if value < 0:
            raise InputError(f"{where}: must be >= 0, got {value}")
        return value
    if kind == "relax":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(
                isinstance(v, str) for v in items):
            raise InputError(f"{where}: expected F, FCF or a list of them, "
                             f"got {_short(value)}")
        items = tuple(v.strip().upper() for v in items)
        bad = [v for v in items if v not in RELAXATIONS]
        if bad:
            raise InputError(f"{where}: unknown relaxation {_short(bad[0])} "
                             f"(choose from {', '.join(RELAXATIONS)})")
        return items[0] if len(items) == 1 else items
    # str
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected a non-empty string, got {_short(value)}")
    if "\0" in value:
        raise InputError(f"{where}: must not contain a NUL character, got {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: an argument that was not UTF-8
        raise InputError(f"{where}: not valid UTF-8 text, got {_short(value)}") from None
    if choices is not None and value not in choices:
        raise InputError(f"{where}: unknown value {_short(value)} "
                         f"(choose from {', '.join(choices)})")
    return value


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))

#: Largest config file read (a flat table of a few dozen options is ~2 kB).
MAX_CONFIG_BYTES = 1_000_000


def load_config(toml_path: str | Path) -> dict[str, Any]:
    """Read a flat TOML config file into a dict of options.

    Unreadable files, unknown keys and bad values raise InputError naming the
    file and the key (checks across options happen when the
    :class:`TrainConfig` is built).
    """
    path = Path(toml_path)
    where = f"config file {_show_path(path)}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{where}: not found") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e.strerror or e})") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(f"{where}: not a valid path") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(f"{where}: larger than {MAX_CONFIG_BYTES // 1000} kB; is it a config file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); TOML files are UTF-8") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{where}: invalid TOML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{where}: invalid TOML (arrays or tables nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise InputError(f"{where}: invalid TOML ({str(e).splitlines()[0][:200]})") from None
    unknown = sorted(set(table) - set(OPTION_NAMES))
    if unknown:
        raise InputError(f"{where}: unknown key {_short(unknown[0])} "
                         f"(see docs/usage.md for the options)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    try:
        return {name: _check(fields[name], value) for name, value in table.items()}
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def make_config(*sources: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from defaults overridden by ``sources`` in order
    (e.g. ``make_config(load_config(path), cli_options)``)."""
    merged: dict[str, Any] = {}
    for source in sources:
        unknown = sorted(set(source) - set(OPTION_NAMES))
        if unknown:
            raise InputError(f"unknown option {unknown[0]!r}")
        merged.update(source)
    return TrainConfig(**merged)
