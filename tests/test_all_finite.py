"""metrics.all_finite: the fast test of a run's per-batch checks, against the
exact test per element (``torch.isfinite``)."""

import numpy as np
import pytest
import torch

from mgrit_gru.training.metrics import all_finite, finite_params


def exact(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_the_exact_test(dtype):
    rng = np.random.default_rng(0)
    info = torch.finfo(dtype)
    for trial in range(200):
        tensors = [torch.randn(*shape, dtype=dtype) for shape in ((7, 5), (5,), (3, 2, 2))]
        kind = trial % 5
        t = tensors[rng.integers(len(tensors))].view(-1)
        i = int(rng.integers(t.numel()))
        if kind == 1:
            t[i] = float("nan")
        elif kind == 2:
            t[i] = float("inf") if rng.random() < 0.5 else -float("inf")
        elif kind == 3:          # huge finite values: their sum overflows, they are finite
            t.fill_(info.max)
        elif kind == 4:          # +inf and -inf cancel to NaN in a sum: still caught
            t[i], t[(i + 1) % t.numel()] = float("inf"), -float("inf")
        if rng.random() < 0.3:
            tensors.append(None)
        assert all_finite(tensors) == exact(tensors), (kind, trial)


def test_parameters_with_gradients_and_empty():
    model = torch.nn.Linear(4, 3)
    assert finite_params(model) and all_finite([]) and all_finite([None])
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert not finite_params(model)
    assert all_finite(p.grad for p in model.parameters())      # no gradients yet
