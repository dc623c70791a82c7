"""Does the trace-driven replay predict the measured time per MGRIT batch?

The workload of ``benchmarks/bench_mgrit.py`` (L = 1024, batch 100, input 9,
hidden 100, 6 classes; the training defaults: 3 levels, cfactor 4, FCF,
nested iteration, 2 forward / 1 backward iterations; 1 torch thread and
``OMP_NUM_THREADS=1`` per rank).  Each round runs, in turn (A B C D, A B C D):

* MGRIT on 1 and on 2 ranks, untraced: ``bench_mgrit.py worker`` (the same
  process bench_mgrit's driver launches), the median wall time per batch;
* MGRIT on 1 and on 2 ranks, traced (``worker`` below): every MPI call and
  solver phase recorded, ``comm.barrier(); batch; comm.barrier()`` per batch
  as bench_mgrit times it.

The traces are replayed (:mod:`mgrit_gru.core.replay`: a core per rank,
messages ``alpha + n / beta`` with ``alpha``, ``beta`` from
``benchmarks/results/pingpong.json``); the prediction of a round is the
median replayed batch time.  A round during which other processes took more
than ``--max-foreign-load`` of the machine (/proc/stat, bench_mgrit's reader)
is run again.  ``--extra-ranks 4 8`` also traces P = 4, 8 once, oversubscribed
on this machine (the replay uses thread CPU time, so the trace does not need
a core per rank); those traces feed ``benchmarks/scaling.py``.

    flock /tmp/mgrit_bench.lock python benchmarks/replay_validate.py \\
        --out benchmarks/results/replay_validation.json

writes ``{"cases": [{"P", "L", "measured_s", "predicted_s", ...}], "command", ...}``
and the traces under ``--trace-dir`` (default benchmarks/results/traces/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_mgrit  # noqa: E402  (the measured runs and the /proc/stat reader)

from mgrit_gru.core.replay import Network, programs_from_traces, replay  # noqa: E402
from mgrit_gru.core.trace import exclusive_cpu, load_trace  # noqa: E402

#: The bench_mgrit workload (its defaults = the training defaults).
WORKLOAD = dict(batches=5, warmup=2, hidden=100, batch=100, levels=3, cfactor=4, fwd_iters=2,
                bwd_iters=1, relax="FCF", nested=True, skip_first_relax=False,
                no_final_residual=False)


def network(path: Path) -> Network:
    pp = json.loads(Path(path).read_text())
    return Network(alpha=pp["alpha_s"], beta=pp["beta_bytes_per_s"], eager=pp["eager_bytes"])


# --------------------------------------------------------------------------- worker
def worker(args) -> None:
    """One traced run (under ``mpiexec -n P``): warm-up, then ``--batches`` traced batches."""
    import torch.nn.functional as F

    from mgrit_gru.core.trace import NULL_TRACER, Tracer
    from mgrit_gru.models import MGRITOptions, MGRITPropagator, SequenceClassifier

    comm, x, y, (B, D, H, C, N) = bench_mgrit.workload(args)
    model = SequenceClassifier("implicit-gru", D, H, C)
    model.propagator = MGRITPropagator(comm, MGRITOptions(
        levels=args.levels, cfactor=args.cfactor, fwd_iters=args.fwd_iters,
        bwd_iters=args.bwd_iters, relax=args.relax, nested=args.nested))

    def batch():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    for _ in range(args.warmup):
        batch()
    tracer = Tracer(rank=comm.rank, size=comm.size, meta={
        "L": N, "batch": B, "hidden": H, "levels": args.levels, "cfactor": args.cfactor,
        "fwd_iters": args.fwd_iters, "bwd_iters": args.bwd_iters, "relax": args.relax,
        "nested": args.nested})
    comm.tracer = tracer
    walls = []
    for _ in range(args.batches):
        comm.barrier()
        t0 = time.perf_counter()
        with tracer.span("batch"):
            batch()
        comm.barrier()
        walls.append(time.perf_counter() - t0)
        tracer.mark("batch done")
    comm.tracer = NULL_TRACER
    info = model.propagator.last_info
    tracer.meta.update(wall_s=walls, fwd_steps=info["fwd"].steps, bwd_steps=info["bwd"].steps,
                       fwd_residuals=info["fwd"].residuals, bwd_residuals=info["bwd"].residuals)
    out = Path(args.trace_out)
    out.mkdir(parents=True, exist_ok=True)
    tracer.write(out / f"rank{comm.rank}.json")
    comm.barrier()
    if comm.rank == 0:
        print("RESULT " + json.dumps({"wall_s": walls, "median": statistics.median(walls)}),
              flush=True)


# --------------------------------------------------------------------------- driver
def _foreign(cmd, env):
    """Run ``cmd``; (stdout, foreign load): bench_mgrit's measure of other processes."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, tot0 = bench_mgrit._cpu_times()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    busy1, tot1 = bench_mgrit._cpu_times()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"traced worker failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    hz = os.sysconf("SC_CLK_TCK")
    ours = (ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime) * hz
    total = max(tot1 - tot0, 1)
    return p.stdout, max(0.0, (busy1 - busy0 - ours) / total)


def run_traced(P: int, length: int, folder: Path, args) -> dict:
    py = sys.executable
    cmd = [py, __file__, "worker", "--length", str(length), "--trace-out", str(folder),
           "--batches", str(args.batches), "--warmup", str(args.warmup)]
    if P > 1:
        cmd = [str(Path(py).parent / "mpiexec"), "-n", str(P)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="1500")
    stdout, foreign = _foreign(cmd, env)
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["foreign_load"] = foreign
    return res


def replay_folder(folder: Path, net: Network) -> dict:
    """Replay the traces in ``folder``: per-batch predictions and the split of rank time."""
    P = len(list(folder.glob("rank*.json")))
    traces = [load_trace(folder / f"rank{r}.json") for r in range(P)]
    progs = programs_from_traces(traces)
    res = replay(progs, net)
    free = replay(progs, Network(alpha=0.0, beta=float("inf"), eager=net.eager))
    per_batch = res.between("batch", "batch done", rank=0)
    meta = traces[0]["metadata"]
    return {"P": P, "predicted_per_batch_s": per_batch,
            "predicted_s": statistics.median(per_batch),
            "predicted_free_network_s": statistics.median(free.between("batch", "batch done")),
            "traced_wall_s": meta["wall_s"], "fwd_steps_rank0": meta["fwd_steps"],
            "bwd_steps_rank0": meta["bwd_steps"], "fwd_residuals": meta["fwd_residuals"],
            "bwd_residuals": meta["bwd_residuals"],
            "cpu_by_phase_rank0": {f"{k[0]}" + ("" if k[1] is None else f"@{k[1]}"): v
                                   for k, v in exclusive_cpu(traces[0], "batch",
                                                             "batch done").items()}}


def work_model(folder: Path, P: int, latency: float) -> float:
    """benchmarks/work_model.py's formula, fed from the P = 1 trace in ``folder``:
    ``(T_fwd (1 - c_f) + T_bwd (1 - c_b) + T_rest) / P + T_fwd c_f + T_bwd c_b
    + n_sweeps P latency`` per batch."""
    t = load_trace(folder / "rank0.json")
    meta = t["metadata"]
    n = len(meta["wall_s"])
    phases = exclusive_cpu(t, "batch", "batch done")
    span = {"fwd": 0.0, "bwd": 0.0}
    for e in t["traceEvents"]:
        if e.get("cat") == "phase" and e["name"] in span:
            span[e["name"]] += e["args"]["cpu1_s"] - e["args"]["cpu0_s"]
    total = sum(v for k, v in phases.items() if k[0] != "comm") / n
    T_f, T_b = span["fwd"] / n, span["bwd"] / n
    T_rest = total - T_f - T_b
    fs, bs = meta["fwd_steps"], meta["bwd_steps"]
    c_f, c_b = fs[-1] / sum(fs), bs[-1] / sum(bs)
    n_sweeps = (meta["fwd_iters"] + meta["bwd_iters"]) * (1 + 2 * len(fs))
    return ((T_f * (1 - c_f) + T_b * (1 - c_b) + T_rest) / P + T_f * c_f + T_b * c_b
            + n_sweeps * P * latency)


def driver(args) -> None:
    net = network(args.pingpong)
    trace_dir = Path(args.trace_dir)
    bench_args = argparse.Namespace(**{**WORKLOAD, "batches": args.batches,
                                       "warmup": args.warmup})
    L = args.length
    rounds, r, retries = [], 0, 0
    while r < args.rounds:
        rnd = {}
        for kind, P in (("mgrit1", 1), ("mgrit2", 2)):
            m = bench_mgrit._run_one(kind, L, bench_args)
            rnd[f"measured{P}"] = {"median": m["median"], "seconds": m["seconds"],
                                   "foreign_load": m["foreign_load"]}
            folder = trace_dir / f"L{L}-P{P}-round{r}"
            t = run_traced(P, L, folder, args)
            rep = replay_folder(folder, net)
            rep["foreign_load"] = t["foreign_load"]
            rnd[f"traced{P}"] = rep
            print(f"round {r} P={P}: measured {m['median']:.3f} s (load {m['foreign_load']:.2f}), "
                  f"traced wall {statistics.median(rep['traced_wall_s']):.3f} s, predicted "
                  f"{rep['predicted_s']:.3f} s (load {t['foreign_load']:.2f})", flush=True)
        loads = [v["foreign_load"] for v in rnd.values()]
        if max(loads) > args.max_foreign_load and retries < args.max_retries:
            retries += 1
            print(f"  machine busy (foreign load {max(loads):.2f}): round {r} again", flush=True)
            time.sleep(5)
            continue
        rnd["noisy"] = max(loads) > args.max_foreign_load
        rounds.append(rnd)
        r += 1
    cases = []
    for P in (1, 2):
        stats = case_stats(rounds, P)
        last = trace_dir / f"L{L}-P{P}-round{len(rounds) - 1}"
        cases.append({"P": P, "L": L, **stats,
                      "work_model_s": work_model(trace_dir / f"L{L}-P1-round{len(rounds) - 1}",
                                                 P, args.work_model_latency),
                      "trace": str(last)})
    extra = []
    for P in args.extra_ranks:
        folder = trace_dir / f"L{L}-P{P}"
        t0 = time.time()
        t = run_traced(P, L, folder, argparse.Namespace(batches=args.extra_batches,
                                                        warmup=1))
        rep = replay_folder(folder, net)
        extra.append({"P": P, "L": L, "predicted_s": rep["predicted_s"],
                      "traced_wall_s_oversubscribed": statistics.median(rep["traced_wall_s"]),
                      "run_seconds": time.time() - t0, "foreign_load": t["foreign_load"],
                      "work_model_s": work_model(trace_dir / f"L{L}-P1-round{len(rounds) - 1}",
                                                 P, args.work_model_latency),
                      "trace": str(folder)})
        print(f"P={P} (oversubscribed): predicted {rep['predicted_s']:.3f} s", flush=True)
    out = {"cases": cases,
           "command": "flock /tmp/mgrit_bench.lock python benchmarks/replay_validate.py "
                      + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "network": {"alpha_s": net.alpha, "beta_bytes_per_s": net.beta,
                       "eager_bytes": net.eager, "from": str(args.pingpong)},
           "workload": {**WORKLOAD, "length": L, "batches": args.batches,
                        "warmup": args.warmup},
           "extra_ranks_oversubscribed": extra,
           "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "shared": True},
           "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for c in cases:
        print(f"P={c['P']}: measured {c['measured_s']:.3f} s, predicted {c['predicted_s']:.3f} s "
              f"({c['error_percent']:+.1f} %), work model {c['work_model_s']:.3f} s, tracer "
              f"overhead {c['tracer_overhead_percent']:+.1f} %")
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def case_stats(rounds: list, P: int) -> dict:
    """One case of the JSON from the rounds: medians over the quiet rounds (all
    rounds if none was quiet) of the measured and the predicted time per batch,
    and the error of the one against the other (so that ``predicted_s /
    measured_s - 1`` is the error reported); the median of the per-round
    ratios beside it."""
    quiet = [rd for rd in rounds if not rd.get("noisy")] or rounds
    meas = statistics.median(rd[f"measured{P}"]["median"] for rd in quiet)
    pred = statistics.median(rd[f"traced{P}"]["predicted_s"] for rd in quiet)
    traced_wall = statistics.median(statistics.median(rd[f"traced{P}"]["traced_wall_s"])
                                    for rd in quiet)
    return {"measured_s": meas, "predicted_s": pred,
            "predicted_over_measured": pred / meas,
            "error_percent": 100 * (pred / meas - 1),
            "median_round_ratio": statistics.median(
                rd[f"traced{P}"]["predicted_s"] / rd[f"measured{P}"]["median"] for rd in quiet),
            "rounds_used": [i for i, rd in enumerate(rounds) if rd in quiet],
            "traced_wall_s": traced_wall,
            "tracer_overhead_percent": 100 * (traced_wall / meas - 1),
            "predicted_free_network_s": statistics.median(
                rd[f"traced{P}"]["predicted_free_network_s"] for rd in quiet)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--length", type=int, default=1024)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--batches", type=int, default=5)
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--extra-ranks", type=int, nargs="*", default=[])
    run.add_argument("--extra-batches", type=int, default=3)
    run.add_argument("--max-foreign-load", type=float, default=0.25)
    run.add_argument("--max-retries", type=int, default=3)
    run.add_argument("--work-model-latency", type=float, default=30e-6)
    run.add_argument("--pingpong", default=str(HERE / "results" / "pingpong.json"))
    run.add_argument("--trace-dir", default=str(HERE / "results" / "traces"))
    run.add_argument("--out", default=str(HERE / "results" / "replay_validation.json"))
    w = sub.add_parser("worker")
    w.add_argument("--length", type=int, required=True)
    w.add_argument("--trace-out", required=True)
    w.add_argument("--batches", type=int, default=5)
    w.add_argument("--warmup", type=int, default=2)
    for k in ("hidden", "batch", "levels", "cfactor", "fwd_iters", "bwd_iters"):
        w.add_argument("--" + k.replace("_", "-"), type=int, default=WORKLOAD[k])
    w.add_argument("--relax", default=WORKLOAD["relax"])
    w.add_argument("--nested", action=argparse.BooleanOptionalAction, default=WORKLOAD["nested"])
    args = p.parse_args(argv)
    worker(args) if args.cmd == "worker" else driver(args)


if __name__ == "__main__":
    main()
