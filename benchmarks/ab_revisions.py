"""Per-batch time of bench_mgrit workers from several git revisions, interleaved.

    python benchmarks/ab_revisions.py --rev base=8b967e6 --rev kernels=f679c0b \
        --rev now=HEAD --kinds mgrit2 mgrit1 serial nngru --rounds 3 \
        --out benchmarks/results/hot_path_ab.json

Each revision is checked out into its own ``git worktree`` (under a temporary
folder, removed at the end) and imported from there (``PYTHONPATH``), with
the venv of this checkout; each round runs every kind once per revision, in
the same order (A B C, A B C, ...), each in a fresh process running
``benchmarks/bench_mgrit.py worker`` *of that revision* (so an old revision
runs with its own benchmark defaults: say so when comparing MGRIT settings).
The JSON keeps every sample, the CPU share other processes took during each
run (/proc/stat), the medians and the median of the per-round ratios against
the first revision.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_mgrit import _cpu_times  # noqa: E402  (the /proc/stat reader, not a copy)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", action="append", required=True, help="NAME=REVISION (repeatable)")
    p.add_argument("--kinds", nargs="+", default=["mgrit2", "serial"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    revs = dict(r.split("=", 1) for r in args.rev)
    py = sys.executable
    mpiexec = str(Path(py).parent / "mpiexec")
    hz = os.sysconf("SC_CLK_TCK")
    samples: dict = {}
    with tempfile.TemporaryDirectory(prefix="mgrit-ab-") as tmp:
        trees = {}
        for name, rev in revs.items():
            tree = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree),
                            rev], check=True, capture_output=True)
            commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            trees[name] = (tree, commit)
        try:
            for r in range(args.rounds):
                for kind in args.kinds:
                    for name, (tree, _) in trees.items():
                        cmd = [py, str(tree / "benchmarks" / "bench_mgrit.py"), "worker", "--kind",
                               kind, "--length", str(args.length), "--batches", str(args.batches),
                               "--warmup", "1"]
                        if kind == "mgrit2":
                            cmd = [mpiexec, "-n", "2"] + cmd
                        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tree),
                                   MPIEXEC_TIMEOUT="900")
                        b0, t0 = _cpu_times()
                        c0 = os.times()
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                              cwd=tree, timeout=1200)
                        b1, t1 = _cpu_times()
                        c1 = os.times()
                        if proc.returncode:
                            raise SystemExit(f"{name} {kind} failed:\n{proc.stderr[-3000:]}")
                        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
                        med = json.loads(line[len("RESULT "):])["median"]
                        ours = (c1.children_user - c0.children_user + c1.children_system
                                - c0.children_system) * hz
                        foreign = max(0.0, (b1 - b0 - ours) / max(t1 - t0, 1))
                        samples.setdefault(kind, {}).setdefault(name, []).append(
                            {"median_s": med, "foreign_load": foreign})
                        print(f"round {r} {kind:7s} {name:10s} {med:.4f} s (foreign {foreign:.2f})",
                              flush=True)
        finally:
            for tree, _ in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    first = next(iter(revs))
    summary = {}
    for kind, per in samples.items():
        base = [s["median_s"] for s in per[first]]
        summary[kind] = {name: {"median_s": statistics.median(s["median_s"] for s in v),
                                f"over_{first}": statistics.median(
                                    s["median_s"] / b for s, b in zip(v, base))}
                         for name, v in per.items()}
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "revisions": {n: c for n, (_, c) in trees.items()}, "length": args.length,
           "samples": samples, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
