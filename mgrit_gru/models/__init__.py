"""Recurrent models: cells with hand-written derivatives, the pooling of hidden
states into features, the propagators (serial, autograd reference, MGRIT with
its time steppers) and the sequence classifier.  Uses the parallel-in-time
core; knows nothing of training or data files.
"""

from mgrit_gru._exports import lazy_exports

__all__ = [
    "AutogradPropagator",
    "CELLS",
    "CellAdjointStepper",
    "CellForwardStepper",
    "GRUCell",
    "ImplicitGRUCell",
    "LSTMCell",
    "MGRITOptions",
    "MGRITPropagator",
    "POOLINGS",
    "Pooling",
    "RNNCell",
    "RecurrentCell",
    "SequenceClassifier",
    "SerialPropagator",
    "StackedCell",
    "TORCH_MODULES",
    "TorchClassifier",
    "WarmStarts",
    "cell_class",
    "cell_name",
    "flush_is_on",
    "from_torch",
    "from_torch_state",
    "from_torch_state_dict",
    "make_cell",
    "select_lin",
    "to_torch",
    "to_torch_classifier",
    "to_torch_state",
    "to_torch_state_dict",
]

_EXPORTS = {
    "CELLS": "cells",
    "GRUCell": "cells",
    "ImplicitGRUCell": "cells",
    "LSTMCell": "cells",
    "RNNCell": "cells",
    "RecurrentCell": "cells",
    "make_cell": "cells",
    "select_lin": "cells",
    "cell_class": "cells",
    "cell_name": "cells",
    "StackedCell": "stacked",
    "TORCH_MODULES": "interop",
    "TorchClassifier": "interop",
    "from_torch": "interop",
    "from_torch_state": "interop",
    "from_torch_state_dict": "interop",
    "to_torch": "interop",
    "to_torch_classifier": "interop",
    "to_torch_state": "interop",
    "to_torch_state_dict": "interop",
    "POOLINGS": "pooling",
    "Pooling": "pooling",
    "flush_is_on": "common",
    "AutogradPropagator": "serial",
    "SerialPropagator": "serial",
    "CellAdjointStepper": "steppers",
    "CellForwardStepper": "steppers",
    "MGRITOptions": "mgrit_propagator",
    "MGRITPropagator": "mgrit_propagator",
    "WarmStarts": "mgrit_propagator",
    "SequenceClassifier": "classifier",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
