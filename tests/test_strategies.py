"""Data-parallel strategies: sequential, mutex, averaging, Hogwild.

Truths: the sequential run (K = 1), one optimizer step on the concatenated
minibatches (averaging), the delayed-gradient schedule of implicit aggregation
written out by hand (mutex), the optimizer's own step counter (updates), the
operating system's process table (clean-up), and one-rank runs for MPI.
"""

import copy
import math
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

from helpers_train import one_thread  # noqa: F401 (a fixture)
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import make_config
from mgrit_gru.data import Dataset, Split, batch_indices, write_dataset
from mgrit_gru.errors import InputError
from mgrit_gru.training.strategies import STRATEGIES, make_strategy
from mgrit_gru.training.loop import train
from mgrit_gru.training.setup import build_model, make_optimizer
from mgrit_gru.training.update import BatchUpdate, TensorSplit

pytestmark = pytest.mark.usefixtures("one_thread")

CELLS = ("implicit-gru", "gru", "lstm", "rnn")
PARALLEL = ("mutex", "mutex-arrival", "averaging", "hogwild")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def strategy(name, workers=1, backend="auto"):
    """``make_strategy`` of a test name (``mutex-arrival``: mutex with the
    arrival order)."""
    base, _, order = name.partition("-")
    return make_strategy(base, workers, backend, mutex_order=order or "fixed")


def make_split(rng, n, length=6, d=3, min_len=2):
    """Variable-length sequences; the class is the sign of the mean level."""
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    lengths = rng.integers(min_len, length + 1, n).astype(np.int64)
    x = (np.where(y == 1, 0.5, -0.5)[:, None, None]
         + rng.standard_normal((n, length, d))).astype(np.float32)
    x[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
    return Split(x, y, lengths)


def make_dataset(n=64, seed=0, min_len=2):
    rng = np.random.default_rng(seed)
    return Dataset("toy", make_split(rng, n, min_len=min_len),
                   make_split(rng, 16, min_len=min_len), 2)


class Run:
    """Model, optimizer and step function of a tiny run, built as train() does."""

    def __init__(self, cell="gru", optimizer="sgd", n=64, dtype="float32", seed=0):
        self.dataset = make_dataset(n)
        self.config = make_config(dict(cell=cell, hidden=5, optimizer=optimizer, lr=0.05,
                                       seed=seed, dtype=dtype, pooling="mean"))
        self.model = build_model(self.config, self.dataset)
        self.optimizer = make_optimizer(self.config, self.model)
        self.data = TensorSplit(self.dataset.train, getattr(torch, dtype))
        self.step = BatchUpdate(self.data, self.model, Comm.serial())

    def batches(self, epoch, batch_size=16):
        return list(batch_indices(self.data.n, batch_size, shuffle=True,
                                  generator=np.random.default_rng([0, epoch])))

    def train(self, name, workers=1, backend="auto", epochs=1, batch_size=16):
        results = []
        with strategy(name, workers, backend) as s:
            for epoch in range(1, epochs + 1):
                results.append(s.run_epoch(self.model, self.optimizer,
                                                  self.batches(epoch, batch_size), self.step))
        return results

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]


def assert_same_state(a: Run, b: Run):
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), key


def worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mgrit-gru-worker")]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- #
# K = 1 is the sequential run
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", PARALLEL)
def test_one_worker_thread_reproduces_sequential(name, cell):
    reference, run = Run(cell), Run(cell)
    expected = reference.train("sequential", epochs=2)
    got = run.train(name, 1, "thread", epochs=2)
    assert_same_state(run, reference)
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in expected]


@pytest.mark.parametrize("name", PARALLEL)
def test_one_worker_process_reproduces_sequential_adam(name):
    """Processes, shared memory and (Hogwild) the shared Adam state; no
    process is left after close()."""
    reference, run = Run("implicit-gru", "adam"), Run("implicit-gru", "adam")
    reference.train("sequential", epochs=2)
    s = strategy(name, 1, "process")
    for epoch in (1, 2):
        s.run_epoch(run.model, run.optimizer, run.batches(epoch), run.step)
    assert_same_state(run, reference)
    pids = s.pool.pids
    assert len(pids) == 1 and alive(pids[0])
    s.close()
    assert not alive(pids[0])
    assert multiprocessing.active_children() == []
    s.close()                                           # idempotent


@pytest.mark.parametrize("name", PARALLEL)
def test_one_worker_thread_reproduces_sequential_adam(name):
    reference, run = Run("lstm", "adam"), Run("lstm", "adam")
    reference.train("sequential", epochs=2)
    run.train(name, 1, "thread", epochs=2)
    assert_same_state(run, reference)


# --------------------------------------------------------------------------- #
# averaging: one step on the concatenated minibatches
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("workers, path", [(2, "direct"), (3, "direct"), (2, "coordinated")])
def test_averaging_is_one_step_on_concatenated_batches(workers, path):
    run = Run("gru", n=16 * workers)
    reference = copy.deepcopy(run.model)
    batches = run.batches(1)
    step = Coordinated(run.step) if path == "coordinated" else run.step
    with make_strategy("averaging", workers, "thread") as strategy:
        result = strategy.run_epoch(run.model, run.optimizer, batches, step)
    assert result["updates"] == 1
    # the truth: mean loss over all K * 16 samples, autograd, one plain SGD step
    idx = torch.from_numpy(np.concatenate(batches))
    x, y, lengths = run.data.x[idx], run.data.y[idx], run.data.lengths[idx]
    loss = torch.nn.functional.cross_entropy(reference(x, lengths), y)
    loss.backward()
    assert result["train_loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    with torch.no_grad():
        for p, q in zip(run.model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q - 0.05 * q.grad, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- #
# mutex: the delayed-gradient schedule, written out
# --------------------------------------------------------------------------- #
class Coordinated:
    """One rank's step function claiming two data groups, with an identity
    reduction: the strategies take their coordinated path (as with MPI)."""

    data_groups = 2
    record = None

    def __init__(self, step):
        self.local = step.local

    def reduce_(self, flat):
        return flat

    def __call__(self, model, idx):  # pragma: no cover - strategies with workers use .local
        raise AssertionError


@pytest.mark.parametrize("workers, backend, path", [(2, "process", "direct"),
                                                    (3, "thread", "direct"),
                                                    (3, "thread", "coordinated")])
def test_mutex_follows_the_implicit_aggregation_schedule(workers, backend, path):
    """In each epoch, update j applies the gradient of minibatch j taken at
    the parameters after update max(0, j - K + 1) of that epoch: worker j % K
    last loaded them (all workers start from the epoch's parameters)."""
    run = Run("rnn", n=48, dtype="float64")
    epochs = [run.batches(e, 7) for e in (1, 2, 3)]        # k = 7: K does not divide it
    theta = run.params()
    scratch = copy.deepcopy(run.model)
    for batches in epochs:
        thetas = [theta]
        for j, idx in enumerate(batches):
            with torch.no_grad():
                for p, v in zip(scratch.parameters(), thetas[max(0, j - workers + 1)]):
                    p.copy_(v)
            for p in scratch.parameters():
                p.grad = None
            x, y, lengths = run.data.take(idx)
            torch.nn.functional.cross_entropy(scratch(x, lengths), y).backward()
            thetas.append([v - 0.05 * p.grad for v, p in zip(thetas[-1], scratch.parameters())])
        theta = thetas[-1]
    step = Coordinated(run.step) if path == "coordinated" else run.step
    with make_strategy("mutex", workers, backend) as strategy:
        results = [strategy.run_epoch(run.model, run.optimizer, batches, step)
                   for batches in epochs]
        pids = strategy.pool.pids
        assert len(pids) == (workers if backend == "process" else 0)
    assert not any(alive(p) for p in pids)
    assert worker_threads() == []
    assert [r["updates"] for r in results] == [7, 7, 7]
    for p, v in zip(run.model.parameters(), theta):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=1e-12)
    # and it is not the sequential run (the test can tell them apart)
    sequential = Run("rnn", n=48, dtype="float64")
    sequential.train("sequential", epochs=3, batch_size=7)
    assert not all(torch.equal(p, q) for p, q in
                   zip(run.model.parameters(), sequential.model.parameters()))


class Recorder:
    """A thread workers' step function that records, per minibatch, the
    parameters its gradient was taken at and the gradient."""

    def __init__(self, step):           # (not ``.local``: the strategies would use that)
        self.step, self.lock, self.calls = step, threading.Lock(), []

    def __call__(self, model, idx):
        loss = self.step(model, idx)
        with self.lock:
            self.calls.append((tuple(int(i) for i in idx),
                               [p.detach().clone() for p in model.parameters()],
                               [p.grad.detach().clone() for p in model.parameters()],
                               id(model)))      # the worker's replica
        return loss


@pytest.mark.parametrize("workers", [2, 3])
def test_arrival_mutex_is_one_chain_of_updates(workers):
    """Arrival order: every minibatch is used once; each gradient was taken at
    the epoch's start or at a version of one chain of updates, each version by
    one gradient only (its updater's next: the copy is in the critical
    section); the chain, rebuilt from the recorded gradients, ends at the
    model's parameters. SGD, float64."""
    run = Run("rnn", n=48, dtype="float64")
    batches = run.batches(1, 5)                                 # k = 10
    theta0 = run.params()
    recorder = Recorder(run.step.local)
    with strategy("mutex-arrival", workers, "thread") as s:
        result = s.run_epoch(run.model, run.optimizer, batches, recorder)
        assert "arrival order" in s.describe()
    assert result["updates"] == len(batches)
    assert sorted(c[0] for c in recorder.calls) == sorted(tuple(map(int, b)) for b in batches)

    def same(a, b):
        return all(torch.allclose(u, v, rtol=0, atol=1e-12) for u, v in zip(a, b))

    at_start = [c for c in recorder.calls if same(c[1], theta0)]
    # each worker's first gradient, and only that, is at the start (a worker
    # that started after the others had taken every minibatch has none)
    firsts = {}
    for c in recorder.calls:
        firsts.setdefault(c[3], c)
    assert 1 <= len(firsts) <= workers
    assert [c[0] for c in at_start] == [c[0] for c in recorder.calls if firsts[c[3]] is c]
    later = [c for c in recorder.calls if not same(c[1], theta0)]
    theta, pending = theta0, list(recorder.calls)
    while later:                                 # the next version someone computed at
        match = [(c, d) for c in pending for d in later
                 if same([v - 0.05 * g for v, g in zip(theta, c[2])], d[1])]
        assert len(match) == 1, "not one chain of updates"
        (c, d), = match
        theta = [v - 0.05 * g for v, g in zip(theta, c[2])]
        pending.remove(c)
        later.remove(d)
    for c in pending:                            # the last updates: nobody computed after
        theta = [v - 0.05 * g for v, g in zip(theta, c[2])]
    for p, v in zip(run.model.parameters(), theta):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=1e-11)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_arrival_mutex_keeps_the_sequential_model(backend):
    """Two arrival-order workers end near the sequential run (a stale-by-one
    gradient per update) and not at it."""
    reference, run = Run("gru", n=480), Run("gru", n=480)  # 30 minibatches: both workers take part
    reference.train("sequential", epochs=2)
    run.train("mutex-arrival", 2, backend, epochs=2)
    diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in
               zip(run.model.parameters(), reference.model.parameters()))
    print("max parameter difference", diff)
    assert 0 < diff < 0.01


# --------------------------------------------------------------------------- #
# number of updates, counted by Adam itself
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, workers, path", [
    ("mutex", 2, "direct"), ("averaging", 2, "direct"), ("averaging", 3, "direct"),
    ("hogwild", 2, "direct"), ("mutex-arrival", 2, "direct"), ("mutex", 2, "coordinated"),
    ("averaging", 3, "coordinated")])
def test_updates_per_epoch(name, workers, path):
    run = Run("gru", "adam", n=70)          # k = 5 minibatches, the last of 6
    k = 5
    step = Coordinated(run.step) if path == "coordinated" else run.step
    with strategy(name, workers, "thread") as s:
        results = [s.run_epoch(run.model, run.optimizer, run.batches(epoch), step)
                   for epoch in (1, 2)]
    expected = k if name != "averaging" else math.ceil(k / workers)
    assert [r["updates"] for r in results] == [expected, expected]
    assert all(math.isfinite(r["train_loss"]) for r in results)
    if name != "hogwild":       # Hogwild's workers may race on the shared state
        steps = {float(s["step"]) for s in run.optimizer.state_dict()["state"].values()}
        assert steps == {2.0 * expected}


# --------------------------------------------------------------------------- #
# clean-up and errors
# --------------------------------------------------------------------------- #
def test_thread_workers_are_gone_after_close():
    run = Run("gru")
    with make_strategy("mutex", 2, "thread") as strategy:
        strategy.run_epoch(run.model, run.optimizer, run.batches(1), run.step)
        assert len(worker_threads()) == 2
    assert worker_threads() == []


class FailingStep:
    """A picklable step function that raises on its third call."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, model, idx):
        self.calls += 1
        if self.calls == 3:
            raise InputError("data file x.h5: broken batch")
        return self.step(model, idx)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_worker_error_reaches_the_caller_and_workers_stop(backend):
    run = Run("gru")
    failing = FailingStep(run.step.local)
    with pytest.raises(InputError, match="^data file x.h5: broken batch$"):
        with make_strategy("mutex", 1, backend) as strategy:
            strategy.run_epoch(run.model, run.optimizer, run.batches(1), failing)
    assert worker_threads() == []
    assert multiprocessing.active_children() == []


def test_options_are_checked():
    with pytest.raises(InputError, match="sequential strategy runs 1 worker"):
        make_strategy("sequential", 2)
    with pytest.raises(InputError, match="strategy backend"):
        make_strategy("mutex", 2, "gpu")
    with pytest.raises(InputError, match="not available"):
        make_strategy("downpour", 2)
    assert set(STRATEGIES) == {"sequential", "mutex", "averaging", "hogwild"}
    with pytest.raises(InputError, match="--mutex-order.*expected one of fixed, arrival"):
        make_strategy("mutex", 2, mutex_order="first")


def test_worker_processes_refuse_a_model_off_the_cpu():
    model = torch.nn.Linear(3, 2, device="meta")     # parameters off the cpu, as on a GPU
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with make_strategy("mutex", 1, "process") as strategy:
        with pytest.raises(InputError, match="worker processes need the model on the cpu "
                                             r"\(it is on meta\)"):
            strategy.start(model, optimizer, lambda m, batch: 0.0)
    assert multiprocessing.active_children() == []
    # the default backend takes threads for it (and processes on the cpu)
    assert make_strategy("mutex", 1)._choose_backend(model) == "thread"
    assert make_strategy("mutex", 1)._choose_backend(torch.nn.Linear(3, 2)) == "process"


class TwoGroups:
    """A step function that claims two MPI data groups."""

    data_groups = 2

    def __init__(self, step):
        self.local = step

    def __call__(self, model, idx):  # pragma: no cover - never called
        raise AssertionError


def test_hogwild_refuses_several_ranks():
    run = Run("gru")
    with make_strategy("hogwild", 2, "thread") as strategy:
        with pytest.raises(InputError, match="hogwild runs on one rank only") as info:
            strategy.start(run.model, run.optimizer, TwoGroups(run.step.local))
    assert "\n" not in str(info.value)
    assert worker_threads() == []


def test_arrival_mutex_refuses_several_ranks():
    run = Run("gru")
    with strategy("mutex-arrival", 2, "thread") as s:
        with pytest.raises(InputError, match="mutex with --mutex-order arrival runs on one "
                                             "rank only.*use --mutex-order fixed"):
            s.start(run.model, run.optimizer, TwoGroups(run.step.local))
    assert worker_threads() == []
    with strategy("mutex-arrival", 2, "thread") as s:     # a coordinated run is refused too
        with pytest.raises(InputError, match="runs on one rank only"):
            s.start(run.model, run.optimizer, Coordinated(run.step))


# --------------------------------------------------------------------------- #
# through train(): the CLI path
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.h5"
    ds = make_dataset(48)
    write_dataset(path, ds.train, ds.test, name="toy", num_classes=2)
    return str(path)


def train_config(data, out, **options):
    base = dict(data=data, out=str(out), hidden=4, epochs=2, batch_size=8, threads=1,
                progress="off", optimizer="sgd", max_len=6)
    base.update(options)
    return make_config(base)


def test_train_with_averaging(toy_file, tmp_path):
    metrics = train(train_config(toy_file, tmp_path / "run", strategy="averaging", workers=2,
                                 worker_backend="process"))
    assert [e["updates"] for e in metrics["epochs"]] == [3, 3]     # ceil(6 / 2)
    assert metrics["environment"]["strategy_startup_seconds"] > 0
    assert "averaging, 2 workers (process)" in (tmp_path / "run" / "log.txt").read_text()
    assert multiprocessing.active_children() == []


def test_auto_backend_is_threads_for_short_runs(toy_file, tmp_path, monkeypatch):
    """auto: threads below AUTO_THREAD_MINIBATCHES minibatches left in the run,
    processes from there on; an explicit backend is kept."""
    import mgrit_gru.training.strategies as strategies_module
    from mgrit_gru.training.strategies import AUTO_THREAD_MINIBATCHES, auto_backend
    n = AUTO_THREAD_MINIBATCHES
    assert auto_backend("auto", n - 1) == "thread"
    assert auto_backend("auto", n) == "auto"                # _choose_backend: processes
    assert auto_backend("process", 1) == "process" and auto_backend("thread", n) == "thread"
    train(train_config(toy_file, tmp_path / "a", strategy="mutex", workers=2))
    assert "mutex, 2 workers (thread)" in (tmp_path / "a" / "log.txt").read_text()
    # 2 epochs x 6 minibatches = 12: at a threshold of 12 the run is not short
    monkeypatch.setattr(strategies_module, "AUTO_THREAD_MINIBATCHES", 12)
    train(train_config(toy_file, tmp_path / "b", strategy="mutex", workers=2))
    assert "mutex, 2 workers (process)" in (tmp_path / "b" / "log.txt").read_text()
    monkeypatch.setattr(strategies_module, "AUTO_THREAD_MINIBATCHES", 13)
    train(train_config(toy_file, tmp_path / "c", strategy="mutex", workers=2))
    assert "mutex, 2 workers (thread)" in (tmp_path / "c" / "log.txt").read_text()
    assert multiprocessing.active_children() == []


def test_train_with_arrival_mutex(toy_file, tmp_path):
    metrics = train(train_config(toy_file, tmp_path / "run", strategy="mutex", workers=2,
                                 mutex_order="arrival"))
    assert [e["updates"] for e in metrics["epochs"]] == [6, 6]
    assert metrics["config"]["mutex_order"] == "arrival"
    assert "mutex (arrival order), 2 workers (thread)" in (tmp_path / "run" / "log.txt").read_text()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("name, workers, updates", [("mutex", 2, 6), ("averaging", 2, 3),
                                                    ("averaging", 3, 2)])
def test_train_with_thread_workers_equals_processes(toy_file, tmp_path, name, workers, updates):
    """--worker-backend thread: the workers are threads of the rank (no child
    process) and the fixed-order strategies' runs are the process runs'
    (averaging: one thread updates the model for all, against every process
    updating its own replica)."""
    runs = {}
    for backend in ("thread", "process"):
        folder = tmp_path / backend
        runs[backend] = train(train_config(toy_file, folder, strategy=name, workers=workers,
                                           worker_backend=backend, optimizer="adam"))
        assert f"{name}, {workers} workers ({backend})" in (folder / "log.txt").read_text()
        assert runs[backend]["config"]["worker_backend"] == backend
    thread, process = runs["thread"]["epochs"], runs["process"]["epochs"]
    assert [e["updates"] for e in thread] == [e["updates"] for e in process] == [updates] * 2
    for a, b in zip(thread, process):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
    assert multiprocessing.active_children() == []


def test_worker_backend_is_checked(toy_file, tmp_path):
    with pytest.raises(InputError, match="worker_backend"):
        make_config(dict(data=toy_file, worker_backend="fork"))


# --------------------------------------------------------------------------- #
# MPI: data groups and time ranks
# --------------------------------------------------------------------------- #
def checksums_agree(model, world):
    from mgrit_gru.training.metrics import param_checksum

    gathered = world.allgather_object(param_checksum(model))
    return all(g == gathered[0] for g in gathered)


@pytest.mark.mpi(min_size=2)
def test_data_groups_match_one_rank(toy_file, tmp_path):
    """Mutex with worker processes on every rank (under MPI), gradients summed
    over the groups: the run of one rank, on every rank. (Averaging across
    data groups: test_mgrit_time_ranks_compose_with_workers.)"""
    world = Comm.world()
    opts = dict(strategy="mutex", workers=2, dtype="float64", batch_size=7)
    parallel = train(train_config(toy_file, tmp_path / "world", **opts), world)
    single = train(train_config(toy_file, tmp_path / "single", **opts), Comm.serial())
    assert parallel["environment"]["data_groups"] == world.size
    for ep, es in zip(parallel["epochs"], single["epochs"]):
        assert ep["updates"] == es["updates"]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert ep[key] == pytest.approx(es[key], rel=1e-10)


GRIDS = {"time": lambda size: size, "data": lambda size: 1, "2x2": lambda size: 2}


def grid_run(world, time_ranks, name):
    """One epoch of ``name`` with 2 workers on a time x data grid (MGRIT with
    fixed iterations); the model."""
    cfg = make_config(dict(cell="implicit-gru", hidden=4, propagator="mgrit", levels=2,
                           cfactor=2, fwd_iters=2, bwd_iters=1, lr=0.05, optimizer="sgd",
                           dtype="float64", pooling="mean"))
    time_comm, data_comm = world.split_grid(time_ranks)
    dataset = make_dataset(40, min_len=6)     # one length: the same MGRIT grid on every shard
    model = build_model(cfg, dataset, time_comm)
    optimizer = make_optimizer(cfg, model)
    data = TensorSplit(dataset.train, torch.float64)
    step = BatchUpdate(data, model, data_comm)
    batches = batch_indices(data.n, 8, shuffle=True, generator=np.random.default_rng(3))
    with make_strategy(name, 2) as strategy:
        result = strategy.run_epoch(model, optimizer, batches, step)
        assert strategy.pool.backend == "thread"
    assert result["updates"] == (5 if name == "mutex" else 3)
    return model


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", ["mutex", "averaging"])
def test_mgrit_time_ranks_compose_with_workers(name, grid):
    """Thread workers, each with its own time communicator, on all ranks as
    time ranks, as data groups, or (4 ranks) 2 x 2: the parameters are
    identical on every rank and equal those of the one-rank run."""
    world = Comm.world()
    if grid == "2x2" and world.size != 4:
        pytest.skip("the 2 x 2 grid needs exactly 4 ranks")
    model = grid_run(world, GRIDS[grid](world.size), name)
    assert checksums_agree(model, world)
    single = grid_run(Comm.serial(), 1, name)
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert worker_threads() == []


@pytest.mark.mpi(min_size=2)
def test_hogwild_refuses_mpi_runs(toy_file, tmp_path):
    world = Comm.world()
    with pytest.raises(InputError, match="hogwild runs on one rank only"):
        train(train_config(toy_file, tmp_path / "hog", strategy="hogwild", workers=2), world)


@pytest.mark.mpi(min_size=2)
def test_arrival_mutex_refuses_mpi_runs(toy_file, tmp_path):
    world = Comm.world()
    with pytest.raises(InputError, match="arrival runs on one rank only"):
        train(train_config(toy_file, tmp_path / "arr", strategy="mutex", workers=2,
                           mutex_order="arrival"), world)


@pytest.mark.parametrize("name", ["mutex", "mutex-arrival", "averaging", "hogwild"])
def test_worker_timeline_records_every_minibatch(name, tmp_path, monkeypatch):
    """MGRIT_GRU_WORKER_TIMELINE: one line per worker and direct epoch, the
    events of every minibatch in order; drivers/worker_timeline.py reads them."""
    import importlib.util
    import json
    from pathlib import Path

    monkeypatch.setenv("MGRIT_GRU_WORKER_TIMELINE", str(tmp_path))
    run = Run("gru", n=80)
    run.train(name, 2, "thread", epochs=2, batch_size=16)          # k = 5 per epoch
    lines = [json.loads(line) for w in (0, 1)
             for line in (tmp_path / f"worker{w}.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    kind = name.replace("-", "_")
    assert {line["kind"] for line in lines} == {kind}
    per_epoch = {}
    for i, line in enumerate(lines):
        names = [e for e, _ in line["events"]]
        times = [t for _, t in line["events"]]
        assert names[0] == "begin" and names[-1] == "end" and times == sorted(times)
        body = names[1:-1]
        per_batch = ["gradient", "update", "done"] if name == "hogwild" else \
            ["gradient", "wait", "update", "done"]
        assert body == per_batch * (len(body) // len(per_batch))
        per_epoch.setdefault(i % 2, 0)
        per_epoch[i % 2] += body.count("gradient")
    if name == "averaging":      # every worker takes part in every round (3 per epoch)
        assert sum(per_epoch.values()) == 2 * 2 * 3
    else:                        # each minibatch once
        assert sum(per_epoch.values()) == 2 * 5
    spec = importlib.util.spec_from_file_location(
        "worker_timeline", Path(__file__).resolve().parent.parent / "drivers" / "worker_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.summarise(module.load(tmp_path))
    assert summary[kind]["epochs"] == 2
    assert abs(sum(summary[kind]["share"].values()) - 1) < 1e-9


# --------------------------------------------------------------------------- #
# the optimizer step of every strategy
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_step_is_torchs_sgd_bit_for_bit(dtype):
    """replicas.optimizer_step: plain SGD as one multi-tensor call gives the
    values of torch's own SGD.step exactly (two groups, a parameter without
    gradient); other optimizers and options take their own step."""
    from mgrit_gru.training.replicas import _plain_sgd, optimizer_step
    g = torch.Generator().manual_seed(3)

    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(7, 5, dtype=dtype)) for _ in range(3)]

    ours, ref = params(), params()
    groups = lambda ps: [{"params": ps[:2], "lr": 0.05}, {"params": ps[2:], "lr": 0.3}]
    opt, ref_opt = torch.optim.SGD(groups(ours), lr=0.1), torch.optim.SGD(groups(ref), lr=0.1)
    assert _plain_sgd(opt)
    for k in range(5):
        for i, (p, q) in enumerate(zip(ours, ref)):
            grad = None if (i == 1 and k % 2) else torch.randn(p.shape, generator=g, dtype=dtype) * 3
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        optimizer_step(opt)
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)
    assert not torch.equal(ours[0], params()[0])
    for other in (torch.optim.SGD(params(), lr=0.1, momentum=0.9),
                  torch.optim.SGD(params(), lr=0.1, weight_decay=1e-3),
                  torch.optim.Adam(params(), lr=0.1)):
        assert not _plain_sgd(other)
    hooked = torch.optim.SGD(params(), lr=0.1)
    calls = []
    hooked.register_step_pre_hook(lambda *a: calls.append(1))
    assert not _plain_sgd(hooked)
    for p in hooked.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    optimizer_step(hooked)
    assert calls == [1]                      # its own step ran, hook included
