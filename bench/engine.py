"""Engine benchmark: full depth vs calibrated exits vs truncated depth, with transformers as the peer.

    python -m bench.engine --prompts 16 --new-tokens 48 --batch 8 [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from bench.common import agreement, command, decode_all, humaneval_prompts, machine, mean_layer, write
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.store import load_hf, resolve_source


def run_engine(label, cfg: EngineConfig, prompts, new_tokens, batch) -> dict:
    engine = LLMEngine(cfg.model_copy(update={"max_batch_size": batch}))
    engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    run = decode_all(engine, prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    records = run.exits
    return {"system": label, "batch": batch, "tok_s": len(records) / run.wall_s,
            "step_ms": sum(run.step_ms) / max(len(run.step_ms), 1), "mem_MiB": engine.memory_bytes()["total"] / 2**20,
            "mean_exit_layer": mean_layer(records), "loaded_depth": engine.depth,
            "greedy_exits": sum(r.greedy for r in records) / len(records), "_tokens": run.tokens}


def run_peer(model, tokenizer, prompts, new_tokens, batch, device) -> dict:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out_tokens, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        out_tokens += out[:, enc["input_ids"].shape[1]:].tolist()
    wall = time.perf_counter() - t0
    mem = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"system": "transformers generate", "batch": batch, "tok_s": len(prompts) * new_tokens / wall,
            "step_ms": float("nan"), "mem_MiB": mem / 2**20, "mean_exit_layer": float(model.config.num_hidden_layers),
            "loaded_depth": model.config.num_hidden_layers, "greedy_exits": 0.0, "_tokens": out_tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--depth", type=int, default=None, help="truncated depth (default: calibration's 90% depth)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    prompts = humaneval_prompts(args.prompts)
    base = EngineConfig(model=args.model, device=args.device)
    probe = LLMEngine(base.model_copy(update={"max_batch_size": 1}))
    if probe.exits is None:
        raise SystemExit(f"no calibrated exit heads for {args.model}: run `helios calibrate {args.model}` first")
    depth = args.depth or probe.exits.meta.get("depth_for_90pct_exits") or probe.num_layers
    del probe
    systems = [("full depth, exits off", base.model_copy(update={"exits": False})),
               ("calibrated exits", base),
               (f"truncated to {depth}, greedy exits", base.model_copy(update={"depth": depth}))]
    hf, tok = load_hf(resolve_source(args.model))
    hf = hf.to(args.device, probe_dtype(args.device))
    rows = []
    for batch in tqdm(args.batch, desc="batch sizes"):
        rows.append(run_peer(hf, tok, prompts, args.new_tokens, batch, args.device))
        for label, cfg in systems:
            rows.append(run_engine(label, cfg, prompts, args.new_tokens, batch))
    for batch in args.batch:
        ref = next(r for r in rows if r["batch"] == batch and r["system"] == systems[0][0])
        for r in rows:
            if r["batch"] == batch:
                r["agreement"], r["exact_seqs"] = agreement(r["_tokens"], ref["_tokens"])
                r["speedup_vs_peer"] = r["tok_s"] / next(x["tok_s"] for x in rows
                                                         if x["batch"] == batch and x["system"].startswith("transformers"))
    for r in rows:
        del r["_tokens"]
    name = args.name or f"engine-{args.model}-{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    header = (f"# Engine benchmark: {args.model}\n\nCommand: `{command()}`  \nMachine: {machine(args.device)}  \n"
              f"Workload: {args.prompts} HumanEval prompts, {args.new_tokens} new tokens each (ignore_eos), greedy. "
              f"Agreement is position-wise against the engine's own full-depth output at the same batch size.")
    print(write(name, rows, header, lambda path: plot(rows, path)).read_text())


def probe_dtype(device: str):
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        ax[0].barh([f"{r['system']} (bs {batch})" for r in sel], [r["tok_s"] for r in sel])
        ax[1].scatter([r["tok_s"] for r in sel], [r["agreement"] for r in sel], label=f"batch {batch}")
    ax[0].set(xlabel="output tokens/s")
    ax[1].set(xlabel="output tokens/s", ylabel="agreement with full depth", title="speed vs quality")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
