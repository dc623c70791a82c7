"""Serial training epoch: our implicit GRU vs torch.nn.GRU on the default data.

One epoch = every training minibatch once: forward, cross-entropy, backward,
Adam step; same data, batch size, hidden size and optimizer for both, last
hidden state into a linear head, one torch thread.  The two variants are
timed interleaved (A B A B ...), ``--repeats`` epochs each after one warm-up
epoch; the JSON holds every sample, the medians and their ratio, and the
share of the machine other processes used meanwhile (/proc/stat).

    python benchmarks/bench_epoch.py --out benchmarks/results/epoch.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mgrit_gru.data import DEFAULT_DATASET, load_dataset
from mgrit_gru.models import SequenceClassifier


def _busy():
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


class TorchGRU(torch.nn.Module):
    def __init__(self, d, h, c):
        super().__init__()
        self.gru = torch.nn.GRU(d, h, batch_first=True)
        self.head = torch.nn.Linear(h, c)

    def forward(self, x, lengths=None):
        _, hn = self.gru(x)
        return self.head(hn[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATASET)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/epoch.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset(args.data)
    x = torch.from_numpy(ds.train.x)
    y = torch.from_numpy(ds.train.y)
    D, C = x.shape[2], ds.num_classes
    torch.manual_seed(0)
    models = {"implicit_gru_serial": SequenceClassifier("implicit-gru", D, args.hidden, C),
              "torch_nn_gru": TorchGRU(D, args.hidden, C)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    order = np.random.default_rng(0).permutation(len(y))

    def epoch(name):
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        for s in range(0, len(order), args.batch_size):
            idx = torch.from_numpy(order[s:s + args.batch_size])
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        return time.perf_counter() - t0

    for name in models:
        epoch(name)   # warm-up
    samples = {k: [] for k in models}
    b0, t0 = _busy()
    for _ in range(args.repeats):
        for name in models:
            samples[name].append(epoch(name))
    b1, t1 = _busy()
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratios = [a / b for a, b in zip(samples["implicit_gru_serial"], samples["torch_nn_gru"])]
    busy = (b1 - b0) / max(t1 - t0, 1)
    out = {"config": vars(args), "data": {"name": ds.name, "n_train": len(y), "length": x.shape[1]},
           "samples": samples, "median_seconds": med,
           "ratio_implicit_over_nngru": statistics.median(ratios),
           "machine_busy_fraction": busy,
           "load_warning": busy > 1.25 / (os.cpu_count() or 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("data", "median_seconds", "ratio_implicit_over_nngru",
                                          "machine_busy_fraction")}, indent=1))


if __name__ == "__main__":
    main()
