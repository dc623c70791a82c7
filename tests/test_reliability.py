"""Reliability of a run (docs/reliability.md): stop signals and exact resume
inside an epoch, checkpoint integrity, divergence guards, run-folder locks.

The truth for every resume is the uninterrupted run with the same options
(the same code on the same ranks: float64 parameters must be bit-for-bit
equal). Signals are sent in-process with ``os.kill`` at a chosen point, so
the tests are deterministic; tests/test_reliability_cli.py sends them from
outside to ``mpiexec``.
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import mgrit_gru.training.loop as loop_module
from helpers_train import without_times, write_easy_data
import mgrit_gru.training.update as update_module
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import make_config
from mgrit_gru.errors import Diverged, InputError, Stopped
from mgrit_gru.training.runfolder import (CHECKPOINT, PREVIOUS, RunFolder, claim_run_name,
                                 content_digest, read_checkpoint, strict_json)
from mgrit_gru.training.signals import StopSignals
from mgrit_gru.training.loop import train
from mgrit_gru.training.metrics import check_replicas


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_easy_data(tmp_path_factory.mktemp("data"), 96)


def config(data, out, **options):
    base = dict(data=data, out=str(out), hidden=8, epochs=3, batch_size=16, threads=1,
                progress="off", dtype="float64")
    base.update(options)
    return make_config(base)


def params(folder):
    return read_checkpoint(folder / CHECKPOINT)["model"]


def bit_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignalAfter:
    """Wrap the strategies so that ``signum`` is sent to this process after
    the ``calls``-th segment (``run_epoch`` call) of the run."""

    def __init__(self, monkeypatch, calls, signum=signal.SIGUSR2, rank=None):
        self.left, self.signum, self.rank = calls, signum, rank
        make = loop_module.make_strategy

        def wrapped(*args, **kwargs):
            strategy = make(*args, **kwargs)
            run_epoch = strategy.run_epoch

            def run(*a, **k):
                out = run_epoch(*a, **k)
                self.left -= 1
                if self.left == 0 and (self.rank is None or self.rank == Comm.world().rank):
                    os.kill(os.getpid(), self.signum)
                return out
            strategy.run_epoch = run
            return strategy
        monkeypatch.setattr(loop_module, "make_strategy", wrapped)


# --------------------------------------------------------------------------- #
# stop signals and exact resume inside an epoch
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_stops_mid_epoch_and_resume_is_bit_exact(data, tmp_path, monkeypatch, signum):
    whole = train(config(data, tmp_path / "whole"), Comm.serial())
    SignalAfter(monkeypatch, calls=8, signum=signum)     # 6 batches per epoch: epoch 2, batch 2
    with pytest.raises(Stopped, match=signal.Signals(signum).name):
        train(config(data, tmp_path / "part"), Comm.serial())
    state = read_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert (state["epoch"], state["batch"]) == (1, 2)
    assert "stopped by " + signal.Signals(signum).name in (tmp_path / "part" / "log.txt").read_text()
    monkeypatch.undo()
    resumed = train(config(data, tmp_path / "part"), Comm.serial(), resume=True)
    assert bit_equal(params(tmp_path / "whole"), params(tmp_path / "part"))
    assert without_times(resumed) == without_times(whole)
    # the signal handlers are restored after the run
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_stop_after_the_last_batch_leaves_the_evaluation(data, tmp_path, monkeypatch):
    whole = train(config(data, tmp_path / "whole"), Comm.serial())
    SignalAfter(monkeypatch, calls=6)                    # the last batch of epoch 1
    with pytest.raises(Stopped):
        train(config(data, tmp_path / "part"), Comm.serial())
    state = read_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert (state["epoch"], state["batch"]) == (0, 6)
    monkeypatch.undo()
    resumed = train(config(data, tmp_path / "part"), Comm.serial(), resume=True)
    assert without_times(resumed) == without_times(whole)


@pytest.mark.parametrize("strategy", ["mutex", "averaging"])
def test_workers_resume_mid_epoch_bit_exact(data, tmp_path, monkeypatch, strategy):
    opts = dict(strategy=strategy, workers=2, sync_batches=2, epochs=2)
    train(config(data, tmp_path / "whole", **opts), Comm.serial())
    SignalAfter(monkeypatch, calls=2)                    # after 4 of 6 batches of epoch 1
    with pytest.raises(Stopped):
        train(config(data, tmp_path / "part", **opts), Comm.serial())
    assert read_checkpoint(tmp_path / "part" / CHECKPOINT)["batch"] == 4
    monkeypatch.undo()
    train(config(data, tmp_path / "part", **opts), Comm.serial(), resume=True)
    assert bit_equal(params(tmp_path / "whole"), params(tmp_path / "part"))


def test_sync_points_of_workers_are_part_of_the_run(data, tmp_path):
    """A mutex run drains its pipeline at the synchronisation points: other
    points, other parameters (why they are an option, not a timing)."""
    a = train(config(data, tmp_path / "a", strategy="mutex", workers=2, sync_batches=2,
                     epochs=1), Comm.serial())
    b = train(config(data, tmp_path / "b", strategy="mutex", workers=2, sync_batches=6,
                     epochs=1), Comm.serial())
    assert a["epochs"][0]["updates"] == b["epochs"][0]["updates"] == 6
    assert not bit_equal(params(tmp_path / "a"), params(tmp_path / "b"))


def test_timed_and_counted_checkpoints(data, tmp_path, monkeypatch):
    written = []
    real = RunFolder.write_checkpoint

    def spy(self, state):
        written.append((state["epoch"], state["batch"]))
        real(self, state)
    monkeypatch.setattr(RunFolder, "write_checkpoint", spy)
    train(config(data, tmp_path / "b", epochs=2, checkpoint_batches=4), Comm.serial())
    # every 4 batches since the last checkpoint (the epoch checkpoints count)
    assert written == [(0, 4), (1, 0), (1, 4), (2, 0)]
    written.clear()
    train(config(data, tmp_path / "s", epochs=1, checkpoint_seconds=1e-9), Comm.serial())
    assert written == [(0, b) for b in range(1, 6)] + [(1, 0)]
    # the previous checkpoint is kept
    assert read_checkpoint(tmp_path / "s" / PREVIOUS)["batch"] == 5


def test_stop_handlers(tmp_path):
    with StopSignals("HUP") as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)     # a second one is ignored
        assert stop.requested == "SIGHUP"
    with StopSignals("none") as stop:
        assert stop.numbers == [signal.SIGTERM]
    with pytest.raises(InputError, match="stop_signal"):
        make_config({"stop_signal": "USR1"})


# --------------------------------------------------------------------------- #
# checkpoint integrity
# --------------------------------------------------------------------------- #
def test_checkpoint_digest_detects_corruption(data, tmp_path):
    train(config(data, tmp_path / "r", epochs=2), Comm.serial())
    state = read_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert state["sha256"] == content_digest(state)
    changed = dict(state, model={k: v.clone() for k, v in state["model"].items()})
    next(iter(changed["model"].values())).view(-1)[0] += 1e-12
    assert content_digest(changed) != state["sha256"]


def _flip_tensor_byte(path, state):
    """Change one byte of a parameter's data inside the checkpoint file."""
    raw = bytearray(path.read_bytes())
    t = next(iter(state["model"].values()))
    needle = t.reshape(-1)[:4].numpy().tobytes()
    at = raw.find(needle)
    assert at > 0
    raw[at + 3] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage-epoch"])
def test_bad_checkpoint_falls_back_to_the_previous(data, tmp_path, damage):
    run = tmp_path / "r"
    whole = train(config(data, tmp_path / "whole"), Comm.serial())
    train(config(data, run, epochs=2), Comm.serial())
    path = run / CHECKPOINT
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flip":
        _flip_tensor_byte(path, read_checkpoint(path))
    else:
        state = torch.load(path, weights_only=True)
        state["epoch"] = "two"
        torch.save(state, path)
    with pytest.raises(ValueError):
        read_checkpoint(path)
    resumed = train(config(data, run), Comm.serial(), resume=True)
    log = (run / "log.txt").read_text()
    assert f"warning: {CHECKPOINT}:" in log and f"using {PREVIOUS}" in log
    assert "resuming after epoch 1" in log
    assert without_times(resumed) == without_times(whole)


def test_both_checkpoints_bad_is_one_input_error(data, tmp_path):
    run = tmp_path / "r"
    train(config(data, run, epochs=2), Comm.serial())
    for name in (CHECKPOINT, PREVIOUS):
        (run / name).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as info:
        train(config(data, run), Comm.serial(), resume=True)
    message = str(info.value)
    assert "\n" not in message and CHECKPOINT in message and PREVIOUS in message


# --------------------------------------------------------------------------- #
# divergence
# --------------------------------------------------------------------------- #
def test_divergence_stops_with_the_last_good_checkpoint(data, tmp_path):
    run = tmp_path / "r"
    # the reported case: the default data, float32, SGD with lr 1e38
    with pytest.raises(Diverged, match=r"non-finite (loss|gradient|parameters after the "
                                       r"update) in epoch 1, batch \d of 4"):
        train(config("default", run, lr=1e38, optimizer="sgd", dtype="float32",
                     max_train=64, max_test=16), Comm.serial())
    assert not (run / CHECKPOINT).exists()
    # diverging later: the last epoch's checkpoint stays, finite and readable
    calls = {"n": 0}
    real = update_module.ShardStep.__call__

    def poisoned(self, model, idx):
        calls["n"] += 1
        loss = real(self, model, idx)
        if calls["n"] == 9:
            for p in model.parameters():
                p.grad.fill_(math.nan)
        return loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(update_module.ShardStep, "__call__", poisoned)
        with pytest.raises(Diverged, match="non-finite gradient in epoch 2, batch 3 of 6"):
            train(config(data, tmp_path / "late"), Comm.serial())
    state = read_checkpoint(tmp_path / "late" / CHECKPOINT)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    text = (tmp_path / "late" / "metrics.json").read_text()
    json.loads(text)       # strict JSON (no NaN)
    assert "NaN" not in text and "Infinity" not in text


def test_skip_batch_counts_and_keeps_training(data, tmp_path, monkeypatch):
    real = update_module.ShardStep.__call__
    calls = {"n": 0}

    def poisoned(self, model, idx):
        calls["n"] += 1
        loss = real(self, model, idx)
        return math.nan if calls["n"] in (2, 9) else loss
    monkeypatch.setattr(update_module.ShardStep, "__call__", poisoned)
    metrics = train(config(data, tmp_path / "r", on_divergence="skip-batch"), Comm.serial())
    assert [e["skipped_batches"] for e in metrics["epochs"]] == [1, 1, 0]
    assert [e["updates"] for e in metrics["epochs"]] == [5, 5, 6]
    assert all(math.isfinite(e["train_loss"]) for e in metrics["epochs"])
    with pytest.raises(InputError, match="skip-batch needs strategy = sequential"):
        train(config(data, tmp_path / "w", on_divergence="skip-batch", strategy="mutex",
                     workers=2), Comm.serial())


def test_replica_check_reports_nan_as_divergence():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(Diverged, match="non-finite parameters"):
        check_replicas(model, Comm.serial())


def test_strict_json():
    assert strict_json({"a": [1.0, math.nan, {"b": math.inf}], "c": "x"}) == \
        {"a": [1.0, None, {"b": None}], "c": "x"}


# --------------------------------------------------------------------------- #
# run folders
# --------------------------------------------------------------------------- #
def test_a_folder_in_use_is_refused(data, tmp_path):
    with RunFolder(str(tmp_path / "r"), Comm.serial(), resume=False):
        with pytest.raises(InputError, match="in use by another run .*pid"):
            RunFolder(str(tmp_path / "r"), Comm.serial(), resume=False)
    # released: a new run may take it
    RunFolder(str(tmp_path / "r"), Comm.serial(), resume=False).close()


def test_a_run_that_died_before_its_first_checkpoint_restarts(data, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text("garbage")
    (run / "log.txt").write_text("old line\n")
    train(config(data, run, epochs=1), Comm.serial())
    log = (run / "log.txt").read_text()
    assert "old line" not in log and "restarting: the previous run" in log
    with pytest.raises(InputError, match="already holds a run"):
        train(config(data, run, epochs=1), Comm.serial())


def test_generated_names_are_unique(tmp_path):
    stem = str(tmp_path / "runs" / "20260101-000000-gru")
    names = {claim_run_name(stem) for _ in range(5)}
    assert len(names) == 5 and all(os.path.isdir(n) for n in names)


# --------------------------------------------------------------------------- #
# MPI: a stop on one rank is agreed by all; exact resume at P ranks
# --------------------------------------------------------------------------- #
@pytest.mark.mpi
@pytest.mark.parametrize("signal_rank", [0, -1])
def test_mpi_signal_on_one_rank_resume_bit_exact(data, tmp_path_factory, monkeypatch,
                                                 signal_rank):
    comm = Comm.world()
    root = comm.bcast_object(str(tmp_path_factory.mktemp("mpi")) if comm.is_root else None)
    opts = dict(propagator="mgrit", levels=2, cfactor=2)
    whole = train(config(data, f"{root}/whole", **opts), comm)
    SignalAfter(monkeypatch, calls=4, rank=signal_rank % comm.size)
    with pytest.raises(Stopped):
        train(config(data, f"{root}/part", **opts), comm)
    monkeypatch.undo()
    resumed = train(config(data, f"{root}/part", **opts), comm, resume=True)
    if comm.is_root:
        assert bit_equal(params(Path(root) / "whole"), params(Path(root) / "part"))
    assert without_times(resumed) == without_times(whole)
