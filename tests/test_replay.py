"""The tracer and the trace-driven replay against closed-form timelines."""
from __future__ import annotations

import json
import time

import pytest

from mgrit_gru.core.replay import Network, Op, pipeline_program, programs_from_traces, replay
from mgrit_gru.core.trace import Tracer, load_trace

NET = Network(alpha=1e-3, beta=1e6, eager=1000)


@pytest.mark.parametrize("P", [1, 2, 5])
def test_pipeline_closed_form(P):
    res = replay(pipeline_program(P, work=0.5, nbytes=8), NET)
    assert res.wall == pytest.approx(P * 0.5 + (P - 1) * NET.cost(8))
    assert res.compute == [0.5] * P
    assert res.waiting[-1] == pytest.approx((P - 1) * (0.5 + NET.cost(8)))


def test_allreduce_waits_for_the_last_rank():
    progs = [[Op("compute", seconds=s), Op("allreduce", nbytes=800)] for s in (1.0, 2.0, 3.0)]
    res = replay(progs, NET)
    tree = 2 * 2 * NET.cost(800)                       # ceil(log2 3) = 2, reduce + bcast
    assert res.finish == pytest.approx([3.0 + tree] * 3)


def test_eager_and_rendezvous_sends():
    def two(nbytes):
        return [[Op("send", peer=1, nbytes=nbytes, tag=7)],
                [Op("compute", seconds=1.0), Op("recv", peer=0, nbytes=nbytes, tag=7)]]

    eager = replay(two(100), NET)
    assert eager.finish[0] == 0.0                     # the sender does not wait
    assert eager.finish[1] == pytest.approx(1.0)      # the data arrived long before
    big = replay(two(10_000), NET)
    done = 1.0 + NET.alpha + NET.cost(10_000)         # handshake once the receive is posted
    assert big.finish == pytest.approx([done, done])


def test_nonblocking_overlap():
    """An irecv posted before the work: the transfer overlaps it."""
    progs = [[Op("compute", seconds=0.2), Op("isend", peer=1, nbytes=500, tag=1, request=1),
              Op("compute", seconds=1.0), Op("wait", request=1)],
             [Op("irecv", peer=0, nbytes=500, tag=1, request=1), Op("compute", seconds=1.0),
              Op("wait", request=1)]]
    res = replay(progs, NET)
    assert res.finish[0] == pytest.approx(1.2)
    assert res.finish[1] == pytest.approx(1.0)        # arrived at 0.2 + cost < 1.0


def test_messages_match_in_order_per_tag():
    progs = [[Op("send", peer=1, nbytes=10, tag="a"), Op("compute", seconds=1.0),
              Op("send", peer=1, nbytes=10, tag="a")],
             [Op("recv", peer=0, nbytes=10, tag="a"), Op("recv", peer=0, nbytes=10, tag="a")]]
    res = replay(progs, NET)
    assert res.finish[1] == pytest.approx(1.0 + NET.cost(10))


def test_deadlock_is_reported():
    progs = [[Op("recv", peer=1, nbytes=8, tag=0)], [Op("recv", peer=0, nbytes=8, tag=0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        replay(progs, NET)


def _spin(seconds):
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


def test_traces_round_trip_through_chrome_json(tmp_path):
    """Two tracers (ranks) record a pipeline; the replay of their files gives the
    measured CPU segments plus the network model."""
    tr = [Tracer(rank=r, size=2, meta={"case": "test"}) for r in range(2)]
    tr[0].mark("begin")
    with tr[0].phase("work", level=0):
        _spin(0.05)
    with tr[0].comm("send", peer=1, nbytes=64, tag=3):
        pass
    tr[0].mark("end")
    tr[1].mark("begin")
    with tr[1].comm("recv", peer=0, nbytes=64, tag=3):
        pass
    _spin(0.03)
    tr[1].mark("end")
    files = [t.write(tmp_path / f"trace-rank{t.rank}.json") for t in tr]
    data = [load_trace(f) for f in files]
    json.dumps(data)
    kinds = {e["ph"] for e in data[0]["traceEvents"]}
    assert {"X", "i", "M"} <= kinds
    res = replay(programs_from_traces(data), NET)
    assert res.compute[0] == pytest.approx(0.05, abs=0.01)
    assert res.finish[1] == pytest.approx(res.finish[0] + NET.cost(64) + 0.03, abs=0.01)
    assert res.between("begin", "end", rank=1)[0] == pytest.approx(res.finish[1], abs=1e-9)


def test_load_trace_refuses_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(ValueError, match="not an mgrit_gru trace"):
        load_trace(p)


def test_disabled_tracer_records_nothing():
    t = Tracer(enabled=False)
    with t.phase("x"), t.comm("send", peer=1, nbytes=8):
        pass
    t.mark("m")
    assert t.events == []
