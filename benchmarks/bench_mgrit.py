"""Time per batch of MGRIT (1 and 2 ranks) vs the serial implicit GRU vs torch.nn.GRU.

The peer implementation's workload: sequence length 128 and 1024, 9 input
features, 6 classes, hidden 100, batch 100, 3 levels, cfactor 4, 2 forward /
1 backward MGRIT iterations; a batch is forward + loss + backward; 1 torch
thread per rank.

    python benchmarks/bench_mgrit.py run --out benchmarks/results/mgrit.json

The driver runs each variant in its own process (MGRIT under mpiexec),
interleaved (A B C D, A B C D, ...), ``--repeats`` rounds; each process times
``--batches`` batches after a warm-up and reports the median.  The JSON holds
every sample, the medians over rounds, the ratios, the solver's step counts
per level per rank and the forward/backward residual after each iteration,
and the CPU time other processes took during each round (read from
/proc/stat): a round during which the machine was busy is retried.
The work model (docs/performance.md) is fed from the same JSON.

    python benchmarks/bench_mgrit.py worker --kind mgrit --length 1024 ...

is one measurement (what the driver launches).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("serial", "nngru", "mgrit1", "mgrit2")


# --------------------------------------------------------------------------- worker
def workload(args):
    """The benchmark's batch on one thread: ``(comm, x, y, (B, D, H, C, N))``
    (also the traced runs' of replay_validate.py)."""
    import torch

    torch.set_num_threads(1)
    from mgrit_gru.core.comm import Comm

    comm = Comm.world()
    torch.manual_seed(0)
    B, D, H, C, N = args.batch, 9, args.hidden, 6, args.length
    x = torch.randn(B, N, D)
    y = torch.randint(0, C, (B,))
    return comm, x, y, (B, D, H, C, N)


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from mgrit_gru.models import MGRITOptions, MGRITPropagator
    from mgrit_gru.models import SequenceClassifier, SerialPropagator

    comm, x, y, (B, D, H, C, N) = workload(args)
    out = {"kind": args.kind, "length": N, "ranks": comm.size}

    if args.kind == "nngru":
        gru = torch.nn.GRU(D, H, batch_first=True)
        head = torch.nn.Linear(H, C)

        def batch():
            gru.zero_grad()
            head.zero_grad()
            _, hn = gru(x)
            F.cross_entropy(head(hn[0]), y).backward()
    else:
        model = SequenceClassifier("implicit-gru", D, H, C)
        if args.kind == "serial":
            model.propagator = SerialPropagator()
        else:
            relax = tuple(args.relax.split(",")) if "," in args.relax else args.relax
            opts = MGRITOptions(levels=args.levels, cfactor=args.cfactor, fwd_iters=args.fwd_iters,
                                bwd_iters=args.bwd_iters, relax=relax, nested=args.nested,
                                skip_first_relax=args.skip_first_relax,
                                final_residual=not args.no_final_residual)
            model.propagator = MGRITPropagator(comm, opts)

        def batch():
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

    for _ in range(args.warmup):
        batch()
    times = []
    for _ in range(args.batches):
        comm.barrier()
        t0 = time.perf_counter()
        batch()
        comm.barrier()
        times.append(time.perf_counter() - t0)
    out["seconds"] = times
    out["median"] = statistics.median(times)
    if args.kind.startswith("mgrit"):
        info = model.propagator.last_info
        out["fwd_residuals"] = info["fwd"].residuals
        out["bwd_residuals"] = info["bwd"].residuals
        out["fwd_steps_per_rank"] = comm.allgather_object(info["fwd"].steps)
        out["bwd_steps_per_rank"] = comm.allgather_object(info["bwd"].steps)
        out["fwd_seconds_per_rank"] = comm.allgather_object(info["fwd"].seconds)
        out["bwd_seconds_per_rank"] = comm.allgather_object(info["bwd"].seconds)
    if comm.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- driver
def _cpu_times():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def _run_one(kind, length, args):
    py = sys.executable
    cmd = [py, __file__, "worker", "--kind", kind, "--length", str(length),
           "--batches", str(args.batches), "--warmup", str(args.warmup),
           "--hidden", str(args.hidden), "--batch", str(args.batch),
           "--levels", str(args.levels), "--cfactor", str(args.cfactor),
           "--fwd-iters", str(args.fwd_iters), "--bwd-iters", str(args.bwd_iters),
           "--relax", args.relax, "--nested" if args.nested else "--no-nested"] \
        + (["--skip-first-relax"] if args.skip_first_relax else []) \
        + (["--no-final-residual"] if args.no_final_residual else [])
    if kind == "mgrit2":
        mpiexec = str(Path(py).parent / "mpiexec")
        cmd = [mpiexec, "-n", "2"] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="900")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, tot0 = _cpu_times()
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    wall = time.time() - t0
    busy1, tot1 = _cpu_times()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"benchmark worker failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    # CPU time of the whole machine minus that of our own (waited-for) processes:
    # what other processes took meanwhile, as a fraction of the machine
    ncpu = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK")
    ours = (ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime) * hz
    total = max(tot1 - tot0, 1)
    res["machine_busy_fraction"] = (busy1 - busy0) / total
    res["foreign_load"] = max(0.0, (busy1 - busy0 - ours) / total)
    res["wall"] = wall
    return res


def driver(args) -> None:
    results = {"config": vars(args).copy(), "host": platform.node(), "cpus": os.cpu_count(),
               "rounds": {}, "summary": {}}
    results["config"].pop("func", None)
    for length in args.lengths:
        rounds = []
        r = 0
        retries = 0
        while r < args.repeats:
            rnd = {}
            for kind in args.kinds:
                rnd[kind] = _run_one(kind, length, args)
                print(f"L={length} round {r} {kind:7s} median {rnd[kind]['median']:.4f} s "
                      f"(foreign load {rnd[kind]['foreign_load']:.2f})", flush=True)
            noisy = any(v["foreign_load"] > args.max_foreign_load for v in rnd.values())
            if noisy and retries < args.max_retries:
                retries += 1
                print(f"  machine busy during round {r}: retrying ({retries}/{args.max_retries})", flush=True)
                time.sleep(5)
                continue
            rnd["noisy"] = noisy
            rounds.append(rnd)
            r += 1
        med = {k: statistics.median(rd[k]["median"] for rd in rounds) for k in args.kinds}
        # ratios per round (side by side), then the median of the ratios
        def ratio(a, b):
            if a in args.kinds and b in args.kinds:
                return statistics.median(rd[a]["median"] / rd[b]["median"] for rd in rounds)
            return None
        summary = {
            "median_seconds_per_batch": med,
            "serial_over_nngru": ratio("serial", "nngru"),
            "mgrit2_over_serial": ratio("mgrit2", "serial"),
            "mgrit1_over_serial": ratio("mgrit1", "serial"),
            "mgrit2_over_mgrit1": ratio("mgrit2", "mgrit1"),
            "mgrit2_over_nngru": ratio("mgrit2", "nngru"),
            "noisy_rounds": sum(1 for rd in rounds if rd["noisy"]),
        }
        for k in ("mgrit1", "mgrit2"):
            if k in args.kinds:
                last = rounds[-1][k]
                summary[f"{k}_fwd_steps_per_rank"] = last["fwd_steps_per_rank"]
                summary[f"{k}_bwd_steps_per_rank"] = last["bwd_steps_per_rank"]
                summary[f"{k}_fwd_residuals"] = last["fwd_residuals"]
                summary[f"{k}_bwd_residuals"] = last["bwd_residuals"]
        results["rounds"][str(length)] = rounds
        results["summary"][str(length)] = summary
        print(json.dumps({length: summary}, indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "worker"):
        s = sub.add_parser(name)
        s.add_argument("--batches", type=int, default=10)
        s.add_argument("--warmup", type=int, default=2)
        s.add_argument("--hidden", type=int, default=100)
        s.add_argument("--batch", type=int, default=100)
        s.add_argument("--levels", type=int, default=3)
        s.add_argument("--cfactor", type=int, default=4)
        s.add_argument("--fwd-iters", type=int, default=2)
        s.add_argument("--bwd-iters", type=int, default=1)
        # defaults: the training defaults (mgrit_gru/training/config.py, docs/fidelity.md)
        s.add_argument("--relax", default="FCF", help="per level, comma separated")
        s.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                       help="nested iteration (the training default)")
        s.add_argument("--skip-first-relax", action="store_true", default=False)
        s.add_argument("--no-final-residual", action="store_true", default=False)
    sub.choices["worker"].add_argument("--kind", choices=KINDS, required=True)
    sub.choices["worker"].add_argument("--length", type=int, required=True)
    run = sub.choices["run"]
    run.add_argument("--lengths", type=int, nargs="+", default=[128, 1024])
    run.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--max-foreign-load", type=float, default=0.25,
                     help="retry a round if other processes took more than this fraction of the machine")
    run.add_argument("--max-retries", type=int, default=3)
    run.add_argument("--out", default="benchmarks/results/mgrit.json")
    args = p.parse_args(argv)
    worker(args) if args.cmd == "worker" else driver(args)


if __name__ == "__main__":
    main()
