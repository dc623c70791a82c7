"""Per-rank timelines: compute phases, communication calls, collectives.

A :class:`Tracer` records, in order, every communication call of a rank
(operation, peer, bytes, tag) with its wall-clock and thread-CPU times at
entry and exit, and named phases (e.g. ``fine relax``, ``level 1``) as nested
spans.  The compute segment between two communication calls is the thread
CPU time between them: what the rank would spend with a core of its own, even
when the trace was taken with more ranks than cores.

``to_chrome()`` gives the Chrome trace / Perfetto JSON object (``traceEvents``
of complete ``"X"`` events; ``pid`` is the rank), which chrome://tracing and
ui.perfetto.dev open; :mod:`mgrit_gru.core.replay` reads the same files.

The disabled tracer (:data:`NULL_TRACER`) costs one attribute test per call.
Where it is attached: ``Comm.tracer`` (every communication call of that
communicator); the solver and the MGRIT propagator record their phases on
the tracer of their communicator (:func:`traced` for a method), the training
loop a ``batch`` span per traced batch (``mgrit-gru train --trace``).
:func:`exclusive_cpu` splits a trace's CPU time over its innermost phases.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["NULL_TRACER", "TRACE_FORMAT", "Tracer", "exclusive_cpu", "load_trace",
           "merge_chrome", "traced"]

#: Format tag in the trace's metadata (bumped when the meaning of fields changes).
TRACE_FORMAT = "mgrit_gru-trace-1"

#: Operations a trace records; the replay knows each of them.
OPS = ("send", "isend", "recv", "irecv", "wait", "allreduce", "barrier", "bcast",
       "allgather")


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class Tracer:
    """The timeline of one rank (``enabled=False``: records nothing)."""

    def __init__(self, rank: int = 0, size: int = 1, enabled: bool = True,
                 meta: dict[str, Any] | None = None) -> None:
        self.rank, self.size, self.enabled = int(rank), int(size), bool(enabled)
        self.meta = dict(meta or {})
        self.events: list[dict[str, Any]] = []
        self._t0, self._c0 = _now()
        # the wall clock at time 0 of the trace: merge_chrome aligns ranks by it
        self.meta.setdefault("wall_clock_s", time.time())
        self._next_request = 0

    # ------------------------------------------------------------ recording
    @contextlib.contextmanager
    def phase(self, name: str, **args: Any) -> Iterator[None]:
        """A named span (phases nest: ``batch`` > ``fwd`` > ``level 1``)."""
        if not self.enabled:
            yield
            return
        w0, c0 = _now()
        try:
            yield
        finally:
            w1, c1 = _now()
            self.events.append({"kind": "phase", "name": name, "w0": w0 - self._t0,
                                "w1": w1 - self._t0, "c0": c0 - self._c0,
                                "c1": c1 - self._c0, "args": args})

    def request(self) -> int:
        """A new id naming a nonblocking operation (its ``wait`` names it too)."""
        self._next_request += 1
        return self._next_request

    @contextlib.contextmanager
    def comm(self, op: str, peer: int | None = None, nbytes: int = 0, tag: int | None = None,
             request: int | None = None) -> Iterator[None]:
        """Record the communication call executed inside the block."""
        if not self.enabled:
            yield
            return
        if op not in OPS:
            raise ValueError(f"trace: unknown operation {op!r}")
        w0, c0 = _now()
        try:
            yield
        finally:
            w1, c1 = _now()
            self.events.append({"kind": "comm", "op": op, "peer": peer, "bytes": int(nbytes),
                                "tag": tag, "request": request, "w0": w0 - self._t0,
                                "w1": w1 - self._t0, "c0": c0 - self._c0, "c1": c1 - self._c0})

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[None]:
        """A phase with a mark ``name`` at its start and ``name + " end"`` at its
        end (the replay sees marks, not phases: e.g. the time of each batch)."""
        if not self.enabled:
            yield
            return
        self.mark(name)
        try:
            with self.phase(name, **args):
                yield
        finally:
            self.mark(name + " end")

    def mark(self, name: str) -> None:
        """An instant (e.g. the start of a batch)."""
        if self.enabled:
            w, c = _now()
            self.events.append({"kind": "mark", "name": name, "w0": w - self._t0,
                                "c0": c - self._c0})

    # ------------------------------------------------------------- output
    def to_chrome(self) -> dict[str, Any]:
        """The Chrome trace / Perfetto JSON object of this rank."""
        out = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                "args": {"name": f"rank {self.rank}"}}]
        for e in self.events:
            if e["kind"] == "mark":
                out.append({"name": e["name"], "ph": "i", "s": "p", "pid": self.rank, "tid": 0,
                            "ts": 1e6 * e["w0"], "args": {"cpu_s": e["c0"]}})
                continue
            args = dict(e.get("args", {}))
            args.update(cpu0_s=e["c0"], cpu1_s=e["c1"])
            if e["kind"] == "comm":
                args.update(op=e["op"], peer=e["peer"], bytes=e["bytes"], tag=e["tag"],
                            request=e["request"])
                name, cat = e["op"], "comm"
            else:
                name, cat = e["name"], "phase"
            out.append({"name": name, "cat": cat, "ph": "X", "pid": self.rank, "tid": 0,
                        "ts": 1e6 * e["w0"], "dur": 1e6 * (e["w1"] - e["w0"]), "args": args})
        # a viewer nests complete events by start time; the replay needs the
        # order in which the calls were made: keep it explicit
        for i, ev in enumerate(out):
            ev.setdefault("args", {})["seq"] = i
        meta = {"format": TRACE_FORMAT, "rank": self.rank, "size": self.size, **self.meta}
        return {"traceEvents": out, "displayTimeUnit": "ms", "metadata": meta}

    def write(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_chrome` to ``path`` (atomically: temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_chrome()))
        os.replace(tmp, path)
        return path


NULL_TRACER = Tracer(enabled=False)


def traced(name: str | Callable[..., str], level: Callable[..., int] | None = None):
    """Method decorator: record each call as phase ``name`` on ``self.comm.tracer``
    (nothing but one attribute test when it is disabled); ``level(self, *args,
    **kwargs)`` gives the phase's ``level`` argument; ``name`` may be such a
    function too."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            tracer = getattr(self.comm, "tracer", NULL_TRACER)
            if not tracer.enabled:
                return fn(self, *args, **kwargs)
            extra = {} if level is None else {"level": int(level(self, *args, **kwargs))}
            with tracer.phase(name if isinstance(name, str) else name(self, *args, **kwargs),
                              **extra):
                return fn(self, *args, **kwargs)
        return wrapper
    return decorate


def exclusive_cpu(trace: dict[str, Any], first: str | None = None,
                  last: str | None = None) -> dict[tuple[str, int | None], float]:
    """Thread CPU seconds of a trace (a :meth:`Tracer.to_chrome` object) per
    innermost phase ``(name, level)``: each phase's time minus that of the
    phases and calls nested in it.  ``("comm", None)``: CPU time inside
    communication calls (MPI polling); ``("other", None)``: outside any phase.
    With ``first``/``last`` (mark names) only the CPU time between the first
    mark ``first`` and the last mark ``last`` counts (events are clipped)."""
    evs = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = [e for e in trace["traceEvents"] if e.get("ph") == "i"]
    lo = min((m["args"]["cpu_s"] for m in marks if m["name"] == first), default=None)
    hi = max((m["args"]["cpu_s"] for m in marks if m["name"] == last), default=None)
    items = []
    for e in evs:
        a = e["args"]
        c0, c1 = a["cpu0_s"], a["cpu1_s"]
        if lo is not None:
            c0, c1 = max(c0, lo), max(c1, lo)
        if hi is not None:
            c0, c1 = min(c0, hi), min(c1, hi)
        key = ("comm", None) if e.get("cat") == "comm" else (e["name"], a.get("level"))
        items.append([c0, c1, key, 0.0])
    items.sort(key=lambda it: (it[0], -it[1]))
    out: dict[tuple[str, int | None], float] = {}
    stack: list[list] = []
    top_level = 0.0
    for it in items:
        while stack and stack[-1][1] <= it[0]:
            stack.pop()
        if stack:
            stack[-1][3] += it[1] - it[0]
        else:
            top_level += it[1] - it[0]
        stack.append(it)
    for c0, c1, key, children in items:
        out[key] = out.get(key, 0.0) + (c1 - c0) - children
    if lo is None or hi is None:
        all_c = [e["args"][k] for e in evs for k in ("cpu0_s", "cpu1_s")] + \
            [m["args"]["cpu_s"] for m in marks]
        lo = min(all_c, default=0.0) if lo is None else lo
        hi = max(all_c, default=0.0) if hi is None else hi
    out[("other", None)] = out.get(("other", None), 0.0) + max(hi - lo - top_level, 0.0)
    return out


def merge_chrome(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """The traces of several ranks as one Chrome trace / Perfetto object (one
    process row per rank), shifted onto a common clock: each trace's
    ``wall_clock_s`` (the ranks' wall clocks; on one node the same clock).
    For viewing; the replay reads the per-rank traces."""
    t_min = min(t["metadata"].get("wall_clock_s", 0.0) for t in traces)
    events = []
    for t in traces:
        shift = 1e6 * (t["metadata"].get("wall_clock_s", 0.0) - t_min)
        for e in t["traceEvents"]:
            e = dict(e)
            if "ts" in e:
                e["ts"] = e["ts"] + shift
            events.append(e)
    meta = {**traces[0]["metadata"], "ranks": [t["metadata"]["rank"] for t in traces],
            "merged": True}
    return {"traceEvents": events, "displayTimeUnit": "ms", "metadata": meta}


def load_trace(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trace written by :meth:`Tracer.write` (``ValueError`` if it is not one)."""
    data = json.loads(Path(path).read_text())
    meta = data.get("metadata", {}) if isinstance(data, dict) else {}
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not an mgrit_gru trace (format {meta.get('format')!r}, "
                         f"expected {TRACE_FORMAT!r})")
    return data
