"""Length-bucketed minibatches in training (``--bucket-by-length``).

Truths: the samples themselves (every index once per epoch), their lengths
(the within-batch and within-round spread of random batches, computed here),
the seed (two draws), and the rule "on for variable-length data only", stated
on data sets built here with known lengths. The batching functions'
own basics (cover, reproducible, sorted without shuffle) are in test_data.py.
"""

import numpy as np
import pytest

from helpers_train import one_thread  # noqa: F401 (a fixture)
from mgrit_gru.cli import build_parser
from mgrit_gru.data import Dataset, Split, batch_indices, lengths_vary, write_dataset
from mgrit_gru.errors import InputError
from mgrit_gru.training import loop
from mgrit_gru.training.config import make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _lengths(n=1000, seed=3):
    return np.random.default_rng(seed).integers(1, 39, size=n)


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("n", [1000, 1003])
def test_grouped_batches_cover_every_sample_once_and_reproduce(group, n):
    lengths = _lengths(n)

    def epoch(seed):
        return [b.tolist() for b in batch_indices(n, 32, shuffle=True, seed=seed,
                                                  lengths=lengths, bucket=True, group=group)]

    a = epoch(5)
    assert sorted(i for b in a for i in b) == list(range(n))
    assert a == epoch(5) and a != epoch(6)
    assert sum(len(b) < 32 for b in a) == (n % 32 != 0)     # one short batch at most


def test_grouped_rounds_have_similar_lengths():
    """The K batches of a round (batches rK .. rK + K - 1) cost alike: the
    spread of their longest sequences is far below that of ungrouped
    bucketing (whose neighbours are random batches), and each batch's own
    spread stays small."""
    lengths, K = _lengths(4000), 2

    def round_spread(group):
        batches = list(batch_indices(4000, 32, shuffle=True, seed=0, lengths=lengths,
                                     bucket=True, group=group))
        longest = np.array([lengths[b].max() for b in batches])
        usable = len(longest) // K * K
        return np.median(np.ptp(longest[:usable].reshape(-1, K), axis=1)), batches

    grouped, batches = round_spread(K)
    ungrouped, _ = round_spread(1)
    assert grouped <= 1 and ungrouped >= 5, (grouped, ungrouped)
    random = list(batch_indices(4000, 32, shuffle=True, seed=0))
    assert np.median([np.ptp(lengths[b]) for b in batches]) < \
        0.2 * np.median([np.ptp(lengths[b]) for b in random])


def test_group_one_is_plain_bucketing_and_bad_groups_are_refused():
    lengths = _lengths()
    plain = [b.tolist() for b in batch_indices(1000, 32, shuffle=True, seed=1,
                                               lengths=lengths, bucket=True)]
    one = [b.tolist() for b in batch_indices(1000, 32, shuffle=True, seed=1,
                                             lengths=lengths, bucket=True, group=1)]
    assert plain == one
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InputError, match="group"):
            list(batch_indices(10, 4, shuffle=True, seed=0, group=bad))


def test_lengths_vary():
    assert lengths_vary(np.array([3, 4, 3]))
    assert not lengths_vary(np.array([5, 5, 5]))
    assert not lengths_vary(None)
    assert not lengths_vary(np.array([7]))


def _dataset(lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    n, T = len(lengths), int(lengths.max())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, T, 2)).astype(np.float32)
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0.0
    y = (np.arange(n) % 2).astype(np.int64)
    split = Split(x, y, lengths)
    return Dataset("toy", split, split, 2)


def test_default_rule_on_for_variable_lengths_only():
    varying = _dataset(np.arange(40) % 6 + 1)
    fixed = _dataset(np.full(40, 6))
    on = make_config(dict(workers=2, strategy="mutex"))
    off = make_config(dict(workers=2, strategy="mutex", bucket_by_length=False))
    assert on.bucket_by_length is True                      # the default
    options = loop.batching_options(on, varying)
    assert options["bucket"] is True and options["group"] == 2
    assert np.array_equal(options["lengths"], varying.train.lengths)
    assert loop.batching_options(on, fixed) == {}
    assert loop.batching_options(off, varying) == {}


def test_cli_switches():
    parser = build_parser()
    assert parser.parse_args(["train", "--no-bucket-by-length"]).bucket_by_length is False
    assert parser.parse_args(["train", "--bucket-by-length"]).bucket_by_length is True
    assert not hasattr(parser.parse_args(["train"]), "bucket_by_length")  # the config's default


@pytest.mark.parametrize("bucket, strategy, workers", [(True, "averaging", 2),
                                                       (False, "sequential", 1)])
def test_training_loop_uses_the_seeded_bucketed_order(bucket, strategy, workers, tmp_path,
                                                      monkeypatch):
    """The loop's batches are those of batch_indices with the run's seed and
    epoch, bucketed (units of K) unless switched off; the batches' length
    spread tells which."""
    lengths = _lengths(96, seed=1)
    ds = _dataset(lengths)
    path = tmp_path / "toy.h5"
    write_dataset(path, ds.train, ds.test, name="toy", num_classes=2)
    seen = []
    real = loop.batch_indices

    def recording(*args, **kwargs):
        out = list(real(*args, **kwargs))
        seen.append(out)
        return iter(out)

    monkeypatch.setattr(loop, "batch_indices", recording)
    config = make_config(dict(data=str(path), out=str(tmp_path / "run"), hidden=3, epochs=2,
                              batch_size=8, threads=1, progress="off", optimizer="sgd",
                              strategy=strategy, workers=workers, seed=4,
                              bucket_by_length=bucket))
    metrics = loop.train(config)
    assert metrics["environment"]["length_bucketing"] is bucket
    assert len(seen) == 2
    for epoch, batches in enumerate(seen, start=1):
        rng = np.random.default_rng([4, epoch])
        truth = real(96, 8, shuffle=True, generator=rng,
                     **(dict(lengths=lengths, bucket=True, group=workers) if bucket else {}))
        assert [b.tolist() for b in batches] == [b.tolist() for b in truth]
        assert sorted(np.concatenate(batches).tolist()) == list(range(96))
        spread = np.median([np.ptp(lengths[b]) for b in batches])
        assert (spread <= 4) if bucket else (spread >= 15), spread
