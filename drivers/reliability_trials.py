"""Trials of the reliability goals (docs/reliability.md), with real jobs.

    python drivers/reliability_trials.py [--trials 10] [--ranks 1 2 3]
                                         [--out drivers/results/reliability.json]

For each P in ``--ranks``: one uninterrupted float64 MGRIT run (the truth),
then ``--trials`` runs that get SIGTERM (sent to ``mpiexec``, which forwards it
to every rank) at a different moment each (spread over the whole run: inside
epochs, at their ends, during evaluation), each resumed with the same
``--resume-or-start`` command until it finishes. A trial passes if every
stopped job exited with code 75 within 30 s of its signal and the final
parameters are bit-for-bit those of the uninterrupted run. Then
``--trials`` SIGKILL trials at P = 2: one rank is killed, the job must end
within 30 s and the last checkpoint must load and resume.

Writes a JSON file with every trial (signal time, exit code, seconds to
exit, stop position, equality) and prints a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mgrit_gru.training.runfolder import CHECKPOINT, read_checkpoint

BIN = Path(sys.executable).parent
OPTIONS = ["--data", "synthetic:64", "--max-train", "512", "--max-test", "64",
           "--dtype", "float64", "--epochs", "3", "--propagator", "mgrit",
           "--batch-size", "16", "--progress", "off"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="600")


def _start(n: int, args: list[str]) -> subprocess.Popen:
    cmd = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", "mgrit_gru", "train",
           *OPTIONS, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _started(folder: Path, p: subprocess.Popen) -> float:
    while True:
        log = folder / "log.txt"
        if log.exists() and "mgrit-gru train |" in log.read_text():
            return time.monotonic()
        if p.poll() is not None:
            return time.monotonic()
        time.sleep(0.02)


def _equal(a: Path, b: Path) -> bool:
    x, y = read_checkpoint(a / CHECKPOINT)["model"], read_checkpoint(b / CHECKPOINT)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _one_trial(n: int, folder: Path, truth: Path, delay: float) -> dict:
    """SIGTERM ``delay`` seconds after training started, then resume with the
    same command until the run completes."""
    stops, attempts = [], 0
    while attempts < 5:
        attempts += 1
        p = _start(n, ["--resume-or-start", str(folder)])
        started = _started(folder, p)
        if not stops:
            while p.poll() is None and time.monotonic() - started < delay:
                time.sleep(0.01)
        sent = None
        if not stops and p.poll() is None:
            sent = time.monotonic()
            p.send_signal(signal.SIGTERM)
        out, err = p.communicate()
        ended = time.monotonic()
        if sent is not None:
            state = read_checkpoint(folder / CHECKPOINT) if p.returncode == 75 else {}
            stops.append({"exit_code": p.returncode,
                          "seconds_to_exit": round(ended - sent, 3),
                          "signal_after_start_s": round(sent - started, 3),
                          "stopped_at": [state.get("epoch"), state.get("batch")],
                          "traceback": "Traceback" in err})
        if p.returncode == 0:
            break
        if p.returncode != 75:
            stops.append({"exit_code": p.returncode, "stderr": err[-400:]})
            break
    exact = p.returncode == 0 and _equal(truth, folder)
    ok = (exact and bool(stops) and all(
        s.get("exit_code") == 75 and s["seconds_to_exit"] < 30 and not s.get("traceback")
        for s in stops))
    return {"stops": stops, "final_exit_code": p.returncode, "bit_exact": exact, "passed": ok}


def signal_trials(n: int, trials: int, root: Path) -> dict:
    truth = root / f"truth-p{n}"
    p = _start(n, ["--out", str(truth)])
    t0 = _started(truth, p)
    p.communicate()
    run_seconds = time.monotonic() - t0
    assert p.returncode == 0, f"uninterrupted run at P={n} failed"
    results = []
    for trial in range(trials):
        delay = 0.8 * run_seconds * (trial + 0.5) / trials   # spread over the run
        late = 0
        for retry in range(4):
            result = _one_trial(n, root / f"p{n}-t{trial}-{retry}", truth, delay)
            if result["stops"] and result["stops"][0]["exit_code"] != 0:
                break
            # the run completed before the signal was sent, or the signal came
            # after the last batch (exit 0, bit-exact): no stop; try again earlier
            late += 1
            delay *= 0.8
        result["trial"], result["late_signals"] = trial, late
        results.append(result)
        stops = result["stops"]
        ok = result["passed"]
        print(f"P={n} trial {trial}: {'pass' if ok else 'FAIL'} {stops}", flush=True)
    return {"P": n, "run_seconds": round(run_seconds, 2), "trials": results,
            "passed": sum(r["passed"] for r in results),
            "stopped": sum(bool(r["stops"]) for r in results)}


def kill_trials(trials: int, root: Path, n: int = 2) -> dict:
    results = []
    for trial in range(trials):
        folder = root / f"kill-t{trial}"
        p = _start(n, ["--out", str(folder), "--checkpoint-batches", "4"])
        started = _started(folder, p)
        time.sleep(0.5 + 0.25 * trial)
        ranks = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                text=True).stdout.split()]
        # mpiexec -> hydra_pmi_proxy -> ranks
        children = [int(x) for r in ranks for x in subprocess.run(
            ["pgrep", "-P", str(r)], capture_output=True, text=True).stdout.split()]
        victim = (children or ranks)[trial % max(1, len(children or ranks))]
        sent = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        p.communicate()
        ended = time.monotonic() - sent
        resumable = False
        if (folder / CHECKPOINT).exists():
            q = _start(n, ["--resume-or-start", str(folder)])
            q.communicate()
            resumable = q.returncode == 0
        else:      # killed before the first checkpoint: the folder must restart
            q = _start(n, ["--resume-or-start", str(folder)])
            q.communicate()
            resumable = q.returncode == 0
        results.append({"trial": trial, "seconds_to_end": round(ended, 3),
                        "exit_code": p.returncode, "resumed_or_restarted": resumable,
                        "killed_after_start_s": round(sent - started, 3),
                        "passed": ended < 30 and p.returncode != 0 and resumable})
        print(f"kill trial {trial}: {results[-1]}", flush=True)
    return {"P": n, "trials": results, "passed": sum(r["passed"] for r in results)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="drivers/results/reliability.json")
    args = parser.parse_args(argv)
    tic = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mgrit-gru-trials-") as tmp:
        root = Path(tmp)
        signals = [signal_trials(n, args.trials, root) for n in args.ranks]
        kills = kill_trials(args.trials, root)
    result = {"command": "python drivers/reliability_trials.py " + " ".join(argv or sys.argv[1:]),
              "options": OPTIONS, "cpu": _cpu(), "signal": signals, "sigkill": kills,
              "seconds": round(time.monotonic() - tic, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| P | trials passed | stopped by the signal | max seconds to exit |")
    print("| --- | --- | --- | --- |")
    for s in signals:
        worst = max((x["seconds_to_exit"] for r in s["trials"] for x in r["stops"]
                     if "seconds_to_exit" in x), default=float("nan"))
        print(f"| {s['P']} | {s['passed']}/{len(s['trials'])} | {s['stopped']} | {worst:.2f} |")
    worst = max(r["seconds_to_end"] for r in kills["trials"])
    print(f"| SIGKILL, P={kills['P']} | {kills['passed']}/{len(kills['trials'])} | - | "
          f"{worst:.2f} |")
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
