"""The command line: ``mgrit-gru train|datasets|info`` (also ``python -m mgrit_gru``).

Every :class:`~mgrit_gru.training.config.TrainConfig` option is a ``train`` flag
(``batch_size`` -> ``--batch-size``), built from the dataclass fields so that
the two never drift apart. Options merge as defaults < ``--config FILE.toml``
< flags. Bad input ends with ``mgrit-gru: error: <message>`` on stderr and
exit code 2, without a traceback; under MPI any exception on any rank ends
the whole job (:func:`~mgrit_gru.core.comm.abort_on_exception`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from mgrit_gru.training.config import TrainConfig, flag, load_config, make_config
from mgrit_gru.errors import (EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_STOPPED, Diverged,
                              InputError, Stopped)

PROG = "mgrit-gru"

_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _launcher_rank() -> int:
    """This process's rank as the MPI launcher announces it (0 without one);
    read from the environment so that messages before MPI starts are printed
    once per job, not once per rank."""
    for var in _LAUNCHER_RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _error(message: str) -> int:
    """Print ``mgrit-gru: error: <message>`` (first line only) on rank 0; return 2."""
    if _launcher_rank() == 0:
        line = str(message).strip().splitlines()[0] if str(message).strip() else "error"
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``mgrit-gru: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


_TYPES = {"int": int, "float": float, "str": str, "relax": str}


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    """One flag for one TrainConfig field (defaults stay out of the namespace
    so that only given flags override the TOML file)."""
    meta = f.metadata
    help_text = meta["help"]
    if meta["choices"]:
        help_text += f" ({'|'.join(meta['choices'])})"
    if f.default is not None:
        help_text += f"; default {f.default}"
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if meta["kind"] == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _TYPES[meta["kind"]]
        kwargs["metavar"] = f.name.upper()
    group.add_argument(flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``mgrit-gru`` parser with its ``train``, ``datasets`` and ``info`` commands."""
    parser = _Parser(prog=PROG, description="Parallel-in-time (MGRIT) training of "
                     "recurrent sequence classifiers on MPI.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    train = commands.add_parser("train", help="train a sequence classifier",
                                description="Train a sequence classifier; options merge as "
                                "defaults < --config FILE.toml < flags (see docs/usage.md).")
    train.add_argument("--config", metavar="FILE.toml", help="TOML file of options")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from "
                       "its checkpoint (its config.toml is the base of the options)")
    start.add_argument("--resume-or-start", metavar="RUN_DIR", help="resume the run in "
                       "RUN_DIR if it has a checkpoint, else start it there (for requeued "
                       "and re-submitted jobs; see docs/reliability.md)")
    options = train.add_argument_group("training options")
    for f in dataclasses.fields(TrainConfig):
        _add_option(options, f)
    commands.add_parser("datasets", help="list the built-in data sets")
    info = commands.add_parser("info", help="print the final metrics of a run")
    info.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _has_checkpoint(folder: str) -> bool:
    """True if ``folder`` holds a checkpoint to resume from (the current or the
    previous one)."""
    return any((Path(folder) / name).is_file() for name in ("checkpoint.pt", "checkpoint.prev.pt"))


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < resumed run's config.toml < --config < flags."""
    sources = []
    if args.resume_or_start:
        if _has_checkpoint(args.resume_or_start):
            args.resume = args.resume_or_start
        else:
            flags_out = getattr(args, "out", None)
            if flags_out is not None and Path(flags_out) != Path(args.resume_or_start):
                raise InputError(f"--out {flags_out}: differs from --resume-or-start "
                                 f"{args.resume_or_start}")
            args.out = args.resume_or_start
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    if args.resume:
        run_config = Path(args.resume) / "config.toml"
        if not run_config.is_file():
            raise InputError(f"--resume {args.resume}: no config.toml in this folder")
        sources.append(load_config(run_config))
        if "out" in flags and Path(flags["out"]) != Path(args.resume):
            raise InputError(f"--out {flags['out']}: differs from --resume {args.resume}")
        flags["out"] = args.resume
    if args.config:
        sources.append(load_config(args.config))
    sources.append(flags)
    return make_config(*sources)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    from mgrit_gru.training.signals import StopSignals

    # The stop signals are caught from here to the end of the process: one
    # that arrives while torch and MPI start is acted on at the first
    # synchronisation point, one after the last is ignored (the run is done).
    with StopSignals(config.stop_signal, after="ignore" if args.process else "restore") as stop:
        return _train_command(args, config, stop)


def _train_command(args: argparse.Namespace, config: TrainConfig, stop) -> int:
    # Imported here: torch and MPI start only for commands that need them.
    from mgrit_gru.core.comm import Comm, abort_on_exception
    from mgrit_gru.training.loop import train

    comm = Comm.world()
    try:
        with abort_on_exception(comm, prog=PROG):
            train(config, comm, resume=bool(args.resume), stop=stop)
    except Stopped:         # raised on every rank after the checkpoint: logged by rank 0
        return EXIT_STOPPED
    except Diverged as e:   # raised on every rank
        _error(f"diverged: {e}")
        return EXIT_DIVERGED
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from mgrit_gru.data import DEFAULT_DATASET, builtin_datasets, load_dataset

    print(f"{'name':<28} {'train':>6} {'test':>6} {'T':>6} {'d':>4} {'classes':>7}")
    for name in builtin_datasets():
        ds = load_dataset(name)
        mark = "  (default)" if name == DEFAULT_DATASET else ""
        print(f"{name:<28} {len(ds.train):>6} {len(ds.test):>6} {ds.seq_len:>6} "
              f"{ds.input_size:>4} {ds.num_classes:>7}{mark}")
    print("synthetic:LEN                (generated: the long-memory pulse task of length LEN)")
    return 0


_TEST_METRICS = ("test_accuracy", "test_f1", "test_loss", "test_precision", "test_recall")
_SOLVER_STATS = ("fwd_iters", "bwd_iters", "fwd_residual", "bwd_residual")
_SOLVER_SUMS = ("fwd_steps", "bwd_steps", "serial_batches")
_GRAD_CHECK = ("grad_cosine", "grad_rel_error")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _info_lines(metrics: dict) -> list[str]:
    """The lines of ``mgrit-gru info`` below its header: the test metrics
    (exact and, with mgrit, inexact), the solver statistics and the gradient
    check of the last epoch, then the other fields of ``final``."""
    final = dict(metrics["final"])
    lines, shown = [], set()
    inference = final.get("inference")
    if inference == "exact":
        lines.append("  test metrics: exact inference (the serial recurrence)"
                     + ("; inexact: under the training forward (mgrit)"
                        if "test_accuracy_inexact" in final else ""))
    elif any(k in final for k in _TEST_METRICS):
        lines.append("  test metrics: under the training propagator "
                     f"({metrics.get('config', {}).get('propagator', '?')})")
    has_inexact = any(f"{k}_inexact" in final for k in _TEST_METRICS)
    if any(k in final for k in _TEST_METRICS):
        lines.append(f"    {'':<20} {'exact' if inference == 'exact' else 'value':>12}"
                     + (f" {'inexact':>12}" if has_inexact else ""))
    for key in _TEST_METRICS:
        if key in final:
            line = f"    {key:<20} {_fmt(final[key]):>12}"
            if has_inexact:
                line += f" {_fmt(final.get(f'{key}_inexact')):>12}"
            lines.append(line)
            shown |= {key, f"{key}_inexact"}
    if any(k in final for k in _SOLVER_STATS + _SOLVER_SUMS):
        shown |= {*_SOLVER_STATS, *_SOLVER_SUMS, *(f"{k}_max" for k in _SOLVER_STATS)}
        # the last epoch trained with mgrit (the last ones may be serial: exact_last_epochs)
        solved = [e for e in metrics.get("epochs", []) if e.get("fwd_iters") is not None]
        stats = final if final.get("fwd_iters") is not None or not solved else solved[-1]
        lines.append(f"  MGRIT solver, epoch {stats.get('epoch', '?')} (per batch)"
                     + (f"; epochs {solved[-1]['epoch'] + 1}-{final['epoch']} trained serially"
                        if stats is not final else ""))
        lines.append(f"    {'':<20} {'mean':>12} {'max':>12}")
        for key in _SOLVER_STATS:
            if key in stats:
                lines.append(f"    {key:<20} {_fmt(stats[key]):>12} "
                             f"{_fmt(stats.get(f'{key}_max')):>12}")
        for key in _SOLVER_SUMS:
            if key in stats:
                lines.append(f"    {key:<20} {_fmt(stats[key]):>12}"
                             + ("  (sum)" if key == "serial_batches" else ""))
    if any(k in final for k in _GRAD_CHECK):
        lines.append("  gradient check (probe batch, mgrit vs exact)")
        for key in _GRAD_CHECK + ("grad_check_seconds",):
            if key in final:
                lines.append(f"    {key:<20} {_fmt(final[key]):>12}")
                shown.add(key)
    for key, value in final.items():
        if key not in shown:
            lines.append(f"  {key:<22} {_fmt(value)}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.run_dir) / "metrics.json"
    try:
        with open(path) as fh:
            metrics = json.load(fh)
        final = metrics["final"]
        lines = _info_lines(metrics)
    except FileNotFoundError:
        raise InputError(f"{path}: not found (is {args.run_dir} a run folder?)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: unreadable metrics ({type(e).__name__})") from None
    config = metrics.get("config", {})
    print(f"run {args.run_dir}: data {config.get('data')}, cell {config.get('cell')}, "
          f"propagator {config.get('propagator')}, {len(metrics.get('epochs', []))} epochs"
          + (f", last epoch {final['epoch']}" if "epoch" in final else ""))
    print("\n".join(lines))
    return 0


_COMMANDS = {"train": _cmd_train, "datasets": _cmd_datasets, "info": _cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); the exit code.

    Without ``argv`` this is the program (the process ends after it): the
    stop signals of ``train`` then stay ignored after the run. With ``argv``
    (a caller in the same process) the previous handlers come back."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    args.process = argv is None
    try:
        return _COMMANDS[args.command](args)
    except InputError as e:  # one process: the guard let it through
        return _error(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
