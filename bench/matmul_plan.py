"""Decode step time by batch size, weights as loaded against the start-up matmul plan (engine.matmul_plan).

One engine, full depth; for each batch size the same requests decode under the plan the engine
measured at start-up, under none (row-major weights, no padding), under the plan it measures
without oneDNN's packed layout (`dense`) and under the start-up plan with the LM head's dense plan
(`head_dense`: no packed copy of the head), alternately, `--rounds` times; the table gives median
step times. `floor_ms` is the time
to read every weight a decode step reads once (a sum over them): the weight-read floor. The last
row is early exits at batch 1 (deferred fill: a step carries the new token and any pending ones).

    python -m bench.matmul_plan --batches 1 2 3 4 5 6 8 --new-tokens 24 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import RESULTS, command, decode_all, humaneval_prompts, machine, md_table, mean_layer
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.matmul_plan import MatmulPlan


def decode_ms(engine: LLMEngine, prompts: list[str], new_tokens: int) -> tuple[list[float], float]:
    """Decode step times (ms) for these prompts run together, and their mean exit layer."""
    run = decode_all(engine, prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    return run.step_ms, mean_layer(run.decode_exits)


@torch.inference_mode()
def read_floor_ms(engine: LLMEngine, reps: int = 3) -> float:
    weights = [p for p in engine.model.layers.parameters() if p.dim() == 2] + [engine.model.lm_head_weight]
    weights = [w.to_dense() if w.is_mkldnn else w for w in weights]  # a packed weight has the same bytes
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            w.sum()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def compare(engine: LLMEngine, label: str, batch: int, prompts: list[str], new_tokens: int, rounds: int,
            floor: float, dense: tuple[MatmulPlan, MatmulPlan]) -> dict:
    model = engine.model
    tuned = (model.layer_plan, model.head_plan)
    plans = {"as_loaded": (MatmulPlan(), MatmulPlan()), "dense": dense, "head_dense": (tuned[0], dense[1]),
             "tuned": tuned}
    times = {mode: [] for mode in plans}
    depth = 0.0
    for _ in range(rounds):
        for mode in times:
            model.set_matmul_plans(*plans[mode])
            steps, depth = decode_ms(engine, prompts[:batch], new_tokens)
            times[mode] += steps
    plain, unpacked, head_dense, planned = (statistics.median(times[m]) for m in times)
    return {"system": label, "batch": batch, "padded_to": plans["tuned"][0].pad_to.get(batch, batch),
            "step_ms_as_loaded": plain, "step_ms_dense": unpacked, "step_ms_head_dense": head_dense,
            "step_ms_tuned": planned, "speedup": plain / planned, "vs_dense": unpacked / planned,
            "vs_head_dense": head_dense / planned, "floor_ms": floor, "tuned_x_floor": planned / floor,
            "tok_s_tuned": 1e3 * batch / planned, "mean_exit_layer": depth}


def dense_plans(engine: LLMEngine) -> tuple[MatmulPlan, MatmulPlan]:
    """The plans this engine measures without the packed layout; its own plans stay in place."""
    model = engine.model
    tuned = (model.layer_plan, model.head_plan)
    model.tune_matmuls(may_pack=False)
    dense = (model.layer_plan, model.head_plan)
    model.set_matmul_plans(*tuned)
    return dense


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    prompts = humaneval_prompts(max(args.batches))
    full = LLMEngine(EngineConfig(model=args.model, exit_policy="full", max_batch_size=max(args.batches)))
    full.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    floor = read_floor_ms(full)
    plans = {"full depth": {"layers": full.model.layer_plan.to_dict(), "head": full.model.head_plan.to_dict()}}
    dense = dense_plans(full)
    plans["without packing"] = {"layers": dense[0].to_dict(), "head": dense[1].to_dict()}
    rows = [compare(full, "full depth", b, prompts, args.new_tokens, args.rounds, floor, dense)
            for b in tqdm(args.batches, desc="batch sizes")]
    del full
    ee = LLMEngine(EngineConfig(model=args.model, max_batch_size=1))
    if ee.exits is not None:
        ee.generate(prompts[:1], SamplingParams(max_tokens=4))
        rows.append(compare(ee, "early exits, deferred fill", 1, prompts, args.new_tokens, args.rounds, floor,
                            dense_plans(ee)))
    plans["early exits"] = {"layers": ee.model.layer_plan.to_dict(), "head": ee.model.head_plan.to_dict()}
    name = args.name or f"matmul-plan-{args.model}-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"command": command(), "machine": machine("cpu"),
                                                       "plans": plans, "rows": rows}, indent=1))
    table = md_table(list(rows[0]), [list(r.values()) for r in rows])
    (args.out / f"{name}.md").write_text("\n".join([
        f"# Matmul plan: {args.model}", "", f"Command: `{command()}`  ", f"Machine: {machine('cpu')}  ",
        (f"Start-up plans (each engine measures its own): {json.dumps(plans)}. Median decode step over {args.rounds} "
         f"rounds of {args.new_tokens} tokens per batch size, weights as loaded, under the plan without packing, under "
         "the start-up plan with the head's dense plan, and tuned, alternately, on one engine."), "",
        *table, "", f"![matmul plan]({name}.png)", ""]))
    _plot([r for r in rows if r["system"] == "full depth"], args.out / f"{name}.png")
    print("\n".join(table))
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    batch = [r["batch"] for r in rows]
    ax.plot(batch, [r["step_ms_as_loaded"] for r in rows], "o-", label="weights as loaded")
    ax.plot(batch, [r["step_ms_dense"] for r in rows], "o-", label="plan without packing")
    ax.plot(batch, [r["step_ms_head_dense"] for r in rows], "o-", label="start-up plan, LM head not packed")
    ax.plot(batch, [r["step_ms_tuned"] for r in rows], "o-", label="start-up matmul plan")
    ax.axhline(rows[0]["floor_ms"], ls=":", color="grey", label="weight-read floor")
    ax.set(xlabel="sequences in the decode step", ylabel="decode step (ms)", title="full-depth decode step", ylim=(0, None))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
