"""The command line under ``mpiexec`` as a cluster user meets it: SIGTERM,
SIGINT and SIGKILL from outside, errors printed once, concurrent runs.

Each test starts real jobs (``mpiexec -n 2 python -m mgrit_gru train``) and
takes a few seconds; the in-process tests of the same guarantees are in
tests/test_reliability.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mgrit_gru.errors import EXIT_DIVERGED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED
from mgrit_gru.training.runfolder import CHECKPOINT, read_checkpoint

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the python")

#: A float64 MGRIT run of several seconds on 2 ranks (64 batches per epoch).
OPTIONS = ["--data", "synthetic:64", "--max-train", "1024", "--max-test", "64",
           "--dtype", "float64", "--epochs", "2", "--propagator", "mgrit",
           "--batch-size", "16", "--progress", "off"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="240")
    e.pop("PYTEST_CURRENT_TEST", None)
    return e


def start(args, n=2, **kw):
    return subprocess.Popen([str(MPIEXEC), "-n", str(n), sys.executable, "-m", "mgrit_gru",
                             "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), **kw)


def run(args, n=2, timeout=240):
    p = start(args, n)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for_training(folder: Path, p: subprocess.Popen, timeout=120):
    """Until the run's header line is in its log (training has started)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        log = folder / "log.txt"
        if log.exists() and "mgrit-gru train |" in log.read_text():
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not start")


def model(folder):
    return read_checkpoint(folder / CHECKPOINT)["model"]


def test_sigterm_checkpoints_exits_75_and_resumes_bit_exact(tmp_path):
    whole = tmp_path / "whole"
    rc, _, err = run([*OPTIONS, "--out", str(whole)])
    assert rc == 0, err
    part = tmp_path / "part"
    p = start([*OPTIONS, "--resume-or-start", str(part)])
    wait_for_training(part, p)
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)         # mpiexec forwards it to every rank
    out, err = p.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == EXIT_STOPPED, err
    assert elapsed < 30
    assert "Traceback" not in err
    state = read_checkpoint(part / CHECKPOINT)
    assert state["batch"] > 0 or state["epoch"] > 0
    assert "stopped by SIGTERM" in out
    # the same command again: resumes (what a requeued job runs)
    rc, out, err = run([*OPTIONS, "--resume-or-start", str(part)])
    assert rc == 0, err
    assert "resuming after" in out
    a, b = model(whole), model(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_ends_every_rank_with_one_line(tmp_path):
    folder = tmp_path / "r"
    p = start([*OPTIONS, "--out", str(folder)])
    wait_for_training(folder, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    ours = [ln for ln in err.splitlines() if "mgrit-gru" in ln]
    assert ours == ["mgrit-gru: interrupted"], err


def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    folder = tmp_path / "r"
    p = start([*OPTIONS, "--out", str(folder)])
    wait_for_training(folder, p)
    ranks = subprocess.run(["pgrep", "-f", f"out {folder}$"], capture_output=True,
                           text=True).stdout.split()
    ranks = [int(r) for r in ranks if int(r) != p.pid]
    ranks = [r for r in ranks if Path(f"/proc/{r}/cmdline").exists() and
             b"mpiexec" not in Path(f"/proc/{r}/cmdline").read_bytes()]
    assert ranks
    t0 = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)
    p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode != 0


def test_input_error_is_printed_once(tmp_path):
    rc, _, err = run(["--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "r")])
    assert rc == EXIT_INPUT
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mgrit-gru: error: "), err


def test_divergence_exits_3_with_one_line(tmp_path):
    rc, _, err = run(["--lr", "1e38", "--optimizer", "sgd", "--max-train", "64",
                      "--max-test", "16", "--epochs", "2", "--progress", "off",
                      "--out", str(tmp_path / "r")])
    assert rc == EXIT_DIVERGED, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "diverged: non-finite" in lines[0], err
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_two_runs_on_one_folder(tmp_path):
    folder = tmp_path / "r"
    a = start([*OPTIONS, "--out", str(folder)], n=1)
    b = start([*OPTIONS, "--out", str(folder)], n=1)
    results = []
    for p in (a, b):
        out, err = p.communicate(timeout=240)
        results.append((p.returncode, err))
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, EXIT_INPUT], results
    err = next(e for rc, e in results if rc == EXIT_INPUT)
    assert "in use by another run" in err or "already holds a run" in err
    # one log, one run's lines
    assert (folder / "log.txt").read_text().count("mgrit-gru train |") == 1
