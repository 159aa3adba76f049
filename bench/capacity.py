"""Memory saved becomes batch: one memory budget, each loaded depth, concurrency reached and tok/s.

The budget is what the full-depth engine needs for its weights and `--full-batch` sequences of
`--max-model-len` tokens. At each depth the engine sizes its KV cache to that budget; closed-loop
clients, as many as the shallowest depth is predicted to hold plus `--extra`, keep it full. The
table sets the concurrency each depth reached beside the memory model's prediction, and tok/s;
`greedy_exits` is the share of tokens that left unconfident at the last loaded layer: what a
truncated stack costs in quality, which HELIOS's choice of depth weighs against the batch.

    python -m bench.capacity --depths 30 24 18 12 --full-batch 8 --new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.common import RESULTS, command, humaneval_prompts, machine, md_table
from controller.policies import greedy_depth
from engine import EngineConfig, LLMEngine, SamplingParams


def run_depth(base: EngineConfig, depth: int, clients: int, requests: int, new_tokens: int,
              prompts: list[str]) -> dict:
    engine = LLMEngine(base.model_copy(update={"depth": depth}))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0)
    sent = done = tokens = reached = greedy = 0
    bar = tqdm(total=requests, desc=f"depth {depth}: {engine.capacity} at once", leave=False)
    t0 = time.perf_counter()
    while done < requests:
        while sent < requests and sent - done < clients:
            engine.add_request(prompts[sent % len(prompts)], params)
            sent += 1
        out = engine.step()
        reached = max(reached, len(engine.scheduler.running))
        tokens += sum(len(o.new_token_ids) for o in out.outputs)
        greedy += sum(e.greedy for e in out.exits)
        finished = sum(o.finished for o in out.outputs)
        done += finished
        bar.update(finished)
    bar.close()
    mem = engine.memory_bytes()
    return {"depth": depth, "predicted": engine.memory.capacity(depth, engine.budget, base.max_batch_size),
            "reached": reached, "tok_s": tokens / (time.perf_counter() - t0),
            "greedy_exits": greedy / max(tokens, 1), "mem_MiB": mem["total"] / 2**20,
            "budget_MiB": engine.budget / 2**20}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--depths", type=int, nargs="+", default=[30, 24, 18, 12])
    p.add_argument("--full-batch", type=int, default=8, help="sequences the budget holds at full depth")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--extra", type=int, default=4, help="clients beyond the largest predicted capacity")
    p.add_argument("--rounds", type=int, default=2, help="requests per run: this many times the clients")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--home", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    base = EngineConfig(model=args.model, max_model_len=args.max_model_len, home=args.home, max_batch_size=512)
    probe = LLMEngine(base.model_copy(update={"max_batch_size": 1, "exit_policy": "full"}))
    memory, layers = probe.memory, probe.num_layers
    # the depth HELIOS's greedy loading picks from the calibration: the paper's comparison point
    hist = probe.exits.meta.get("exit_share_by_layer", {}) if probe.exits is not None else {}
    chosen = greedy_depth({int(k): v for k, v in hist.items()}, 0.9, layers) if hist else None
    del probe
    budget = memory.weights(layers) + args.full_batch * memory.per_sequence(layers)
    base = base.model_copy(update={"memory_budget": float(budget)})
    depths = sorted(set(args.depths) | ({chosen} if chosen else set()), reverse=True)
    clients = max(memory.capacity(d, budget, base.max_batch_size) for d in depths) + args.extra
    prompts = humaneval_prompts(16)
    rows = [run_depth(base, d, clients, args.rounds * clients, args.new_tokens, prompts)
            for d in tqdm(depths, desc="depths")]
    for r in rows:
        r["helios_choice"] = r["depth"] == chosen
    full = next((r for r in rows if r["depth"] == layers), rows[0])
    for r in rows:
        r["reached_over_predicted"] = r["reached"] / r["predicted"]
        r["batch_x_full"] = r["reached"] / full["reached"]
        r["tok_s_x_full"] = r["tok_s"] / full["tok_s"]
    result = {"command": command(), "machine": machine(base.device), "model": args.model, "budget_bytes": budget,
              "full_batch": args.full_batch, "max_model_len": args.max_model_len, "clients": clients,
              "new_tokens": args.new_tokens, "rows": rows}
    name = args.name or f"capacity-{args.model}-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = md_table(list(rows[0]), [list(r.values()) for r in rows])
    (args.out / f"{name}.md").write_text("\n".join([
        f"# Memory becomes batch: {args.model}", "", f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"One budget of {budget / 2**20:.0f} MiB (full-depth weights plus {args.full_batch} sequences of "
        f"{args.max_model_len} tokens); {clients} closed-loop clients, {args.new_tokens} new tokens each.", "",
        *table, "", f"![capacity]({name}.png)", ""]))
    _plot(rows, args.out / f"{name}.png")
    print("\n".join(table))
    return result


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["depth"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    depth = [r["depth"] for r in rows]
    a.plot(depth, [r["predicted"] for r in rows], "-", label="memory model")
    a.plot(depth, [r["reached"] for r in rows], "o", label="reached")
    a.set(xlabel="loaded depth", ylabel="sequences at once", title="one memory budget")
    a.legend()
    b.plot(depth, [r["tok_s"] for r in rows], "o-")
    b.set(xlabel="loaded depth", ylabel="output tokens/s", title="throughput at that batch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
