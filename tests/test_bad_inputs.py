"""Regression tests: each class of bad input that once ended in a traceback
(or a huge allocation) now ends in one line of InputError (exit code 2).

Classes (docs/data.md, "Bad input"): class counts beyond the data, invalid
UTF-8 in HDF5 attributes, dangling soft and external links, byte-corrupted
files, null dataspaces, declared shapes beyond the memory, synthetic lengths,
non-UTF-8 TOML (also a resumed run's config.toml), hidden sizes, workers and
threads, seeds beyond 64 bits, float64 inputs beyond float32.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mgrit_gru import cli, limits
from mgrit_gru.models import cells
from mgrit_gru.training import loop as loop_module
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import INT_MAX, load_config, make_config
from mgrit_gru.data import Split, load_dataset, make_synthetic, write_dataset
from mgrit_gru.errors import InputError
from mgrit_gru.training.setup import build_model


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def raw_file(path: Path, *, y_train=(0, 1, 0, 1), y_test=(1, 0), x_dtype="f4", attrs=None,
             y_dtype="i8") -> Path:
    """A small file written with h5py directly (no validation)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for split, y in (("train", y_train), ("test", y_test)):
            g = f.create_group(split)
            g["x"] = rng.standard_normal((len(y), 5, 2)).astype(x_dtype)
            g["y"] = np.array(y, dtype=y_dtype)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def one_line_error(fn, *words):
    """Run ``fn``; it must raise a one-line InputError containing ``words``
    and emit no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as info:
            fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


def cli_exit_2(argv, capsys, *words):
    """``mgrit-gru ARGV`` in-process: exit code 2 and one error line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mgrit-gru: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def bad_utf8_attr(obj, name: bytes, raw: bytes) -> None:
    """A fixed-length attribute that declares UTF-8 but holds ``raw``."""
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_cset(h5py.h5t.CSET_UTF8)
    attr = h5py.h5a.create(obj.id, name, tid, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(np.array(raw, dtype=f"S{len(raw)}"), mtype=tid)


# --------------------------------------------------------------------------- #
# class counts beyond the data
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("label, dtype", [(10 ** 5, "i8"), (2 ** 31, "i8"), (2 ** 62, "i8"),
                                          (2 ** 63 - 1, "i8"), (2 ** 64 - 1, "u8")])
def test_labels_far_beyond_the_data(tmp_path, label, dtype):
    path = raw_file(tmp_path / "f.h5", y_train=(0, 1, 0, label), y_dtype=dtype)
    msg = one_line_error(lambda: load_dataset(path), str(path), "/train/y", str(label),
                         str(limits.MAX_CLASSES))
    assert "negative" not in msg  # uint64 labels are not wrapped into negative ones


def test_largest_supported_label_loads(tmp_path):
    top = limits.MAX_CLASSES - 1
    path = raw_file(tmp_path / "f.h5", y_train=(0, 1, 0, top))
    ds = load_dataset(path)
    assert ds.num_classes == limits.MAX_CLASSES
    assert sum(limits.estimate_memory(make_config({}), ds).values()) < 2e9


@pytest.mark.parametrize("num_classes, words", [
    (10 ** 6, ["far above the largest label 1", "at most 2 x"]),
    (5, ["far above the largest label 1"]),
    (2 ** 40, ["far above"]),
])
def test_num_classes_attribute_far_above_the_labels(tmp_path, num_classes, words):
    path = raw_file(tmp_path / "f.h5", attrs={"num_classes": num_classes})
    one_line_error(lambda: load_dataset(path), str(path), "num_classes", *words)


def test_num_classes_attribute_up_to_twice_the_labels_is_kept(tmp_path):
    path = raw_file(tmp_path / "f.h5", attrs={"num_classes": 4})  # labels 0, 1
    assert load_dataset(path).num_classes == 4


def test_num_classes_attribute_beyond_the_limit(tmp_path):
    top = limits.MAX_CLASSES - 1
    path = raw_file(tmp_path / "f.h5", y_train=(0, top, 0, 1),
                    attrs={"num_classes": limits.MAX_CLASSES + 1})
    one_line_error(lambda: load_dataset(path), str(path), "more than the 4096 classes")


def test_write_dataset_applies_the_same_class_limits(tmp_path):
    x = np.zeros((2, 3, 1), np.float32)
    split = Split(x, np.array([0, 1]))
    with pytest.raises(InputError, match="far above"):
        write_dataset(tmp_path / "w.h5", split, split, name="w", num_classes=100)
    with pytest.raises(InputError, match="4096 classes"):
        write_dataset(tmp_path / "w.h5", Split(x, np.array([0, 10 ** 5])), split, name="w")
    assert not (tmp_path / "w.h5").exists()


def test_classes_are_those_of_the_whole_file_with_max_train(tmp_path):
    # the prefix kept by max_train holds labels 0, 1 only; the file has 0..5
    path = raw_file(tmp_path / "f.h5", y_train=(0, 1, 0, 1, 5, 4, 3), y_test=(2, 1),
                    attrs={"num_classes": 6})
    assert load_dataset(path, max_train=2, max_test=1).num_classes == 6
    bad = raw_file(tmp_path / "g.h5", y_train=(0, 1, 0, 1, 9), attrs={"num_classes": 3})
    # a bad label beyond the kept prefix is still an error
    one_line_error(lambda: load_dataset(bad, max_train=2), "/train/y has label 9")


def test_cli_label_1e5_exit_2_before_training(tmp_path, capsys):
    path = raw_file(tmp_path / "f.h5", y_train=(0, 1, 0, 10 ** 5))
    cli_exit_2(["train", "--data", str(path), "--out", str(tmp_path / "run")], capsys,
               "/train/y", "100000")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- #
# invalid UTF-8 attributes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", [b"name", b"description", b"label_mapping"])
def test_invalid_utf8_attribute(tmp_path, name):
    path = raw_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        bad_utf8_attr(f, name, b"caf\xe9 \xff")
    one_line_error(lambda: load_dataset(path), str(path), repr(name.decode()), "not valid UTF-8")


def test_invalid_utf8_ascii_vlen_attribute(tmp_path):
    path = raw_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        f.attrs.create("source", np.array(b"\xff\xfe", dtype=h5py.string_dtype("ascii")))
    one_line_error(lambda: load_dataset(path), str(path), "'source'", "not valid UTF-8")


def test_unusual_attributes_are_plain_values(tmp_path):
    path = raw_file(tmp_path / "f.h5", attrs={"empty": h5py.Empty("f4"),
                                              "names": np.array([b"a", b"b"]),
                                              "matrix": np.eye(2)})
    attrs = load_dataset(path).attrs
    assert attrs["empty"] is None and attrs["names"] == ["a", "b"]
    assert attrs["matrix"] == [[1.0, 0.0], [0.0, 1.0]]


# --------------------------------------------------------------------------- #
# links, null dataspaces, corrupted files
# --------------------------------------------------------------------------- #
def test_dangling_soft_link(tmp_path):
    path = raw_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        del f["train/x"]
        f["train/x"] = h5py.SoftLink("/train/gone")
    one_line_error(lambda: load_dataset(path), str(path), "/train/x is a soft link to "
                   "/train/gone, which does not exist")


@pytest.mark.parametrize("member", ["/train/x", "/test"])
def test_external_link_to_a_missing_file(tmp_path, member):
    path = raw_file(tmp_path / "f.h5")
    missing = tmp_path / "missing.h5"
    with h5py.File(path, "a") as f:
        del f[member]
        f[member] = h5py.ExternalLink(str(missing), "/x")
    one_line_error(lambda: load_dataset(path), str(path), f"{member} is an external link",
                   str(missing), "cannot be opened")


def test_external_link_to_an_existing_file_is_followed(tmp_path):
    path = raw_file(tmp_path / "f.h5")
    other = tmp_path / "other.h5"
    with h5py.File(path, "a") as f, h5py.File(other, "w") as o:
        o["x"] = f["train/x"][()]
        expected = f["train/x"][()]
        del f["train/x"]
        f["train/x"] = h5py.ExternalLink(str(other), "/x")
    np.testing.assert_array_equal(load_dataset(path).train.x, expected)


@pytest.mark.parametrize("key", ["x", "y", "lengths"])
def test_null_dataspace(tmp_path, key):
    path = raw_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        if key in f["test"]:
            del f["test"][key]
        f["test"].create_dataset(key, data=h5py.Empty("i8"))
    one_line_error(lambda: load_dataset(path), str(path), f"/test/{key} has a null dataspace")


def _corrupt_cases():
    """Byte corruptions of a written file (offsets as fractions of its size)
    that reached h5py errors other than OSError in the old reader."""
    return [("zero", 0.5, 256), ("zero", 0.02, 64), ("truncate", 0.6, 0), ("flip", 0.55, 7),
            ("flip", 0.3, 13), ("zero", 0.8, 512)]


@pytest.mark.parametrize("kind, where, size", _corrupt_cases())
def test_corrupted_file_one_line_or_valid(tmp_path, kind, where, size):
    rng = np.random.default_rng(3)
    split = Split(rng.standard_normal((40, 30, 3)).astype(np.float32), np.arange(40) % 3)
    path = tmp_path / "f.h5"
    write_dataset(path, split, split, name="c", attrs={"description": "corrupted below"})
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if kind == "zero":
        data[at:at + size] = bytes(len(data[at:at + size]))
    elif kind == "truncate":
        data = data[:at]
    else:
        for i in range(size):
            data[(at + 97 * i) % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ds = load_dataset(path)
        except InputError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return
    # corruption that HDF5 cannot see (data bytes): still a valid data set
    assert np.isfinite(ds.train.x).all() and ds.train.y.max() < ds.num_classes


def test_h5py_errors_become_input_errors(tmp_path, monkeypatch):
    """Whatever h5py raises while reading (KeyError, RuntimeError, ...) is one line."""
    path = raw_file(tmp_path / "f.h5")

    def broken(self, *args, **kwargs):
        raise RuntimeError("Can't read data (wrong B-tree signature)\nsecond line")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", broken)
    one_line_error(lambda: load_dataset(path), str(path), "cannot read /train/y",
                   "wrong B-tree signature", "damaged")


# --------------------------------------------------------------------------- #
# declared shapes beyond the memory
# --------------------------------------------------------------------------- #
def test_declared_shape_of_hundreds_of_gb_is_not_read(tmp_path, monkeypatch):
    path = raw_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        del f["train/x"]
        f["train"].create_dataset("x", shape=(4, 10 ** 7, 2), dtype="f8")  # 640 MB ... declared
        del f["test/x"]
        f["test"].create_dataset("x", shape=(2, 10 ** 9, 2), dtype="f8")  # 32 GB declared
    reads = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, *a: reads.append(self.name) or real(self, *a))
    monkeypatch.setattr(limits, "available_memory", lambda: 16 * 10 ** 9)
    msg = one_line_error(lambda: load_dataset(path), str(path), "(2, 1000000000, 2) float64",
                         "more than the 16.0 GB available", "--max-len")
    assert reads == [], reads  # nothing was read: metadata only
    assert "GB" in msg
    # a prefix of the steps fits: only that is read (the fill value 0)
    ds = load_dataset(path, max_len=3)
    assert ds.seq_len == 3 and not ds.train.x.any()


def test_read_budget_follows_the_available_memory(tmp_path, monkeypatch):
    path = raw_file(tmp_path / "f.h5")
    load_dataset(path)
    monkeypatch.setattr(limits, "available_memory", lambda: 100)
    one_line_error(lambda: load_dataset(path), str(path), "needs about", "100 B available")


# --------------------------------------------------------------------------- #
# synthetic lengths
# --------------------------------------------------------------------------- #
def test_synthetic_length_1e8(monkeypatch):
    one_line_error(lambda: load_dataset("synthetic:100000000"), "synthetic:100000000",
                   str(limits.MAX_SYNTHETIC_LENGTH))
    # capped by max_len it is fine
    assert load_dataset("synthetic:100000000", max_len=40, max_train=4, max_test=2).seq_len == 40


@pytest.mark.parametrize("spec", ["synthetic:²", "synthetic:١٢", "synthetic:-5", "synthetic:0",
                                  "synthetic:" + "9" * 5000, "synthetic:1e3"])
def test_synthetic_bad_length(spec):
    one_line_error(lambda: load_dataset(spec), "synthetic:")


def test_synthetic_memory_checked_before_generating(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 10 ** 6)
    one_line_error(lambda: load_dataset("synthetic:2000"), "synthetic:2000", "generating",
                   "1000 + 200 sequences")
    one_line_error(lambda: make_synthetic(2000, 1000, 200), "generating")


# --------------------------------------------------------------------------- #
# config files and values
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("raw, words", [
    (b"\xff\xfehidden = 3\n", ["not UTF-8", "0xff at offset 0"]),
    ('data = "café"\n'.encode("latin-1"), ["not UTF-8", "0xe9"]),
    ("hidden = 3\n".encode("utf-16"), ["not UTF-8"]),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", ["nested too deeply"]),
    (b"epochs = " + b"9" * 5000 + b"\n", ["invalid TOML", "4300 digits"]),
    (b"seed = 18446744073709551616\n", ["option seed", "64-bit"]),
    (b"lr = 1" + b"0" * 400 + b"\n", ["option lr", "out of range"]),
    (b'out = "a\\u0000b"\n', ["option out", "NUL"]),
])
def test_bad_toml_files(tmp_path, raw, words):
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    one_line_error(lambda: load_config(path), f"config file {path}", *words)


def test_resumed_run_with_garbage_config_toml(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_bytes(bytes(range(256)) * 4)
    cli_exit_2(["train", "--resume", str(run)], capsys, "config.toml", "not UTF-8")


@pytest.mark.parametrize("name, value, words", [
    ("seed", 2 ** 64, ["64-bit"]), ("seed", 2 ** 63, ["64-bit"]),
    ("workers", 10 ** 6, ["at most 65536"]), ("threads", 2 ** 40, ["at most 65536"]),
    ("hidden", 10 ** 30, ["64-bit"]), ("epochs", -2 ** 70, ["64-bit"]),
    ("data", "x\udcffy", ["not valid UTF-8"]), ("out", "a\x00b", ["NUL"]),
])
def test_bad_values(name, value, words):
    one_line_error(lambda: make_config({name: value}), f"option {name}", *words)


def test_largest_seed_builds_a_model():
    config = make_config({"seed": INT_MAX, "hidden": 4})
    ds = load_dataset("synthetic:16", max_train=2, max_test=2)
    model = build_model(config, ds)
    assert sum(p.numel() for p in model.parameters()) > 0
    np.random.default_rng([config.seed, 1]).permutation(4)


def test_flag_values_through_the_parser(capsys):
    args = cli.build_parser().parse_args(["train", "--seed", str(2 ** 64)])
    one_line_error(lambda: cli._train_config(args), "option seed", "64-bit")
    cli_exit_2(["train", "--threads", str(2 ** 40)], capsys, "option threads")


# --------------------------------------------------------------------------- #
# resources: hidden sizes, workers, threads
# --------------------------------------------------------------------------- #
@pytest.fixture
def small_data():
    return load_dataset("synthetic:32", max_train=8, max_test=4)


@pytest.mark.parametrize("hidden", [10 ** 5, 10 ** 6, 10 ** 9])
def test_hidden_size_beyond_the_memory(small_data, hidden):
    config = make_config({"hidden": hidden})
    one_line_error(lambda: limits.check_resources(config, small_data, 1), "option hidden",
                   f"hidden {hidden}", "per rank", "available")


def test_memory_estimate_counts_the_ranks_on_a_node(small_data, monkeypatch):
    config = make_config({"hidden": 64})
    per_rank = sum(limits.estimate_memory(config, small_data).values())
    monkeypatch.setattr(limits, "available_memory", lambda: int(per_rank * 2.5))
    limits.check_resources(config, small_data, 2)
    one_line_error(lambda: limits.check_resources(config, small_data, 3), "x 3 ranks on this node")


@pytest.mark.parametrize("cell", ["implicit-gru", "gru", "lstm", "rnn"])
def test_parameter_estimate_matches_the_model(small_data, cell):
    config = make_config({"hidden": 7, "cell": cell, "optimizer": "adam"})
    model = build_model(config, small_data)
    n_params = sum(p.numel() for p in model.parameters())
    parts = limits.estimate_memory(config, small_data)
    assert parts["parameters"] == n_params * 4 * 5
    cls = cells.CELLS[cell]
    assert limits.CELL_SHAPES[cell] == (cls.gates, cls.state_factor)


def test_workers_and_threads_beyond_the_cores(small_data, monkeypatch):
    monkeypatch.setattr(limits, "usable_cores", lambda: 2)
    for name in ("workers", "threads"):
        limits.check_resources(make_config({name: 8}), small_data, 1)
        one_line_error(lambda: limits.check_resources(make_config({name: 9}), small_data, 1),
                       f"option {name}", "9 is more than 4x the 2 usable cores")
        one_line_error(lambda: limits.check_resources(make_config({name: 5}), small_data, 2),
                       "5 x 2 ranks on this node", "at most 4 per rank")


def test_usable_cores_and_memory_of_this_machine():
    assert 1 <= limits.usable_cores() <= (os.cpu_count() or 1)
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    assert 0 < limits.available_memory() <= total


def test_cgroup_limit_bounds_the_memory(tmp_path, monkeypatch):
    v2 = tmp_path / "cg"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000000\n")
    (v2 / "memory.current").write_text("600000000\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 100000000\n")
    monkeypatch.setattr(limits, "_CGROUP_V2", v2)
    assert limits.available_memory() == 500_000_000
    (v2 / "memory.max").write_text("max\n")
    assert limits.available_memory() > 500_000_000
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable: 42 kB\n")
    monkeypatch.setattr(limits, "_MEMINFO", meminfo)
    monkeypatch.setattr(limits, "_CGROUP_V1", tmp_path / "none")
    assert limits.available_memory() == 42 * 1024


@pytest.mark.skipif("check_resources" not in inspect.getsource(loop_module),
                    reason="the training loop does not call limits.check_resources yet")
def test_train_rejects_a_huge_hidden_size_before_allocating(tmp_path):
    config = make_config({"data": "synthetic:32", "max_train": 4, "max_test": 4,
                          "hidden": 10 ** 6, "epochs": 1, "out": str(tmp_path / "run")})
    one_line_error(lambda: loop_module.train(config, Comm.serial()), "option hidden")


# --------------------------------------------------------------------------- #
# float64 inputs beyond float32
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("value", [1e39, -3.5e38, 1e300])
def test_float64_beyond_float32_named_without_warning(tmp_path, value):
    path = raw_file(tmp_path / "f.h5", x_dtype="f8")
    with h5py.File(path, "a") as f:
        x = f["test/x"][()]
        x[1, 2, 1] = value
        del f["test/x"]
        f["test/x"] = x
    msg = one_line_error(lambda: load_dataset(path), str(path), "/test/x", f"{value:.6g}",
                         "sample 1", "float32 range")
    assert "NaN" not in msg


def test_float64_within_float32_loads(tmp_path):
    path = raw_file(tmp_path / "f.h5", x_dtype="f8")
    with h5py.File(path, "a") as f:
        x = f["train/x"][()]
        x[0, 0, 0] = 3e38
        del f["train/x"]
        f["train/x"] = x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(path)
    assert ds.train.x[0, 0, 0] == np.float32(3e38)
    assert torch.isfinite(torch.from_numpy(ds.train.x)).all()


def test_write_dataset_rejects_values_beyond_float32(tmp_path):
    x = np.zeros((2, 3, 1))
    x[0, 0, 0] = 1e39
    with pytest.raises(InputError, match="float32 range"):
        write_dataset(tmp_path / "w.h5", Split(x, np.array([0, 1])),
                      Split(x * 0, np.array([0, 1])), name="w")
