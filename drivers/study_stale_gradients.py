"""Stale-gradient strategies with few updates per epoch: the default data set.

    python drivers/study_stale_gradients.py [--seeds 0,1,2] [--epochs 20]

The bundled default data (FreezerRegularTrain: 150 training sequences) gives
``ceil(150 / 32) = 5`` minibatches per epoch. Averaging with K = 2 makes half
as many updates (3 per epoch); Hogwild makes 5, but with K = 2 every
gradient is one update old, and with 5 updates in an epoch that is a large
share of the run. This study trains ``mgrit-gru train``'s defaults
(implicit GRU, hidden 32, Adam lr 0.01, batch 32, 20 epochs) with each
strategy and with the two usual remedies, over several seeds (the default
data's accuracy varies by ~0.1 from seed to seed even for the sequential
run):

* a larger learning rate for averaging (``lr x K``: the averaged gradient of
  K minibatches is one step where the sequential run takes K);
* a smaller batch (``batch_size / K``): averaging then updates as often as
  the sequential run with ``batch_size`` does, each update the mean over
  ``batch_size`` sequences; Hogwild gets twice the updates;
* more epochs (``epochs x K``: as many updates as the sequential run).

Every run goes through :func:`mgrit_gru.training.loop.train` (worker
processes, the default backend), with the test set evaluated after the last
epoch only. Writes ``drivers/results/stale_gradients.json`` and prints a
markdown table (mean and per-seed test accuracy, updates per epoch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrit_gru.core.comm import Comm  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.training.loop import train  # noqa: E402

#: (label, options) of each variant; ``K`` is replaced by --workers.
VARIANTS = [
    ("sequential", dict(strategy="sequential")),
    ("mutex", dict(strategy="mutex", workers="K")),
    ("averaging", dict(strategy="averaging", workers="K")),
    ("averaging, lr x K", dict(strategy="averaging", workers="K", lr="xK")),
    ("averaging, batch / K", dict(strategy="averaging", workers="K", batch_size="/K")),
    ("averaging, epochs x K", dict(strategy="averaging", workers="K", epochs="xK")),
    ("hogwild", dict(strategy="hogwild", workers="K")),
    ("hogwild, batch / K", dict(strategy="hogwild", workers="K", batch_size="/K")),
    ("hogwild, lr / K", dict(strategy="hogwild", workers="K", lr="/K")),
]


def options(spec: dict, args) -> dict:
    out = dict(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs)
    for key, value in spec.items():
        if value == "K":
            value = args.workers
        elif value == "xK":
            value = out[key] * args.workers
        elif value == "/K":
            value = out[key] / args.workers if key == "lr" else max(1, out[key] // args.workers)
        out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="default")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))),
                   help="indices into VARIANTS")
    p.add_argument("--out", default=str(ROOT / "drivers" / "results" / "stale_gradients.json"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")]
    rows = []
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in chosen:
            opts = options(spec, args)
            accs, f1s, updates = [], [], None
            for seed in seeds:
                config = make_config(dict(data=args.data, seed=seed, threads=1,
                                          progress="off", eval_every=opts["epochs"],
                                          out=f"{tmp}/{len(rows)}-{seed}", **opts))
                m = train(config, Comm.serial())
                accs.append(m["final"]["test_accuracy"])
                f1s.append(m["final"]["test_f1"])
                updates = m["epochs"][-1]["updates"]
            rows.append({"variant": label, "options": opts, "seeds": seeds,
                         "test_accuracy": accs, "test_f1": f1s,
                         "mean_accuracy": statistics.mean(accs),
                         "updates_per_epoch": updates,
                         "total_updates": updates * opts["epochs"]})
            print(f"{label:24s} acc {statistics.mean(accs):.3f} "
                  f"({' / '.join(f'{a:.3f}' for a in accs)})  updates/epoch {updates}",
                  flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    lines = [f"| variant (K = {args.workers}) | lr | batch | epochs | updates/epoch | "
             f"updates | test accuracy, mean (seeds {', '.join(map(str, seeds))}) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o = r["options"]
        lines.append(f"| {r['variant']} | {o['lr']:g} | {o['batch_size']} | {o['epochs']} | "
                     f"{r['updates_per_epoch']} | {r['total_updates']} | "
                     f"{r['mean_accuracy']:.3f} ({' / '.join(f'{a:.3f}' for a in r['test_accuracy'])}) |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "options": vars(args),
                                          "rows": rows, "table": table,
                                          "seconds": time.perf_counter() - tic}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
