"""Weight formats on CPU: fp32, bf16 and int8 weight-only, at full depth and with the shipped exits.

For each format one engine decodes the same held-out HumanEval prompts at each batch size (greedy,
`--new-tokens` each, ignore_eos). Per row: decode step time (median), tok/s over the run, the
format's weight-read floor (the bytes a full-depth decode step reads, layers and LM head, at the
bandwidth the faster of a plain sum and an fp32 matrix-vector product over a large tensor reaches
here), and two agreements with the fp32 model:
`agree_tf`, teacher-forced (the share of generated tokens transformers' fp32 model picks too given
the same prefix: what a format changes per token), and `agree_pos`, position-wise against the fp32
engine's own text at full depth (one early difference makes the rest of a text differ).

    python -m bench.weights --prompts 16 --new-tokens 48 --batch 1 8 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import (RESULTS, agreement, command, decode_all, humaneval_prompts, machine, mean_layer,
                          rotated, token_agreement, write)
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.store import load_hf, resolve_source

FORMATS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
           "int8": {"dtype": "bfloat16", "int8_weights": True}}


@torch.inference_mode()
def bandwidth_gb_s(size_bytes: int = 1 << 30, reps: int = 5) -> dict[str, float]:
    """GB/s that two kernels read from memory (more than any cache holds): a plain sum, and an fp32
    matrix-vector product, what a one-row decode step is. The floor takes the faster: on some CPUs
    the BLAS gemv reads far more per second than the sum (an AMX Xeon: 23 against 13.5 GB/s)."""
    x = torch.ones(size_bytes // 4)
    m, v = x.view(-1, 4096), torch.ones(4096)
    rates = {}
    for name, kernel in (("sum", x.sum), ("gemv", lambda: m @ v)):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - t0)
        rates[name] = size_bytes / best / 1e9
    return rates


def step_bytes(engine: LLMEngine, rows: int) -> int:
    """What a full-depth decode step of `rows` rows reads: every layer's weights and the LM head
    (its int8 copy at the row counts the engine runs it for)."""
    return engine.model.weight_bytes()["layers"] + engine.model.head_bytes(rows)


def start(cfg: EngineConfig, prompts: list[str], batch: int) -> LLMEngine:
    engine = LLMEngine(cfg.model_copy(update={"max_batch_size": batch}))
    engine.generate(prompts[:batch], SamplingParams(max_tokens=8))  # warm-up: first bf16 steps are slow
    return engine


def run(label: str, engine: LLMEngine, prompts: list[str], new_tokens: int, batch: int, gb_s: float) -> dict:
    run = decode_all(engine, prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    size = step_bytes(engine, batch)
    return {"system": label, "batch": batch, "tok_s": len(run.exits) / run.wall_s,
            "step_ms": statistics.median(run.step_ms), "floor_ms": 1e3 * size / (gb_s * 1e9),
            "weights_MiB": size / 2**20, "mean_exit_layer": mean_layer(run.exits), "_tokens": run.tokens}


def at_batch(systems: list[tuple[str, EngineConfig]], prompts: list[str], batch: int, args, gb_s: float) -> list[dict]:
    """One engine per format at this batch size, each run `args.repeats` times in rotated order."""
    engines = {label: start(cfg, prompts, batch) for label, cfg in tqdm(systems, desc="starting", leave=False)}
    bar = tqdm(total=len(engines) * args.repeats, desc="runs", leave=False)

    def one(label: str) -> dict:
        bar.update()
        return run(label, engines[label], prompts, args.new_tokens, batch, gb_s)
    runs = rotated(list(engines), args.repeats, one)
    bar.close()
    ref = runs[systems[0][0]]
    return [{**rs[0], "tok_s": statistics.median(r["tok_s"] for r in rs),  # medians; each ratio within a repeat
             "step_ms": statistics.median(r["step_ms"] for r in rs),
             "step_x_fp32": statistics.median(r["step_ms"] / f["step_ms"] for r, f in zip(rs, ref))}
            for rs in runs.values()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every format per batch size, in rotated order: "
                    "step time and tok/s are their medians, step_x_fp32 the median of each repeat's ratio")
    args = ap.parse_args(argv)
    prompts = humaneval_prompts(args.prompts)
    rates = bandwidth_gb_s()
    gb_s = max(rates.values())
    systems = []
    for f in args.formats:
        base = EngineConfig(model=args.model, **FORMATS[f])
        systems += [(f"{f}, full depth", base.model_copy(update={"exit_policy": "full"})), (f"{f}, exits", base)]
    rows = [r for b in tqdm(args.batch, desc="batch sizes") for r in at_batch(systems, prompts, b, args, gb_s)]
    hf, tok = load_hf(resolve_source(args.model))  # fp32: the reference every format is judged by
    for r in tqdm(rows, desc="agreement"):
        ref = next(x for x in rows if x["batch"] == r["batch"] and x["system"] == systems[0][0])
        r["agree_tf"] = token_agreement(hf, tok, prompts, r["_tokens"])
        r["agree_pos"] = agreement(r["_tokens"], ref["_tokens"])[0]
    for r in rows:
        del r["_tokens"]
    name = args.name or f"weights-{args.model}-cpu"
    header = (f"# Weight formats on CPU: {args.model}\n\nCommand: `{command()}`  \nMachine: {machine('cpu')}, "
              f"memory read at {gb_s:.1f} GB/s (the faster of a plain sum, {rates['sum']:.1f}, and an fp32 "
              f"matrix-vector product, {rates['gemv']:.1f})  \nWorkload: {args.prompts} held-out HumanEval prompts, "
              f"{args.new_tokens} new tokens each (ignore_eos), greedy. `exits`: the shipped exit heads "
              "(calibrated in fp32) under the default policy."
              + (f" Each format ran {args.repeats} times per batch size in rotated order (one engine each): step "
                 "time and tok/s are medians, `step_x_fp32` the median of the repeats' ratios; agreement is the "
                 "first run's." if args.repeats > 1 else ""))
    print(write(name, rows, header, lambda path: plot(rows, path), args.out).read_text())
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        ax[0].barh([f"{r['system']} (bs {batch})" for r in sel], [r["step_ms"] for r in sel], alpha=0.8)
        ax[0].scatter([r["floor_ms"] for r in sel], [f"{r['system']} (bs {batch})" for r in sel], color="k",
                      marker="|", s=200, zorder=3)
        ax[1].scatter([r["tok_s"] for r in sel], [r["agree_tf"] for r in sel], label=f"batch {batch}")
        for r in sel:
            ax[1].annotate(r["system"], (r["tok_s"], r["agree_tf"]), fontsize=7)
    ax[0].set(xlabel="decode step (ms); | = weight-read floor")
    ax[1].set(xlabel="output tokens/s", ylabel="token agreement with fp32 (teacher-forced)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
