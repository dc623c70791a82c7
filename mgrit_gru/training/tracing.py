"""``mgrit-gru train --trace``: each rank's timeline of the first batches.

:class:`RunTrace` attaches a :class:`~mgrit_gru.core.trace.Tracer` to the
time communicator (every MPI call of the time group and the solver's and
propagator's phases are recorded on it) and wraps the update of each of the
first ``trace_batches`` batches of the first epoch this run trains in a
``batch`` span (marks ``batch`` / ``batch end`` and a phase: forward,
backward and the gradient sum; the optimizer step follows it).  After the
last of them, or at the end of that epoch, the tracer is detached and

* every rank writes ``trace/rank<r>.json`` (``r``: its rank in the job), the
  timeline of its time rank (Chrome trace / Perfetto JSON);
* rank 0 of each time group writes ``trace/timeline.json`` (with several data
  groups ``timeline-group<g>.json``): the ranks of its time group in one file,
  one process row per time rank, on a common clock (the ranks' wall clocks).

The replay (:mod:`mgrit_gru.core.replay`) reads the per-rank files of one
time group.  Calls on the data communicator (the gradient sum of several data
groups) are not recorded: they appear as time outside the calls.  Tracing
needs the sequential strategy (worker threads would record on one timeline).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mgrit_gru.core.comm import Comm
from mgrit_gru.core.trace import NULL_TRACER, Tracer, merge_chrome
from mgrit_gru.errors import InputError

__all__ = ["RunTrace", "TRACE_FOLDER"]

#: The trace's folder in the run folder.
TRACE_FOLDER = "trace"


class RunTrace:
    """The tracer of one rank for a run with ``--trace`` (see the module docstring)."""

    def __init__(self, config, comm: Comm, time_comm: Comm, data_comm: Comm, folder: Path):
        if config.strategy != "sequential":
            raise InputError(f"option trace (--trace): timelines are recorded with the "
                             f"sequential strategy only, not {config.strategy!r}")
        self.comm, self.time_comm, self.data_comm = comm, time_comm, data_comm
        self.folder = Path(folder) / TRACE_FOLDER
        self.left = int(config.trace_batches)
        self.index = 0
        self.tracer = Tracer(rank=time_comm.rank, size=time_comm.size, meta={
            "what": "mgrit-gru train --trace", "job_rank": comm.rank,
            "data_group": data_comm.rank, "data_groups": data_comm.size,
            "propagator": config.propagator, "cell": config.cell, "hidden": config.hidden,
            "batch_size": config.batch_size})
        time_comm.tracer = self.tracer

    @classmethod
    def start(cls, config, comm, time_comm, data_comm, folder) -> "RunTrace | None":
        """The run's trace, or None without ``config.trace``."""
        return cls(config, comm, time_comm, data_comm, folder) if config.trace else None

    @property
    def done(self) -> bool:
        return self.left <= 0

    def wrap(self, step_fn):
        """``step_fn`` whose calls, while batches are left to trace, are ``batch`` spans."""
        if self.done:
            return step_fn

        def traced_step(model, idx):
            if self.left <= 0:
                return step_fn(model, idx)
            self.left -= 1
            self.index += 1
            with self.tracer.span("batch", index=self.index, size=len(idx)):
                return step_fn(model, idx)
        return traced_step

    def finish(self, run) -> None:
        """Detach the tracer and write the files (collective over the time group)."""
        if self.time_comm.tracer is NULL_TRACER:
            return
        self.time_comm.tracer = NULL_TRACER
        self.tracer.meta["batches"] = self.index
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.tracer.to_chrome()
        self.tracer.write(self.folder / f"rank{self.comm.rank}.json")
        every = self.time_comm.allgather_object(own)
        if self.time_comm.rank == 0:
            name = "timeline.json" if self.data_comm.size == 1 \
                else f"timeline-group{self.data_comm.rank}.json"
            path = self.folder / name
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(merge_chrome(every)))
            os.replace(tmp, path)
        run.log(f"trace: {self.index} batches of {self.time_comm.size} time ranks written to "
                f"{self.folder} (open timeline.json in ui.perfetto.dev or chrome://tracing)")
