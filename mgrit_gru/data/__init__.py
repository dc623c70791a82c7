"""Data: the dataset schema and its validation, HDF5 files (read, write, the
bundled default), the synthetic long-sequence task and minibatching.  numpy and
h5py only: no torch, no MPI.
"""

from mgrit_gru._exports import lazy_exports

__all__ = [
    "Batch",
    "DEFAULT_DATASET",
    "Dataset",
    "PROVENANCE_ATTRS",
    "Split",
    "batch_indices",
    "builtin_datasets",
    "iterate_minibatches",
    "lengths_vary",
    "load_dataset",
    "make_synthetic",
    "write_dataset",
]

_EXPORTS = {
    "Batch": "schema",
    "DEFAULT_DATASET": "schema",
    "Dataset": "schema",
    "PROVENANCE_ATTRS": "schema",
    "Split": "schema",
    "builtin_datasets": "hdf5",
    "load_dataset": "hdf5",
    "write_dataset": "hdf5",
    "batch_indices": "batching",
    "iterate_minibatches": "batching",
    "lengths_vary": "batching",
    "make_synthetic": "synthetic",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
