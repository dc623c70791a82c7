"""Fused C++ kernels (mgrit_gru.models.kernels) against the torch path and torch.nn.GRU.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json

One torch thread, float32, implicit GRU, loss ``sum(g * h_last)``, forward +
backward of one batch, for each shape (default: L=1024/B=100/D=9/H=100 and
L=256/B=32/D=9/H=64):

* ``serial``: today's pure-torch ``SerialPropagator`` (step loop of
  ``cell.step``, chunked ``linearize`` + ``vjp_state`` backward), as
  benchmarks/bench_cells.py measures it;
* ``kernels``: the same computation by the kernels: ``input_projection``
  (the kernels' own loop for the small input size), ``forward_sweep``, the
  loss source in ``lam``, ``sweep_backward`` (``backward_sweep`` per time
  chunk + the parameter-gradient GEMMs), under the same subnormal flushing as
  SerialPropagator;
* ``torch_gru`` / ``torch_gru_flushed``: torch.nn.GRU forward + autograd
  backward, without / with ``torch.set_flush_denormal(True)``.

The variants run interleaved for ``--repeats`` rounds, the order rotated
from round to round (A B C D, B C D A, ...: no variant always follows the
same one);
medians of wall and process-CPU time and their ratios are reported. Then the
thread test: two Python threads each running ``kernels`` (and ``serial``) on
its own batch at the same time, against one thread running the two batches
one after the other (interleaved rounds too): ``speedup = sequential /
concurrent`` (2.0 is perfect on 2 idle cores), next to a control job that
surely runs without the GIL (large ``torch.mm`` calls): what two threads can
gain on the machine at that moment. The machine's load by other processes is
read from /proc/stat (``foreign_load``). Last, per-step calls as the MGRIT
steppers make them (``per_step``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from mgrit_gru.models import SerialPropagator
from mgrit_gru.models import kernels
from mgrit_gru.models.cells import make_cell
from mgrit_gru.models.common import flushing_denormals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cells import _proc_stat  # noqa: E402  (the machine's busy/total jiffies)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LoadMeter:
    """Machine fraction used by other processes while the block ran."""

    def __enter__(self):
        self.stat0, self.cpu0, self.wall0 = _proc_stat(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        (b1, t1), (b0, t0) = _proc_stat(), self.stat0
        wall = time.perf_counter() - self.wall0
        ours = time.process_time() - self.cpu0
        ncpu = os.cpu_count() or 1
        self.foreign = (max(0.0, (b1 - b0) / (t1 - t0) - ours / (wall * ncpu))
                        if t1 > t0 else float("nan"))


class KernelRun:
    """One batch forward + backward through the kernels, with its own buffers
    (one per thread), as an integrated SerialPropagator would do it."""

    def __init__(self, cell, chunk):
        self.cell, self.work = cell, {}
        self.chunk = None if chunk == "auto" else chunk

    def __call__(self, x: torch.Tensor, g: torch.Tensor):
        cell = self.cell
        B, T, D = x.shape
        H, S, GH = cell.hidden_size, cell.state_size, cell.proj_size
        w = self.work
        if "xw" not in w or w["xw"].shape != (T, B, GH):
            w.update(x=torch.empty(T, B, D), xw=torch.empty(T, B, GH), hw=torch.empty(T, B, GH),
                     states=torch.empty(T + 1, B, S), lam=torch.empty(T, B, S))
        params = {n: getattr(cell, n) for n in cell.param_names}
        with flushing_denormals(True), torch.no_grad():
            x_tm = w["x"]
            x_tm.copy_(x.transpose(0, 1))
            xw = kernels.input_projection(x_tm, cell.weight_ih, cell.bias_ih, w["xw"])
            states = w["states"]
            states[0].zero_()
            kernels.forward_sweep("implicit-gru", xw, cell.weight_hh, cell.bias_hh, 1.0,
                                  states, w["hw"])
            lam = w["lam"]
            lam.zero_()
            lam[-1, :, :H] = g                      # loss sum(g * h_last)
            grads, _ = kernels.sweep_backward("implicit-gru", x_tm, xw, w["hw"], states,
                                              params, 1.0, lam, chunk=self.chunk, work=w)
        return grads


def bench_shape(L: int, B: int, D: int, H: int, repeats: int, chunks: list) -> dict:
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    g = torch.randn(B, H)
    gru = torch.nn.GRU(D, H, batch_first=True)
    cell = make_cell("implicit-gru", D, H)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in gru.state_dict().items()})
    serial = SerialPropagator()

    def run_serial():
        cell.zero_grad()
        (serial.features(cell, x, None, "last") * g).sum().backward()

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

    variants = {"serial": run_serial, "torch_gru": run_torch,
                "torch_gru_flushed": run_torch_flushed}
    runs = {}
    for k in chunks:
        runs[k] = KernelRun(cell, k)
        variants[f"kernels_chunk{k}"] = lambda k=k: runs[k](x, g)
    main = f"kernels_chunk{chunks[0]}"

    # correctness guard: the kernels' gradients are the torch path's
    run_serial()
    ref = {n: p.grad.clone() for n, p in cell.named_parameters()}
    got = runs[chunks[0]](x, g)
    err = max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30))
              for n in ref)

    for fn in variants.values():                      # warm-up (buffers, BLAS)
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotated A B C, B C A, ..
            fn = variants[name]
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
        print(f"  L={L} B={B} H={H} round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {wall[k][-1]:.3f}s" for k in variants), flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "length": L, "batch": B, "input_size": D, "hidden": H, "repeats": repeats,
        "main_variant": main, "max_rel_grad_error_vs_serial": err,
        "wall_s": wall, "cpu_s": cpu, "median_wall_s": med, "median_cpu_s": med_cpu,
        "ratio_kernels_torch": med[main] / med["torch_gru"],
        "ratio_kernels_torch_flushed": med[main] / med["torch_gru_flushed"],
        "ratio_serial_torch": med["serial"] / med["torch_gru"],
        "ratio_serial_torch_flushed": med["serial"] / med["torch_gru_flushed"],
        "ratio_kernels_serial": med[main] / med["serial"],
        "ratio_cpu_kernels_torch_flushed": med_cpu[main] / med_cpu["torch_gru_flushed"],
        "goal": 0.6,
        "meets_goal": max(med[main] / med["torch_gru"],
                          med[main] / med["torch_gru_flushed"]) <= 0.6,
    }


def bench_threads(L: int, B: int, D: int, H: int, repeats: int, chunk) -> dict:
    """Two threads each running one batch at once vs one thread running both.

    A control job (a loop of large ``torch.mm`` calls: one Python call per
    millisecond, GIL released inside) shows what two threads can gain on this
    machine at this moment: when other processes occupy the cores, the control
    does not reach 2 either. ``efficiency = speedup_kernels / speedup_control``.
    Per-thread CPU times (``time.thread_time``) are recorded too.
    """
    torch.manual_seed(1)
    cell = make_cell("implicit-gru", D, H).requires_grad_(False)
    xs = [torch.randn(B, L, D) for _ in range(2)]
    gs = [torch.randn(B, H) for _ in range(2)]
    kruns = [KernelRun(cell, chunk) for _ in range(2)]
    cell_s = make_cell("implicit-gru", D, H)
    sprops = [SerialPropagator() for _ in range(2)]
    mats = [torch.randn(384, 384) for _ in range(2)]

    def serial_job(i):
        (sprops[i].features(cell_s, xs[i], None, "last") * gs[i]).sum().backward()

    def kernel_job(i):
        kruns[i](xs[i], gs[i])

    t0 = time.perf_counter()
    kernel_job(0)
    per_kernel_job = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(mats[0], mats[0])
    mm_calls = max(10, int(10 * per_kernel_job / max(time.perf_counter() - t0, 1e-6)))

    def control_job(i):
        for _ in range(mm_calls):
            torch.mm(mats[i], mats[i])

    def sequential(job):
        c0 = time.thread_time()
        job(0)
        job(1)
        return [time.thread_time() - c0]

    def concurrent(job):
        errors, cpu = [], [0.0, 0.0]

        def target(i):
            try:
                c0 = time.thread_time()
                job(i)
                cpu[i] = time.thread_time() - c0
            except BaseException as exc:               # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=target, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return cpu

    jobs = {"kernels": kernel_job, "serial": serial_job, "control_mm": control_job}
    variants = {}
    for name, job in jobs.items():
        variants[f"{name}_sequential"] = lambda job=job: sequential(job)
        variants[f"{name}_two_threads"] = lambda job=job: concurrent(job)
    for fn in variants.values():
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            w0 = time.perf_counter()
            cpu[name].append(fn())
            wall[name].append(time.perf_counter() - w0)
        print(f"  threads L={L} B={B} H={H} round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {wall[k][-1]:.3f}s" for k in variants), flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    speed = {name: med[f"{name}_sequential"] / med[f"{name}_two_threads"] for name in jobs}
    busy = {name: statistics.median(sum(c) / w for c, w in zip(cpu[f"{name}_two_threads"],
                                                             wall[f"{name}_two_threads"]))
            for name in jobs}
    return {
        "length": L, "batch": B, "input_size": D, "hidden": H, "repeats": repeats,
        "chunk": chunk, "control_mm_calls": mm_calls, "wall_s": wall, "thread_cpu_s": cpu,
        "median_wall_s": med,
        "speedup_kernels": speed["kernels"], "speedup_serial": speed["serial"],
        "speedup_control_mm": speed["control_mm"],
        "efficiency_kernels_vs_control": speed["kernels"] / speed["control_mm"],
        "cores_busy_two_threads": busy,
    }


def bench_steps(B: int, H: int, calls: int, repeats: int) -> dict:
    """Per-step calls of the MGRIT steppers, implicit GRU, coarse dt = 4:
    ``cell.step`` vs ``kernels.step`` and ``cell.vjp_state(lin, g, acc=)`` vs
    ``kernels.vjp_lin``, microseconds per call (median of rotated rounds)."""
    torch.manual_seed(2)
    cell = make_cell("implicit-gru", 9, H).requires_grad_(False)
    xw, s, g = torch.randn(B, 3 * H), 0.5 * torch.randn(B, H), torch.randn(B, H)
    out, hw, acc = torch.empty(B, H), torch.empty(B, 3 * H), torch.zeros(B, H)
    lin = cell.linearize(xw, s, 4.0)
    w, b = cell.weight_hh, cell.bias_hh
    fns = {"cell_step": lambda: cell.step(xw, s, 4.0, out=out, hw_out=hw),
           "kernels_step": lambda: kernels.step("implicit-gru", xw, s, w, b, 4.0, out, hw),
           "cell_vjp_state": lambda: cell.vjp_state(lin, g, acc=acc),
           "kernels_vjp_lin": lambda: kernels.vjp_lin("implicit-gru", lin, g, w, acc, acc)}
    for fn in fns.values():
        for _ in range(max(10, calls // 5)):
            fn()
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"batch": B, "hidden": H, "dt": 4.0, "calls": calls, "median_us": med,
            "speedup_step": med["cell_step"] / med["kernels_step"],
            "speedup_vjp": med["cell_vjp_state"] / med["kernels_vjp_lin"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="1024x100x9x100,256x32x9x64",
                    help="comma-separated LxBxDxH")
    ap.add_argument("--chunks", default="auto,16,64,256",
                    help="backward chunk sizes of the kernel variant (the first is the main "
                         "one; auto: sweep_backward's default)")
    ap.add_argument("--skip-threads", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not kernels.available():
        print("kernels unavailable:", kernels.build_info()["error"])
        return 1
    chunks = [c.strip() if c.strip() == "auto" else int(c) for c in args.chunks.split(",")
              if c.strip()]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s.strip()]
    rows, threads, foreign = [], [], {}
    for L, B, D, H in shapes:
        with LoadMeter() as meter:
            rows.append(bench_shape(L, B, D, H, args.repeats, chunks))
        foreign[f"sequence_{L}x{B}x{D}x{H}"] = meter.foreign
        row = rows[-1]
        print(f"L={L} B={B} H={H}: kernels/torch {row['ratio_kernels_torch']:.3f} "
              f"(flushed {row['ratio_kernels_torch_flushed']:.3f}), serial/torch "
              f"{row['ratio_serial_torch']:.3f} (flushed {row['ratio_serial_torch_flushed']:.3f}), "
              f"grad error {row['max_rel_grad_error_vs_serial']:.1e}", flush=True)
    steps = []
    with LoadMeter() as meter:
        for B, H in [(100, 100), (8, 32)]:
            steps.append(bench_steps(B, H, 300, args.repeats))
            st = steps[-1]
            print(f"per step B={B} H={H}: " + ", ".join(
                f"{k} {v:.1f} us" for k, v in st["median_us"].items()), flush=True)
    foreign["per_step"] = meter.foreign
    if not args.skip_threads:
        for L, B, D, H in shapes:
            with LoadMeter() as meter:
                threads.append(bench_threads(L, B, D, H, args.repeats, chunks[0]))
            foreign[f"threads_{L}x{B}x{D}x{H}"] = meter.foreign
            t = threads[-1]
            print(f"two threads L={L} B={B} H={H}: speedup kernels {t['speedup_kernels']:.2f}, "
                  f"serial {t['speedup_serial']:.2f}, control (torch.mm) "
                  f"{t['speedup_control_mm']:.2f}", flush=True)
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kernels": kernels.build_info(),
        "sequence": rows, "per_step": steps, "threads_test": threads, "foreign_load": foreign,
        "meets_goal_all_shapes": all(r["meets_goal"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
