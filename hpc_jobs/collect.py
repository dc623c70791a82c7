#!/usr/bin/env python3
"""Gather the metrics of many run folders into one table (CSV and/or JSON).

    python hpc_jobs/collect.py runs/scaling [more folders] [--csv FILE] [--json FILE]

Every folder given is a run folder (it holds ``metrics.json``) or is searched
for run folders at any depth. One row per run, from its ``metrics.json`` (the
layout of docs/usage.md): the options that tell runs of a sweep apart, the
ranks (time ranks x data groups) and threads, and the final figures (training
time, accuracy, MGRIT iterations and residuals). Without ``--csv`` or
``--json`` the CSV goes to standard output. Folders that look like runs but
hold no readable ``metrics.json`` (a job that failed before its first epoch)
are reported on standard error and left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from mgrit_gru.errors import InputError

#: Columns taken from ``metrics["config"]``.
CONFIG_COLUMNS = ("data", "cell", "hidden", "propagator", "strategy", "workers",
                  "batch_size", "levels", "cfactor", "relax", "cycle")
#: Columns taken from ``metrics["environment"]``.
ENV_COLUMNS = ("ranks", "time_ranks", "data_groups", "threads")
#: Columns taken from ``metrics["final"]`` (the last epoch, plus train_seconds).
FINAL_COLUMNS = ("train_seconds", "train_loss", "test_loss", "test_accuracy", "test_f1",
                 "fwd_iters", "bwd_iters", "fwd_residual", "bwd_residual")
#: Every column, in order. ``epochs`` counts the epochs done; ``complete`` says
#: whether that is all the run asked for; ``seconds_per_epoch`` is
#: ``train_seconds / epochs``.
COLUMNS = ("run", *CONFIG_COLUMNS, *ENV_COLUMNS, "epochs", "complete",
           "seconds_per_epoch", *FINAL_COLUMNS, "hostname")

_RUN_MARKERS = ("config.toml", "log.txt", "checkpoint.pt")
_SORT_KEYS = ("data", "propagator", "cell", "hidden", "ranks", "time_ranks", "run")


def find_runs(folders: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """``(runs, broken)``: the folders holding a ``metrics.json``, and those
    that hold other run files but no ``metrics.json``, in sorted order."""
    runs: set[Path] = set()
    candidates: set[Path] = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder")
        runs.update(p.parent for p in folder.rglob("metrics.json"))
        for marker in _RUN_MARKERS:
            candidates.update(p.parent for p in folder.rglob(marker))
        if (folder / "metrics.json").is_file():
            runs.add(folder)
    return sorted(runs), sorted(candidates - runs)


def row_of(run: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """One table row from a run's metrics (missing fields are ``None``)."""
    config = metrics.get("config") or {}
    env = metrics.get("environment") or {}
    final = metrics.get("final") or {}
    epochs = len(metrics.get("epochs") or [])
    row: dict[str, Any] = {"run": str(run)}
    for key in CONFIG_COLUMNS:
        value = config.get(key)
        row[key] = ",".join(value) if isinstance(value, list) else value
    for key in ENV_COLUMNS:
        row[key] = env.get(key)
    row["epochs"] = epochs
    wanted = config.get("epochs")
    row["complete"] = None if wanted is None else epochs >= wanted
    seconds = final.get("train_seconds")
    row["seconds_per_epoch"] = seconds / epochs if seconds is not None and epochs else None
    for key in FINAL_COLUMNS:
        row[key] = final.get(key)
    row["hostname"] = env.get("hostname")
    return row


def _sort_key(row: dict[str, Any]) -> tuple:
    # None sorts last; numbers and strings never meet in one column.
    return tuple((row[k] is None, row[k] if row[k] is not None else 0) for k in _SORT_KEYS)


def collect(folders: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, problems)``: a sorted table row per readable run, and one
    message per folder that looks like a run but gave none."""
    runs, broken = find_runs(folders)
    rows, problems = [], [f"{b}: no metrics.json (the run ended before its first epoch?)"
                          for b in broken]
    for run in runs:
        path = run / "metrics.json"
        try:
            with open(path) as fh:
                metrics = json.load(fh)
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            rows.append(row_of(run, metrics))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            problems.append(f"{path}: unreadable ({type(e).__name__}: {e})".splitlines()[0])
    rows.sort(key=_sort_key)
    return rows, problems


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The table as CSV text (a header line, then one line per row; ``None``
    as an empty field)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the table; 0 if at least one run was found."""
    parser = argparse.ArgumentParser(prog="collect.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="a run folder, or a folder of run folders (e.g. runs/scaling)")
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the table as a JSON list of rows")
    args = parser.parse_args(argv)
    try:
        rows, problems = collect(args.folders)
        if not rows:
            raise InputError(f"{', '.join(args.folders)}: no run folder with a metrics.json")
        for message in problems:
            print(f"collect.py: warning: {message}", file=sys.stderr)
        if args.csv:
            _write(args.csv, to_csv(rows))
        if args.json:
            _write(args.json, json.dumps(rows, indent=2) + "\n")
    except InputError as e:
        print(f"collect.py: error: {e}", file=sys.stderr)
        return 2
    if not args.csv and not args.json:
        sys.stdout.write(to_csv(rows))
    else:
        print(f"{len(rows)} runs -> {', '.join(f for f in (args.csv, args.json) if f)}",
              file=sys.stderr)
    return 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror})") from None


if __name__ == "__main__":
    sys.exit(main())
