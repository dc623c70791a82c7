"""Work model: at which number of time ranks P does MGRIT overtake the serial loop?

Everything the model uses is measured here, on one process:

* the solver's own step counters (fine + intermediate levels vs the coarsest
  level, forward and adjoint) for one batch; they are the same for every P
  (tests/test_mgrit.py checks that the total work does not depend on P);
* the seconds of one MGRIT batch at P = 1, split into forward solve, adjoint
  solve and the rest (parameter gradients, projections, head);
* the seconds of one serial batch (hand-written VJP propagator);
* the MPI message latency, from a ping-pong at P = 2 (``--latency``; default
  measured by ``benchmarks/bench_mgrit.py``'s environment is not needed: 30 us).

Model for P ranks: work proportional to the points a rank owns divides by P;
the coarsest level is a sequential sweep through all ranks, so its steps do
not; each sequential sweep and each relaxation adds a message latency per
rank boundary on its critical path:

    T(P) = (T_fwd (1 - c_f) + T_bwd (1 - c_b) + T_rest) / P
           + T_fwd c_f + T_bwd c_b + n_sweeps * P * latency

with ``c_f``, ``c_b`` the coarsest-level share of the forward / adjoint steps.

    python benchmarks/work_model.py --length 1024 --out benchmarks/results/work_model.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mgrit_gru.models import MGRITOptions, MGRITPropagator
from mgrit_gru.models import SequenceClassifier, SerialPropagator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--cfactor", type=int, default=4)
    p.add_argument("--fwd-iters", type=int, default=2)
    p.add_argument("--bwd-iters", type=int, default=1)
    p.add_argument("--relax", default="F,FCF")
    p.add_argument("--skip-first-relax", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency", type=float, default=30e-6, help="seconds per message")
    p.add_argument("--max-p", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/work_model.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    N, B = args.length, args.batch
    x = torch.randn(B, N, 9)
    y = torch.randint(0, 6, (B,))
    model = SequenceClassifier("implicit-gru", 9, args.hidden, 6)
    relax = tuple(args.relax.split(",")) if "," in args.relax else args.relax
    opts = MGRITOptions(levels=args.levels, cfactor=args.cfactor, fwd_iters=args.fwd_iters,
                        bwd_iters=args.bwd_iters, relax=relax, skip_first_relax=args.skip_first_relax)
    mgrit = MGRITPropagator(None, opts)
    serial = SerialPropagator()

    def batch(prop):
        model.propagator = prop
        model.zero_grad()
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t0

    batch(serial), batch(mgrit)   # warm-up
    t_ser, t_mg, t_f, t_b = [], [], [], []
    for _ in range(args.repeats):   # interleaved
        t_ser.append(batch(serial))
        t_mg.append(batch(mgrit))
        t_f.append(mgrit.last_info["fwd"].seconds)
        t_b.append(mgrit.last_info["bwd"].seconds)
    T_ser, T_mg = statistics.median(t_ser), statistics.median(t_mg)
    T_fwd, T_bwd = statistics.median(t_f), statistics.median(t_b)
    T_rest = max(T_mg - T_fwd - T_bwd, 0.0)
    fwd_steps = mgrit.last_info["fwd"].steps
    bwd_steps = mgrit.last_info["bwd"].steps
    c_f = fwd_steps[-1] / sum(fwd_steps)
    c_b = bwd_steps[-1] / max(sum(bwd_steps), 1)
    L = len(fwd_steps)
    # sequential sweeps per solve: coarsest solves (one per coarse correction) + relaxations
    n_sweeps = (opts.fwd_iters + opts.bwd_iters) * (1 + 2 * L)

    def model_T(P):
        return ((T_fwd * (1 - c_f) + T_bwd * (1 - c_b) + T_rest) / P
                + T_fwd * c_f + T_bwd * c_b + n_sweeps * P * args.latency)

    table = {P: model_T(P) for P in [1, 2, 4, 8, 16, 32, 64, 128, 256] if P <= min(args.max_p, N)}
    crossover = next((P for P in range(1, min(args.max_p, N) + 1) if model_T(P) < T_ser), None)
    best_P = min(range(1, min(args.max_p, N) + 1), key=model_T)
    out = {
        "config": vars(args),
        "measured": {"serial_batch_s": T_ser, "mgrit_p1_batch_s": T_mg, "mgrit_p1_fwd_s": T_fwd,
                     "mgrit_p1_bwd_s": T_bwd, "mgrit_p1_rest_s": T_rest,
                     "serial_samples": t_ser, "mgrit_samples": t_mg},
        "steps": {"fwd_per_level": fwd_steps, "bwd_per_level": bwd_steps,
                  "serial_fwd": N, "serial_bwd": N,
                  "fwd_work_over_serial": sum(fwd_steps) / N, "bwd_work_over_serial": sum(bwd_steps) / N,
                  "coarsest_share_fwd": c_f, "coarsest_share_bwd": c_b},
        "model_seconds_per_batch": table,
        "model_speedup_over_serial": {P: T_ser / t for P, t in table.items()},
        "crossover_P": crossover,
        "best_P": best_P,
        "best_speedup": T_ser / model_T(best_P),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("measured", "steps", "model_speedup_over_serial",
                                          "crossover_P", "best_P", "best_speedup")}, indent=1))


if __name__ == "__main__":
    main()
