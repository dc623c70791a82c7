"""Training: the configuration, the training loop, the data-parallel strategies and
their workers, the run folder with its checkpoints, stop signals and metrics.
Uses the models, the data and the core.
"""

__all__ = [
    "RunFolder",
    "STRATEGIES",
    "TrainConfig",
    "build_model",
    "classification_metrics",
    "load_config",
    "make_config",
    "make_strategy",
    "param_checksum",
    "train",
]

_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "make_config": "config",
    "build_model": "loop",
    "train": "loop",
    "STRATEGIES": "strategies",
    "make_strategy": "strategies",
    "RunFolder": "runfolder",
    "classification_metrics": "metrics",
    "param_checksum": "metrics",
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
