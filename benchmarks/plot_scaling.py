"""Figures of the trace-driven replay (docs/performance.md, "MGRIT scaling").

    python benchmarks/plot_scaling.py

reads ``benchmarks/results/scaling.json``, ``replay_validation.json`` and the
traces under ``benchmarks/results/traces/`` and writes to ``docs/figures/``:

* ``mgrit_speedup.png``: projected speedup over the serial loop vs P (strong
  scaling for each L, weak scaling), with the ideal line;
* ``mgrit_rank_time.png``: the time of each rank in one batch split into fine
  relaxation / coarse levels / coarsest pipeline / other compute / waiting /
  communication, for the traces (P = 2 on its own cores, P = 4, 8
  oversubscribed) and a projection (P = 16, L = 4096);
* ``mgrit_residuals.png``: the fine-level residual per iteration of the
  traced forward and adjoint solves.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from mgrit_gru.core.replay import Network, programs_from_traces, replay  # noqa: E402
from mgrit_gru.core.trace import exclusive_cpu, load_trace  # noqa: E402

PARTS = ("fine", "coarse", "coarsest", "other", "waiting", "communication")
COLORS = ("tab:blue", "tab:cyan", "tab:red", "tab:gray", "tab:orange", "tab:purple")


def trace_split(folder: Path, net: Network) -> list[dict]:
    """Per rank, seconds per batch of each part, from a trace and its replay."""
    P = len(list(folder.glob("rank*.json")))
    traces = [load_trace(folder / f"rank{r}.json") for r in range(P)]
    progs = programs_from_traces(traces)
    res = replay(progs, net)
    free = replay(progs, Network(alpha=0.0, beta=float("inf"), eager=net.eager))
    out = []
    for r, t in enumerate(traces):
        nb = len(t["metadata"]["wall_s"])
        last = t["metadata"]["levels"] - 1
        parts = dict.fromkeys(PARTS, 0.0)
        for (name, level), sec in exclusive_cpu(t, "batch", "batch done").items():
            if name == "comm":
                continue
            if name == "coarsest":
                parts["coarsest"] += sec
            elif level == 0:
                parts["fine"] += sec
            elif level is not None and level <= last:
                parts["coarse"] += sec
            else:
                parts["other"] += sec
        parts = {k: v / nb for k, v in parts.items()}
        # waiting and communication inside the batches (the replay's per-rank sums
        # cover the whole trace; the time before the first batch is waiting only)
        first = dict(res.marks[r])["batch"]
        done = [tm for name, tm in res.marks[r] if name == "batch done"][-1]
        wall = (done - first) / nb
        comm = max(res.waiting[r] - free.waiting[r], 0.0) / nb
        parts["communication"] = comm
        parts["waiting"] = max(wall - sum(parts[k] for k in PARTS[:4]) - comm, 0.0)
        out.append(parts)
    return out


def main() -> None:
    res_dir = HERE / "results"
    fig_dir = ROOT / "docs" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    sc = json.loads((res_dir / "scaling.json").read_text())
    val = json.loads((res_dir / "replay_validation.json").read_text())
    net = Network(**{k: sc["network"][k2] for k, k2 in (("alpha", "alpha_s"),
                                                        ("beta", "beta_bytes_per_s"),
                                                        ("eager", "eager_bytes"))})
    # 1. speedup
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    Ps = [r["P"] for r in sc["weak"]["rows"]]
    ax.plot(Ps, Ps, "k:", label="ideal (P)")
    ax.axhline(1.0, color="gray", lw=0.8)
    for L, d in sc["strong"].items():
        rows = d["rows"]
        ax.plot([r["P"] for r in rows], [r["speedup_over_serial"] for r in rows], "o-",
                label=f"strong, L = {L}")
    wk = sc["weak"]["rows"]
    ax.plot([r["P"] for r in wk], [r["speedup_over_serial"] for r in wk], "s--",
            label=f"weak, L = {sc['weak']['points_per_rank']} P")
    for c in val["cases"]:
        ax.plot([c["P"]], [sc["baselines"]["serial"]["cpu_median"] / c["measured_s"]], "kx",
                ms=9, label="measured, L = 1024" if c["P"] == 1 else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("time ranks P")
    ax.set_ylabel("speedup over the serial loop")
    ax.set_title("MGRIT batch (B=100, H=100), projected by trace replay")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_dir / "mgrit_speedup.png", dpi=120)
    plt.close(fig)

    # 2. time per rank
    panels = []
    tdir = res_dir / "traces"
    last_p2 = sorted(tdir.glob("L1024-P2-round*"))
    if last_p2:
        panels.append(("trace P=2, L=1024", trace_split(last_p2[-1], net)))
    for P in (4, 8):
        f = tdir / f"L1024-P{P}"
        if f.is_dir():
            panels.append((f"trace P={P}, L=1024\n(oversubscribed)", trace_split(f, net)))
    proj = next((r for r in sc["strong"]["4096"]["rows"] if r["P"] == 16), None)
    if proj:
        panels.append(("projection P=16, L=4096", proj["per_rank"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, ranks) in zip(axes[0], panels):
        bottom = [0.0] * len(ranks)
        for part, color in zip(PARTS, COLORS):
            vals = [r[part] for r in ranks]
            ax.bar(range(len(ranks)), vals, bottom=bottom, color=color, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rank")
        ax.set_xticks(range(len(ranks)))
    axes[0][0].set_ylabel("seconds per batch")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(fig_dir / "mgrit_rank_time.png", dpi=120)
    plt.close(fig)

    # 3. residuals
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for c in val["cases"]:
        meta = load_trace(Path(c["trace"]) / "rank0.json")["metadata"]
        for kind, style in (("fwd", "o-"), ("bwd", "s--")):
            r = meta[f"{kind}_residuals"]
            ax.semilogy(range(len(r)), r, style, label=f"{kind}, P = {c['P']}")
    ax.set_xlabel("iteration (0: after nested iteration / first relaxation)")
    ax.set_ylabel("fine C-point residual")
    ax.set_title("Residual per iteration, L = 1024 (last traced batch)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_dir / "mgrit_residuals.png", dpi=120)
    plt.close(fig)
    print(f"wrote {fig_dir}/mgrit_speedup.png, mgrit_rank_time.png, mgrit_residuals.png")


if __name__ == "__main__":
    main()
