"""The HELIOS benchmark: every serving mode on real workloads, in one run.

    helios bench [--model smollm2] [--prompts 24] [--new-tokens 48] [--batch 1 8] [--device cpu]
    helios bench --short          # seconds-scale smoke run (CI)

Systems: transformers `generate` (the peer), our engine at full depth, the `batch` exit rule,
DREX `rebatch` (deferred KV fill, with DREX's rebatching buffer across steps, and with state
copy), HELIOS (two candidates: greedy-loaded and full depth, with profiling, selection, breach
counting and load-deeper-or-switch; timed after its start-up profiling round), and HELIOS with
`rebatch`. Workloads: HumanEval, chat prompts, and a drift from code to chat, each prompt one that
calibration never saw. Each runs at every `--batch` concurrency. Agreement and ROUGE-L are against
the engine's own full-depth greedy output on the same workload.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bench.common import RESULTS, EnergyMeter, agreement, machine, md_table, rotated, rouge_l, token_agreement
from bench import llamacpp
from bench.serving import Helios, Single, serve
from bench.workloads import workload
from controller.config import ControllerConfig
from engine import EngineConfig, LLMEngine
from engine.config import from_pairs

COPY = "rebatch, state copy"
BUFFER = "rebatch + buffer"
SYSTEMS = ["transformers generate", "engine full depth", "batch", "rebatch", BUFFER, COPY, "HELIOS",
           "HELIOS + rebatch"]
LLAMA_CPP = "llama.cpp"  # an optional extra: in the default systems only where llama-cpp-python is installed
# a workload is a few dozen requests, not a day of traffic: a profiling round of one request per candidate
BENCH_CONTROLLER = {"profile_sample": 1}


def controller_config(defaults: dict, pairs: list[str]) -> ControllerConfig:
    """ControllerConfig from `defaults` and FIELD=VALUE pairs (values read as YAML scalars)."""
    return from_pairs(ControllerConfig, defaults, pairs, "--controller")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _router(system: str, base: EngineConfig, args):
    if system == "engine full depth":
        return Single(LLMEngine(base.model_copy(update={"exit_policy": "full", "exits": False})))
    if system in ("batch", "rebatch"):
        return Single(LLMEngine(base.model_copy(update={"exit_policy": system})))
    if system == BUFFER:
        return Single(LLMEngine(base.model_copy(update={"exit_policy": "buffer"})))
    if system == COPY:
        return Single(LLMEngine(base.model_copy(update={"exit_policy": "rebatch", "kv_fill": "copy"})))
    policy = "rebatch" if "rebatch" in system else "ride_along"
    engines = {f"{args.model}@greedy": LLMEngine(base.model_copy(update={"exit_policy": policy})),
               f"{args.model}@full": LLMEngine(base.model_copy(update={"exit_policy": policy}))}
    return Helios(engines, args.controller, greedy_loaded=[f"{args.model}@greedy"])


def _batch_in_budget(engine: LLMEngine, budget: int) -> int:
    """Sequences of this engine's context length that fit in `budget` bytes beside its weights: what
    the engine sizes its cache to under that `memory_budget` (`bench/capacity.py` runs it)."""
    return engine.memory.capacity(engine.depth, budget, cap=1 << 20)


def start_up(router: Helios, requests, batch: int, new_tokens: int) -> None:
    """The controller's start-up profiling round, served untimed: a cluster profiles its candidates
    once at start and then every `profile_every` requests (150), so a workload of a few dozen requests
    is timed on a controller that is up rather than one starting: in this one process the profiled
    request's candidate steps its one row between the other candidate's steps of the rest, a full
    weight read for one token (the cluster runs candidates as separate replicas). The round's
    decisions stay in the trace, at token 0."""
    serve(router, requests[:router.core.schedule.pending], batch, new_tokens, desc="HELIOS start-up profiling")
    router.decisions[:] = [{**d, "token": 0} for d in router.decisions]


def run_system(system, base, requests, args, hf=None, singles=None) -> dict:
    if system == LLAMA_CPP:
        from engine.store import resolve_source

        source = resolve_source(args.model)
        if not source.gguf_file:
            raise SystemExit(f"llama.cpp needs a GGUF checkpoint; {args.model} is not one")
        with EnergyMeter(args.device) as energy:
            run = llamacpp.run(str(source.path / source.gguf_file), requests,
                               lambda p: hf[1](p)["input_ids"], args.new_tokens)
        return {"tok_s": sum(map(len, run.tokens)) / run.wall_s, "tokens": run.tokens, "ttft": run.ttft_s,
                "tpot": run.tpot_s, "exits": [], "decisions": [], "kinds": [], "mem": run.file_bytes,
                "engines": [], "energy": energy.joules}
    if system == "transformers generate":
        from bench.engine import run_peer

        with EnergyMeter(args.device) as energy:
            row = run_peer(hf[0], hf[1], [r.prompt for r in requests], args.new_tokens, base.max_batch_size,
                           args.device)
        return {"tok_s": row["tok_s"], "tokens": row["_tokens"], "ttft": [], "tpot": [], "exits": [],
                "decisions": [], "kinds": [], "mem": row["mem_MiB"] * 2**20, "engines": [], "energy": energy.joules}
    if system.startswith("HELIOS") or singles is None:
        router = _router(system, base, args)
        if isinstance(router, Helios):
            start_up(router, requests, base.max_batch_size, args.new_tokens)
    else:
        key = (system, base.max_batch_size)
        if key not in singles:
            singles[key] = _router(system, base, args)
        router = singles[key]
    with EnergyMeter(args.device) as energy:
        run = serve(router, requests, base.max_batch_size, args.new_tokens, desc=f"{system} @{base.max_batch_size}")
    engines = list(router.engines.values())
    return {"tok_s": len(run.exits) / run.wall_s, "tokens": run.tokens, "ttft": run.ttft_s, "tpot": run.tpot_s,
            "exits": run.exits, "decisions": run.decisions, "kinds": run.kinds, "energy": energy.joules,
            "mem": sum(e.memory_bytes()["total"] for e in engines), "engines": engines}


def run_repeats(systems: list[str], repeats: int, run) -> tuple[dict, dict]:
    """Every system `repeats` times in rotated order (`rotated`). Returns (one result per system, its
    tokens/s per repeat): throughput is the median of the repeats, TTFT and TPOT are pooled over them,
    and tokens, exits and decisions are the first repeat's (quality is judged once)."""
    runs = rotated(systems, repeats, run)
    merged = {}
    for s, rs in runs.items():
        merged[s] = {**rs[0], "tok_s": statistics.median(r["tok_s"] for r in rs),
                     "ttft": [t for r in rs for t in r["ttft"]], "tpot": [t for r in rs for t in r["tpot"]]}
    return merged, {s: [r["tok_s"] for r in rs] for s, rs in runs.items()}


def summarise(system, wl, batch, r, ref_tokens, budget, verify) -> dict:
    n = max(len(r["exits"]), sum(len(t) for t in r["tokens"]))
    agree, _ = agreement(r["tokens"], ref_tokens)
    engines = r["engines"]
    serving = engines[-1] if len(engines) == 1 else None
    if r["decisions"]:  # HELIOS: the candidate it ended on
        last = [d for d in r["decisions"] if d["action"] in ("select", "switch", "load_deeper")]
        name = last[-1]["candidate"] if last else None
        serving = next((e for e in engines if name and e.name == name), engines[0])
    return {
        "system": system, "workload": wl, "batch": batch,
        "kv_fill": serving.config.kv_fill if serving and serving.exits is not None else "-", "tok_s": r["tok_s"],
        "ttft_p50_ms": 1e3 * _pct(r["ttft"], 0.5), "ttft_p99_ms": 1e3 * _pct(r["ttft"], 0.99),
        "tpot_p50_ms": 1e3 * _pct(r["tpot"], 0.5),
        "tpot_p99_ms": 1e3 * _pct(r["tpot"], 0.99),
        "mean_exit_layer": statistics.fmean(e.layer for e in r["exits"]) if r["exits"] else float("nan"),
        "greedy_exits": sum(e.greedy for e in r["exits"]) / len(r["exits"]) if r["exits"] else 0.0,
        "involuntary": sum(e.involuntary for e in r["exits"]),
        "held": sum(e.held_s > 0 for e in r["exits"]) / len(r["exits"]) if r["exits"] else 0.0,
        "held_p99_ms": 1e3 * _pct([e.held_s for e in r["exits"] if e.held_s > 0], 0.99),
        "agreement": agree,
        "token_agreement": verify(r["tokens"]),
        "rouge_l": statistics.fmean(rouge_l(a, b) for a, b in zip(r["tokens"], ref_tokens)),
        "mem_MiB": r["mem"] / 2**20,
        "batch_in_budget": _batch_in_budget(serving, budget) if serving else float("nan"),
        "J_per_tok": r["energy"] / n if r["energy"] is not None else float("nan"),
        "decisions": len([d for d in r["decisions"] if d["action"] != "load_layers"]),
    }


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="helios bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=24, help="requests per workload")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="concurrent requests (each is a run)")
    ap.add_argument("--workloads", nargs="+", default=["humaneval", "chat", "drift"])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS + [LLAMA_CPP],
                    default=SYSTEMS + ([LLAMA_CPP] if llamacpp.available() else []))
    ap.add_argument("--controller", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="HELIOS controller settings (fields of controller.config.ControllerConfig), over the "
                         f"cluster's defaults and the benchmark's own: {BENCH_CONTROLLER}")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="EngineConfig fields of every system's engine, e.g. --set dtype=bfloat16 int8_weights=true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--home", default=None, help="converted checkpoints (default: HELIOS_HOME)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every system per workload and batch, in rotated order; tok/s is their median "
                         "and each ratio the median of the repeats' ratios (for machines whose speed drifts)")
    ap.add_argument("--short", action="store_true", help="tiny budget: 3 requests, 8 tokens, batch 2")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.command = "helios bench " + " ".join(shlex.quote(a) for a in argv)
    overrides = dict(BENCH_CONTROLLER, **({"breach_window": 8, "breach_max": 2} if args.short else {}))
    if args.short:
        args.prompts, args.new_tokens, args.batch = 3, 8, [2]
    args.controller = controller_config(overrides, args.controller)

    base = from_pairs(EngineConfig, {"model": args.model, "device": args.device, "home": args.home}, args.set, "--set")
    probe = LLMEngine(base.model_copy(update={"max_batch_size": 1, "exit_policy": "full"}))
    if probe.exits is None:
        raise SystemExit(f"no calibrated exit heads for {args.model}: run `helios calibrate {args.model}` first")
    tokenizer, full_weights = probe.tokenizer, probe.memory_bytes()
    del probe
    from engine.store import load_hf, resolve_source

    # the transformers model is both the peer and the full-depth judge of every system's tokens
    hf = load_hf(resolve_source(args.model))
    hf[0].to(args.device)
    systems = ["engine full depth"] + [s for s in args.systems if s != "engine full depth"]
    rows, traces, speeds = [], {}, {}
    singles = {}  # engines of single-candidate systems are reused across workloads; HELIOS starts fresh
    for wl in tqdm(args.workloads, desc="workloads"):
        requests = workload(wl, args.prompts, tokenizer)
        prompts = [r.prompt for r in requests]
        verify = lambda tokens: token_agreement(hf[0], hf[1], prompts, tokens)  # noqa: E731
        for batch in args.batch:
            at = base.model_copy(update={"max_batch_size": batch})
            results, tok_s = run_repeats(systems, args.repeats,
                                         lambda s: run_system(s, at, requests, args, hf, singles))
            speeds.update({(s, wl, batch): v for s, v in tok_s.items()})
            ref = results["engine full depth"]
            budget = full_weights["base"] + full_weights["layers"] + ref["engines"][0].memory_bytes()["kv_cache"]
            for s in tqdm(args.systems, desc="verifying", leave=False):
                rows.append(summarise(s, wl, batch, results[s], ref["tokens"], budget, verify))
            traces[wl] = {s: {"layers": [e.layer for e in r["exits"]], "greedy": [e.greedy for e in r["exits"]],
                              "kinds": r["kinds"], "decisions": r["decisions"]}
                          for s, r in results.items() if r["exits"]}  # the largest batch's, the last run
    name = args.name or f"helios-{args.model}-{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    return write_results(args, rows, traces, name, speeds)


def ratio_table(rows: list[dict], speeds: dict | None = None) -> list[str]:
    """Each system's tokens/s over the baselines the targets are stated against, per workload: with
    repeats, the median over repeats of the ratio within each repeat."""
    bases = [b for b in ("engine full depth", "batch", "transformers generate", LLAMA_CPP)
             if any(r["system"] == b for r in rows)]
    speeds = speeds or {(r["system"], r["workload"], r["batch"]): [r["tok_s"]] for r in rows}

    def ratio(r, b):
        ours, theirs = speeds[(r["system"], r["workload"], r["batch"])], speeds[(b, r["workload"], r["batch"])]
        return statistics.median(x / y for x, y in zip(ours, theirs))
    return md_table(["system", "workload", "batch"] + [f"x {b}" for b in bases],
                    [[r["system"], r["workload"], r["batch"]] + [ratio(r, b) for b in bases] for r in rows])


def write_results(args, rows, traces, name, speeds: dict | None = None) -> Path:
    from bench import plots

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "traces": traces}, indent=1))
    lines = [f"# HELIOS benchmark: {args.model}", "",
             f"Command: `{args.command}`  ",
             f"Machine: {machine(args.device)}  ",
             f"Workload: {args.prompts} requests per workload, {args.new_tokens} new tokens each (ignore_eos), "
             f"{' and '.join(map(str, args.batch))} concurrent clients (`batch`), greedy decoding. `agreement` (position-wise) and ROUGE-L are "
             "against the engine's full-depth output; `token_agreement` is the share of generated tokens "
             "that the full-depth model also picks given the same prefix. `batch_in_budget`: sequences an engine at that "
             "depth holds under a `memory_budget` of what the full-depth engine uses for its weights plus its KV "
             "cache (measured by `python -m bench.capacity`). `held`: share of tokens that waited a step in the rebatching "
             "buffer, `held_p99_ms` how long (from the step that held them to their token)."
             + (f" Every system ran {args.repeats} times per workload and batch, in rotated order: `tok_s` is the "
                "median, TTFT and TPOT are pooled, quality is the first run's." if args.repeats > 1 else "")
             + (" llama.cpp serves the requests one after another (its Python binding runs one sequence); "
                "its `mem_MiB` is the GGUF file it maps." if any(r["system"] == LLAMA_CPP for r in rows) else ""),
             ""]
    lines += md_table(list(rows[0]), [list(r.values()) for r in rows])
    lines += ["", "Throughput ratios within this run (tokens/s of the row's system over the column's"
              + (f"; the median of {args.repeats} repeats' ratios, each repeat running every system in turn):"
                 if args.repeats > 1 else "):"), ""]
    lines += ratio_table(rows, speeds)
    figures = plots.render(rows, traces, out, name)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in figures]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())
    return md


if __name__ == "__main__":
    main()
