"""The tracer wired into the communicator, the solver and the training loop;
the skeleton runs of the solver against real traced solves.

Serial tests run at P = 1; the ``mpi`` tests at whatever size mpiexec gives."""
from __future__ import annotations

import time

import pytest
import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.core.replay import Network, programs_from_traces, replay
from mgrit_gru.core.skeleton import Skeleton, SkeletonComm, SkeletonStepper
from mgrit_gru.core.solver import MGRIT, MGRITSettings
from mgrit_gru.core.stepper import DahlquistStepper
from mgrit_gru.core.trace import NULL_TRACER, Tracer, exclusive_cpu, merge_chrome
from helpers_train import one_thread  # noqa: F401  (fixture)

NET = Network(alpha=1e-3, beta=1e6, eager=1000)
SETTINGS = [MGRITSettings(levels=3, cfactor=4, max_iters=2, relax="FCF", nested=True),
            MGRITSettings(levels=3, cfactor=2, max_iters=3, relax=("F", "FCF"), cycle="F")]
U0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _stepper():
    return DahlquistStepper(lam=torch.tensor([-0.3, -2.0, -10.0]), dt=0.1, state_shape=(3,))


def _traced_solve(comm, n, settings, reverse=False):
    """(untraced u, traced u, info, tracer) of one solve with a right-hand side."""
    g = torch.Generator().manual_seed(3)
    rhs_full = torch.randn((n + 1, 3), generator=g, dtype=torch.float64)
    out = []
    for tracer in (NULL_TRACER, Tracer(comm.rank, comm.size)):
        comm.tracer = tracer
        solver = MGRIT(_stepper(), comm, n, settings, reverse=reverse)
        lo, hi = solver.fine_range.lo, solver.fine_range.hi
        u, info = solver.solve(u0=U0, rhs=rhs_full[lo:hi])
        out.append((u.clone(), info))
    comm.tracer = NULL_TRACER
    return out[0][0], out[1][0], out[1][1], tracer


def _skeleton_ops(rank, size, n, settings, reverse=False, state_bytes=24):
    sk = Skeleton()
    comm = SkeletonComm(rank, size, sk, state_bytes)
    solver = MGRIT(SkeletonStepper(sk), comm, n, settings, reverse=reverse)
    solver.solve(rhs=torch.zeros(solver.fine_range.size, 1))
    sk.flush()
    return sk


def _calls(ops):
    """The communication calls of a program: (kind, peer, bytes, tag)."""
    return [(o.kind, o.peer, o.nbytes, o.tag) for o in ops if o.kind not in ("compute", "mark")]


def check_traced_solve(comm):
    for settings in SETTINGS:
        for n, reverse in ((64, False), (37, True)):
            plain, traced, info, tracer = _traced_solve(comm, n, settings, reverse)
            # the traced solve computes the same thing (same operations, same order)
            torch.testing.assert_close(traced, plain, rtol=0, atol=1e-13)
            data = tracer.to_chrome()
            levels = {e["args"].get("level") for e in data["traceEvents"]
                      if e.get("cat") == "phase" and e["name"] == "f_relax"}
            assert levels == {0, 1}                     # F-relaxation on the non-coarsest levels
            names = {e["name"] for e in data["traceEvents"] if e.get("cat") == "phase"}
            assert {"f_relax", "residual", "coarse_correct", "coarsest"} <= names
            # the skeleton of this rank: the same calls, the same step counts
            sk = _skeleton_ops(comm.rank, comm.size, n, settings, reverse)
            prog = programs_from_traces(comm.allgather_object(data))
            assert _calls(prog[comm.rank]) == _calls(sk.ops)
            assert [sk.steps.get(l, 0) for l in range(len(info.steps))] == info.steps
            # the traces replay without a deadlock; every rank finishes
            if comm.rank == 0:
                res = replay(prog, NET)
                assert len(res.finish) == comm.size and min(res.finish) >= 0


def test_traced_solve_serial():
    check_traced_solve(Comm.serial())


@pytest.mark.mpi
def test_traced_solve_mpi():
    check_traced_solve(Comm.world())


def test_skeleton_replays_at_many_ranks():
    """Skeleton programs of every rank of a P = 8 solve match each other (the
    replay finds a partner for every call) and count the steps of the whole
    solve independently of P (the solver's work does not depend on P)."""
    s = SETTINGS[0]
    totals = []
    for P in (1, 3, 8):
        sks = [_skeleton_ops(r, P, 256, s) for r in range(P)]
        replay([sk.ops for sk in sks], NET)
        totals.append([sum(sk.steps.get(l, 0) for sk in sks) for l in range(3)])
    assert totals[0][0] == totals[1][0] == totals[2][0]


def _spin(seconds):
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


@pytest.mark.mpi
def test_pipeline_through_comm_matches_closed_form():
    """Rank r receives from r-1, computes, sends to r+1 through Comm with a tracer:
    the replay of the traces is P work + (P-1) message costs."""
    comm = Comm.world()
    P, work = comm.size, 0.05
    tr = Tracer(comm.rank, P)
    comm.tracer = tr
    buf = torch.zeros(4)
    comm.barrier()
    tr.mark("go")
    if comm.rank > 0:
        comm.recv(buf, comm.rank - 1, tag=5)
    _spin(work)
    if comm.rank < P - 1:
        comm.send(buf, comm.rank + 1, tag=5)
    tr.mark("done")
    comm.tracer = NULL_TRACER
    traces = comm.allgather_object(tr.to_chrome())
    res = replay(programs_from_traces(traces), NET)
    took = res.marks[P - 1][-1][1] - res.marks[0][0][1]
    assert took == pytest.approx(P * work + (P - 1) * NET.cost(16), abs=0.02 * P)
    kinds = [e["args"]["op"] for e in traces[min(1, P - 1)]["traceEvents"]
             if e.get("cat") == "comm"]
    assert kinds[0] == "barrier" and ("recv" in kinds) == (P > 1)


def test_exclusive_cpu_of_a_known_timeline():
    def ev(name, c0, c1, cat="phase", level=None):
        args = {"cpu0_s": c0, "cpu1_s": c1}
        if level is not None:
            args["level"] = level
        if cat == "comm":
            args["op"] = "recv"
        return {"name": name, "cat": cat, "ph": "X", "ts": 0, "dur": 0, "args": args}
    trace = {"traceEvents": [
        {"name": "b", "ph": "i", "args": {"cpu_s": 0.0}},
        ev("fwd", 0.0, 10.0),
        ev("f_relax", 1.0, 4.0, level=0), ev("recv", 2.0, 2.5, cat="comm"),
        ev("coarsest", 5.0, 6.0, level=2),
        ev("bwd", 10.0, 12.0),
        {"name": "e", "ph": "i", "args": {"cpu_s": 13.0}}]}
    got = exclusive_cpu(trace, "b", "e")
    assert got[("f_relax", 0)] == pytest.approx(2.5)
    assert got[("comm", None)] == pytest.approx(0.5)
    assert got[("coarsest", 2)] == pytest.approx(1.0)
    assert got[("fwd", None)] == pytest.approx(10.0 - 3.0 - 1.0)
    assert got[("other", None)] == pytest.approx(1.0)
    assert sum(got.values()) == pytest.approx(13.0)


def test_merge_aligns_ranks_on_the_wall_clock():
    a, b = Tracer(0, 2), Tracer(1, 2)
    a.meta["wall_clock_s"], b.meta["wall_clock_s"] = 100.0, 100.5
    a.mark("x")
    b.mark("x")
    m = merge_chrome([a.to_chrome(), b.to_chrome()])
    ts = {e["pid"]: e["ts"] for e in m["traceEvents"] if e.get("ph") == "i"}
    assert ts[1] - ts[0] == pytest.approx(0.5e6, abs=1e4)


def test_train_trace_writes_timelines(tmp_path, one_thread):
    from helpers_train import write_easy_data

    from mgrit_gru.core.trace import load_trace
    from mgrit_gru.training import make_config, train
    data = write_easy_data(tmp_path, 48)
    out = tmp_path / "run"
    cfg = make_config({"data": data, "epochs": 1, "hidden": 6, "batch_size": 16,
                       "propagator": "mgrit", "levels": 2, "trace": True, "trace_batches": 2,
                       "out": str(out), "progress": "off"})
    train(cfg, Comm.serial())
    t = load_trace(out / "trace" / "rank0.json")
    assert t["metadata"]["batches"] == 2
    res = replay(programs_from_traces([t]), NET)
    assert len(res.between("batch", "batch end")) == 2
    names = {e["name"] for e in t["traceEvents"] if e.get("cat") == "phase"}
    assert {"batch", "fwd", "bwd", "param_grads", "f_relax"} <= names
    assert (out / "trace" / "timeline.json").is_file()


def test_train_trace_refuses_worker_strategies(tmp_path):
    from helpers_train import write_easy_data

    from mgrit_gru.errors import InputError
    from mgrit_gru.training import make_config, train
    data = write_easy_data(tmp_path, 16)
    cfg = make_config({"data": data, "epochs": 1, "hidden": 4, "strategy": "mutex",
                       "workers": 2, "trace": True, "out": str(tmp_path / "r"),
                       "progress": "off"})
    with pytest.raises(InputError, match="trace"):
        train(cfg, Comm.serial())
