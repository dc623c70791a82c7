"""Training: the configuration, the training loop, the data-parallel strategies and
their workers, the run folder with its checkpoints, stop signals and metrics.
Uses the models, the data and the core.
"""

from mgrit_gru._exports import lazy_exports

__all__ = [
    "BatchUpdate",
    "RunFolder",
    "STRATEGIES",
    "ShardStep",
    "SolverStats",
    "TensorSplit",
    "TrainConfig",
    "WorkerPool",
    "build_model",
    "choose_device",
    "classification_metrics",
    "evaluate",
    "evaluate_exact",
    "gradient_check",
    "load_config",
    "make_config",
    "make_optimizer",
    "make_strategy",
    "param_checksum",
    "resolve_config",
    "resolve_device",
    "train",
]

_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "make_config": "config",
    "build_model": "setup",
    "make_optimizer": "setup",
    "resolve_config": "setup",
    "choose_device": "setup",
    "resolve_device": "setup",
    "train": "loop",
    "BatchUpdate": "update",
    "TensorSplit": "update",
    "ShardStep": "update",
    "SolverStats": "update",
    "evaluate": "evaluation",
    "evaluate_exact": "evaluation",
    "gradient_check": "evaluation",
    "STRATEGIES": "strategies",
    "make_strategy": "strategies",
    "WorkerPool": "pool",
    "RunFolder": "runfolder",
    "classification_metrics": "metrics",
    "param_checksum": "metrics",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
