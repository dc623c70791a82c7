"""Cell and serial-propagator timings against torch's own GRU/LSTM.

    python benchmarks/bench_cells.py --out benchmarks/results/cells.json

One torch thread. Two parts:

* per step (batch 100, hidden 100, input 9 and 1000): each cell's ``step``
  (input projection precomputed, as the propagators use it), the step with
  its input projection, and step + VJP (``step`` saving ``hw``,
  ``linearize``, ``vjp_state``, ``vjp_proj``, ``param_grads``), next to
  ``torch.nn.GRUCell`` / ``LSTMCell`` / ``RNNCell`` forward and forward +
  autograd backward;
* the whole sequence (length 1024, batch 100, input 9, hidden 100, loss on
  the last hidden state): ``SerialPropagator`` forward + backward of the
  implicit GRU against ``torch.nn.GRU`` forward + backward, interleaved
  (A B A B ...), ``--repeats`` rounds, medians and their ratio. Two extra
  variants show the role of subnormal numbers: the adjoint decays through
  1024 steps into the subnormal range, where x86 arithmetic is many times
  slower; ``SerialPropagator`` flushes subnormals by default, so the table
  also has it without flushing and torch.nn.GRU with flushing.

``--chunks 0,8,32`` adds SerialPropagator variants with those backward
chunk sizes (0: the whole sequence linearised in one call) to the rounds.

Wall time and process CPU time are both recorded. The machine's CPU use is
read from /proc/stat before and after each part; when other processes used
more than ``--max-foreign-load`` of the machine, ``load_warning`` says so
(interleaving keeps the ratios meaningful under load).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mgrit_gru.models.cells import make_cell
from mgrit_gru.models import SerialPropagator

TORCH_CELLS = {"implicit-gru": torch.nn.GRUCell, "gru": torch.nn.GRUCell,
               "lstm": torch.nn.LSTMCell, "rnn": torch.nn.RNNCell}


# ------------------------------------------------------------------ machine
def _proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, or (0, 0) off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)      # idle + iowait
    return sum(fields) - idle, sum(fields)


class LoadMeter:
    """CPU used by other processes while a block ran, as a machine fraction."""

    def __enter__(self):
        self.stat0, self.cpu0, self.wall0 = _proc_stat(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy1, total1 = _proc_stat()
        busy0, total0 = self.stat0
        wall = time.perf_counter() - self.wall0
        ours = time.process_time() - self.cpu0
        ncpu = os.cpu_count() or 1
        if total1 > total0:
            machine_busy = (busy1 - busy0) / (total1 - total0)   # fraction of all CPUs
            self.foreign = max(0.0, machine_busy - ours / (wall * ncpu))
        else:
            self.foreign = float("nan")
        self.wall = wall


# ----------------------------------------------------------------- per step
def _per_call_us(fns: dict, calls: int, rounds: int = 5) -> dict[str, float]:
    """Median over interleaved ``rounds`` of the mean time per call (µs) of
    each function (A B C .., A B C .., ...), after a warm-up."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_steps(batch: int, hidden: int, inputs: list[int], calls: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for D in inputs:
        x = torch.randn(batch, D)
        for name in ("implicit-gru", "gru", "lstm", "rnn"):
            cell = make_cell(name, D, hidden).requires_grad_(False)   # no graphs, as under no_grad
            S, GH = cell.state_size, cell.gates * hidden
            s = 0.5 * torch.randn(batch, S)
            g = torch.randn(batch, S)
            out, hw = torch.empty(batch, S), torch.empty(batch, GH)
            xw = cell.input_projection(x)

            def step():
                cell.step(xw, s, 1.0, out=out, hw_out=hw)

            def step_proj():
                cell.step(cell.input_projection(x), s, 1.0, out=out, hw_out=hw)

            def step_vjp():
                xw_ = cell.input_projection(x)
                cell.step(xw_, s, 1.0, out=out, hw_out=hw)
                lin = cell.linearize(xw_, s, 1.0, hw=hw)
                cell.vjp_state(lin, g)
                cell.param_grads(x, s, *cell.vjp_proj(lin, g))

            ref = TORCH_CELLS[name](D, hidden)
            h = (0.5 * torch.randn(batch, hidden)).requires_grad_()
            hx = (h, 0.5 * torch.randn(batch, hidden)) if name == "lstm" else h
            gh = torch.randn(batch, hidden)

            def torch_fwd():
                with torch.no_grad():
                    ref(x, hx)

            def torch_fwd_bwd():
                o = ref(x, hx)
                (o[0] if name == "lstm" else o).backward(gh)

            times = _per_call_us({"step_us": step, "step_with_projection_us": step_proj,
                                  "step_vjp_us": step_vjp, "torch_step_us": torch_fwd,
                                  "torch_step_vjp_us": torch_fwd_bwd}, calls)
            row = {"cell": name, "input_size": D, "batch": batch, "hidden": hidden,
                   "torch_cell": type(ref).__name__, **times}
            row["ratio_step"] = row["step_with_projection_us"] / row["torch_step_us"]
            row["ratio_step_vjp"] = row["step_vjp_us"] / row["torch_step_vjp_us"]
            rows.append(row)
            print(f"  {name:12s} D={D:5d}  step {row['step_us']:7.1f} us "
                  f"(+proj {row['step_with_projection_us']:7.1f}, torch {row['torch_step_us']:7.1f})"
                  f"  step+vjp {row['step_vjp_us']:7.1f} us (torch {row['torch_step_vjp_us']:7.1f})",
                  flush=True)
    return rows


# ------------------------------------------------------------- whole sequence
def bench_sequence(length: int, batch: int, D: int, hidden: int, repeats: int,
                   chunks: list[int]) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, length, D)
    g = torch.randn(batch, hidden)
    gru = torch.nn.GRU(D, hidden, batch_first=True)
    cell = make_cell("implicit-gru", D, hidden)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in gru.state_dict().items()})
    serial, serial_nf = SerialPropagator(), SerialPropagator(flush_denormals=False)

    def run_serial(prop):
        cell.zero_grad()
        (prop.features(cell, x, None, "last") * g).sum().backward()

    def run_torch():
        gru.zero_grad()
        _, hn = gru(x)
        (hn[0] * g).sum().backward()

    def run_torch_flushed():
        torch.set_flush_denormal(True)
        try:
            run_torch()
        finally:
            torch.set_flush_denormal(False)

    variants = {
        "serial": lambda: run_serial(serial),
        "torch_gru": run_torch,
        "serial_no_flush": lambda: run_serial(serial_nf),
        "torch_gru_flushed": run_torch_flushed,
    }
    for k in chunks:                                  # optional chunk-size sweep (0: all steps)
        prop = SerialPropagator(chunk=k or length)
        variants[f"serial_chunk{k}"] = lambda prop=prop: run_serial(prop)
    for fn in variants.values():                      # warm-up (and buffer pool)
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():             # interleaved: A B C D, A B C D, ...
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {wall[k][-1]:.3f}s" for k in variants), flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "length": length, "batch": batch, "input_size": D, "hidden": hidden,
        "loss": "sum(g * h_last)", "repeats": repeats,
        "wall_s": wall, "cpu_s": cpu, "median_wall_s": med, "median_cpu_s": med_cpu,
        "ratio": med["serial"] / med["torch_gru"],
        "ratio_cpu": med_cpu["serial"] / med_cpu["torch_gru"],
        "ratio_both_flushed": med["serial"] / med["torch_gru_flushed"],
        "ratio_neither_flushed": med["serial_no_flush"] / med["torch_gru"],
        "ratio_per_round_median": statistics.median(
            a / b for a, b in zip(wall["serial"], wall["torch_gru"])),
        "goal": 0.6,
        "meets_goal": med["serial"] / med["torch_gru"] <= 0.6,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cells.json"))
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (>= 7 for the goal)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--calls", type=int, default=200, help="calls per per-step sample")
    ap.add_argument("--chunks", default="",
                    help="comma-separated backward chunk sizes to add to the sequence rounds "
                         "(0: the whole sequence in one linearize call)")
    ap.add_argument("--skip-steps", action="store_true", help="only the whole-sequence part")
    ap.add_argument("--max-foreign-load", type=float, default=0.25,
                    help="machine fraction used by other processes that triggers load_warning")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    chunks = [int(k) for k in args.chunks.split(",") if k.strip()]
    foreign, steps = {}, None
    if not args.skip_steps:
        print("per step:", flush=True)
        with LoadMeter() as meter:
            steps = bench_steps(args.batch, args.hidden, [9, 1000], args.calls)
        foreign["per_step"] = meter.foreign
    print(f"whole sequence (L={args.length}):", flush=True)
    with LoadMeter() as meter:
        seq = bench_sequence(args.length, args.batch, 9, args.hidden, args.repeats, chunks)
    foreign["sequence"] = meter.foreign

    busy = {k: v for k, v in foreign.items() if v > args.max_foreign_load}
    warning = None
    if busy:
        warning = ("other processes used " + ", ".join(f"{v:.0%} of the machine during {k}"
                                                       for k, v in busy.items())
                   + "; absolute times are inflated, the interleaved ratios less so")
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "per_step": steps, "sequence": seq,
        "foreign_load": foreign, "load_warning": warning,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"ratio serial / torch.nn.GRU (median wall): {seq['ratio']:.3f} "
          f"(cpu {seq['ratio_cpu']:.3f}; both flushing subnormals {seq['ratio_both_flushed']:.3f})")
    if warning:
        print("load_warning:", warning)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
