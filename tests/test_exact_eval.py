"""Exact evaluation of MGRIT-trained models, solver statistics, the serial last
epochs and the gradient check of the training loop (mgrit_gru.training.loop)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from mgrit_gru.cli import main
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import make_config
from mgrit_gru.data import load_dataset
from mgrit_gru.errors import InputError
from mgrit_gru.models import SerialPropagator
from mgrit_gru.training import loop as train_module
from mgrit_gru.training.loop import EPOCH_STATS, TEST_METRICS, build_model, train

DATA = dict(data="synthetic:64", max_train=64, max_test=48)
#: MGRIT solves converged to round-off (float64)
TIGHT = dict(fwd_iters=60, bwd_iters=60, fwd_tol=1e-12, bwd_tol=1e-12)
INEXACT = [f"{k}_inexact" for k in TEST_METRICS]


def config(out, **options):
    base = dict(**DATA, out=str(out), hidden=8, epochs=2, batch_size=16, threads=1,
                progress="off", propagator="mgrit", lr=0.02,
                # the cheap settings of the reference work: clearly inexact
                relax=("F", "FCF"), nested=False)
    base.update(options)
    return make_config(base)


def run_folder(comm, tmp_path, name):
    """Rank 0's folder (train writes there on every rank's behalf)."""
    return comm.bcast_object(str(tmp_path / name))


def serial_metrics(cfg, checkpoint):
    """Accuracy and mean loss of the checkpoint's weights on the test split, in
    a model built with the serial propagator, by a plain loop."""
    dataset = load_dataset(cfg.data, max_train=cfg.max_train, max_test=cfg.max_test)
    model = build_model(dataclasses.replace(cfg, propagator="serial"), dataset)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    x = torch.from_numpy(dataset.test.x).to(getattr(torch, cfg.dtype))
    y = torch.from_numpy(dataset.test.y)
    lengths = None if dataset.test.lengths is None else torch.from_numpy(dataset.test.lengths)
    loss = correct = 0.0
    with torch.no_grad():
        for s in range(0, len(y), 16):
            logits = model(x[s:s + 16], None if lengths is None else lengths[s:s + 16])
            loss += float(torch.nn.functional.cross_entropy(logits, y[s:s + 16], reduction="sum"))
            correct += int((logits.argmax(1) == y[s:s + 16]).sum())
    return correct / len(y), loss / len(y)


def without(metrics, *words):
    return [{k: v for k, v in e.items() if not any(w in k for w in words)}
            for e in metrics["epochs"]]


def check_exact_test_metrics(comm, tmp_path, dtype, **options):
    out = run_folder(comm, tmp_path, "run")
    cfg = config(out, dtype=dtype, **options)
    metrics = train(cfg, comm)
    comm.barrier()                       # rank 0 has written the checkpoint
    final = metrics["final"]
    accuracy, loss = serial_metrics(cfg, f"{out}/checkpoint.pt")
    assert final["inference"] == "exact"
    assert final["test_accuracy"] == accuracy
    assert final["test_loss"] == pytest.approx(loss, rel=0,
                                               abs=1e-5 if dtype == "float32" else 1e-10)
    # the inexact metrics are there, and differ: the comparison above can fail
    assert set(INEXACT) <= set(final)
    assert abs(final["test_loss_inexact"] - final["test_loss"]) > 1e-4
    # every rank holds the same metrics
    gathered = comm.allgather_object(without(metrics, "seconds"))
    assert all(g == gathered[0] for g in gathered)
    return metrics


# --------------------------------------------------------------------------- #
# exact evaluation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_test_metrics_are_the_serial_ones(tmp_path, dtype):
    check_exact_test_metrics(Comm.serial(), tmp_path, dtype)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("time", ["all", 1])
def test_test_metrics_are_the_serial_ones_mpi(tmp_path, dtype, time):
    world = Comm.world()
    metrics = check_exact_test_metrics(world, tmp_path, dtype,
                                       time_ranks=world.size if time == "all" else 1)
    assert metrics["environment"]["time_ranks"] == (world.size if time == "all" else 1)


def test_serial_runs_have_no_inexact_metrics(tmp_path):
    metrics = train(config(tmp_path / "run", propagator="serial"), Comm.serial())
    for record in metrics["epochs"]:
        assert record["inference"] == "exact" and record["train_propagator"] == "serial"
        assert not set(INEXACT + list(EPOCH_STATS)) & set(record)


def test_epoch_without_evaluation_has_null_metrics(tmp_path):
    metrics = train(config(tmp_path / "run", epochs=2, eval_every=2), Comm.serial())
    first = metrics["epochs"][0]
    assert all(first[k] is None for k in [*TEST_METRICS, *INEXACT])
    assert all(metrics["epochs"][1][k] is not None for k in [*TEST_METRICS, *INEXACT])


# --------------------------------------------------------------------------- #
# solver statistics, sample ids
# --------------------------------------------------------------------------- #
class _Recorder(SerialPropagator):
    """A serial propagator that reports made-up solver statistics (the call
    number) and records the sample ids it is given before each forward."""

    def __init__(self):
        super().__init__()
        self.ids, self.calls, self.last_stats = None, [], {}

    def set_sample_ids(self, ids):
        self.ids = None if ids is None else np.array(ids)

    def features(self, cell, x, lengths=None, pooling="last"):
        n = len(self.calls) + 1
        self.calls.append((x.shape[0], self.ids))
        self.ids = "stale"           # every forward must be preceded by set_sample_ids
        self.last_stats = {"fwd_iters": n, "bwd_iters": 2 * n, "fwd_residual": 1.0 / n,
                           "bwd_residual": 3.0, "fwd_steps": 10 * n, "bwd_steps": 5.0,
                           "serial_fallback": float(n % 2)}
        return super().features(cell, x, lengths, pooling)


def test_stats_and_sample_ids(tmp_path, monkeypatch):
    recorders = []

    def fake(config, time_comm):
        recorders.append(_Recorder())
        return recorders[-1]

    monkeypatch.setattr(train_module, "make_propagator", fake)
    # 64 sequences, batch 16: 4 training forwards per epoch, then 1 inexact eval
    metrics = train(config(tmp_path / "run", epochs=1, grad_check_every=1), Comm.serial())
    (rec,) = recorders
    train_calls, rest = rec.calls[:4], rec.calls[4:]
    ids = np.concatenate([c[1] for c in train_calls])
    assert sorted(ids.tolist()) == list(range(64))          # the shuffled epoch
    assert all(n == 16 for n, _ in train_calls)
    # the grad check (16 probe sequences) and the inexact evaluation (48): cold
    assert [(n, i) for n, i in rest] == [(16, None), (48, None)]
    record = metrics["epochs"][0]
    n = np.arange(1, 5)
    assert record["fwd_iters"] == pytest.approx(n.mean())
    assert record["fwd_iters_max"] == 4 and record["bwd_iters_max"] == 8
    assert record["bwd_iters"] == pytest.approx(2 * n.mean())
    assert record["fwd_residual"] == pytest.approx((1.0 / n).mean())
    assert record["fwd_residual_max"] == 1.0 and record["bwd_residual_max"] == 3.0
    assert record["fwd_steps"] == pytest.approx(10 * n.mean()) and record["bwd_steps"] == 5.0
    assert record["serial_batches"] == 2                      # calls 1 and 3
    assert record["train_propagator"] == "mgrit"


def test_mgrit_stats_keys(tmp_path):
    metrics = train(config(tmp_path / "run", epochs=1), Comm.serial())
    record = metrics["final"]
    assert set(EPOCH_STATS) <= set(record)
    for kind in ("fwd", "bwd"):
        assert record[f"{kind}_iters_max"] >= record[f"{kind}_iters"] >= 1
        assert record[f"{kind}_residual_max"] >= record[f"{kind}_residual"] > 0
    assert record["serial_batches"] == 0
    line = (tmp_path / "run" / "log.txt").read_text().splitlines()[-1]
    assert f"acc {record['test_accuracy']:.3f} (inexact " in line and "| mgrit fwd" in line


# --------------------------------------------------------------------------- #
# exact last epochs
# --------------------------------------------------------------------------- #
def final_parameters(out):
    state = torch.load(f"{out}/checkpoint.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items()}


def check_exact_last_epochs(comm, tmp_path):
    a, b, c = (run_folder(comm, tmp_path, n) for n in "abc")
    opts = dict(epochs=3, dtype="float64")
    mixed = train(config(a, exact_last_epochs=1, **opts), comm)
    assert [e["train_propagator"] for e in mixed["epochs"]] == ["mgrit", "mgrit", "serial"]
    assert mixed["epochs"][1]["fwd_iters"] is not None
    assert all(mixed["epochs"][2][k] is None for k in EPOCH_STATS)
    assert set(INEXACT) <= set(mixed["final"])
    train(config(b, exact_last_epochs=3, **opts), comm)
    serial = train(config(c, propagator="serial", **opts), comm)
    comm.barrier()
    pb, pc = final_parameters(b), final_parameters(c)
    for key in pc:
        torch.testing.assert_close(pb[key], pc[key], rtol=0, atol=1e-10)
    assert not all(torch.allclose(final_parameters(a)[k], pc[k], rtol=0, atol=1e-10) for k in pc)
    if comm.is_root:
        log = open(f"{a}/log.txt").read()
        assert "epoch 3: training switches from mgrit to the exact serial recurrence" in log
    return serial


def test_exact_last_epochs(tmp_path):
    check_exact_last_epochs(Comm.serial(), tmp_path)


@pytest.mark.mpi(min_size=2)
def test_exact_last_epochs_mpi(tmp_path):
    check_exact_last_epochs(Comm.world(), tmp_path)


def test_exact_last_epochs_needs_sequential(tmp_path):
    with pytest.raises(InputError, match="exact_last_epochs"):
        train(config(tmp_path / "run", exact_last_epochs=1, strategy="mutex", workers=2),
              Comm.serial())


# --------------------------------------------------------------------------- #
# gradient check
# --------------------------------------------------------------------------- #
def check_grad_check(comm, tmp_path, **grid):
    a, b, c = (run_folder(comm, tmp_path, n) for n in "abc")
    opts = dict(epochs=2, dtype="float64", **grid)
    tight = train(config(a, grad_check_every=1, **TIGHT, **opts), comm)
    for record in tight["epochs"]:
        assert record["grad_cosine"] > 1 - 1e-9 and record["grad_rel_error"] < 1e-8
    loose = train(config(b, grad_check_every=2, **opts), comm)
    assert "grad_cosine" not in loose["epochs"][0]
    assert loose["final"]["grad_rel_error"] > 1e-6            # the defaults: inexact
    assert loose["final"]["grad_cosine"] < 1 - 1e-12
    # the check does not disturb the training
    plain = train(config(c, **opts), comm)
    assert without(loose, "seconds", "grad") == without(plain, "seconds", "grad")
    gathered = comm.allgather_object(without(loose, "seconds"))
    assert all(g == gathered[0] for g in gathered)
    if comm.is_root:
        line = open(f"{b}/log.txt").read().splitlines()[-1]
        assert f"| grad cos {loose['final']['grad_cosine']:.6g} relerr " in line


def test_gradient_check_restores_the_gradients():
    cfg = config("unused", dtype="float64")
    dataset = load_dataset(cfg.data, max_train=cfg.max_train, max_test=cfg.max_test)
    model = build_model(cfg, dataset)
    params = list(model.parameters())
    for i, p in enumerate(params[1:]):
        p.grad = torch.full_like(p, float(i))
    before = [None if p.grad is None else p.grad.clone() for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(dataset.train.x[:16]).double()
    y = torch.from_numpy(dataset.train.y[:16])
    check = train_module.gradient_check(model, x, y, None)
    assert check["grad_rel_error"] > 1e-6 and 0.9 < check["grad_cosine"] < 1
    assert params[0].grad is None
    for p, g in zip(params[1:], before[1:]):
        assert torch.equal(p.grad, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert type(model.propagator).__name__ == "MGRITPropagator"


def test_grad_check(tmp_path):
    check_grad_check(Comm.serial(), tmp_path)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("time", ["all", 1])
def test_grad_check_mpi(tmp_path, time):
    world = Comm.world()
    check_grad_check(world, tmp_path, time_ranks=world.size if time == "all" else 1)


# --------------------------------------------------------------------------- #
# mgrit-gru info
# --------------------------------------------------------------------------- #
def test_info_shows_exact_inexact_stats_and_grad_check(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic:64", "--max-train", "32", "--max-test", "16",
                 "--hidden", "8", "--epochs", "1", "--threads", "1", "--progress", "off",
                 "--propagator", "mgrit", "--grad-check-every", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    final = json.loads((out / "metrics.json").read_text())["final"]
    for key in ("test_accuracy", "test_accuracy_inexact", "test_f1", "test_f1_inexact",
                "fwd_iters_max", "grad_cosine", "grad_rel_error"):
        assert f"{final[key]:.6g}" in text, key
    assert "exact" in text and "inexact" in text
