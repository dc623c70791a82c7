"""The command line: end to end runs, option precedence, error messages."""

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from mgrit_gru.cli import main
from mgrit_gru.training.config import OPTION_NAMES, TrainConfig, make_config
from mgrit_gru.data import Split, write_dataset

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--data", "synthetic:40", "--epochs", "1", "--max-train", "32", "--max-test", "16",
         "--max-len", "40", "--hidden", "8", "--threads", "1", "--progress", "off"]
EPOCH_KEYS = ("train_loss", "test_loss", "test_accuracy", "test_precision", "test_recall",
              "test_f1", "seconds")


def run_cli(*args, cwd=None):
    """``python -m mgrit_gru ARGS`` in a subprocess (no MPI launcher around it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    return subprocess.run([sys.executable, "-m", "mgrit_gru", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


def check_metrics(path):
    metrics = json.loads(path.read_text())
    assert set(metrics) == {"config", "epochs", "final", "environment"}
    assert len(metrics["epochs"]) == metrics["config"]["epochs"]
    for record in [*metrics["epochs"], metrics["final"]]:
        for key in EPOCH_KEYS:
            assert math.isfinite(record[key]), key
        for key in ("test_accuracy", "test_precision", "test_recall", "test_f1"):
            assert 0.0 <= record[key] <= 1.0
    assert metrics["final"]["train_seconds"] >= metrics["final"]["seconds"]
    return metrics


# --------------------------------------------------------------------------- #
# end to end
# --------------------------------------------------------------------------- #
def test_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    metrics = check_metrics(out / "metrics.json")
    assert metrics["config"]["data"] == "synthetic:40"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"] == metrics["config"]
    assert set(state) >= {"model", "optimizer"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("epoch 1/1 | train_loss ")
    assert (out / "log.txt").read_text().splitlines() == printed


def test_python_m_train_subprocess_default_out(tmp_path):
    """``python -m mgrit_gru train`` exits 0 and writes runs/<timestamp>-<cell>."""
    result = run_cli("train", *QUICK, "--cell", "rnn", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith("-rnn")
    check_metrics(run / "metrics.json")


def test_info_prints_final_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    final = json.loads((out / "metrics.json").read_text())["final"]
    text = capsys.readouterr().out
    assert f"{final['test_accuracy']:.6g}" in text and "test_f1" in text


def test_datasets_lists_builtins(capsys):
    from mgrit_gru.data import builtin_datasets

    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    for name in builtin_datasets():
        assert name in text


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #
def test_every_option_has_a_flag():
    from mgrit_gru.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(OPTION_NAMES) <= dests


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_docs_list_every_option(doc):
    from mgrit_gru.training.config import flag

    text = (ROOT / doc).read_text()
    missing = [name for name in OPTION_NAMES if f"`{flag(name)}`" not in text]
    assert not missing


def test_precedence_defaults_toml_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('hidden = 6\nepochs = 3\nrelax = ["F", "FCF", "F"]\nlr = 0.002\n')
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--config", str(toml), "--out", str(out),
                 "--lr", "0.003"]) == 0          # QUICK sets --epochs 1 and --hidden 8
    with open(out / "config.toml", "rb") as fh:
        resolved = tomllib.load(fh)
    default = TrainConfig()
    assert resolved["hidden"] == 8 and resolved["epochs"] == 1 and resolved["lr"] == 0.003
    assert resolved["relax"] == ["F", "FCF", "F"]           # from the file
    assert resolved["batch_size"] == default.batch_size     # default
    assert resolved["cell"] == default.cell
    # the written file is a valid config that gives back the same options
    assert make_config(resolved) == make_config(resolved, {"out": str(out)})
    assert make_config(resolved).to_dict() == resolved


BAD_OPTIONS = [
    (["--hidden", "0"], "hidden"),
    (["--hidden", "abc"], "--hidden"),
    (["--epochs", "-1"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--lr", "0"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--cell", "transformer"], "cell"),
    (["--optimizer", "lbfgs"], "optimizer"),
    (["--dtype", "float16"], "dtype"),
    (["--pooling", "max"], "pooling"),
    (["--propagator", "magic"], "propagator"),
    (["--levels", "0"], "levels"),
    (["--cfactor", "1"], "cfactor"),
    (["--fwd-iters", "0"], "fwd_iters"),
    (["--fwd-tol", "-0.001"], "fwd_tol"),
    (["--bwd-tol", "-1"], "bwd_tol"),
    (["--relax", "FFC"], "relax"),
    (["--relax", "F,F,F,F"], "relax"),          # 4 entries for 3 levels
    (["--time-ranks", "0"], "time_ranks"),
    (["--time-ranks", "2"], "time_ranks"),      # does not divide 1 rank
    (["--strategy", "random"], "strategy"),
    (["--workers", "0"], "workers"),
    (["--threads", "0"], "threads"),
    (["--seed", "-3"], "seed"),
    (["--progress", "sometimes"], "progress"),
    (["--eval-every", "0"], "eval_every"),
    (["--max-len", "0"], "max_len"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("args, name", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_exit_2_one_line(args, name, tmp_path, capsys):
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mgrit-gru: error: ")
    assert name in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_device_cuda_without_a_gpu_exit_2_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", *QUICK, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mgrit-gru: error: option device (--device)")
    assert "no CUDA device" in err
    assert not (tmp_path / "run").exists()
    assert main(["train", *QUICK, "--device", "auto", "--out", str(tmp_path / "auto")]) == 0
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["environment"]["device"] == "cpu" and metrics["config"]["device"] == "auto"


def test_bad_options_in_subprocess_no_traceback(tmp_path):
    for args, name in [(["--hidden", "0"], "hidden"), (["--cfactor", "1"], "cfactor")]:
        result = run_cli("train", *args, "--out", str(tmp_path / "run"))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("mgrit-gru: error: ") and name in result.stderr


@pytest.mark.parametrize("content, words", [
    ('hidden = 8\nfoo = 1\n', ["c.toml", "foo"]),
    ('hidden = "eight"\n', ["c.toml", "hidden"]),
    ('hidden = \n', ["c.toml", "invalid TOML"]),
])
def test_bad_toml_names_file_and_key(tmp_path, capsys, content, words):
    toml = tmp_path / "c.toml"
    toml.write_text(content)
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for word in words:
        assert word in err


def test_missing_toml(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["broken.h5", "missing.h5"])
def test_bad_data_file_exit_2_names_the_file(tmp_path, capsys, name):
    bad = tmp_path / name
    if name == "broken.h5":
        bad.write_text("not hdf5")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgrit-gru: error: ") and err.count("\n") == 1 and name in err


def test_data_file_with_wrong_schema(tmp_path, capsys):
    # the labels do not fit the declared classes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 1)).astype(np.float32)
    path = tmp_path / "odd.h5"
    write_dataset(path, Split(x, np.array([0, 1, 0, 1])), Split(x, np.array([0, 1, 0, 1])),
                  name="odd")
    import h5py
    with h5py.File(path, "r+") as f:
        f["test/y"][0] = 7
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "odd.h5" in err and err.count("\n") == 1


def test_resume_via_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    metrics = check_metrics(out / "metrics.json")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
