"""Trace-driven replay: the wall time of a run if every rank had a core.

Input: the per-rank traces of :mod:`mgrit_gru.core.trace` (one run, all ranks
of one communicator).  Each rank's timeline becomes a program of compute
segments (the thread CPU time between two communication calls) and the
communication calls in their order.  A discrete-event simulation runs the
programs with one core per rank and a network model:

* a point-to-point message of ``n`` bytes costs ``alpha + n / beta``;
  messages up to ``eager`` bytes are sent eagerly (the sender goes on at once,
  the data arrive ``alpha + n / beta`` after the send), larger ones by
  rendezvous (the transfer starts when both the send and the receive are
  posted; a blocking send waits for it);
* a collective of ``n`` bytes (allreduce, barrier, bcast, allgather) starts
  when the last rank enters it and costs a binomial tree of messages:
  ``2 ceil(log2 P) (alpha + n / beta)`` for an allreduce (reduce + broadcast),
  ``ceil(log2 P) (...)`` for the others.

``alpha`` and ``beta`` come from a ping-pong on the machine at hand
(``benchmarks/pingpong.py``) or from the user, for their cluster.

The replay answers the question the traces cannot, on a machine with fewer
cores than ranks: how long the run would take with a core per rank.  It knows
neither caches nor memory bandwidth shared between ranks: those show up in the
compute segments of the trace they were measured in.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Network", "Op", "ReplayResult", "pipeline_program", "programs_from_traces", "replay"]


@dataclass(frozen=True)
class Network:
    """Message cost ``alpha + n / beta`` (seconds; ``beta`` in bytes per second)."""

    alpha: float = 2e-6
    beta: float = 5e9
    eager: int = 65536

    def cost(self, nbytes: int) -> float:
        return self.alpha + nbytes / self.beta

    def collective(self, op: str, nbytes: int, P: int) -> float:
        if P <= 1:
            return 0.0
        depth = math.ceil(math.log2(P))
        return (2 if op == "allreduce" else 1) * depth * self.cost(nbytes)


@dataclass
class Op:
    kind: str                 # compute, mark, send, isend, recv, irecv, wait, <collective>
    seconds: float = 0.0      # compute
    peer: int | None = None
    nbytes: int = 0
    tag: Any = None
    request: int | None = None
    name: str = ""


@dataclass
class ReplayResult:
    """Simulated clocks: ``finish[r]`` per rank, ``marks[r]`` = [(name, time)]."""

    finish: list[float]
    marks: list[list[tuple[str, float]]]
    compute: list[float]               # seconds of compute per rank
    waiting: list[float] = field(default_factory=list)   # seconds blocked per rank

    @property
    def wall(self) -> float:
        return max(self.finish) if self.finish else 0.0

    def between(self, first: str, last: str, rank: int = 0) -> list[float]:
        """Durations from each mark ``first`` to the next mark ``last`` on ``rank``."""
        out, start = [], None
        for name, t in self.marks[rank]:
            if name == first:
                start = t
            elif name == last and start is not None:
                out.append(t - start)
                start = None
        return out


COLLECTIVES = ("allreduce", "barrier", "bcast", "allgather")


def programs_from_traces(traces: Sequence[dict]) -> list[list[Op]]:
    """One program per rank (ordered by rank) from Chrome-trace objects."""
    progs: dict[int, list[Op]] = {}
    for trace in traces:
        rank = int(trace["metadata"]["rank"])
        events = sorted((e for e in trace["traceEvents"] if e.get("ph") in ("X", "i")
                         and (e.get("cat") == "comm" or e.get("ph") == "i")),
                        key=lambda e: e["args"]["seq"])
        prog: list[Op] = []
        cpu = None   # thread CPU time at the end of the previous call
        for e in events:
            a = e["args"]
            start = a["cpu_s"] if e["ph"] == "i" else a["cpu0_s"]
            if cpu is not None and start > cpu:
                prog.append(Op("compute", seconds=start - cpu))
            if e["ph"] == "i":
                prog.append(Op("mark", name=e["name"]))
                cpu = start
                continue
            prog.append(Op(a["op"], peer=a["peer"], nbytes=int(a["bytes"]), tag=a["tag"],
                           request=a["request"]))
            cpu = a["cpu1_s"]
        progs[rank] = prog
    if sorted(progs) != list(range(len(progs))):
        raise ValueError(f"traces of ranks {sorted(progs)}: expected 0..{len(progs) - 1}")
    return [progs[r] for r in range(len(progs))]


class _Blocked(Exception):
    pass


def replay(programs: Sequence[Sequence[Op]], network: Network | None = None) -> ReplayResult:
    """Run the programs; raise ``RuntimeError`` on a deadlock (unmatched calls)."""
    net = network or Network()
    P = len(programs)
    clock = [0.0] * P
    pc = [0] * P
    busy = [0.0] * P
    waited = [0.0] * P
    marks: list[list[tuple[str, float]]] = [[] for _ in range(P)]
    # per (src, dst, tag): send records {post, nbytes, done}, receive posts
    sends: dict[tuple, list[dict]] = defaultdict(list)
    recvs: dict[tuple, list[dict]] = defaultdict(list)
    requests: list[dict[int, dict]] = [dict() for _ in range(P)]
    pending: list[dict | None] = [None] * P      # the current op's record once posted
    coll_entries: dict[int, dict[int, float]] = defaultdict(dict)
    coll_count = [0] * P

    def transfer(s: dict, r: dict) -> float:
        """Completion time of a matched send/receive pair."""
        if s["nbytes"] <= net.eager:
            return s["post"] + net.cost(s["nbytes"])
        return max(s["post"], r["post"]) + net.alpha + net.cost(s["nbytes"])

    def matched(rec: dict, side: str) -> dict | None:
        key, index = rec["key"], rec["index"]
        other = recvs[key] if side == "send" else sends[key]
        return other[index] if index < len(other) else None

    def post(me: int, op: Op, side: str) -> dict:
        key = (me, op.peer, op.tag) if side == "send" else (op.peer, me, op.tag)
        book = sends if side == "send" else recvs
        rec = {"key": key, "index": len(book[key]), "post": clock[me], "nbytes": op.nbytes,
               "side": side}
        book[key].append(rec)
        return rec

    def completion(rec: dict) -> float:
        """Completion time of a posted send or receive, or raise _Blocked."""
        other = matched(rec, rec["side"])
        if rec["side"] == "send":
            if rec["nbytes"] <= net.eager:
                return rec["post"]
            if other is None:
                raise _Blocked
            return transfer(rec, other)
        if other is None:
            raise _Blocked
        return transfer(other, rec)

    def advance(me: int, until: float) -> None:
        if until > clock[me]:
            waited[me] += until - clock[me]
            clock[me] = until

    def step(me: int) -> None:
        op = programs[me][pc[me]]
        k = op.kind
        if k == "compute":
            clock[me] += op.seconds
            busy[me] += op.seconds
        elif k == "mark":
            marks[me].append((op.name, clock[me]))
        elif k in ("send", "recv"):
            if pending[me] is None:
                pending[me] = post(me, op, k)
            advance(me, completion(pending[me]))
        elif k in ("isend", "irecv"):
            requests[me][op.request] = post(me, op, k[1:])
        elif k == "wait":
            rec = requests[me].get(op.request)
            if rec is None:
                raise RuntimeError(f"replay: rank {me} waits on unknown request {op.request}")
            advance(me, completion(rec))
        elif k in COLLECTIVES:
            n = coll_count[me]
            entries = coll_entries[n]
            if me not in entries:
                entries[me] = clock[me]
            if len(entries) < P:
                raise _Blocked
            advance(me, max(entries.values()) + net.collective(k, op.nbytes, P))
        else:
            raise RuntimeError(f"replay: unknown operation {k!r}")
        if k in COLLECTIVES:
            coll_count[me] += 1
        pending[me] = None
        pc[me] += 1

    while True:
        progress = False
        for me in range(P):
            while pc[me] < len(programs[me]):
                try:
                    step(me)
                except _Blocked:
                    break
                progress = True
        if all(pc[me] == len(programs[me]) for me in range(P)):
            break
        if not progress:
            stuck = [f"rank {me}: {programs[me][pc[me]]}" for me in range(P)
                     if pc[me] < len(programs[me])]
            raise RuntimeError("replay: deadlock (unmatched calls): " + "; ".join(stuck))
    return ReplayResult(finish=clock, marks=marks, compute=busy, waiting=waited)


def pipeline_program(P: int, work: float, nbytes: int = 8) -> list[list[Op]]:
    """A test program: rank r receives from r-1, computes ``work``, sends to r+1
    (a sequential pipeline; its wall time is ``P work + (P-1) cost``)."""
    progs = []
    for r in range(P):
        prog = []
        if r > 0:
            prog.append(Op("recv", peer=r - 1, nbytes=nbytes, tag=0))
        prog.append(Op("compute", seconds=work))
        if r < P - 1:
            prog.append(Op("send", peer=r + 1, nbytes=nbytes, tag=0))
        progs.append(prog)
    return progs

