"""The SLURM job scripts of hpc_jobs/: train.sbatch, the sweep generator and collect.py.

Without SLURM, ``srun``, ``mpiexec``, ``sbatch`` and ``scontrol`` are replaced
by fake launchers that record their arguments and environment (and, for one
test, run the training command for real, for others wait for a signal); the
recorded ``mgrit-gru train`` arguments are read back with the product's own
parser. If ``sbatch`` is on PATH and a controller answers, one tiny job is
submitted for real (the stop-and-requeue path under a real SLURM:
tests/test_slurm_real.py).
"""

import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from mgrit_gru.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
HPC = ROOT / "hpc_jobs"
TRAIN = HPC / "train.sbatch"
PY = sys.executable

# A launcher stand-in: records argv and environment as JSON in $FAKE_RECORD
# (one file per call: .0, .1, ...); with FAKE_RUN=1 runs the command after
# its leading "--option" words; with FAKE_WAIT=1 waits (up to 60 s) for
# SIGTERM, SIGUSR2 or SIGHUP, writes its name to $FAKE_RECORD.signal and exits
# with 75; else exits with $FAKE_EXIT (default 0; scontrol: 0, and `show`
# prints $FAKE_SCONTROL_SHOW).
FAKE_LAUNCHER = f"""#!{PY}
import json, os, signal, subprocess, sys, time
base = os.environ["FAKE_RECORD"]
got = []
if os.environ.get("FAKE_WAIT") == "1" and os.path.basename(sys.argv[0]) != "scontrol":
    for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
n = 0
while os.path.exists(f"{{base}}.{{n}}"):
    n += 1
with open(f"{{base}}.{{n}}.tmp", "w") as fh:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, fh)
os.rename(f"{{base}}.{{n}}.tmp", f"{{base}}.{{n}}")
if os.environ.get("FAKE_WAIT") == "1" and os.path.basename(sys.argv[0]) != "scontrol":
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(f"{{base}}.signal", "w") as fh:
        fh.write(" ".join(got))
    sys.exit(75 if got else 1)
if os.environ.get("FAKE_RUN") == "1":
    cmd = sys.argv[1:]
    while cmd and cmd[0].startswith("-"):
        cmd.pop(0)
    rc = subprocess.call(cmd)
    sys.exit(rc)
if os.path.basename(sys.argv[0]) == "sbatch":
    print(100 + n)
if os.path.basename(sys.argv[0]) == "scontrol":
    if "show" in sys.argv:
        print(os.environ.get("FAKE_SCONTROL_SHOW", "JobId=1 JobState=COMPLETING Reason=None"))
    sys.exit(0)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A folder of fake launchers (srun, sbatch, scontrol) for PATH, a fake
    venv (the real python, a fake mpiexec) and the record file prefix."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name in ("srun", "sbatch", "scontrol"):
        _write_exe(bin_dir / name, FAKE_LAUNCHER)
    venv = tmp_path / "fakevenv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(PY)
    _write_exe(venv / "bin" / "mpiexec", FAKE_LAUNCHER)
    return {"bin": bin_dir, "venv": venv, "record": tmp_path / "record"}


def _records(fakes) -> list[dict]:
    base = fakes["record"]
    n, out = 0, []
    while (path := Path(f"{base}.{n}")).exists():
        out.append(json.loads(path.read_text()))
        n += 1
    return out


def _clean_env() -> dict:
    """The environment without any SLURM or MPI launcher variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SRUN_", "PMI_", "PMIX_", "OMPI_", "HYDRA_"))
            and k not in ("LAUNCHER", "ARGS", "CONFIG", "RUN_DIR", "VENV", "DRY_RUN",
                          "MAX_RESTARTS")}


def _script_env(fakes, workdir, env) -> dict:
    full = _clean_env()
    full.update(PATH=f"{fakes['bin']}{os.pathsep}{os.environ['PATH']}",
                FAKE_RECORD=str(fakes["record"]), SLURM_SUBMIT_DIR=str(workdir),
                VENV=str(Path(sys.prefix)))
    full.update({k: str(v) for k, v in env.items()})
    return full


def run_script(script, args, fakes, workdir, **env):
    """Run a job script with bash as SLURM would (SLURM_* from ``env``)."""
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=120, cwd=workdir, env=_script_env(fakes, workdir, env))


def split_launch(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(launcher words, mgrit-gru train arguments)`` of a recorded command."""
    i = argv.index("mgrit_gru")
    assert argv[i - 3:i + 2] == [argv[i - 3], "-u", "-m", "mgrit_gru", "train"], argv
    assert Path(argv[i - 3]).name.startswith("python")
    return argv[:i - 3], argv[i + 2:]


def parse_train(args: list[str]):
    """The namespace ``mgrit-gru train`` itself makes of ``args``."""
    return build_parser().parse_args(["train", *args])


# --------------------------------------------------------------------------- #
# train.sbatch
# --------------------------------------------------------------------------- #
def test_train_sbatch_srun(fakes, tmp_path):
    r = run_script(TRAIN, ["--", "--propagator", "mgrit", "--epochs", "2"], fakes, tmp_path,
                   SLURM_JOB_NAME="tiny", SLURM_JOB_ID=42, SLURM_CPUS_PER_TASK=3,
                   SLURM_NTASKS=2, ARGS="--levels 2 --data synthetic:64")
    assert r.returncode == 0, r.stderr
    (rec,) = _records(fakes)
    launcher, train_args = split_launch(rec["argv"])
    assert Path(launcher[0]).name == "srun"
    for word in ("--mpi=pmi2", "--kill-on-bad-exit=1", "--cpu-bind=cores", "--ntasks=2",
                 "--cpus-per-task=3"):
        assert word in launcher
    ns = parse_train(train_args)
    # the job's own run folder, resumed by a requeued job (same id)
    assert (ns.threads, ns.resume_or_start, ns.propagator, ns.epochs, ns.levels, ns.data) == \
        (3, "runs/tiny-42", "mgrit", 2, 2, "synthetic:64")
    assert not hasattr(ns, "out") and ns.resume is None
    assert rec["env"]["OMP_NUM_THREADS"] == "3"
    assert rec["env"]["SRUN_CPUS_PER_TASK"] == "3"


def test_train_sbatch_user_options_win(fakes, tmp_path):
    r = run_script(TRAIN, ["--threads", "1", "--out", "mine"], fakes, tmp_path,
                   SLURM_JOB_NAME="x", SLURM_JOB_ID=1, SLURM_CPUS_PER_TASK=4, SLURM_NTASKS=1)
    assert r.returncode == 0, r.stderr
    ns = parse_train(split_launch(_records(fakes)[0]["argv"])[1])
    assert (ns.threads, ns.out, ns.resume_or_start) == (1, "mine", None)


@pytest.mark.parametrize("how", ["resume", "resume_or_start", "resume_or_start=", "config_out"])
def test_train_sbatch_no_default_out(fakes, tmp_path, how):
    """--resume, --resume-or-start and a config file's `out` must not be
    overridden by the job's run folder."""
    config = tmp_path / "c.toml"
    config.write_text('out = "from-config"\nepochs = 3\n')
    args, env = {"resume": (["--resume", "runs/old"], {}),
                 "resume_or_start": (["--resume-or-start", "runs/mine"], {}),
                 "resume_or_start=": (["--resume-or-start=runs/mine"], {}),
                 "config_out": ([], {"CONFIG": str(config)})}[how]
    r = run_script(TRAIN, args, fakes, tmp_path, SLURM_JOB_ID=5, **env)
    assert r.returncode == 0, r.stderr
    ns = parse_train(split_launch(_records(fakes)[0]["argv"])[1])
    assert not hasattr(ns, "out")
    assert (ns.resume, ns.resume_or_start) == {"resume": ("runs/old", None),
                                               "config_out": (None, None)}.get(
        how, (None, "runs/mine"))
    if how == "config_out":
        assert ns.config == str(config)


def test_train_sbatch_run_dir_and_exit_code(fakes, tmp_path):
    r = run_script(TRAIN, [], fakes, tmp_path, SLURM_JOB_ID=9, RUN_DIR="runs/here", FAKE_EXIT=3)
    assert r.returncode == 3
    (rec,) = _records(fakes)            # no scontrol requeue after exit code 3
    assert parse_train(split_launch(rec["argv"])[1]).resume_or_start == "runs/here"
    assert r.stdout.rstrip().splitlines()[-1].startswith("== job 9: exit code 3 at ")


def test_train_sbatch_header_stop_and_requeue():
    """The stop signal ahead of the limit goes to the batch shell (B:), the
    job may be requeued and a requeued job appends to its .out file."""
    header = [line for line in TRAIN.read_text().splitlines() if line.startswith("#SBATCH ")]
    for line in ("#SBATCH --signal=B:USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --output=%x-%j.out"):
        assert line in header


@pytest.mark.parametrize("restart,max_restarts,rc,requeued", [
    (None, None, 75, True),      # first run, default MAX_RESTARTS 10
    ("9", None, 75, True),
    ("10", None, 75, False),     # the limit reached
    ("2", "2", 75, False),
    (None, "0", 75, False),      # MAX_RESTARTS=0: never
    (None, None, 0, False),      # done
    (None, None, 1, False),      # an internal error
    (None, None, 2, False),      # bad input
    (None, None, 3, False),      # diverged
    (None, None, 130, False),    # SIGINT
])
def test_train_sbatch_requeues_on_75(fakes, tmp_path, restart, max_restarts, rc, requeued):
    env = {"SLURM_JOB_ID": 31, "SLURM_JOB_NAME": "rq", "FAKE_EXIT": rc}
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = restart
    if max_restarts is not None:
        env["MAX_RESTARTS"] = max_restarts
    r = run_script(TRAIN, [], fakes, tmp_path, **env)
    assert r.returncode == rc, r.stderr
    records = _records(fakes)
    ns = parse_train(split_launch(records[0]["argv"])[1])
    assert ns.resume_or_start == "runs/rq-31"   # every restart resumes the same folder
    calls = [rec["argv"][1:] for rec in records if Path(rec["argv"][0]).name == "scontrol"]
    assert calls == ([["requeue", "31"]] if requeued else [])   # no SIGTERM: no `show job`
    lines = r.stdout.rstrip().splitlines()
    assert f"restart {restart or 0} of at most {max_restarts or 10}," in lines[0]
    n, most = int(restart or 0), int(max_restarts or 10)
    if requeued:
        assert lines[-1].endswith(f"; requeued (restart {n + 1} of at most {most})"), lines[-1]
    elif rc == 75:
        assert lines[-1].endswith(f"; not requeued (restart {n}, MAX_RESTARTS={most})"), lines[-1]
    else:
        assert lines[-1].startswith(f"== job 31: exit code {rc} at "), lines[-1]


def test_train_sbatch_requeue_failure_is_reported(fakes, tmp_path):
    """A failing scontrol requeue (a cancelled job) is one line; the exit code stays 75."""
    _write_exe(fakes["bin"] / "scontrol", "#!/bin/sh\necho 'scontrol: error: Job is pending "
               "execution' >&2\nexit 1\n")
    r = run_script(TRAIN, [], fakes, tmp_path, SLURM_JOB_ID=32, FAKE_EXIT=75)
    assert r.returncode == 75
    assert "scontrol requeue failed" in r.stdout.rstrip().splitlines()[-1]


def test_train_sbatch_bad_max_restarts(fakes, tmp_path):
    r = run_script(TRAIN, [], fakes, tmp_path, MAX_RESTARTS="ten")
    assert r.returncode == 2 and "MAX_RESTARTS" in r.stderr
    assert _records(fakes) == []


@pytest.mark.parametrize("launcher,args,sent,expected,reason", [
    ("srun", [], "USR2", "SIGUSR2", None),                       # srun forwards it to the ranks
    ("srun", ["--stop-signal", "HUP"], "USR2", "SIGHUP", None),  # the run's own stop signal
    ("srun", ["--stop-signal=HUP"], "HUP", "SIGHUP", None),      # sbatch --signal=B:HUP@...
    ("mpiexec", [], "USR2", "SIGTERM", None),                    # hydra forwards TERM, dies of USR2
    # SLURM's SIGTERM: it signals the ranks itself, nothing is passed on; a
    # requeue only at the time limit (not after scancel or SLURM's own requeue)
    ("srun", [], "TERM", "", "None"),
    ("mpiexec", [], "TERM", "", "None"),
    ("srun", [], "TERM", "", "TimeLimit"),
    ("mpiexec", [], "TERM", "", "TimeLimit"),
])
def test_train_sbatch_passes_the_stop_signal_on(fakes, tmp_path, launcher, args, sent, expected,
                                                reason):
    """The batch shell gets SLURM's signal (--signal=B:...) and passes the right
    one on to the launcher, waits for it and requeues on its exit code 75."""
    env = _script_env(fakes, tmp_path, {"SLURM_JOB_ID": 33, "LAUNCHER": launcher,
                                        "VENV": fakes["venv"], "FAKE_WAIT": 1,
                                        "FAKE_SCONTROL_SHOW": f"JobId=33 JobState=COMPLETING "
                                                              f"Reason={reason}"})
    proc = subprocess.Popen(["bash", str(TRAIN), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{fakes['record']}.0").exists():   # the launcher is up
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(getattr(signal, "SIG" + sent))
        if not expected:
            # nothing reaches the launcher: it is still waiting; end it as SLURM would
            time.sleep(0.5)
            assert not Path(f"{fakes['record']}.signal").exists()
            assert proc.poll() is None
            launcher_pid = _launcher_pid(proc.pid)
            os.kill(launcher_pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out + err
    got = Path(f"{fakes['record']}.signal").read_text()
    assert got == (expected or "SIGTERM"), out + err
    lines = out.rstrip().splitlines()
    if expected:
        assert f"SIG{sent} at " in out and f"sending {expected} to {launcher}" in out, out
    else:
        assert "SIGTERM at " in out and "SLURM signals the ranks itself" in out, out
    assert lines[-2].startswith("== job 33: exit code 75 at "), out
    requeues = [rec["argv"][1:] for rec in _records(fakes)[1:] if "requeue" in rec["argv"]]
    if reason in (None, "TimeLimit"):
        assert lines[-1].endswith("; requeued (restart 1 of at most 10)"), out
        assert requeues == [["requeue", "33"]]
    else:
        assert "by SLURM's SIGTERM" in lines[-1] and "not requeued" in lines[-1], out
        assert requeues == []


def _launcher_pid(shell_pid: int) -> int:
    """The pid of the job script's child (the fake launcher)."""
    children = Path(f"/proc/{shell_pid}/task/{shell_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_train_sbatch_mpiexec(fakes, tmp_path):
    r = run_script(TRAIN, ["--epochs", "1"], fakes, tmp_path, LAUNCHER="mpiexec",
                   VENV=fakes["venv"], SLURM_JOB_ID=7, SLURM_NTASKS=4, SLURM_CPUS_PER_TASK=2)
    assert r.returncode == 0, r.stderr
    (rec,) = _records(fakes)
    launcher, train_args = split_launch(rec["argv"])
    assert launcher[0] == str(fakes["venv"] / "bin" / "mpiexec")
    assert launcher[1:] == ["-n", "4", "-bind-to", "core:2"]
    # hydra's proxies are started by srun: they must get the whole node
    assert "SRUN_CPUS_PER_TASK" not in rec["env"]
    assert "--whole" in rec["env"]["HYDRA_LAUNCHER_EXTRA_ARGS"].split()
    assert rec["env"]["OMP_NUM_THREADS"] == "2"
    assert parse_train(train_args).threads == 2


@pytest.mark.parametrize("env,word", [({"LAUNCHER": "ssh"}, "LAUNCHER"),
                                      ({"VENV": "/nonexistent/venv"}, "VENV"),
                                      ({"CONFIG": "missing.toml"}, "CONFIG")])
def test_train_sbatch_bad_settings(fakes, tmp_path, env, word):
    r = run_script(TRAIN, [], fakes, tmp_path, **env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0]
    assert _records(fakes) == []


def test_train_sbatch_end_to_end_then_collect(fakes, tmp_path):
    """The real training command (1 rank, run by the fake srun), then collect.py."""
    r = run_script(TRAIN, ["--", "--data", "synthetic:16", "--max-train", "8", "--max-test", "4",
                           "--epochs", "1", "--hidden", "4", "--progress", "off"],
                   fakes, tmp_path, SLURM_JOB_NAME="e2e", SLURM_JOB_ID=7, FAKE_RUN=1)
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((tmp_path / "runs" / "e2e-7" / "metrics.json").read_text())
    c = subprocess.run([PY, str(HPC / "collect.py"), str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    (row,) = list(csv.DictReader(io.StringIO(c.stdout)))
    assert row["run"] == str(tmp_path / "runs" / "e2e-7")
    assert int(row["ranks"]) == 1 and row["data"] == "synthetic:16"
    assert float(row["test_accuracy"]) == metrics["final"]["test_accuracy"]
    assert float(row["train_seconds"]) == metrics["final"]["train_seconds"]


# --------------------------------------------------------------------------- #
# the sweep generator
# --------------------------------------------------------------------------- #
SMALL_SWEEP = """
[sweep]
name = "t"
time = "00:10:00"
cpus_per_task = 2
tasks_per_node = 4
launcher = "mpiexec"

[options]
propagator = "mgrit"
epochs = 1
relax = ["FCF", "F"]

[[grid]]
name = "strong"
ranks = [1, 2, 8]
data = ["synthetic:32", "synthetic:64"]

[[grid]]
name = "mixed"
ranks = 4
time_ranks = [1, 2, 3, 4]
data = "synthetic:32"

[[grid]]
name = "td"
time_ranks = 2
data_groups = [1, 3]
data = "synthetic:32"
time = 5
"""


def expected_small_sweep():
    """(ranks, time_ranks, data, time) of every point, worked out by hand."""
    points = [(p, p, d, "00:10:00") for p in (1, 2, 8) for d in ("synthetic:32", "synthetic:64")]
    points += [(4, t, "synthetic:32", "00:10:00") for t in (1, 2, 4)]  # 3 does not divide 4
    points += [(2 * g, 2, "synthetic:32", "5") for g in (1, 3)]
    return points


def generate(sweep_file: Path, out: Path, *extra):
    return subprocess.run([PY, str(HPC / "generate.py"), str(sweep_file), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=60)


def sbatch_header(script: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a script."""
    header = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            header[key] = value
    return header


@pytest.fixture
def project(tmp_path):
    """A project root for submitting: hpc_jobs/ of this repository."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "hpc_jobs").symlink_to(HPC)
    return root


def test_generator_small_sweep(fakes, tmp_path, project):
    sweep = tmp_path / "small.toml"
    sweep.write_text(SMALL_SWEEP)
    out = tmp_path / "gen"
    g = generate(sweep, out)
    assert g.returncode == 0, g.stderr
    assert "skipped 1 " in g.stdout  # time_ranks 3 on 4 ranks
    scripts = sorted(out.glob("*.sbatch"))
    expected = expected_small_sweep()
    assert len(scripts) == len(expected)
    got = []
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        h = sbatch_header(script)
        ntasks, per_node, nodes = int(h["--ntasks"]), int(h["--ntasks-per-node"]), int(h["--nodes"])
        assert per_node <= 4 and nodes * per_node >= ntasks and (nodes - 1) * per_node < ntasks
        assert h["--cpus-per-task"] == "2"
        assert h["--job-name"] == f"t-{script.stem}"
        # run the job script as SLURM would, through the real train.sbatch
        r = run_script(script, [], fakes, project, SLURM_JOB_NAME=h["--job-name"],
                       SLURM_JOB_ID=11, SLURM_NTASKS=ntasks, SLURM_CPUS_PER_TASK=2,
                       VENV=fakes["venv"])
        assert r.returncode == 0, r.stderr
        rec = _records(fakes)[-1]
        launcher, train_args = split_launch(rec["argv"])
        assert launcher[1:3] == ["-n", str(ntasks)]  # the sweep's launcher: mpiexec
        ns = parse_train(train_args)
        assert ns.resume_or_start == f"runs/t/{script.stem}-11" and ns.threads == 2
        assert ns.propagator == "mgrit" and ns.epochs == 1 and ns.relax == "FCF,F"
        got.append((ntasks, ns.time_ranks, ns.data, h["--time"]))
    assert sorted(got) == sorted(expected)


def test_submit_all(fakes, tmp_path, project):
    sweep = tmp_path / "small.toml"
    sweep.write_text(SMALL_SWEEP)
    out = tmp_path / "gen"
    assert generate(sweep, out).returncode == 0
    submit = out / "submit_all.sh"
    assert subprocess.run(["bash", "-n", str(submit)]).returncode == 0
    r = run_script(submit, ["-A", "proj", "-p", "debug"], fakes, project)
    assert r.returncode == 0, r.stderr
    records = _records(fakes)
    submitted = sorted(Path(rec["argv"][-1]).name for rec in records)
    assert submitted == sorted(p.name for p in out.glob("*.sbatch"))
    for rec in records:
        assert rec["argv"][1:-1] == ["--parsable", "-A", "proj", "-p", "debug"]
    assert (project / "runs" / "t").is_dir()
    assert len(r.stdout.splitlines()) == len(records)
    # not from a project root: an error, nothing submitted
    r = run_script(submit, [], fakes, tmp_path)
    assert r.returncode == 2 and "project root" in r.stderr
    assert len(_records(fakes)) == len(records)


def test_example_sweep_counts(tmp_path):
    path = HPC / "sweeps" / "scaling.toml"
    doc = tomllib.loads(path.read_text())
    strong, hybrid = doc["grid"]
    expected = len(strong["ranks"]) * len(strong["data"]) + sum(
        hybrid["ranks"] % t == 0 for t in hybrid["time_ranks"])
    r = generate(path, tmp_path / "gen")
    assert r.returncode == 0, r.stderr
    scripts = list((tmp_path / "gen").glob("*.sbatch"))
    assert len(scripts) == expected
    for script in scripts:
        h = sbatch_header(script)
        nodes = -(-int(h["--ntasks"]) // doc["sweep"]["tasks_per_node"])
        assert int(h["--nodes"]) == nodes


def _shell_files(tmp_path) -> list[Path]:
    files = [*HPC.glob("*.sbatch"), *HPC.glob("local-test/*.sh")]
    for sweep in HPC.glob("sweeps/*.toml"):
        out = tmp_path / sweep.stem
        assert generate(sweep, out).returncode == 0
        files += [*out.glob("*.sbatch"), out / "submit_all.sh"]
    return files


def test_all_scripts_parse(tmp_path):
    files = _shell_files(tmp_path)
    assert len(files) > 5
    for f in files:
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{f}: {r.stderr}"


def test_no_home_paths_or_accounts(tmp_path):
    home = str(Path.home())
    for f in _shell_files(tmp_path) + list(HPC.glob("sweeps/*.toml")):
        text = f.read_text()
        for bad in ("/home/", "~/", "$HOME", "${HOME}", home + "/", "--account", "conda activate"):
            assert bad not in text, f"{f}: {bad}"
        for line in text.splitlines():
            assert not line.startswith(("#SBATCH -A", "#SBATCH --partition", "#SBATCH -p ")), \
                f"{f}: {line}"


@pytest.mark.parametrize("snippet,words", [
    ('[[grid]]\nranks = 2\nlevles = 2\n', ["levles"]),
    ('[[grid]]\nranks = 2\nlevels = 0\n', ["levels"]),
    ('[[grid]]\ndata = "synthetic:8"\n', ["ranks"]),
    ('[[grid]]\nranks = 2\nout = "x"\n', ["out"]),
    ('[[grid]]\ndata_groups = 2\ntime_ranks = 2\n', ["time_ranks", "mgrit"]),
])
def test_generator_bad_input(tmp_path, snippet, words):
    sweep = tmp_path / "bad.toml"
    sweep.write_text('[sweep]\nname = "b"\n\n' + snippet)
    r = generate(sweep, tmp_path / "gen")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(sweep) in lines[0]
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "gen").exists()


def test_generator_refuses_accounts(tmp_path):
    sweep = tmp_path / "acct.toml"
    sweep.write_text('[sweep]\nname = "a"\nsbatch = ["--account=abc"]\n[[grid]]\nranks = 1\n')
    r = generate(sweep, tmp_path / "gen")
    assert r.returncode == 2 and "account" in r.stderr


def test_generator_force_replaces_only_generated(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('[sweep]\nname = "s"\n[[grid]]\nranks = [1, 2]\n')
    out = tmp_path / "gen"
    assert generate(sweep, out).returncode == 0
    (out / "notes.txt").write_text("mine")
    assert generate(sweep, out).returncode == 2  # not empty
    sweep.write_text('[sweep]\nname = "s"\n[[grid]]\nranks = [4]\n')
    assert generate(sweep, out, "--force").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid0-p4-t1.sbatch", "notes.txt",
                                                     "submit_all.sh"]


# --------------------------------------------------------------------------- #
# collect.py
# --------------------------------------------------------------------------- #
def _epoch(e, seconds, acc, mgrit):
    record = {"epoch": e, "train_loss": 0.7 - 0.1 * e, "seconds": seconds, "test_loss": 0.6,
              "test_accuracy": acc, "test_precision": 0.5, "test_recall": 0.5, "test_f1": 0.5,
              "eval_seconds": 0.1}
    if mgrit:
        record.update(fwd_iters=2.0, bwd_iters=1.0, fwd_residual=1e-3 * e, bwd_residual=2e-4)
    return record


def _fake_run(folder: Path, *, data, propagator, ranks, time_ranks, seconds, acc, epochs_wanted):
    folder.mkdir(parents=True)
    epochs = [_epoch(e + 1, s, a, propagator == "mgrit") for e, (s, a) in enumerate(zip(seconds, acc))]
    config = {"data": data, "cell": "implicit-gru", "hidden": 16, "propagator": propagator,
              "strategy": "sequential", "workers": 1, "batch_size": 8, "levels": 2,
              "cfactor": 4, "relax": ["FCF", "F"], "cycle": "V", "epochs": epochs_wanted,
              "time_ranks": time_ranks}
    final = dict(epochs[-1], train_seconds=sum(seconds))
    metrics = {"config": config, "epochs": epochs, "final": final,
               "environment": {"torch": "x", "python": "3", "mgrit_gru": "0.1",
                               "hostname": "node7", "ranks": ranks, "time_ranks": time_ranks,
                               "data_groups": ranks // time_ranks, "threads": 2}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.toml").write_text("")
    return metrics


def test_collect_two_runs(tmp_path):
    runs = tmp_path / "runs" / "sweep"
    a = _fake_run(runs / "mg-p4", data="synthetic:64", propagator="mgrit", ranks=4,
                  time_ranks=2, seconds=[3.0, 5.0], acc=[0.5, 0.75], epochs_wanted=2)
    b = _fake_run(runs / "nested" / "serial-p1", data="synthetic:64", propagator="serial",
                  ranks=1, time_ranks=1, seconds=[7.0], acc=[0.625], epochs_wanted=3)
    (runs / "failed-9").mkdir()
    (runs / "failed-9" / "config.toml").write_text("")
    csv_path, json_path = tmp_path / "t.csv", tmp_path / "t.json"
    r = subprocess.run([PY, str(HPC / "collect.py"), str(runs), "--csv", str(csv_path),
                        "--json", str(json_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "failed-9" in r.stderr and "warning" in r.stderr
    rows = {Path(row["run"]).name: row for row in csv.DictReader(csv_path.open())}
    assert set(rows) == {"mg-p4", "serial-p1"}
    mg, se = rows["mg-p4"], rows["serial-p1"]
    assert (int(mg["ranks"]), int(mg["time_ranks"]), int(mg["data_groups"])) == (4, 2, 2)
    assert float(mg["train_seconds"]) == 8.0 and float(mg["seconds_per_epoch"]) == 4.0
    assert float(mg["test_accuracy"]) == 0.75 and int(mg["epochs"]) == 2
    assert mg["complete"] == "True" and se["complete"] == "False"
    assert float(mg["fwd_residual"]) == a["final"]["fwd_residual"]
    assert float(mg["bwd_iters"]) == 1.0 and mg["relax"] == "FCF,F"
    assert se["propagator"] == "serial" and se["fwd_iters"] == "" and se["hostname"] == "node7"
    assert float(se["test_accuracy"]) == b["final"]["test_accuracy"]
    table = json.loads(json_path.read_text())
    assert [Path(t["run"]).name for t in table] == [Path(row["run"]).name
                                                    for row in csv.DictReader(csv_path.open())]
    by_name = {Path(t["run"]).name: t for t in table}
    assert by_name["serial-p1"]["fwd_iters"] is None
    assert by_name["mg-p4"]["train_seconds"] == 8.0
    # one run folder given directly
    r = subprocess.run([PY, str(HPC / "collect.py"), str(runs / "mg-p4")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(list(csv.DictReader(io.StringIO(r.stdout)))) == 1


def test_collect_nothing(tmp_path):
    r = subprocess.run([PY, str(HPC / "collect.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([PY, str(HPC / "collect.py"), str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a folder" in r.stderr


# --------------------------------------------------------------------------- #
# a real SLURM, when one answers
# --------------------------------------------------------------------------- #
def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "UP" in r.stdout


@pytest.mark.skipif(not _slurm_up(), reason="no SLURM controller answers (scontrol ping)" + (
    f"; {os.environ['MGRIT_GRU_CI_SLURM']}" if os.environ.get("MGRIT_GRU_CI_SLURM") else ""))
def test_real_slurm_job():
    # under the repository (a shared file system on a cluster, unlike /tmp)
    runs = ROOT / "runs"
    made_runs = not runs.exists()
    runs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pytest-slurm-", dir=runs))
    try:
        (work / "hpc_jobs").symlink_to(HPC)
        env = {**_clean_env(), "VENV": sys.prefix}
        r = subprocess.run(["sbatch", "--parsable", "--job-name=pytest-hpc", "--nodes=1",
                            "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                            "--time=5", "hpc_jobs/train.sbatch", "--", "--data", "synthetic:16",
                            "--max-train", "8", "--max-test", "4", "--epochs", "1", "--hidden",
                            "4", "--propagator", "mgrit", "--progress", "off"],
                           capture_output=True, text=True, timeout=60, cwd=work, env=env)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                               text=True, timeout=30)
            if not q.stdout.strip():
                break
            time.sleep(2)
        else:
            subprocess.run(["scancel", job], timeout=30)
            pytest.skip(f"job {job} did not finish within 240 s (queue busy?)")
        out = (work / f"pytest-hpc-{job}.out")
        log = out.read_text() if out.exists() else "(no .out file)"
        metrics_path = work / "runs" / f"pytest-hpc-{job}" / "metrics.json"
        assert metrics_path.exists(), log
        metrics = json.loads(metrics_path.read_text())
        assert metrics["environment"]["ranks"] == 2, log
        assert metrics["environment"]["time_ranks"] == 2
        assert len(metrics["epochs"]) == 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_runs and not any(runs.iterdir()):
            runs.rmdir()
