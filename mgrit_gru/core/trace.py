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
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["NULL_TRACER", "TRACE_FORMAT", "Tracer", "load_trace"]

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


def load_trace(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trace written by :meth:`Tracer.write` (``ValueError`` if it is not one)."""
    data = json.loads(Path(path).read_text())
    meta = data.get("metadata", {}) if isinstance(data, dict) else {}
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not an mgrit_gru trace (format {meta.get('format')!r}, "
                         f"expected {TRACE_FORMAT!r})")
    return data
