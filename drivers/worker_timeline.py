"""Where the workers of a direct epoch spend their time, from the event
times they record with ``MGRIT_GRU_WORKER_TIMELINE=<folder>``.

    MGRIT_GRU_WORKER_TIMELINE=/tmp/tl python drivers/bench_strategy_backends.py \
        --cells gru --bucket --variants sequential,mutex:process,averaging:process
    python drivers/worker_timeline.py /tmp/tl [--out summary.json]

(``bench_strategy_backends.py --timeline /tmp/tl`` sets the variable.) Each
worker appends one JSON line per direct epoch to ``worker<w>.jsonl``: its
kind and the ``time.perf_counter`` times of the events ``gradient``,
``wait`` (for the turn or the round), ``update`` and ``done`` of every
minibatch. For every kind this prints the share of the workers' time in
each phase and

* ``mutex`` (fixed order): the waits of a ring replayed with the measured
  gradient and update durations (worker ``j % K`` computes minibatch ``j``
  after its own previous update, update ``j`` follows update ``j - 1``):
  when it matches the measured waits, they are the fixed order's, not
  wake-up latency;
* ``averaging``: the cap of the round structure on the measured gradients,
  ``sum of all gradient durations / (K x sum over rounds of the slowest)``
  times ``K``: the speedup over the same gradients back to back if nothing
  else cost anything.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

PHASES = ("gradient", "wait", "update", "done")


def load(folder: Path) -> dict:
    """``{(kind, epoch index): {worker: events}}`` (the epochs of every
    worker in the order it ran them; every worker runs every direct epoch)."""
    epochs = collections.defaultdict(dict)
    for path in sorted(folder.glob("worker*.jsonl")):
        w = int(path.stem[len("worker"):])
        for i, line in enumerate(path.read_text().splitlines()):
            record = json.loads(line)
            epochs[(record["kind"], i)][w] = record["events"]
    return epochs


def durations(events: list, name: str) -> list[float]:
    return [tb - ta for (a, ta), (_, tb) in zip(events, events[1:]) if a == name]


def ring_waits(grad: list[list[float]], upd: list[list[float]]) -> float:
    """Total wait of the fixed-order ring replayed with these durations
    (``grad[w][i]``: worker ``w``'s ``i``-th minibatch)."""
    K = len(grad)
    order = [(w, i) for i in range(max(map(len, grad))) for w in range(K) if i < len(grad[w])]
    free, last, waits = [0.0] * K, 0.0, 0.0
    for w, i in order:
        ready = free[w] + grad[w][i]
        start = max(ready, last)
        waits += start - ready
        last = free[w] = start + upd[w][i]
    return waits


def summarise(epochs: dict) -> dict:
    out = {}
    by_kind = collections.defaultdict(list)
    for (kind, _), workers in sorted(epochs.items()):
        by_kind[kind].append(workers)
    for kind, runs in by_kind.items():
        phase = dict.fromkeys(PHASES, 0.0)
        measured_wait = simulated_wait = 0.0
        round_sum = round_max = 0.0
        batches = 0
        for workers in runs:
            K = len(workers)
            grads = [durations(workers[w], "gradient") for w in sorted(workers)]
            upds = [durations(workers[w], "update") for w in sorted(workers)]
            batches += sum(map(len, grads))
            for events in workers.values():
                for name in PHASES:
                    phase[name] += sum(durations(events, name))
            if kind == "mutex":
                measured_wait += sum(sum(durations(e, "wait")) for e in workers.values())
                simulated_wait += ring_waits(grads, upds)
            if kind == "averaging":
                for r in range(min(map(len, grads))):
                    row = [g[r] for g in grads]
                    round_sum += sum(row)
                    round_max += max(row) * K
        total = sum(phase.values()) or 1.0
        entry = {"epochs": len(runs), "minibatches": batches,
                 "share": {k: v / total for k, v in phase.items()},
                 "per_minibatch_us": {k: v / max(batches, 1) * 1e6 for k, v in phase.items()}}
        if kind == "mutex":
            entry["wait_measured_s"] = measured_wait
            entry["wait_ring_replay_s"] = simulated_wait
        if kind == "averaging" and round_max:
            entry["round_cap"] = K * round_sum / round_max
        out[kind] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    summary = summarise(load(args.folder))
    for kind, e in summary.items():
        shares = "  ".join(f"{k} {v:.0%} ({e['per_minibatch_us'][k]:.0f} us)"
                           for k, v in e["share"].items())
        extra = ""
        if "wait_measured_s" in e:
            extra = (f"  waits: measured {e['wait_measured_s']:.3f} s, ring replay "
                     f"{e['wait_ring_replay_s']:.3f} s")
        if "round_cap" in e:
            extra = f"  round cap {e['round_cap']:.2f}"
        print(f"{kind:14s} {e['epochs']:3d} epochs {e['minibatches']:6d} minibatches  "
              f"{shares}{extra}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
