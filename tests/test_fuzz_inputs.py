"""Fuzz tests: generated bad input never ends in a traceback.

Three generators, all in-process and reproducible (``derandomize=True``, no
example database):

* HDF5 files (``load_dataset``): valid files with mutations of dtypes, shapes,
  values (NaN, Inf, beyond float32), labels, lengths, attributes (num_classes,
  invalid UTF-8), structure (missing and wrong objects, dangling soft links,
  external links, null dataspaces, declared shapes far beyond the memory) and
  byte corruption or truncation of the written file;
* TOML config files (``load_config`` + ``make_config``): tables of options
  with valid and invalid values, then byte mutations (invalid UTF-8, UTF-16,
  truncation, random bytes);
* ``mgrit-gru train`` argument lists (``build_parser`` + ``_train_config``),
  including ``--config`` and ``--resume`` with good and garbage files.

Every case must either raise :class:`InputError` with a one-line message
(argparse: ``SystemExit(2)`` with one ``mgrit-gru: error:`` line) or be
accepted; an accepted data set must hold what the file holds, pass
``check_resources`` and run a forward pass, and a sample of the accepted
cases trains for real (``train`` on ``Comm.serial()``; the only other outcome
allowed there is :class:`Diverged`). No warning and nothing on stderr
(Python or C level, e.g. HDF5-DIAG) is allowed, and no other exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_train import one_thread  # noqa: F401 (a fixture)
from mgrit_gru import limits
from mgrit_gru.cli import _train_config, build_parser
from mgrit_gru.core.comm import Comm
from mgrit_gru.training.config import OPTION_NAMES, TrainConfig, flag, load_config, make_config
from mgrit_gru.data import load_dataset
from mgrit_gru.errors import Diverged, InputError
from mgrit_gru.training.loop import train
from mgrit_gru.training.setup import build_model

#: Cases per generator (1,800 in all; about a minute on 2 busy cores).
N_READER, N_CONFIG, N_FLAGS = 800, 500, 500
#: One accepted case in TRAIN_EVERY (by a drawn number, when it is TRAIN_PICK:
#: not 0, which hypothesis draws far more often) trains for real.
TRAIN_EVERY = 12
TRAIN_PICK = 5


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    print_blob=False, suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def quiet(allowed_stderr: list[str] | None = None):
    """Fail on any warning and on any output to stderr (``sys.stderr`` and
    file descriptor 2); with ``allowed_stderr`` (a list) the Python-level
    stderr text is handed back in it instead of failing."""
    py_err = io.StringIO()
    with tempfile.TemporaryFile() as fd_err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stderr(py_err):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fd_err.seek(0)
        c_text = fd_err.read().decode(errors="replace")
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert c_text == "", c_text
    if allowed_stderr is None:
        assert py_err.getvalue() == "", py_err.getvalue()
    else:
        allowed_stderr.append(py_err.getvalue())


def assert_one_line(exc: BaseException, *must_contain: str) -> str:
    msg = str(exc)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg, msg
    for text in must_contain:
        assert text in msg, (text, msg)
    return msg


def tiny_training(config: TrainConfig, out: Path) -> None:
    """Train one short epoch; InputError (one line) and Diverged are the only
    other outcomes allowed."""
    try:
        metrics = train(config, Comm.serial())
    except InputError as e:
        assert_one_line(e)
        return
    except Diverged as e:
        assert_one_line(e)
        return
    assert len(metrics["epochs"]) == config.epochs
    assert (out / "checkpoint.pt").is_file()


def accept(count: Counter, make, *must_contain: str):
    """``make()``, counted as accepted; ``None``, counted as rejected, when it
    raises a one-line InputError (with ``must_contain``)."""
    try:
        value = make()
    except InputError as e:
        assert_one_line(e, *must_contain)
        count["rejected"] += 1
        return None
    count["accepted"] += 1
    return value


def run_cases(run, name: str, count: Counter, n: int, **at_least: int) -> None:
    """Run the hypothesis test ``run``, print its counts, and check that it
    saw ``n`` cases and that each count of ``at_least`` reached its minimum."""
    tic = time.perf_counter()
    run()
    print(f"\n{name}: {dict(count)} in {time.perf_counter() - tic:.1f} s")
    assert count["cases"] >= n
    for key, least in at_least.items():
        assert count[key] >= least, (key, count)


def train_tiny(config: TrainConfig, out: Path, **changes) -> bool:
    """:func:`tiny_training` of ``config`` cut to one sequential epoch of a
    small model in ``out`` (with ``changes``); False, without training, if the
    cut config is rejected (a one-line InputError)."""
    try:
        tiny = dataclasses.replace(
            config, epochs=1, hidden=min(config.hidden, 6), out=str(out), threads=1,
            workers=1, strategy="sequential", progress="off",
            batch_size=min(config.batch_size, 8), **changes)
    except InputError as e:
        assert_one_line(e)
        return False
    tiny_training(tiny, out)
    return True


def forward_check(config: TrainConfig, ds) -> bool:
    """check_resources, then (for small models) build_model and one forward."""
    try:
        limits.check_resources(config, ds, 1)
    except InputError as e:
        assert_one_line(e)
        return False
    params = 4 * config.hidden * (config.hidden + ds.input_size + 2) + config.hidden * ds.num_classes
    if params > 200_000:
        return True
    model = build_model(config, ds)
    split = ds.train.take(slice(0, 2))
    dtype = getattr(torch, config.dtype)
    x = torch.from_numpy(np.ascontiguousarray(split.x[:, :64])).to(dtype)
    lengths = None if split.lengths is None else torch.from_numpy(
        np.minimum(split.lengths, x.shape[1]))
    with torch.no_grad():
        logits = model(x, lengths)
    assert logits.shape == (len(split), ds.num_classes)
    return True


# --------------------------------------------------------------------------- #
# HDF5 files
# --------------------------------------------------------------------------- #
X_DTYPES = ["f4", "f4", "f4", "f8", "f8", "f2", "i2", "u8", "?", "c8", "S4"]
Y_DTYPES = ["i8", "i8", "i8", "u8", "i1", "u2", "f4", "?"]
X_VALUES = ["plain"] * 6 + ["nan", "inf", "beyond_f32", "near_f32_max", "zero"]
LABELS = ["plain"] * 6 + ["negative", "large", "max_u64", "one_class", "sparse"]
LENGTHS = ["absent"] * 5 + ["valid", "valid", "zero", "too_long", "float", "2d", "bad_pad"]
SHAPES = ["ok"] * 10 + ["x_2d", "y_2d", "y_count", "empty_n", "empty_t"]
STRUCTURE = ["ok"] * 12 + ["no_group", "group_is_dataset", "x_is_group", "soft_dangling",
                           "soft_ok", "ext_missing", "ext_ok", "null_x", "null_y", "scalar_x",
                           "declared_huge", "datatype"]
NUM_CLASSES = ["absent", "exact", "exact", "exact", "plus_one", "double", "small_int",
               "million", "float", "string", "array", "bool", "negative"]
NAME_ATTR = ["ok", "ok", "absent", "bad_utf8", "number", "empty"]
CORRUPTION = ["none"] * 10 + ["flip", "flip", "truncate", "zero_block"]


#: Per split: (key, value without a mutation, the values of a mutation).
SPLIT_DIMS = {"x_dtype": ("f4", X_DTYPES), "x_values": ("plain", X_VALUES),
              "y_dtype": ("i8", Y_DTYPES), "labels": ("plain", LABELS),
              "lengths": ("absent", LENGTHS), "shape": ("ok", SHAPES)}
FILE_DIMS = {"structure": ("ok", STRUCTURE), "num_classes": ("exact", NUM_CLASSES),
             "name": ("ok", NAME_ATTR), "description_bad_utf8": (False, [True]),
             "corruption": ("none", CORRUPTION)}
_DIMS = [("train", k) for k in SPLIT_DIMS] + [("test", k) for k in SPLIT_DIMS] + [
    ("file", k) for k in FILE_DIMS]


@st.composite
def h5_cases(draw):
    """A file spec: a valid file with 0-3 mutated dimensions (about a third
    are clean: a fair share of the cases must load)."""
    mutated = set(draw(st.lists(st.sampled_from(_DIMS), max_size=3)))
    case = {
        "d": draw(st.integers(1, 3)), "classes": draw(st.integers(2, 4)),
        "structure_split": draw(st.sampled_from(["train", "test"])),
        "small_int": draw(st.integers(-3, 12)),
        "chunked": draw(st.booleans()),
        "flips": draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                               min_size=1, max_size=8)),
        "cut": draw(st.floats(0, 1)),
        "max_train": draw(st.sampled_from([None, None, 1, 2, 5])),
        "max_test": draw(st.sampled_from([None, None, 1, 3])),
        "max_len": draw(st.sampled_from([None, None, None, 1, 3, 5])),
        "train_draw": draw(st.integers(0, 3 * TRAIN_EVERY - 1)),  # accepted files are many
    }
    for split in ("train", "test"):
        spec = {"n": draw(st.integers(1, 6)), "t": draw(st.integers(1, 7)),
                "seed": draw(st.integers(0, 2 ** 16))}
        for key, (default, values) in SPLIT_DIMS.items():
            spec[key] = draw(st.sampled_from(values)) if (split, key) in mutated else default
        case[split] = spec
    for key, (default, values) in FILE_DIMS.items():
        case[key] = draw(st.sampled_from(values)) if ("file", key) in mutated else default
    return case


def _split_arrays(spec: dict, d: int, classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec["seed"])
    n, t = spec["n"], spec["t"]
    x = rng.standard_normal((n, t, d))
    kind = spec["x_values"]
    if kind == "nan":
        x[rng.integers(n), rng.integers(t), 0] = np.nan
    elif kind == "inf":
        x[rng.integers(n), rng.integers(t), 0] = -np.inf
    elif kind == "beyond_f32":
        x[rng.integers(n), rng.integers(t), 0] = 1e39 * rng.choice([-1, 1])
    elif kind == "near_f32_max":
        x[rng.integers(n), rng.integers(t), 0] = 3e38
    elif kind == "zero":
        x[:] = 0
    labels = [int(v) for v in np.arange(n) % classes]
    kind = spec["labels"]
    if kind == "negative":
        labels[rng.integers(n)] = -1
    elif kind == "large":
        labels[rng.integers(n)] = int(rng.choice([5000, 10 ** 5, 2 ** 31, 2 ** 62]))
    elif kind == "max_u64":
        labels[rng.integers(n)] = 2 ** 64 - 1
    elif kind == "one_class":
        labels = [0] * n
    elif kind == "sparse":
        labels[rng.integers(n)] = 40
    y = _store_labels(labels, spec["y_dtype"])
    out: dict[str, np.ndarray] = {"x": x, "y": y}
    lengths = spec["lengths"]
    if lengths != "absent":
        lv = rng.integers(1, t + 1, size=n)
        if lengths == "zero":
            lv[0] = 0
        elif lengths == "too_long":
            lv[-1] = t + 1
        if lengths != "bad_pad":
            pad = np.arange(t)[None, :] >= np.clip(lv, 0, t)[:, None]
            x[pad] = 0
        out["lengths"] = lv.astype(np.float32) if lengths == "float" else (
            lv.reshape(n, 1) if lengths == "2d" else lv)
    shape = spec["shape"]
    if shape == "x_2d":
        out["x"] = x[:, :, 0]
    elif shape == "y_2d":
        out["y"] = y.reshape(n, 1)
    elif shape == "y_count":
        out["y"] = np.concatenate([y, y[:1]])
    elif shape == "empty_n":
        out["x"] = x[:0]
    elif shape == "empty_t":
        out["x"] = x[:, :0]
    return out


def _store_labels(values: list[int], dtype: str) -> np.ndarray:
    """The labels as ``dtype``; integers that do not fit it go to int64 or
    uint64 (and, when neither holds them all, are wrapped into int64)."""
    if np.dtype(dtype).kind not in "iu":  # float or bool labels
        return np.array(values, dtype=np.float64).astype(dtype)
    for candidate in (dtype, "i8", "u8"):
        info = np.iinfo(candidate)
        if all(info.min <= v <= info.max for v in values):
            return np.array(values, dtype=candidate)
    return np.array([v % 2 ** 63 for v in values], dtype=np.int64)


def _store_x(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as ``dtype`` (overflow, NaN to int etc. as numpy does, quietly)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype == "S4":
            return x.astype("S4")
        return x.astype(dtype)


def _write_bad_utf8_attr(obj, name: str, raw: bytes) -> None:
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_cset(h5py.h5t.CSET_UTF8)
    attr = h5py.h5a.create(obj.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(np.array(raw, dtype=f"S{len(raw)}"), mtype=tid)


def write_case(case: dict, path: Path, ext_path: Path) -> dict:
    """Write the case's file; return what a successful load must give
    (``None`` where the loaded content is not predictable)."""
    expected: dict = {}
    arrays = {}
    # Byte corruption only in the checksummed HDF5 1.8 format (write_dataset's):
    # HDF5 can crash or hang on some corrupted files of the original format.
    libver = ("v108", "v108") if case["corruption"] != "none" else None
    with h5py.File(path, "w", libver=libver) as f:
        for split in ("train", "test"):
            spec = case[split]
            a = _split_arrays(spec, case["d"], case["classes"])
            x, y = _store_x(a["x"], spec["x_dtype"]), a["y"]
            g = f.create_group(split)
            kw = {"chunks": True, "compression": "gzip"} if case["chunked"] else {}
            g.create_dataset("x", data=x, **(kw if x.size else {}))
            g.create_dataset("y", data=y, **(kw if y.size else {}))
            if "lengths" in a:
                g.create_dataset("lengths", data=a["lengths"])
            arrays[split] = {"x": x, "y": y, "lengths": a.get("lengths")}
        structure, target = case["structure"], case["structure_split"]
        g = f[target]
        if structure == "no_group":
            del f[target]
        elif structure == "group_is_dataset":
            del f[target]
            f[target] = np.zeros(3)
        elif structure == "x_is_group":
            del g["x"]
            g.create_group("x")
        elif structure == "soft_dangling":
            del g["x"]
            g["x"] = h5py.SoftLink(f"/{target}/nowhere")
        elif structure == "soft_ok":
            g["x_data"] = g["x"]
            del g["x"]
            g["x"] = h5py.SoftLink(f"/{target}/x_data")
        elif structure in ("ext_missing", "ext_ok"):
            with h5py.File(ext_path, "w") as ext:
                ext["x"] = g["x"][()]
            del g["x"]
            g["x"] = h5py.ExternalLink(str(ext_path) if structure == "ext_ok"
                                       else str(ext_path) + ".missing", "/x")
        elif structure in ("null_x", "null_y"):
            key = structure[-1]
            del g[key]
            g.create_dataset(key, data=h5py.Empty("f4" if key == "x" else "i8"))
        elif structure == "scalar_x":
            del g["x"]
            g["x"] = 1.5
        elif structure == "declared_huge":
            n = g["x"].shape[0]
            del g["x"]
            g.create_dataset("x", shape=(n, 10 ** 9, case["d"]), dtype="f8")
            arrays[target]["x"] = "huge"
        elif structure == "datatype":
            del g["x"]
            g["x"] = np.dtype("f4")
        nc = case["num_classes"]
        top = max(int(np.max(arrays[s]["y"])) if np.size(arrays[s]["y"]) else 0
                  for s in ("train", "test"))
        value = {"exact": top + 1, "plus_one": top + 2, "double": 2 * (top + 1) + 1,
                 "small_int": case["small_int"], "million": 10 ** 6, "float": float(top + 1),
                 "string": str(top + 1), "array": np.array([top + 1]), "bool": True,
                 "negative": -2}.get(nc)
        if isinstance(value, int) and not isinstance(value, bool):
            value = np.uint64(min(value, 2 ** 64 - 1)) if value >= 2 ** 63 else np.int64(value)
        if value is not None:
            f.attrs["num_classes"] = value
        if case["name"] == "ok":
            f.attrs["name"] = "fuzz"
        elif case["name"] == "bad_utf8":
            _write_bad_utf8_attr(f, "name", b"\xff\xfe\x80name")
        elif case["name"] == "number":
            f.attrs["name"] = 7
        elif case["name"] == "empty":
            f.attrs["name"] = h5py.Empty("f4")
        if case["description_bad_utf8"]:
            _write_bad_utf8_attr(f, "description", b"caf\xe9")
        else:
            f.attrs["description"] = "fuzz case"
    expected = arrays if structure not in ("ext_missing",) else None
    corruption = case["corruption"]
    if corruption != "none":
        data = bytearray(path.read_bytes())
        if corruption == "flip":
            for where, byte in case["flips"]:
                data[int(where * len(data))] = byte
        elif corruption == "truncate":
            data = data[:int(case["cut"] * len(data))]
        elif corruption == "zero_block":
            start = int(case["cut"] * len(data))
            data[start:start + 64] = bytes(len(data[start:start + 64]))
        path.write_bytes(bytes(data))
        expected = None
    return expected


def check_loaded(ds, case: dict, expected: dict | None) -> None:
    """Invariants of every accepted data set, and its content against the file."""
    assert 2 <= ds.num_classes <= limits.MAX_CLASSES
    for split, limit in (("train", case["max_train"]), ("test", case["max_test"])):
        s = getattr(ds, split)
        assert s.x.dtype == np.float32 and s.y.dtype == np.int64
        assert s.x.ndim == 3 and s.y.shape == (len(s),) and len(s) >= 1
        assert np.isfinite(s.x).all()
        assert s.y.min() >= 0 and s.y.max() < ds.num_classes
        if s.lengths is not None:
            assert s.lengths.dtype == np.int64
            assert s.lengths.min() >= 1 and s.lengths.max() <= s.seq_len
        if expected is None:
            continue
        raw = expected[split]
        rows = slice(0, limit)
        if isinstance(raw["x"], str):  # declared, never written: the fill value 0
            assert not s.x.any()
        else:
            want = np.asarray(raw["x"])[rows, :case["max_len"]].astype(np.float32)
            np.testing.assert_array_equal(s.x, want)
        np.testing.assert_array_equal(s.y, np.asarray(raw["y"])[rows].astype(np.int64))
    attr = case["num_classes"]
    if expected is not None and attr == "absent":
        top = max(int(np.max(expected[s]["y"])) for s in ("train", "test"))
        assert ds.num_classes == top + 1


def test_fuzz_hdf5_reader(tmp_path):
    count = Counter()
    path, ext_path = tmp_path / "case.h5", tmp_path / "ext.h5"

    @fuzz_settings(N_READER)
    @given(case=h5_cases())
    def run(case):
        count["cases"] += 1
        expected = write_case(case, path, ext_path)
        kwargs = {k: case[k] for k in ("max_train", "max_test", "max_len")}
        with quiet():
            ds = accept(count, lambda: load_dataset(path, **kwargs), str(path))
            if ds is None:
                return
            check_loaded(ds, case, expected)
            config = make_config({"data": str(path), "hidden": 4, "batch_size": 4, "epochs": 1,
                                  "progress": "off", **{k: v for k, v in kwargs.items() if v}})
            if forward_check(config, ds) and case["train_draw"] == TRAIN_PICK:
                out = tmp_path / f"run{count['trained']}"
                tiny_training(dataclasses.replace(config, out=str(out)), out)
                count["trained"] += 1

    run_cases(run, "HDF5 reader", count, N_READER, accepted=N_READER // 10,
              rejected=N_READER // 3, trained=3)


# --------------------------------------------------------------------------- #
# TOML config files
# --------------------------------------------------------------------------- #
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_SAMPLE_STRINGS = ["default", "synthetic:24", "FreezerRegularTrain", "", "x\ty", "é", "nope.h5",
                   "a\u0000b", "synthetic:²", "synthetic:0", "synthetic:99999999999"]


def _valid_value(name: str):
    f = _FIELDS[name]
    kind, choices = f.metadata["kind"], f.metadata["choices"]
    if choices:
        return st.sampled_from(choices)
    if kind == "bool":
        return st.booleans()
    if kind == "int":
        return st.integers(0, 6)
    if kind == "float":
        return st.floats(0, 2, allow_nan=False)
    if kind == "relax":
        return st.one_of(st.sampled_from(["F", "FCF", "fcf", "F,FCF"]),
                         st.lists(st.sampled_from(["F", "FCF"]), min_size=1, max_size=3))
    return st.sampled_from(_SAMPLE_STRINGS)


_ANY_VALUE = st.one_of(
    st.integers(-3, 10), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 5, 10 ** 9, 10 ** 6]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=10), st.sampled_from(_SAMPLE_STRINGS),
    st.lists(st.one_of(st.integers(-2, 3), st.sampled_from(["F", "FCF", "X"])), max_size=3),
    st.just("DATETIME"), st.just({"a": 1}),
)


def _toml_value(v) -> str:
    if v == "DATETIME":
        return "1979-05-27T07:32:00Z"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else
                                     "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def toml_documents(draw):
    names = st.sampled_from(OPTION_NAMES)
    keys = draw(st.lists(st.one_of(names, names, names, names, st.sampled_from(
        ["unknown", "hidden_size", "a.b", "\"quoted key\""])), max_size=6, unique=True))
    lines = []
    for key in keys:
        bare = key if key in _FIELDS else None
        valid = bare is not None and draw(st.integers(0, 2)) > 0
        value = draw(_valid_value(bare) if valid else _ANY_VALUE)
        lines.append(f"{key} = {_toml_value(value)}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.sampled_from(["[table]", "hidden = ", "= 3", "hidden = 1 2",
                                           "a = " + "[" * 3000 + "]" * 3000,
                                           "epochs = " + "9" * 5000, "hidden = 3\nhidden = 4"])))
    text = "\n".join(lines) + "\n"
    raw = text.encode("utf-8")
    mutation = draw(st.sampled_from(["none"] * 14 + ["flip", "bad_utf8", "latin1", "utf16",
                                                    "bom", "bytes", "truncate", "nul"]))
    if mutation == "flip" and raw:
        b = bytearray(raw)
        for where, byte in draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                   st.integers(0, 255)), min_size=1, max_size=4)):
            b[int(where * len(b))] = byte
        raw = bytes(b)
    elif mutation == "bad_utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + raw[at:]
    elif mutation == "latin1":
        raw = (text + 'data = "café"\n').encode("latin-1", errors="replace")
    elif mutation == "utf16":
        raw = text.encode("utf-16")
    elif mutation == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mutation == "bytes":
        raw = draw(st.binary(max_size=64))
    elif mutation == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif mutation == "nul":
        raw = raw + b"\x00"
    return raw, draw(st.integers(0, TRAIN_EVERY - 1))


def test_fuzz_config_loader(tmp_path):
    count = Counter()
    path = tmp_path / "case.toml"

    @fuzz_settings(N_CONFIG)
    @given(doc=toml_documents())
    def run(doc):
        raw, train_draw = doc
        count["cases"] += 1
        path.write_bytes(raw)
        with quiet():
            config = accept(count, lambda: make_config(load_config(path)))
            if config is None:
                return
            # the run folder's config.toml is written by tomli_w and read back the same way
            path.write_text(tomli_w.dumps(config.to_dict()), encoding="utf-8")
            assert make_config(load_config(path)) == config
            if train_draw == TRAIN_PICK:
                if train_tiny(config, tmp_path / f"run{count['trained']}", data="synthetic:24",
                              max_train=8, max_test=8, max_len=None):
                    count["trained"] += 1

    run_cases(run, "config loader", count, N_CONFIG, accepted=N_CONFIG // 10,
              rejected=N_CONFIG // 3, trained=3)


# --------------------------------------------------------------------------- #
# command-line flags
# --------------------------------------------------------------------------- #
_VALUE_TEXTS = ["0", "1", "2", "3", "-1", "8", "1.5", "0.01", "1e999", "-inf", "nan", "1_000",
                "\u0663", "0x10", "", " 4 ", "9" * 30, "9223372036854775808", "100000",
                "\udcff", "F,FCF", "FCF,X", "mgrit", "serial", "lstm", "float64", "default",
                "synthetic:24", "synthetic:100000000", "FreezerRegularTrain", "-", "--", "é"]
_VALUED = [n for n, f in _FIELDS.items() if f.metadata["kind"] != "bool"]
_BOOLS = [n for n, f in _FIELDS.items() if f.metadata["kind"] == "bool"]


def _flag_files(root: Path) -> dict[str, list[str]]:
    """Files and folders for --config and --resume."""
    good = root / "good.toml"
    good.write_text('hidden = 4\nepochs = 1\ndata = "synthetic:24"\n', encoding="utf-8")
    (root / "latin1.toml").write_bytes('data = "café"\n'.encode("latin-1"))
    (root / "bad.toml").write_text("hidden = [\n", encoding="utf-8")
    (root / "big_seed.toml").write_text("seed = 18446744073709551616\n", encoding="utf-8")
    garbage = root / "garbage_run"
    garbage.mkdir()
    (garbage / "config.toml").write_bytes(bytes(range(256)))
    valid_run = root / "valid_run"
    valid_run.mkdir()
    (valid_run / "config.toml").write_text('hidden = 4\ndata = "default"\n', encoding="utf-8")
    return {"config": [str(good), str(root / "latin1.toml"), str(root / "bad.toml"),
                       str(root / "big_seed.toml"), str(root / "missing.toml"), str(root)],
            "resume": [str(garbage), str(valid_run), str(root / "no_such_run"), str(root / "empty")]}


@st.composite
def argvs(draw, files: dict[str, list[str]]):
    tokens: list[str] = []
    for _ in range(draw(st.integers(0, 5))):
        what = draw(st.sampled_from(["valued", "valued", "valued", "bool", "config", "resume",
                                     "junk"]))
        if what == "valued":
            name = draw(st.sampled_from(_VALUED))
            valid = draw(st.integers(0, 2)) > 0
            value = str(draw(_valid_value(name))) if valid else draw(
                st.one_of(st.sampled_from(_VALUE_TEXTS), st.text(max_size=6)))
            if name in ("out",):
                value = draw(st.sampled_from(["OUT", "\udcff", "a\tb", ""]))
            tokens += [flag(name), value]
        elif what == "bool":
            name = draw(st.sampled_from(_BOOLS))
            tokens.append(draw(st.sampled_from([flag(name), "--no-" + flag(name)[2:]])))
        elif what == "config":
            tokens += ["--config", draw(st.sampled_from(files["config"]))]
        elif what == "resume":
            tokens += [draw(st.sampled_from(["--resume", "--resume-or-start"])),
                       draw(st.sampled_from(files["resume"]))]
        else:
            tokens.append(draw(st.one_of(st.sampled_from(["--hidden", "--nope", "-x", "train",
                                                          "--epochs=2", "--lr=-1", "--hid"]),
                                         st.text(max_size=6))))
    # --help / -h (and their prefixes) print the help and exit 0: not a bad input
    tokens = [t for t in tokens if not (t.startswith("-h") or (len(t) > 2 and "--help".startswith(t))
                                        or (t.startswith("--he") and "--help".startswith(t.split("=")[0])))]
    return ["train", *tokens], draw(st.integers(0, TRAIN_EVERY - 1))


def test_fuzz_flags(tmp_path):
    count = Counter()
    files = _flag_files(tmp_path)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()

    @fuzz_settings(N_FLAGS)
    @given(case=argvs(files))
    def run(case):
        argv, train_draw = case
        argv = [str(out_dir / f"run{count['cases']}") if t == "OUT" else t for t in argv]
        count["cases"] += 1
        stderr: list[str] = []
        with quiet(allowed_stderr=stderr):
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as e:
                assert e.code == 2, (argv, e.code)
                count["parser"] += 1
                parsed = False
            else:
                parsed = True
        if not parsed:
            lines = stderr[0].splitlines()
            assert len(lines) == 1 and lines[0].startswith("mgrit-gru: error: "), stderr
            return
        assert stderr == [""], stderr
        with quiet():
            config = accept(count, lambda: _train_config(args))
            if config is None:
                return
            try:
                ds = load_dataset(config.data, max_train=min(config.max_train or 16, 16),
                                  max_test=min(config.max_test or 16, 16),
                                  max_len=min(config.max_len or 40, 40))
            except InputError as e:
                assert_one_line(e)
                return
            small = dataclasses.replace(config, max_train=min(config.max_train or 16, 16),
                                        max_test=min(config.max_test or 16, 16),
                                        max_len=min(config.max_len or 40, 40))
            if forward_check(small, ds):
                count["forward"] += 1
                if train_draw == TRAIN_PICK:
                    if train_tiny(small, tmp_path / f"run{count['trained']}"):
                        count["trained"] += 1

    run_cases(run, "flags", count, N_FLAGS, parser=N_FLAGS // 10, accepted=N_FLAGS // 10,
              rejected=N_FLAGS // 10, trained=2)
