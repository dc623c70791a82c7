"""Projected MGRIT scaling (P = 1..64) from traces, against the serial loop and torch.nn.GRU.

Inputs: the traces of ``benchmarks/replay_validate.py`` (L = 1024, the
bench_mgrit workload; measured at P = 1 and 2 on their own cores, P = 4 and 8
oversubscribed on the 2-core machine).  Method:

1. **Calibration.** From each trace taken with a core per rank (P = 1, 2) the
   thread CPU seconds of: a step on level ``l`` of the forward and of the
   adjoint solve (the exclusive CPU time of the solver's phases on level
   ``l`` inside ``fwd`` / ``bwd``, divided by the steps the solver counted
   on that level); per owned fine point: the forward outside the solver
   phases (input projection, access hook), the adjoint outside them, the
   adjoint linearisation and the parameter gradients; the rest of a batch
   (head, loss, pooling, sources) as ``r0 + r1 n`` (``n`` owned points),
   fitted over the ranks of both traces (a negative coefficient is set to 0
   and the other refitted).  Medians over the rounds.
2. **Extrapolation.** For each (P, L, levels) the real solver runs as a
   skeleton (:mod:`mgrit_gru.core.skeleton`): every rank's real sequence of
   MPI calls (peers, tags, sizes), with compute segments ``sum_l steps_l x
   cost_l`` plus the per-point and fixed terms above at the places where
   the propagator has them.  The programs are replayed with the ping-pong
   network (alpha, beta).  So per-rank compute scales with the rank's
   points and the grid's step counts, nothing else (no cache effects, no
   memory-bandwidth sharing between ranks).
3. **Check.** The skeleton's replay at P = 1, 2, 4, 8 against the replay of
   the real traces at the same P.
4. **Baselines**, measured in this run (one process, one thread,
   interleaved): the serial loop (``SerialPropagator``) and torch.nn.GRU, a
   batch at L = 1024, thread CPU time (the replay's currency; wall in the
   JSON); longer L scale linearly (both are sequential loops over L).

    flock /tmp/mgrit_bench.lock python benchmarks/scaling.py \\
        --out benchmarks/results/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from mgrit_gru.core.replay import Network, programs_from_traces, replay  # noqa: E402
from mgrit_gru.core.skeleton import Skeleton, SkeletonComm, SkeletonStepper  # noqa: E402
from mgrit_gru.core.solver import MGRIT  # noqa: E402
from mgrit_gru.core.trace import load_trace  # noqa: E402
from mgrit_gru.models import MGRITOptions  # noqa: E402

#: Solver phases that carry a level (steps of that level happen inside them).
SOLVER_PHASES = ("f_relax", "residual", "c_relax", "coarse_correct", "cycle", "coarsest")
PROPAGATOR_PHASES = ("fwd", "bwd", "adjoint_linearise", "param_grads", "batch")


# ------------------------------------------------------------------ calibration
def phase_tree(trace: dict) -> list[dict]:
    """Phases of the traced batches with inclusive CPU minus the CPU inside MPI
    calls (``cpu``), exclusive (``excl``) and the names of their ancestors."""
    evs = trace["traceEvents"]
    marks = [e["args"]["cpu_s"] for e in evs if e.get("ph") == "i" and e["name"] == "batch"]
    ends = [e["args"]["cpu_s"] for e in evs if e.get("ph") == "i" and e["name"] == "batch done"]
    lo, hi = min(marks), max(ends)
    items = []
    for e in evs:
        if e.get("ph") != "X":
            continue
        a = e["args"]
        if a["cpu0_s"] < lo or a["cpu1_s"] > hi:
            continue
        items.append({"name": e["name"], "cat": e.get("cat"), "level": a.get("level"),
                      "c0": a["cpu0_s"], "c1": a["cpu1_s"], "comm": 0.0, "children": 0.0})
    items.sort(key=lambda it: (it["c0"], -it["c1"]))
    stack: list[dict] = []
    for it in items:
        while stack and stack[-1]["c1"] <= it["c0"]:
            stack.pop()
        it["ancestors"] = [s["name"] for s in stack]
        d = it["c1"] - it["c0"]
        if it["cat"] == "comm":
            for s in stack:
                s["comm"] += d
        if stack:
            stack[-1]["children"] += d
        stack.append(it)
    out = []
    for it in items:
        if it["cat"] == "comm":
            continue
        d = it["c1"] - it["c0"]
        it["cpu"] = d - it["comm"]
        it["excl"] = d - it["children"]
        out.append(it)
    return out


def rank_costs(trace: dict) -> dict:
    meta = trace["metadata"]
    nb = len(meta["wall_s"])
    tree = phase_tree(trace)
    n = _owned(meta["rank"], meta["size"], meta["L"], meta)
    c = {"n": n}
    for d in ("fwd", "bwd"):
        steps = meta[f"{d}_steps"]
        per = [0.0] * len(steps)
        for it in tree:
            if it["name"] in SOLVER_PHASES and d in it["ancestors"]:
                per[it["level"]] += it["excl"]
        c[d] = [per[l] / (nb * steps[l]) if steps[l] else None for l in range(len(steps))]
        total = sum(it["cpu"] for it in tree if it["name"] == d)
        c[f"{d}_other"] = (total - sum(per)) / (nb * n)
        c[f"{d}_total"] = total / nb
    for name in ("adjoint_linearise", "param_grads"):
        c[name] = sum(it["cpu"] for it in tree if it["name"] == name) / (nb * n)
    batch = sum(it["cpu"] for it in tree if it["name"] == "batch") / nb
    c["rest"] = batch - c["fwd_total"] - c["bwd_total"] - (
        c["adjoint_linearise"] + c["param_grads"]) * n
    c["batch"] = batch
    return c


def _owned(rank: int, size: int, N: int, meta: dict) -> int:
    grid = MGRIT.make_grid(SkeletonComm(rank, size, Skeleton(), 0), N, _options(meta).settings(False))
    return grid.fine_range.size


def _options(meta: dict, levels: int | None = None) -> MGRITOptions:
    return MGRITOptions(levels=levels or meta["levels"], cfactor=meta["cfactor"],
                        fwd_iters=meta["fwd_iters"], bwd_iters=meta["bwd_iters"],
                        relax=meta["relax"], nested=meta["nested"])


def calibrate(folders: list[Path]) -> dict:
    per = [rank_costs(load_trace(f / f"rank{r}.json"))
           for f in folders for r in range(len(list(f.glob("rank*.json"))))]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    cost = {}
    for d in ("fwd", "bwd"):
        levels = len(per[0][d])
        cost[d] = [med([p[d][l] for p in per if p[d][l] is not None]) for l in range(levels)]
        cost[f"{d}_other"] = med([p[f"{d}_other"] for p in per])
    for name in ("adjoint_linearise", "param_grads"):
        cost[name] = med([p[name] for p in per])
    # rest = r0 + r1 n, least squares over the ranks
    ns = [p["n"] for p in per]
    rs = [p["rest"] for p in per]
    nbar, rbar = statistics.fmean(ns), statistics.fmean(rs)
    var = sum((x - nbar) ** 2 for x in ns)
    r1 = sum((x - nbar) * (y - rbar) for x, y in zip(ns, rs)) / var if var else 0.0
    r0 = rbar - r1 * nbar
    if r0 < 0 or r1 < 0:   # noise: a negative fixed (or per-point) cost would be optimistic
        r0, r1 = (0.0, rbar / nbar) if r0 < 0 else (rbar, 0.0)
    cost["rest"] = [r0, r1]
    cost["ranks_used"] = len(per)
    return cost


# ------------------------------------------------------------------ skeleton programs
def batch_program(rank: int, P: int, N: int, opts: MGRITOptions, cost: dict, B: int, H: int,
                  n_params: int) -> tuple[list, Skeleton]:
    """Rank ``rank``'s program of one bench_mgrit batch (barrier, batch, barrier)."""
    sk = Skeleton()
    comm = SkeletonComm(rank, P, sk, state_bytes=4 * B * H)
    comm.barrier()
    sk.mark("batch")
    s_f, s_b = opts.settings(False), opts.settings(True)
    grid = MGRIT.make_grid(comm, N, s_f)
    n = grid.fine_range.size
    sk.compute(cost["fwd_other"] * n, "other")
    L = len(grid.levels)
    sk.costs = _level_costs(cost["fwd"], L)
    MGRIT(SkeletonStepper(sk), comm, grid, s_f).solve()
    sk.costs = ()
    comm.allreduce_(None, nbytes=4 * (B * H + 1))
    sk.compute(cost["rest"][0] + cost["rest"][1] * n, "other")
    grid_b = MGRIT.make_grid(comm, N, s_b, reverse=True)
    sk.compute(cost["adjoint_linearise"] * n + cost["bwd_other"] * n, "other")
    sk.costs = _level_costs(cost["bwd"], L)
    solver = MGRIT(SkeletonStepper(sk), comm, grid_b, s_b)
    rhs = torch.zeros(grid_b.fine_range.size, 1)
    lam, _ = solver.solve(rhs=rhs)
    solver.halo(lam, torch.zeros(1))
    sk.costs = ()
    sk.compute(cost["param_grads"] * n, "other")
    comm.allreduce_(None, nbytes=4 * (n_params + 1))
    comm.barrier()
    sk.mark("batch done")
    sk.flush()
    return sk.ops, sk


def _level_costs(measured: list[float], levels: int) -> list[float]:
    """Per-level step costs for ``levels`` levels: the measured ones; a deeper
    intermediate level costs as the deepest measured intermediate one, the
    coarsest as the measured coarsest."""
    inter = measured[:-1]
    out = [inter[min(l, len(inter) - 1)] for l in range(levels - 1)] + [measured[-1]]
    return out


def project(P: int, N: int, opts: MGRITOptions, cost: dict, net: Network, B=100, H=100,
            n_params=None) -> dict:
    if n_params is None:   # implicit GRU H=100, D=9: 3 H (D + H) + 6 H weights and biases
        n_params = 3 * H * (9 + H) + 6 * H
    progs, sks = zip(*(batch_program(r, P, N, opts, cost, B, H, n_params) for r in range(P)))
    res = replay(list(progs), net)
    free = replay(list(progs), Network(alpha=0.0, beta=float("inf"), eager=net.eager))
    T = res.between("batch", "batch done")[0]
    L = len(sks[0].steps) if sks[0].steps else opts.levels
    per_rank = []
    for r, sk in enumerate(sks):
        fine = sk.seconds.get(0, 0.0)
        coarsest_level = max(k for k in sk.seconds if isinstance(k, int)) if any(
            isinstance(k, int) for k in sk.seconds) else 0
        levels = [k for k in sk.seconds if isinstance(k, int)]
        coarse = sum(sk.seconds[k] for k in levels if 0 < k < opts.levels - 1)
        coarsest = sum(sk.seconds[k] for k in levels if k == opts.levels - 1 and k > 0)
        per_rank.append({"fine": fine, "coarse": coarse, "coarsest": coarsest,
                         "other": sk.seconds.get("other", 0.0),
                         "waiting": free.waiting[r],
                         "communication": max(res.waiting[r] - free.waiting[r], 0.0),
                         "steps": dict(sorted(sk.steps.items()))})
        del coarsest_level
    return {"P": P, "L": N, "levels": opts.levels, "predicted_s": T, "per_rank": per_rank,
            "free_network_s": free.between("batch", "batch done")[0], "n_levels": L}


# ------------------------------------------------------------------ baselines
def baselines(rounds: int, length: int = 1024, B: int = 100, H: int = 100) -> dict:
    """Serial loop and torch.nn.GRU, one batch each per round, interleaved."""
    import torch.nn.functional as F
    from mgrit_gru.models import SequenceClassifier, SerialPropagator

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(B, length, 9)
    y = torch.randint(0, 6, (B,))
    model = SequenceClassifier("implicit-gru", 9, H, 6)
    model.propagator = SerialPropagator()
    gru, head = torch.nn.GRU(9, H, batch_first=True), torch.nn.Linear(H, 6)

    def serial():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def nngru():
        gru.zero_grad()
        head.zero_grad()
        _, hn = gru(x)
        F.cross_entropy(head(hn[0]), y).backward()

    serial(), nngru()
    out = {"serial": {"cpu": [], "wall": []}, "nngru": {"cpu": [], "wall": []}}
    for _ in range(rounds):
        for name, fn in (("serial", serial), ("nngru", nngru)):
            w, c = time.perf_counter(), time.thread_time()
            fn()
            out[name]["cpu"].append(time.thread_time() - c)
            out[name]["wall"].append(time.perf_counter() - w)
    for v in out.values():
        v["cpu_median"] = statistics.median(v["cpu"])
        v["wall_median"] = statistics.median(v["wall"])
    out["length"] = length
    return out


# ------------------------------------------------------------------ driver
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", default=str(HERE / "results" / "traces"))
    p.add_argument("--pingpong", default=str(HERE / "results" / "pingpong.json"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--weak-points", type=int, default=256, help="L / P of the weak scaling")
    p.add_argument("--what-if-levels", type=int, nargs="*", default=[4, 5, 6])
    p.add_argument("--baseline-rounds", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pp = json.loads(Path(args.pingpong).read_text())
    net = Network(alpha=pp["alpha_s"], beta=pp["beta_bytes_per_s"], eager=pp["eager_bytes"])
    tdir = Path(args.traces)
    own = sorted(f for f in tdir.glob("L1024-P[12]-round*") if f.is_dir())
    if not own:
        raise SystemExit(f"no traces in {tdir}: run benchmarks/replay_validate.py first")
    cost = calibrate(own)
    meta = load_trace(own[0] / "rank0.json")["metadata"]
    opts = _options(meta)
    # the skeleton against the replay of the real traces
    check = []
    for folder in sorted(tdir.glob("L1024-P*")):
        P = len(list(folder.glob("rank*.json")))
        traces = [load_trace(folder / f"rank{r}.json") for r in range(P)]
        real = statistics.median(replay(programs_from_traces(traces), net)
                                 .between("batch", "batch done"))
        sk = project(P, 1024, opts, cost, net)["predicted_s"]
        check.append({"trace": folder.name, "P": P, "trace_replay_s": real, "skeleton_s": sk,
                      "skeleton_over_trace": sk / real,
                      "oversubscribed": P > (os.cpu_count() or 1)})
        print(f"check {folder.name}: trace replay {real:.3f} s, skeleton {sk:.3f} s", flush=True)
    base = baselines(args.baseline_rounds)
    ser, gru = base["serial"]["cpu_median"], base["nngru"]["cpu_median"]
    print(f"baselines L=1024: serial {ser:.3f} s, torch.nn.GRU {gru:.3f} s (thread CPU)", flush=True)

    def entry(P, N, levels=None):
        o = opts if levels is None else _options(meta, levels)
        pr = project(P, N, o, cost, net)
        s, g = ser * N / 1024, gru * N / 1024
        pr.update(serial_s=s, nngru_s=g, speedup_over_serial=s / pr["predicted_s"],
                  speedup_over_nngru=g / pr["predicted_s"])
        return pr

    strong = {}
    for N in args.lengths:
        rows = [entry(P, N) for P in args.ranks if P <= N // 4]
        strong[str(N)] = {
            "rows": rows,
            "crossover_P_serial": next((r["P"] for r in rows if r["speedup_over_serial"] > 1), None),
            "crossover_P_nngru": next((r["P"] for r in rows if r["speedup_over_nngru"] > 1), None),
            "best": max(rows, key=lambda r: r["speedup_over_serial"])["P"],
            "best_speedup_over_serial": max(r["speedup_over_serial"] for r in rows)}
        print(f"L={N}: " + " ".join(f"P{r['P']}:{r['speedup_over_serial']:.2f}" for r in rows),
              flush=True)
    weak = [entry(P, args.weak_points * P) for P in args.ranks]
    print("weak: " + " ".join(f"P{r['P']}:{r['predicted_s']:.3f}s" for r in weak), flush=True)
    what_if = []
    for lv in args.what_if_levels:
        for N in (4096,):
            r = entry(64, N, lv)
            what_if.append(r)
            print(f"what-if L={N} P=64 levels={lv}: speedup {r['speedup_over_serial']:.2f}",
                  flush=True)
    # the limiting term at P=64, L=4096: the critical path's composition on the last rank
    out = {
        "command": "flock /tmp/mgrit_bench.lock python benchmarks/scaling.py "
                   + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": "AMD EPYC", "cores": os.cpu_count(), "shared": True},
        "network": {"alpha_s": net.alpha, "beta_bytes_per_s": net.beta, "eager_bytes": net.eager},
        "workload": {"batch": 100, "hidden": 100, "input": 9, "levels": opts.levels,
                     "cfactor": opts.cfactor, "fwd_iters": opts.fwd_iters,
                     "bwd_iters": opts.bwd_iters, "relax": opts.relax, "nested": opts.nested},
        "calibration": cost, "calibration_traces": [f.name for f in own],
        "skeleton_check": check, "baselines": base,
        "strong": strong, "weak": {"points_per_rank": args.weak_points, "rows": weak},
        "what_if_levels": what_if,
        "extrapolation": (
            "traced: P=1,2 (a core per rank) and the P listed in skeleton_check (P>2 "
            "oversubscribed on 2 cores); every other (P, L) is a skeleton run of the real "
            "solver (mgrit_gru/core/skeleton.py): per rank, compute between MPI calls = "
            "sum over levels of (steps counted on level l) x (CPU seconds per step on level l, "
            "forward or adjoint, calibrated from the P=1,2 traces) + per owned fine point "
            "(forward outside the solver phases, adjoint outside them, adjoint linearisation, "
            "parameter gradients) + r0 + r1 n for the rest of the batch; messages alpha + n/beta "
            "from pingpong.json; baselines scale linearly in L from L=1024"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
