"""Training: the configuration, the training loop, the data-parallel strategies and
their workers, the run folder with its checkpoints, stop signals and metrics.
Uses the models, the data and the core.
"""

from mgrit_gru._exports import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
