"""The training loop: metrics, learning, determinism, resume, MPI replicas."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from helpers_train import DEVICES, without_times, write_easy_data
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import make_config
from mgrit_gru.data import load_dataset
from mgrit_gru.errors import InputError
from mgrit_gru.training.loop import train
from mgrit_gru.training.setup import build_model, check_device_options, resolve_device
from mgrit_gru.training.metrics import check_replicas, classification_metrics, confusion_matrix

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
EPOCH_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "test_precision",
              "test_recall", "test_f1", "seconds"}


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    """A tiny two-class HDF5 data set in the package schema."""
    return write_easy_data(tmp_path_factory.mktemp("data"), 64)


def config(data, out, **options):
    base = dict(data=data, out=str(out), hidden=8, epochs=2, batch_size=16, threads=1,
                progress="off")
    base.update(options)
    return make_config(base)


# --------------------------------------------------------------------------- #
# metrics against hand-computed values
# --------------------------------------------------------------------------- #
def test_confusion_matrix_counts_pairs():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 4), expected)


@pytest.mark.parametrize("classes, y_true, y_pred, accuracy, precision, recall", [
    # per class precision 2/2, 1/3, 0/1 ; recall 2/3, 1/2, 0/1
    (3, [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 1], Fraction(3, 6), Fraction(4, 9), Fraction(7, 18)),
    # class 2 is never predicted: precision 0 by convention ; recall 1, 1, 0
    (3, [0, 1, 2, 2], [0, 1, 1, 1], Fraction(2, 4), Fraction(4, 9), Fraction(2, 3)),
    # class 2 absent from labels and predictions: 0 and 0, still in the mean
    (3, [0, 1, 1, 0], [0, 1, 1, 0], Fraction(1), Fraction(2, 3), Fraction(2, 3)),
    (2, [0, 1, 1, 0], [0, 1, 1, 0], Fraction(1), Fraction(1), Fraction(1)),
])
def test_macro_metrics_hand_computed(classes, y_true, y_pred, accuracy, precision, recall):
    m = classification_metrics(confusion_matrix(y_true, y_pred, classes))
    f1 = 2 * precision * recall / (precision + recall)
    assert m["accuracy"] == pytest.approx(float(accuracy), abs=1e-15)
    assert m["precision"] == pytest.approx(float(precision), abs=1e-15)
    assert m["recall"] == pytest.approx(float(recall), abs=1e-15)
    assert m["f1"] == pytest.approx(float(f1), abs=1e-15)


def test_macro_metrics_nothing_right_is_zero():
    m = classification_metrics(confusion_matrix([0, 0, 1], [1, 1, 0], 2))
    assert m == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
def test_training_reduces_the_loss(easy_data, tmp_path, device):
    cfg = config(easy_data, tmp_path / "run", epochs=4, lr=0.05, device=device)
    dataset = load_dataset(easy_data)
    model = build_model(cfg, dataset)       # the initial weights train() starts from
    with torch.no_grad():
        x = torch.from_numpy(dataset.test.x)
        initial = float(torch.nn.functional.cross_entropy(model(x), torch.from_numpy(dataset.test.y)))
    metrics = train(cfg, Comm.serial())
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert metrics["final"]["test_loss"] < 0.7 * initial
    assert losses[-1] < losses[0]
    assert metrics["final"]["test_accuracy"] > 0.75


def test_same_seed_same_metrics(easy_data, tmp_path):
    a = train(config(easy_data, tmp_path / "a"), Comm.serial())
    b = train(config(easy_data, tmp_path / "b"), Comm.serial())
    c = train(config(easy_data, tmp_path / "c", seed=1), Comm.serial())
    assert without_times(a) == without_times(b)
    assert without_times(a) != without_times(c)


def test_run_folder_files(easy_data, tmp_path):
    out = tmp_path / "run"
    metrics = train(config(easy_data, out, checkpoint_every=5), Comm.serial())
    # .lock: the run's flock (released at the end, the file stays)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.toml",
                                                     "log.txt", "metrics.json"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    for record in on_disk["epochs"]:
        assert EPOCH_KEYS <= set(record)
        assert all(math.isfinite(record[k]) for k in EPOCH_KEYS)
    assert on_disk["final"]["train_seconds"] == pytest.approx(
        sum(e["seconds"] for e in on_disk["epochs"]))
    assert {"torch", "ranks", "threads", "hostname"} <= set(on_disk["environment"])
    # the last epoch is checkpointed even when checkpoint_every does not divide it
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    model = build_model(config(easy_data, out), load_dataset(easy_data))
    model.load_state_dict(state["model"])
    # one log line per epoch after the header
    lines = (out / "log.txt").read_text().splitlines()
    assert [ln.split(" | ")[0] for ln in lines[1:]] == ["epoch 1/2", "epoch 2/2"]


def test_refuses_to_overwrite_a_run(easy_data, tmp_path):
    train(config(easy_data, tmp_path / "run", epochs=1), Comm.serial())
    with pytest.raises(InputError, match="already holds a run"):
        train(config(easy_data, tmp_path / "run", epochs=1), Comm.serial())


def test_eval_every_skips_test_metrics(easy_data, tmp_path):
    metrics = train(config(easy_data, tmp_path / "run", epochs=3, eval_every=2), Comm.serial())
    evaluated = [e["test_loss"] is not None for e in metrics["epochs"]]
    assert evaluated == [False, True, True]   # epoch 2, and the last one


def test_resume_continues_exactly(easy_data, tmp_path):
    whole = train(config(easy_data, tmp_path / "whole", epochs=3), Comm.serial())
    train(config(easy_data, tmp_path / "part", epochs=1), Comm.serial())
    resumed = train(config(easy_data, tmp_path / "part", epochs=3), Comm.serial(), resume=True)
    assert without_times(resumed) == without_times(whole)


def test_resume_needs_a_checkpoint(easy_data, tmp_path):
    with pytest.raises(InputError, match="not found"):
        train(config(easy_data, tmp_path / "none"), Comm.serial(), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no checkpoint.pt"):
        train(config(easy_data, tmp_path / "empty"), Comm.serial(), resume=True)


def test_time_ranks_must_fit_the_communicator(easy_data, tmp_path):
    with pytest.raises(InputError, match="time_ranks"):
        train(config(easy_data, tmp_path / "run", time_ranks=2), Comm.serial())


def test_autograd_propagator_trains_like_serial(easy_data, tmp_path):
    """The hand-written backward and plain BPTT give the same training run."""
    a = train(config(easy_data, tmp_path / "a", dtype="float64"), Comm.serial())
    b = train(config(easy_data, tmp_path / "b", dtype="float64", propagator="autograd"),
              Comm.serial())
    for ea, eb in zip(a["epochs"], b["epochs"]):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert ea[key] == pytest.approx(eb[key], rel=1e-9)


def test_mgrit_converged_trains_like_serial(easy_data, tmp_path):
    """Converged MGRIT solves give the serial run; MGRIT statistics are recorded."""
    exact = dict(dtype="float64", levels=2, cfactor=2, fwd_iters=40, bwd_iters=40,
                 fwd_tol=1e-13, bwd_tol=1e-13)
    a = train(config(easy_data, tmp_path / "a", dtype="float64"), Comm.serial())
    b = train(config(easy_data, tmp_path / "b", propagator="mgrit", **exact), Comm.serial())
    for ea, eb in zip(a["epochs"], b["epochs"]):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert ea[key] == pytest.approx(eb[key], rel=1e-9)
        assert eb["test_loss_inexact"] == pytest.approx(ea["test_loss"], rel=1e-9)
        assert 1 <= eb["fwd_iters"] <= 40 and eb["fwd_residual"] <= 1e-13
        assert 1 <= eb["bwd_iters"] <= 40 and eb["bwd_residual"] <= 1e-13
    assert "fwd_iters" not in a["final"]


# --------------------------------------------------------------------------- #
# MPI: data groups and replicas
# --------------------------------------------------------------------------- #
@pytest.mark.mpi(min_size=2)
def test_data_groups_match_one_rank(easy_data, tmp_path):
    world = Comm.world()
    # every rank's tmp_path differs; the run folder is rank 0's
    cfg = config(easy_data, tmp_path / "world", epochs=2, batch_size=7, dtype="float64")
    parallel = train(cfg, world)
    single = train(config(easy_data, tmp_path / "single", epochs=2, batch_size=7,
                          dtype="float64"), Comm.serial())
    assert parallel["environment"]["data_groups"] == world.size
    for ep, es in zip(parallel["epochs"], single["epochs"]):
        for key in ("train_loss", "test_loss", "test_accuracy", "test_f1"):
            assert ep[key] == pytest.approx(es[key], rel=1e-10)
    # every rank returns the same metrics
    gathered = world.allgather_object(without_times(parallel))
    assert all(g == gathered[0] for g in gathered)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("time", ["all", 1])
def test_mgrit_time_and_data_ranks_match_one_rank(easy_data, tmp_path, time):
    """MGRIT with a fixed number of iterations gives the same run on P time
    ranks (or on P data groups) as on one rank."""
    world = Comm.world()
    time_ranks = world.size if time == "all" else 1
    opts = dict(epochs=1, batch_size=10, dtype="float64", propagator="mgrit", levels=2,
                cfactor=2, fwd_iters=2, bwd_iters=1)
    parallel = train(config(easy_data, tmp_path / "world", time_ranks=time_ranks, **opts),
                     world)
    single = train(config(easy_data, tmp_path / "single", **opts), Comm.serial())
    assert parallel["environment"]["time_ranks"] == time_ranks
    # residuals are of the batch each rank solves for: a shard with data groups
    keys = ("train_loss", "test_loss", "test_accuracy", "test_loss_inexact",
            "test_accuracy_inexact", "fwd_iters", "bwd_iters")
    if time_ranks == world.size:
        keys += ("fwd_residual", "bwd_residual")
    for ep, es in zip(parallel["epochs"], single["epochs"]):
        for key in keys:
            assert ep[key] == pytest.approx(es[key], rel=1e-9, abs=1e-14)
    gathered = world.allgather_object(without_times(parallel))
    assert all(g == gathered[0] for g in gathered)


@pytest.mark.mpi(min_size=2)
def test_check_replicas_detects_a_difference():
    world = Comm.world()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    check_replicas(model, world)                    # identical: passes
    if world.rank == world.size - 1:
        with torch.no_grad():
            model.bias[0] += 1e-6
    with pytest.raises(RuntimeError, match="differ across ranks"):
        check_replicas(model, world)                # raised on every rank: no hang


# --------------------------------------------------------------------------- #
# the device
# --------------------------------------------------------------------------- #
def fake_gpus(monkeypatch, count):
    """torch sees ``count`` GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", rank=3) == torch.device("cpu")
    with pytest.raises(InputError, match=r"^option device \(--device\): cuda, but torch sees "
                                         r"no CUDA device") as info:
        resolve_device("cuda")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("environ, rank, index", [
    ({}, 0, 0), ({}, 5, 1),                                  # no launcher: rank mod GPUs
    ({"MPI_LOCALRANKID": "3"}, 9, 3), ({"SLURM_LOCALID": "6"}, 0, 2),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 4, 1),
    # MPICH's hydra first, then SLURM, then Open MPI; a value that is no number is skipped
    ({"MPI_LOCALRANKID": "1", "SLURM_LOCALID": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 0, 1),
    ({"SLURM_LOCALID": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 0, 2),
    ({"MPI_LOCALRANKID": "", "SLURM_LOCALID": "x", "OMPI_COMM_WORLD_LOCAL_RANK": "7"}, 0, 3),
])
@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_resolve_device_picks_local_rank_mod_gpus(monkeypatch, environ, rank, index, name):
    fake_gpus(monkeypatch, 4)
    assert resolve_device(name, rank, environ) == torch.device("cuda", index)


@pytest.mark.parametrize("options, words", [
    (dict(strategy="hogwild"), "hogwild cannot run on a GPU"),
    (dict(strategy="hogwild", workers=2), "hogwild cannot run on a GPU"),
    (dict(strategy="mutex", workers=2), "mutex with 2 workers cannot run on a GPU"),
    (dict(strategy="averaging", workers=3), "averaging with 3 workers cannot run on a GPU"),
])
def test_strategies_that_cannot_run_on_a_gpu(easy_data, tmp_path, options, words):
    cfg = config(easy_data, tmp_path / "run", **options)
    check_device_options(cfg, torch.device("cpu"))              # on the cpu: fine
    with pytest.raises(InputError, match=r"^option strategy \(--strategy\): " + words):
        check_device_options(cfg, torch.device("cuda", 1))
    for fine in (dict(), dict(strategy="mutex", workers=1), dict(strategy="averaging")):
        check_device_options(config(easy_data, tmp_path / "run", **fine), torch.device("cuda"))


def test_train_cuda_without_a_gpu_is_an_input_error(easy_data, tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(InputError, match="option device"):
        train(config(easy_data, tmp_path / "run", device="cuda"), Comm.serial())
    assert not (tmp_path / "run").exists()                  # nothing written
    metrics = train(config(easy_data, tmp_path / "auto", device="auto", epochs=1),
                    Comm.serial())
    assert metrics["environment"]["device"] == "cpu"
    assert metrics["config"]["device"] == "auto"          # the option as given


def host_tensors(state):
    """Every tensor in a (nested) checkpoint."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in host_tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in host_tensors(v)]
    return []


@pytest.mark.parametrize("device", DEVICES)
def test_device_run_checkpoint_and_resume(easy_data, tmp_path, device):
    """On each device: the run of the cpu (float64), the device recorded, host
    tensors in the checkpoint, and a resumed run that continues the
    uninterrupted one (on the same device, and on the cpu)."""
    opts = dict(epochs=3, dtype="float64", optimizer="adam")
    on_cpu = train(config(easy_data, tmp_path / "cpu", **opts), Comm.serial())
    whole = train(config(easy_data, tmp_path / "whole", device=device, **opts), Comm.serial())
    used = whole["environment"]["device"]
    assert used == "cpu" if device == "cpu" else used.startswith("cuda:")
    assert f"| device {used} |" in (tmp_path / "whole" / "log.txt").read_text().splitlines()[0]
    for a, b in zip(on_cpu["epochs"], whole["epochs"]):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-9)
    train(config(easy_data, tmp_path / "part", device=device, **dict(opts, epochs=1)),
          Comm.serial())
    # loaded without map_location: tensors saved from a GPU would come back on it
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    tensors = host_tensors(state)
    assert len(tensors) > 10 and all(t.device.type == "cpu" for t in tensors)
    resumed = train(config(easy_data, tmp_path / "part", device=device, **opts),
                    Comm.serial(), resume=True)
    if device == "cpu":
        assert without_times(resumed) == without_times(whole)
    else:
        for a, b in zip(whole["epochs"], resumed["epochs"]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        # a run of the GPU resumed on the cpu
        train(config(easy_data, tmp_path / "moved", device=device, **dict(opts, epochs=1)),
              Comm.serial())
        moved = train(config(easy_data, tmp_path / "moved", device="cpu", **opts),
                      Comm.serial(), resume=True)
        assert moved["environment"]["device"] == "cpu"
        for a, b in zip(whole["epochs"], moved["epochs"]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_is_torchs_fused_adam_and_follows_the_loop(dtype):
    """make_optimizer's Adam is torch's fused one where torch has it for the
    CPU, and 30 steps of it stay with torch's per-tensor Adam to float
    rounding (the same gradients fed to both)."""
    from mgrit_gru.training.setup import make_optimizer
    dataset = load_dataset("synthetic:16", max_train=64, max_test=8)
    config = make_config(dict(data="synthetic:16", cell="gru", hidden=6, optimizer="adam",
                              lr=0.01, dtype=dtype))
    model = build_model(config, dataset)
    twin = build_model(config, dataset)
    twin.load_state_dict(model.state_dict())
    opt = make_optimizer(config, model)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
        assert opt.param_groups[0]["fused"] is True
    except RuntimeError:            # an older torch without CPU fused Adam: the loop
        assert not opt.param_groups[0].get("fused")
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert not torch.equal(p, q.new_zeros(q.shape))
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
