"""MPI ping-pong between two ranks: the alpha (latency) and beta (bandwidth) of
the replay's network model, measured through the same Comm calls the solver
makes (torch tensors, no pickling).

    mpiexec -n 2 python benchmarks/pingpong.py --out benchmarks/results/pingpong.json

For each message size (8 B .. 16 MiB) rank 0 sends, rank 1 sends back,
``--repeats`` times after a warm-up; the one-way time is half the median round
trip.  ``alpha`` and ``beta`` are the least-squares fit of ``t = alpha + n /
beta`` (weighted by 1/t, so that small messages count as much as large ones),
and ``eager`` is left at MPICH's default for shared memory (64 KiB).  The
machine's load during the run (other processes' CPU share from /proc/stat) is
recorded (it includes the two polling ranks themselves: 1.0 on a 2-core machine); other load inflates alpha.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 21, 1 << 24]


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def fit(sizes, times) -> tuple[float, float]:
    """``(alpha, beta)`` of ``t = alpha + n / beta`` by weighted least squares."""
    w = [1.0 / t for t in times]
    sw = sum(wi * wi for wi in w)
    sx = sum(wi * wi * n for wi, n in zip(w, sizes))
    sy = sum(wi * wi * t for wi, t in zip(w, times))
    sxx = sum(wi * wi * n * n for wi, n in zip(w, sizes))
    sxy = sum(wi * wi * n * t for wi, n, t in zip(w, sizes, times))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    alpha = (sy - slope * sx) / sw
    return max(alpha, 0.0), (1.0 / slope if slope > 0 else float("inf"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from mgrit_gru.core.comm import Comm

    torch.set_num_threads(1)
    comm = Comm.world()
    if comm.size != 2:
        print("pingpong: run with exactly 2 ranks (mpiexec -n 2)", file=sys.stderr)
        return 2
    me, other = comm.rank, 1 - comm.rank
    rows = []
    b0 = _busy()
    for n in SIZES:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32)
        reps = args.repeats if n <= (1 << 21) else max(args.repeats // 5, 5)
        samples = []
        for k in range(reps + 3):
            comm.barrier()
            t0 = time.perf_counter()
            if me == 0:
                comm.send(buf, other, tag=5)
                comm.recv(buf, other, tag=6)
            else:
                comm.recv(buf, other, tag=5)
                comm.send(buf, other, tag=6)
            if k >= 3:
                samples.append((time.perf_counter() - t0) / 2)
        rows.append({"bytes": buf.numel() * 4, "one_way_s": statistics.median(samples),
                     "min_s": min(samples), "repeats": reps})
    b1 = _busy()
    if me == 0:
        alpha, beta = fit([r["bytes"] for r in rows], [r["one_way_s"] for r in rows])
        busy = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)
        out = {"alpha_s": alpha, "beta_bytes_per_s": beta, "eager_bytes": 65536,
               "sizes": rows, "machine_busy_share": busy, "cpu": platform.processor() or
               platform.machine(), "command": "mpiexec -n 2 python benchmarks/pingpong.py"}
        try:
            with open("/proc/cpuinfo") as fh:
                out["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if "model name" in l)
        except (OSError, StopIteration):
            pass
        text = json.dumps(out, indent=2)
        print(f"alpha {alpha * 1e6:.2f} us, beta {beta / 1e9:.2f} GB/s "
              f"(busy share {busy:.2f})")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
