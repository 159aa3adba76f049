"""Figures of the HELIOS benchmark: exit depths, the speed/agreement frontier, the drift trace."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def render(rows: list[dict], traces: dict, out: Path, name: str) -> list[Path]:
    return [exit_depths(traces, out / f"{name}-exits.png"), frontier(rows, out / f"{name}-frontier.png"),
            drift(traces.get("drift", {}), out / f"{name}-drift.png")]


def exit_depths(traces: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 3.5), squeeze=False)
    for ax, (wl, systems) in zip(axes[0], traces.items()):
        for system, t in systems.items():
            if not t["layers"]:
                continue
            top = max(t["layers"])
            ax.hist(t["layers"], bins=range(1, top + 2), histtype="step", density=True, label=system)
        ax.set(title=f"exit layer per token: {wl}", xlabel="exit layer", ylabel="share of tokens")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frontier(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for wl, marker in zip(sorted({r["workload"] for r in rows}), "osD^v"):
        for r in (r for r in rows if r["workload"] == wl):
            ax.scatter(r["tok_s"], r["token_agreement"], marker=marker)
            ax.annotate(f"{r['system']} ({wl})", (r["tok_s"], r["token_agreement"]), fontsize=6)
    ax.set(xlabel="output tokens/s", ylabel="token agreement with full depth", title="throughput vs agreement")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def drift(systems: dict, path: Path, window: int = 32) -> Path:
    """Rolling greedy-exit rate and mean exit layer over served tokens, with each decision marked."""
    helios = {s: t for s, t in systems.items() if s.startswith("HELIOS")}
    fig, axes = plt.subplots(len(helios) or 1, 1, figsize=(9, 3 * max(1, len(helios))), squeeze=False)
    for ax, (system, t) in zip(axes[:, 0], helios.items()):
        g = t["greedy"]
        rate = [sum(g[max(0, i - window):i + 1]) / len(g[max(0, i - window):i + 1]) for i in range(len(g))]
        ax.plot(rate, label=f"greedy-exit rate (last {window} tokens)")
        chat = [i for i, k in enumerate(t["kinds"]) if k == "chat"]
        ax.scatter(chat, [1.02] * len(chat), s=1, color="grey", label="chat token")
        for d in t["decisions"]:
            ax.axvline(d["token"], color="red", alpha=0.5)
            ax.text(d["token"], 0.5, f"{d['action']} {d['candidate']}:{d['depth']}", rotation=90, fontsize=7)
        ax.set(title=f"{system} on the drift workload", xlabel="served tokens", ylim=(0, 1.05))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
