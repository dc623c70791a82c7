"""GPU check: the serial and MGRIT propagators on CUDA against the CPU.

For a user with a GPU: one short run that says whether the device path is
correct (max abs difference of the features and of every gradient, CUDA vs
CPU, for the serial propagator and for MGRIT at P = 1) and how fast it is
(median seconds per batch, forward + backward, on both).  JSON to stdout, or
to ``--out``.  Without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py                      # defaults below
    python benchmarks/gpu_check.py --length 1024 --batch 100 --hidden 100 --out gpu.json
    python benchmarks/gpu_check.py --device cpu --length 64   # a dry run of the script itself

(in a dry run the ``cuda`` entries are those of the second CPU run).

The MGRIT runs use ``MGRITOptions()`` (the reference work's 2/1 iterations):
an inexact gradient, but the same function of the data on both devices, so
CUDA and CPU must agree to round-off (float32: about 1e-4 relative to the
values; float64: 1e-10).  ``--tight`` converges the solves instead (then
both also equal the serial result).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgrit_gru.models import MGRITOptions, MGRITPropagator, SequenceClassifier, SerialPropagator  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_run(model, x, y):
    """Features and gradients (parameters, then x) of one batch, on model's device."""
    model.zero_grad()
    xr = x.clone().requires_grad_(True)
    feats = model.features(xr)
    F.cross_entropy(model.head(feats), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["x"] = xr.grad.detach().clone()
    return feats.detach(), grads


def _timed(model, x, y, device, reps):
    times = []
    for _ in range(reps + 1):            # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        _batch_run(model, x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def check(args) -> dict:
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    cuda = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = SequenceClassifier(args.cell, args.input, args.hidden, 4, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.length, args.input, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (args.batch,), generator=g)
    opts = MGRITOptions(fwd_iters=60, bwd_iters=60, fwd_tol=1e-12, bwd_tol=1e-12) if args.tight \
        else MGRITOptions()
    result = {
        "device": torch.cuda.get_device_name(cuda) if cuda.type == "cuda" else str(cuda),
        "torch": torch.__version__,
        "problem": {"length": args.length, "batch": args.batch, "input": args.input,
                    "hidden": args.hidden, "cell": args.cell, "dtype": args.dtype,
                    "mgrit": "tight" if args.tight else "MGRITOptions()"},
        "propagators": {},
    }
    for name, make in (("serial", SerialPropagator), ("mgrit", lambda: MGRITPropagator(None, opts))):
        runs = {}
        for key, dev in (("cpu", torch.device("cpu")), ("cuda", cuda)):
            model = copy.deepcopy(base).to(dev)
            model.propagator = make()
            xd, yd = x.to(dev), y.to(dev)
            feats, grads = _batch_run(model, xd, yd)
            times = _timed(model, xd, yd, dev, args.reps)
            runs[key] = (feats.cpu(), {k: v.cpu() for k, v in grads.items()}, times)
        (f_cpu, g_cpu, t_cpu), (f_gpu, g_gpu, t_gpu) = runs["cpu"], runs["cuda"]
        entry = {
            "max_abs_diff": {"features": float((f_gpu - f_cpu).abs().max())},
            "max_abs": {"features": float(f_cpu.abs().max())},
            "seconds_per_batch": {"cpu": statistics.median(t_cpu), "cuda": statistics.median(t_gpu)},
            "times": {"cpu": t_cpu, "cuda": t_gpu},
        }
        for k in g_cpu:
            entry["max_abs_diff"][f"grad {k}"] = float((g_gpu[k] - g_cpu[k]).abs().max())
            entry["max_abs"][f"grad {k}"] = float(g_cpu[k].abs().max())
        entry["speedup"] = entry["seconds_per_batch"]["cpu"] / entry["seconds_per_batch"]["cuda"]
        result["propagators"][name] = entry
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--input", type=int, default=9)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--cell", default="implicit-gru")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tight", action="store_true", help="converge the MGRIT solves")
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    p.add_argument("--device", default="cuda",
                   help="the device compared with the CPU (default cuda; cpu: a dry run)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check")
        return 0
    text = json.dumps(check(args), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
