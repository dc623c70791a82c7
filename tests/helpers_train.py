"""Helpers shared by the training tests (tests/test_train.py,
tests/test_reliability.py, tests/test_strategies.py, tests/test_fuzz_inputs.py):
a tiny learnable data set, the epoch records without their times, one torch
thread per test, and the devices present."""

import numpy as np
import pytest
import torch

from mgrit_gru.data import Split, write_dataset


def easy_split(rng, n, length=12):
    """Class = sign of the sequence's mean level: learnable in a few epochs."""
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    level = np.where(y == 1, 0.5, -0.5)
    x = level[:, None, None] + 0.5 * rng.standard_normal((n, length, 2))
    return Split(x.astype(np.float32), y, None)


def write_easy_data(folder, n_train, n_test=32):
    """A two-class HDF5 file ``folder/easy.h5`` in the package schema (seed 1);
    its path."""
    path = folder / "easy.h5"
    rng = np.random.default_rng(1)
    write_dataset(path, easy_split(rng, n_train), easy_split(rng, n_test), name="easy",
                  num_classes=2)
    return str(path)


def without_times(metrics):
    """The epoch records of a run without the fields that are times."""
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in metrics["epochs"]]


@pytest.fixture
def one_thread():
    """One torch thread during the test (the previous number after it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


NO_CUDA = "no CUDA device"

#: ``device`` parameters: the cpu always, cuda (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_CUDA))]
