"""The parallel-in-time core: time grids and their partition over ranks, the
communicator (the only module that imports mpi4py), the time-stepper protocol
with a reference stepper, and the one FAS MGRIT solver.  It knows no neural
network: it imports nothing of ``models``, ``training`` or ``data``.
"""

from mgrit_gru._exports import lazy_exports

__all__ = [
    "Comm",
    "DahlquistStepper",
    "Level",
    "LevelRange",
    "MGRIT",
    "MGRITSettings",
    "Partition",
    "SolveInfo",
    "SolverWorkspace",
    "StepperBase",
    "TimeGrid",
    "TimeStepper",
    "abort_on_exception",
    "block_ranges",
    "make_hierarchy",
]

_EXPORTS = {
    "Level": "grid",
    "TimeGrid": "grid",
    "LevelRange": "grid",
    "Partition": "grid",
    "block_ranges": "grid",
    "make_hierarchy": "grid",
    "Comm": "comm",
    "abort_on_exception": "comm",
    "DahlquistStepper": "stepper",
    "StepperBase": "stepper",
    "TimeStepper": "stepper",
    "MGRIT": "solver",
    "MGRITSettings": "solver",
    "SolveInfo": "solver",
    "SolverWorkspace": "solver",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
