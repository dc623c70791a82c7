"""What makes data-parallel workers scale, as rules the training loop follows
(the speedups themselves are measured, not tested: docs/strategies.md).

Truths: the rule for the default synchronisation points written out here
(at least 16 batches and 2**17 sequence steps of work per worker), and
the workers' gradients against the sequential run's.
"""

import math

import pytest

from mgrit_gru.training.config import make_config
from mgrit_gru.training.loop import _sync_batches


@pytest.mark.parametrize("strategy, workers, batch, T", [
    ("mutex", 2, 32, 38), ("averaging", 3, 32, 38), ("hogwild", 2, 32, 301),
    ("mutex", 2, 16, 1024), ("mutex", 4, 100, 9), ("averaging", 2, 32, 1)])
def test_default_sync_points_scale_with_the_work(strategy, workers, batch, T):
    config = make_config(dict(strategy=strategy, workers=workers, batch_size=batch))
    per_worker = _sync_batches(config, T) / workers
    assert per_worker == int(per_worker) >= 16
    assert per_worker * batch * T >= 2 ** 17
    # and no longer than needed: one batch fewer would fall short (or 16)
    assert per_worker == 16 or (per_worker - 1) * batch * T < 2 ** 17
    assert per_worker == max(16, math.ceil(2 ** 17 / (batch * T)))


def test_sync_points_of_sequential_and_explicit_values():
    assert _sync_batches(make_config(dict()), 38) == 1
    assert _sync_batches(make_config(dict(strategy="mutex", workers=2, sync_batches=6)),
                         38) == 6
