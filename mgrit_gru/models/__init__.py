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
    "WarmStarts",
    "flush_is_on",
    "make_cell",
    "select_lin",
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
