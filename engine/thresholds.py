"""Choosing exit thresholds, and the calibration report.

One threshold serves every exit layer: a token leaves at the first layer whose predicted agreement
reaches it. Per-layer thresholds searched greedily in exit order over-fit the tuning tokens and
leave depth on the table; a single level on calibrated predictors does not. It is the lowest that
keeps `target` agreement in *every* domain, so a domain the exits serve worse sets the bar. The
held-out prompts are halved within each domain: one half chooses, the other measures.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

OFF = 1.1  # a threshold no probability reaches: the check is skipped at that layer
GRID = (0.5, 0.7, 0.8, 0.9, 0.95)
LEVELS = tuple(round(0.5 + 0.005 * i, 3) for i in range(100))  # 0.5 .. 0.995: candidate thresholds
MARGINS = (0.0, 1.0, 2.0, 3.0, 4.0)  # candidate logit gaps for the exit vocabulary's check


def halves(feats, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out tokens split by prompt, alternating within each domain: (tune, measure)."""
    groups, domains = feats.group[held], feats.domain[held]
    tune = torch.zeros(len(held), dtype=torch.bool)
    for d in domains.unique():
        prompts = groups[domains == d].unique()
        tune |= torch.isin(groups, prompts[::2])
    return held[tune], held[~tune]


def by_domain(domain: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(d): (domain == d).nonzero().squeeze(1) for d in domain.unique()}


def choose_threshold(conf: dict, agree: dict, domain: torch.Tensor, target: float, num_layers: int) -> float:
    """The lowest level at which every domain's tokens agree with the full model >= `target`."""
    parts = by_domain(domain)
    for t in LEVELS:
        if all(simulate({l: c[i] for l, c in conf.items()}, {l: a[i] for l, a in agree.items()},
                        {l: t for l in conf}, num_layers)["agreement"] >= target for i in parts.values()):
            return t
    return OFF


def gate(conf: dict, margin: dict, m: float) -> dict:
    """Predictor scores of tokens whose head has a clear winner (gap >= m); the others never exit."""
    return {l: torch.where(margin[l] >= m, c, torch.zeros_like(c)) for l, c in conf.items()}


def choose_rule(conf: dict, agree: dict, margin: dict, domain: torch.Tensor, target: float, num_layers: int,
                with_margin: bool) -> tuple[float, float]:
    """(margin, threshold): for each candidate margin its lowest threshold keeping `target` in every
    domain; the pair whose tokens leave shallowest. Without an exit vocabulary the margin stays 0:
    reading it would take the full LM head at every check, which the predictor is there to spare."""
    best = (float("inf"), 0.0, OFF)
    for m in MARGINS if with_margin else (0.0,):
        gated = gate(conf, margin, m)
        t = choose_threshold(gated, agree, domain, target, num_layers)
        if t > 1.0:
            continue
        depth = simulate(gated, agree, {l: t for l in conf}, num_layers)["mean_depth"]
        if depth < best[0]:
            best = (depth, m, t)
    return best[1], best[2]


def simulate(conf: dict, agree: dict, thresholds: dict, num_layers: int) -> dict:
    """First-confident-exit over `thresholds`; tokens that never exit run to full depth and agree."""
    n = len(next(iter(agree.values())))
    depth = torch.full((n,), num_layers)
    ok = torch.ones(n, dtype=torch.bool)
    left = torch.ones(n, dtype=torch.bool)
    for l in sorted(thresholds):
        leave = left & (conf[l] >= thresholds[l])
        depth[leave], ok[leave] = l, agree[l][leave]
        left &= ~leave
    hist = torch.bincount(depth, minlength=num_layers + 1)[1:]
    return {"agreement": float(ok.float().mean()), "mean_depth": float(depth.float().mean()) / num_layers,
            "exit_share_by_layer": {i + 1: int(c) for i, c in enumerate(hist.tolist()) if c},
            "tokens": n}


def depth_for_share(share_by_layer: dict, share: float) -> int:
    """Smallest depth at which `share` of tokens have exited: what greedy loading loads."""
    total, acc = sum(share_by_layer.values()), 0
    for layer in sorted(share_by_layer):
        acc += share_by_layer[layer]
        if acc >= share * total:
            return layer
    return max(share_by_layer)


@torch.inference_mode()
def check_cost(engine, bank, batch: int = 8, reps: int = 50) -> dict:
    """Seconds per exit check vs per decoder layer, for a decode batch on this device."""
    model = engine.model
    h = torch.randn(batch, 1, model.hidden_size, device=model.device, dtype=model.dtype)
    ctx = model.make_ctx(torch.arange(batch, device=model.device),
                         torch.full((batch, 1), 64, device=model.device))
    point = next(iter(bank.points.values()))

    def clock(fn):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    layer_s = clock(lambda: model.layer_forward(0, h, ctx))
    check_s = clock(lambda: bool((point.predictor(h[:, 0], h[:, 0]) >= 0.5).any()))
    head_s = clock(lambda: model.logits(h[:, 0]))
    return {"batch": batch, "layer_ms": layer_s * 1e3, "check_ms": check_s * 1e3,
            "check_in_layers": check_s / layer_s, "lm_head_ms_per_step": head_s * 1e3}


def place_exits(thresholds: dict, sim: dict, num_layers: int, cost_in_layers: float) -> dict:
    """Disable checks whose expected saving (share exiting x layers skipped) is below their cost."""
    shares = sim["exit_share_by_layer"]
    total = sim["tokens"]
    reach = 1.0
    placed = {}
    for l in sorted(thresholds):
        share = shares.get(l, 0) / total
        placed[l] = thresholds[l] if share * (num_layers - l) > reach * cost_in_layers else OFF
        reach -= share
    return placed


@dataclass
class CalibrationReport:
    summary: dict
    per_layer: list[dict]
    frontier: dict

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"summary": self.summary, "per_layer": self.per_layer, "frontier": self.frontier}
        (directory / "report.json").write_text(json.dumps(payload, indent=2))
        plot_report(self, directory / "report.png")
        return directory / "report.json"


def build_report(engine, bank, scores, conf, feats, held, domains, cfg, losses) -> CalibrationReport:
    num_layers, layers = engine.num_layers, bank.layers
    tune, evals = halves(feats, held)
    agree, maxprob = scores.agree, scores.maxprob

    def part(d, idx):
        return {l: v[idx] for l, v in d.items()}
    bank.margin, level = choose_rule(part(conf, tune), part(agree, tune), part(scores.margin, tune),
                                     feats.domain[tune], cfg.target, num_layers, bank.vocab is not None)
    ungated = conf
    conf = gate(conf, scores.margin, bank.margin)  # what serving checks: predictor, then the margin
    thresholds = {l: level for l in layers}
    sim = simulate(part(conf, evals), part(agree, evals), thresholds, num_layers)
    cost = check_cost(engine, bank)
    thresholds = place_exits(thresholds, sim, num_layers, cost["check_in_layers"])
    bank.set_thresholds(thresholds)
    sim = simulate(part(conf, evals), part(agree, evals), thresholds, num_layers)
    per_domain, frontier = {}, {}
    for d, idx in by_domain(feats.domain[evals]).items():
        tokens = evals[idx]
        s = simulate(part(conf, tokens), part(agree, tokens), thresholds, num_layers)
        per_domain[domains[d]] = {k: s[k] for k in ("agreement", "mean_depth", "tokens")}
        frontier[domains[d]] = {name: [{"threshold": t, **{k: v for k, v in simulate(
            part(score, tokens), part(agree, tokens), {l: t for l in layers}, num_layers).items()
            if k in ("agreement", "mean_depth")}} for t in (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)]
            for name, score in (("predictor and margin", conf), ("predictor", ungated), ("max_softmax", maxprob))}

    per_layer = []
    for l in layers:
        c, a = conf[l][evals], agree[l][evals].float()
        row = {"layer": l, "head_agreement": float(a.mean()), "threshold": thresholds[l], "by_threshold": {}}
        for t in GRID:
            sel = c >= t
            row["by_threshold"][str(t)] = {"exit_rate": float(sel.float().mean()),
                                           "agreement": float(a[sel].mean()) if sel.any() else None}
        per_layer.append(row)
    summary = {
        "model": engine.name, "head_type": cfg.head_type, "num_layers": num_layers, "exit_layers": layers,
        "target": cfg.target, "threshold": level, "margin": bank.margin,
        "exit_vocab": 0 if bank.vocab is None else len(bank.vocab), "thresholds": thresholds, "eval_tokens": len(evals),
        "on_policy": bool(feats.on_policy[evals].all()), "rounds": cfg.rounds, "domains": per_domain,
        "agreement": sim["agreement"], "mean_depth": sim["mean_depth"],
        "exit_share_by_layer": sim["exit_share_by_layer"],
        "depth_for_90pct_exits": depth_for_share(sim["exit_share_by_layer"], 0.9),
        "check_cost": cost, "final_kl": losses[-1] if losses else None,
        "prompts_per_domain": cfg.num_prompts, "new_tokens": cfg.max_new_tokens, "steps": cfg.steps,
        "replies_per_prompt": cfg.samples,
    }
    return CalibrationReport(summary, per_layer, frontier)


def plot_report(report: CalibrationReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.summary
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["layer"] for r in report.per_layer], [r["head_agreement"] for r in report.per_layer], "o-")
    ax[0].set(xlabel="exit layer", ylabel="top-1 agreement with full model", title="exit head agreement", ylim=(0, 1))
    shares = s["exit_share_by_layer"]
    ax[1].bar(list(shares), [v / s["eval_tokens"] for v in shares.values()])
    ax[1].set(xlabel="exit layer", ylabel="share of tokens",
              title=f"exit depth @ threshold {s['threshold']}: agree {s['agreement']:.3f}, depth {s['mean_depth']:.2f}")
    for domain, rules in report.frontier.items():
        for name, pts in rules.items():
            ax[2].plot([p["mean_depth"] for p in pts], [p["agreement"] for p in pts],
                       {"predictor": "x:", "max_softmax": "x--"}.get(name, "o-"), label=f"{domain}: {name}")
    ax[2].set(xlabel="mean exit depth (fraction of layers)", ylabel="agreement",
              title="quality vs depth per domain (held-out prompts)")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{s['model']} - {s['head_type']} heads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
