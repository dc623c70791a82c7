"""The parallel-in-time core: time grids and their partition over ranks, the
communicator (the only module that imports mpi4py), the time-stepper protocol
with a reference stepper, and the one FAS MGRIT solver.  It knows no neural
network: it imports nothing of ``models``, ``training`` or ``data``.
"""

__all__ = [
    "Comm",
    "DahlquistStepper",
    "Level",
    "LevelRange",
    "MGRIT",
    "MGRITSettings",
    "Partition",
    "SolveInfo",
    "TimeStepper",
    "abort_on_exception",
    "block_ranges",
    "make_hierarchy",
]

_EXPORTS = {
    "Level": "grid",
    "LevelRange": "grid",
    "Partition": "grid",
    "block_ranges": "grid",
    "make_hierarchy": "grid",
    "Comm": "comm",
    "abort_on_exception": "comm",
    "DahlquistStepper": "stepper",
    "TimeStepper": "stepper",
    "MGRIT": "solver",
    "MGRITSettings": "solver",
    "SolveInfo": "solver",
}

def __getattr__(name):
    """Import the sub-module that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
