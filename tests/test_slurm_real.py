"""The whole stop-and-requeue path under a real SLURM (skipped where none answers).

A short float64 MGRIT training job on 2 ranks is submitted through
``hpc_jobs/train.sbatch`` with each launcher. Once its second epoch is logged
it gets SIGUSR2 on its batch shell, as ``#SBATCH --signal=B:USR2@120`` delivers
it ahead of the time limit (``scancel --batch --signal=USR2``). The test
checks that

* the script passed the signal on and the ranks stopped: a checkpoint was
  written and the job step ended with exit code 75 within 30 s of the signal;
* the job requeued itself (same job id, ``SLURM_RESTART_COUNT`` 1) and resumed
  its own run folder ``runs/<name>-<id>`` (``--resume-or-start``), from the
  position inside the epoch where it stopped, and then completed;
* its final parameters (``checkpoint.pt``'s ``model``) are bit-for-bit those of
  an uninterrupted run of the same options (same code, same 2 ranks, started
  directly with the venv's ``mpiexec``): a resume must not change the run.

Slurm holds a requeued job for about two minutes (its BeginTime); the test
makes it eligible at once (``scontrol update StartTime=now``, as root) after
the old job's step daemons are gone, so the whole module takes about a minute.
CI starts a local SLURM for it (``.ci/run``: ``apt-get install slurm-wlm``,
``hpc_jobs/local-test/start.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HPC = ROOT / "hpc_jobs"
VENV = Path(sys.prefix)
EPOCHS = 6
# 16 batches of 4 per epoch, about 1 s per epoch on 2 shared cores
OPTIONS = ["--data", "synthetic:128", "--max-train", "64", "--max-test", "32",
           "--dtype", "float64", "--epochs", str(EPOCHS), "--propagator", "mgrit",
           "--batch-size", "4", "--progress", "off"]
STOP_WITHIN = 30.0          # seconds from the signal to the step's exit code 75
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _slurm_up() -> str | None:
    """None if a SLURM controller answers, else the reason why not."""
    for exe in ("sbatch", "scontrol", "scancel", "squeue"):
        if shutil.which(exe) is None:
            return f"{exe} not on PATH (no SLURM here; CI installs slurm-wlm and runs " \
                   f"hpc_jobs/local-test/start.sh)"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if r.returncode != 0 or "UP" not in r.stdout:
        return f"no SLURM controller answers (scontrol ping: {(r.stdout + r.stderr).strip()})"
    return None


_REASON = _slurm_up()
if _REASON and os.environ.get("MGRIT_GRU_CI_SLURM"):     # why CI has none
    _REASON += f"; {os.environ['MGRIT_GRU_CI_SLURM']}"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "PMI_", "PMIX_", "OMPI_", "HYDRA_"))
           and k not in ("LAUNCHER", "ARGS", "CONFIG", "RUN_DIR", "DRY_RUN", "MAX_RESTARTS")}
    env["VENV"] = str(VENV)
    return env


def _job(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict ({} once the job is gone)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        return {}
    return dict(word.split("=", 1) for word in r.stdout.split() if "=" in word)


def _wait(what: str, predicate, timeout: float, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")


def _stepds(job: str) -> list[str]:
    """This machine's slurmstepd processes of ``job`` (by their titles)."""
    r = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30)
    return [line for line in r.stdout.splitlines() if line.startswith(f"slurmstepd: [{job}.")]


def _stamps(text: str, pattern: str) -> list[float]:
    """Epoch seconds of the ``YYYY-mm-ddTHH:MM:SS.mmm`` stamps after ``pattern``."""
    return [datetime.strptime(m, "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            for m in re.findall(pattern + r" at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)", text)]


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def workdir():
    """A project folder under the repository (a shared file system on a
    cluster, unlike /tmp), with hpc_jobs/ linked in."""
    runs = ROOT / "runs"
    made = not runs.exists()
    runs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pytest-slurm-real-", dir=runs))
    (work / "hpc_jobs").symlink_to(HPC)
    yield work
    shutil.rmtree(work, ignore_errors=True)
    if made and not any(runs.iterdir()):
        runs.rmdir()


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run: started in the background, awaited on first use."""
    out = workdir / "reference"
    env = {**_clean_env(), "OMP_NUM_THREADS": "1", "MPIEXEC_TIMEOUT": "300"}
    proc = subprocess.Popen([str(VENV / "bin" / "mpiexec"), "-n", "2", sys.executable, "-m",
                             "mgrit_gru", "train", "--threads", "1", "--out", str(out), *OPTIONS],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=workdir, env=env)
    state = {}

    def result() -> dict[str, torch.Tensor]:
        if "model" not in state:
            text, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, text
            state["model"] = _model(out / "checkpoint.pt")
        return state["model"]

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_stop_requeue_resume_bitwise(workdir, reference, launcher):
    name = f"pytest-requeue-{launcher}"
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=2",
                        "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5",
                        "hpc_jobs/train.sbatch", "--", *OPTIONS],
                       capture_output=True, text=True, timeout=60, cwd=workdir,
                       env={**_clean_env(), "LAUNCHER": launcher})
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out_file = workdir / f"{name}-{job}.out"
    run_dir = workdir / "runs" / f"{name}-{job}"
    log_file = run_dir / "log.txt"

    def read(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    def show() -> str:
        return f"--- {out_file.name}:\n{read(out_file)}--- log.txt:\n{read(log_file)}--- job: " \
               f"{_job(job)}"

    try:
        # the signal once the second epoch is logged: the run is inside epoch 3
        _wait("the second epoch", lambda: f"epoch 2/{EPOCHS} " in read(log_file), 150, show)
        signalled = time.time()
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)

        # stopped after a checkpoint, exit code 75, requeued by the script
        def requeued() -> bool:
            info = _job(job)
            if info.get("JobState") in FINAL:
                pytest.fail(f"job {job} ended instead of being requeued\n{show()}")
            return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

        _wait("the requeue", requeued, 60, show)
        text = read(out_file)
        forwarded = "SIGUSR2" if launcher == "srun" else "SIGTERM"
        assert re.search(rf"SIGUSR2 at \S+, sending {forwarded} to {launcher}", text), show()
        (exited,) = _stamps(text, r"exit code 75")
        assert 0 < exited - signalled < STOP_WITHIN, show()
        assert "requeued (restart 1 of at most 10)" in text, show()
        log = read(log_file)
        m = re.search(rf"stopped by {forwarded} in epoch (\d+) after batch (\d+) of 16: "
                      rf"checkpoint written", log)
        assert m, show()
        epoch, batch = int(m.group(1)), int(m.group(2))
        assert 3 <= epoch <= EPOCHS, show()
        assert (run_dir / "checkpoint.pt").is_file()

        # Slurm holds a requeued job for ~2 minutes; release it once the old
        # job's step daemons are gone (a new step of the same id must not meet them)
        time.sleep(3)
        _wait("the old job's slurmstepd to end", lambda: not _stepds(job), 60, show)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True,
                       capture_output=True, timeout=30)
        _wait("the resumed job to end", lambda: _job(job).get("JobState") in FINAL, 150, show)
        info = _job(job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", show()
        text = read(out_file)
        assert text.count(f"== job {job} ({name})") == 2, show()
        assert "restart 1 of at most 10," in text.split("requeued")[1], show()
        assert text.rstrip().splitlines()[-1].startswith(f"== job {job}: exit code 0 at"), show()
        log = read(log_file)
        # from the position inside the epoch where it stopped
        assert log.count("resuming after") == 1, show()
        resumed = log.split("resuming after")[1]
        assert resumed.startswith(f" batch {batch} of epoch {epoch}\n"), show()
        assert f"epoch {EPOCHS}/{EPOCHS} " in resumed, show()
        # its own folder, nothing else
        assert sorted(p.name for p in (workdir / "runs").iterdir()) == [run_dir.name], show()

        # bit for bit the uninterrupted run
        got, want = _model(run_dir / "checkpoint.pt"), reference()
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype == torch.float64, key
            assert torch.equal(got[key], want[key]), \
                f"{key}: max |diff| {(got[key] - want[key]).abs().max().item():.3e}"
    finally:
        if _job(job).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job], timeout=30)
        shutil.rmtree(workdir / "runs", ignore_errors=True)
