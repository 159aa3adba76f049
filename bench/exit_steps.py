"""Where an early exit's saving goes at batch 1: decode step times by exit layer.

One engine, one request at a time, exits off and on alternately (`--rounds`), so both read the
same matmul plan. With exits on, each decode step is filed twice: by the layer its token left at,
and, for steps that went to full depth, by the layer the *previous* token left at. Under the
deferred fill (engine.deferred) that previous token's skipped layers run in this step, as a second
column beside the new token: `extra_ms_per_layer` is what that column costs per skipped layer,
against `saved_ms_per_layer`, what leaving early saved per skipped layer. Where a decode step is
bound by reading the weights, the column is nearly free; where the CPU's matmul for 2 rows costs
more than one row's, it gives back part of what the exit saved. `columns` times the stack alone at
1-4 columns per row (one layer after another, as a decode step runs them) to say which.

    python -m bench.exit_steps --prompts 6 --new-tokens 40 --rounds 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import RESULTS, command, decode_all, humaneval_prompts, machine, write
from engine import EngineConfig, LLMEngine, SamplingParams, deferred
from engine.config import from_pairs


def measure(engine: LLMEngine, prompts: list[str], new_tokens: int, rounds: int) -> tuple[list[float], dict, dict]:
    """(steps without exits, steps by own exit layer, full-depth steps by the previous token's exit layer)."""
    bank, params = engine.exits, SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    plain, own, after = [], defaultdict(list), defaultdict(list)
    for _ in tqdm(range(rounds), desc="rounds"):
        engine.use_exits(None)
        for p in prompts:
            plain += decode_all(engine, [p], params).step_ms
        engine.use_exits(bank)
        for p in prompts:
            run = decode_all(engine, [p], params)
            layers = [e.layer for e in run.decode_exits]
            for i, (ms, layer) in enumerate(zip(run.step_ms, layers)):
                own[layer].append(ms)
                if layer == engine.num_layers:
                    after[layers[i - 1] if i else layer].append(ms)
    return plain, own, after


@torch.inference_mode()
def columns(engine: LLMEngine, counts=(1, 2, 3, 4), reps: int = 20, context: int = 200) -> dict[int, float]:
    """Median ms for every loaded layer over one row of `count` columns (its new token and pending
    ones) at a context of `context` tokens, the counts interleaved so drift in the machine hits all.
    It writes K/V into slot 0: run it after the engine's requests are done."""
    model, times = engine.model, {n: [] for n in counts}
    slot = torch.tensor([0], device=model.device)
    for _ in tqdm(range(reps), desc="stack by columns"):
        for n in counts:
            pos = torch.arange(context, context - n, -1, device=model.device)[None]
            ctx = model.make_ctx(slot, pos, torch.zeros_like(pos))
            h = torch.randn(1, n, model.hidden_size, device=model.device, dtype=model.dtype)
            t = time.perf_counter()
            for i in range(model.depth):
                deferred.layer_step(model, i, h, ctx)
            times[n].append(1e3 * (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in times.items()}


def table(plain: list[float], own: dict, after: dict, num_layers: int) -> list[dict]:
    """One row per group of steps; each step's time is set against exits off (what a token that
    left at `layer` saved) or against a full-depth step with nothing pending (what its column cost
    the next step), per layer skipped."""
    nan = float("nan")
    full = statistics.median(plain)
    settled = statistics.median(after.get(num_layers, plain))  # full depth, nothing pending

    def row(steps: str, layer: int, ms: list[float], saved: float = nan, extra: float = nan) -> dict:
        return {"steps": steps, "layer": layer, "count": len(ms), "median_ms": statistics.median(ms),
                "saved_ms_per_layer": saved, "extra_ms_per_layer": extra}

    def per_skipped(delta: float, layer: int) -> float:
        return delta / (num_layers - layer) if layer < num_layers else nan
    return ([row("exits off", num_layers, plain)]
            + [row("token left at layer", l, ms, saved=per_skipped(full - statistics.median(ms), l))
               for l, ms in sorted(own.items())]
            + [row("full depth, previous token left at", l, ms, extra=per_skipped(statistics.median(ms) - settled, l))
               for l, ms in sorted(after.items())])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--column-reps", type=int, default=20, help="timings of the stack per column count")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="EngineConfig fields")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    engine = LLMEngine(from_pairs(EngineConfig, {"model": args.model, "max_batch_size": 1}, args.set, "--set"))
    if engine.exits is None:
        raise SystemExit(f"{args.model} has no exit heads to measure")
    prompts = humaneval_prompts(args.prompts)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    plain, own, after = measure(engine, prompts, args.new_tokens, args.rounds)
    stack = columns(engine, reps=args.column_reps)
    rows = table(plain, own, after, engine.num_layers)
    on = [ms for v in own.values() for ms in v]
    header = "\n".join([
        f"# Decode steps by exit layer: {args.model}, batch 1", "", f"Command: `{command()}`  ",
        f"Machine: {machine('cpu')}  ",
        f"Mean decode step: exits off {statistics.fmean(plain):.1f} ms, on {statistics.fmean(on):.1f} ms "
        f"({statistics.fmean(plain) / statistics.fmean(on):.2f}x); a full-depth step is "
        f"{statistics.median(plain) / engine.num_layers:.2f} ms per layer, the LM head included. "
        "Medians over every decode step of the rounds.", "",
        "The loaded layers alone (no LM head, no checks) for one row at 1-4 columns: " + ", ".join(
            f"{n}: {ms:.1f} ms ({ms / stack[1]:.2f}x)" for n, ms in stack.items()) + "."])
    name = args.name or f"exit-steps-{args.model}-cpu"
    return write(name, rows, header, lambda path: _plot(rows, path), args.out)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for kind, marker in (("token left at layer", "o-"), ("full depth, previous token left at", "s-")):
        pts = [(r["layer"], r["median_ms"]) for r in rows if r["steps"] == kind]
        ax.plot(*zip(*pts), marker, label=kind + " (x)")
    ax.axhline(rows[0]["median_ms"], ls=":", color="grey", label="exits off")
    ax.set(xlabel="exit layer x", ylabel="decode step, median (ms)", ylim=(0, None),
           title="batch 1: what an exit saves, and what its deferred KV costs the next step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
