"""Gradient quality of MGRIT settings at the weights of a trained run.

    python drivers/gradient_quality.py RUN_DIR [--batch 32] [--out FILE.json]

Loads ``RUN_DIR/checkpoint.pt`` (any propagator), takes the first ``--batch``
training sequences of the run's data, and compares the parameter gradient of
each MGRIT setting below (P = 1: results do not depend on P) with the exact
one of the serial propagator: cosine, relative error ||g - g*|| / ||g*||, the
final forward / backward residuals and the solver steps of the batch. The
figures in docs/mgrit.md ("New defaults") come from this script at the
checkpoints of ``mgrit-gru train --out runs/serial`` (serially trained
weights) and of ``mpiexec -n 2 mgrit-gru train --propagator mgrit --out
runs/mgrit`` (weights trained by MGRIT), default data, seed 0.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from mgrit_gru.models import MGRITOptions, MGRITPropagator
from mgrit_gru.training.config import make_config
from mgrit_gru.data import DEFAULT_DATASET, load_dataset
from mgrit_gru.models import SerialPropagator
from mgrit_gru.training.setup import build_model
from mgrit_gru.training.update import TensorSplit

OLD = dict(relax=("F", "FCF"))
NEW = dict(nested=True, relax="FCF")
SETTINGS = {
    "old 2/1": OLD,
    "old 3/1": dict(OLD, fwd_iters=3),
    "old 2/2": dict(OLD, bwd_iters=2),
    "old 2/1 FCF": dict(relax="FCF"),
    "old 2/1 coarse mean": dict(OLD, coarse_input="mean"),
    "exact fwd / 1 bwd": dict(OLD, fwd_iters=40, fwd_tol=1e-6),
    "2 fwd / exact bwd": dict(OLD, bwd_iters=40, bwd_tol=1e-9),
    "nested 2/1": dict(OLD, nested=True),
    "nested 3/1": dict(OLD, nested=True, fwd_iters=3),
    "nested FCF 2/1 (new defaults)": NEW,
    "nested FCF 2/1, adjoint cold": dict(NEW, bwd_nested=False),
    "nested FCF, F adjoint": dict(NEW, bwd_relax="F"),
    "nested FCF 2/1, 2 levels": dict(NEW, levels=2),
    "nested FCF 2/2, 2 levels": dict(NEW, levels=2, bwd_iters=2),
    "nested FCF 2/1, cfactor 8": dict(NEW, cfactor=8),
    "nested F-cycle 2/1, 4 levels": dict(OLD, nested=True, cycle="F", levels=4),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run folder with checkpoint.pt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    state = torch.load(f"{args.run}/checkpoint.pt", weights_only=True)
    options = {k: v for k, v in state["config"].items() if k != "time_ranks"}
    config = make_config(dict(options, propagator="serial"))
    data = load_dataset(DEFAULT_DATASET if config.data == "default" else config.data,
                        max_train=config.max_train, max_test=config.max_test,
                        max_len=config.max_len)
    model = build_model(config, data)
    model.load_state_dict(state["model"])
    x, y, lengths = TensorSplit(data.train, getattr(torch, config.dtype)).take(
        slice(0, args.batch))

    def gradient(prop):
        model.propagator = prop
        model.zero_grad()
        F.cross_entropy(model(x, lengths), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    exact = gradient(SerialPropagator())
    rows = []
    print(f"{'setting':32s} {'cosine':>8s} {'rel.err':>8s} {'fwd res':>9s} {'bwd res':>9s} steps")
    for name, kw in SETTINGS.items():
        prop = MGRITPropagator(None, MGRITOptions(**kw), log=lambda line: None)
        g = gradient(prop)
        st = prop.last_stats
        row = {"setting": name, "options": {k: list(v) if isinstance(v, tuple) else v
                                            for k, v in kw.items()},
               "cosine": float(g @ exact / (g.norm() * exact.norm())),
               "rel_error": float((g - exact).norm() / exact.norm()),
               "fwd_residual": st["fwd_residual"], "bwd_residual": st["bwd_residual"],
               "fwd_steps": st["fwd_steps"], "bwd_steps": st["bwd_steps"]}
        rows.append(row)
        print(f"{name:32s} {row['cosine']:8.4f} {row['rel_error']:8.3f} {row['fwd_residual']:9.2e} "
              f"{row['bwd_residual']:9.2e} {row['fwd_steps']:.0f}+{row['bwd_steps']:.0f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"run": args.run, "epoch": state.get("epoch"), "batch": args.batch,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
