"""Load test: N streaming clients for M minutes against a running `helios serve`, on loopback.

Each client sends one streaming completion after another until the time is up (bounded: it stops by
itself) and records TTFT, TPOT and how the request ended. With `--engine` it then runs the same
model in-process at the same concurrency, so the cluster's tok/s is read as a ratio to the engine's
on the same machine in the same run.

    python -m bench.load --url http://127.0.0.1:8000 --clients 64 --minutes 5 --engine smollm2 --engine-threads 0 1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm

from bench.common import RESULTS, command, humaneval_prompts, machine
from engine.config import usable_cpus


@dataclass
class Outcome:
    ok: bool
    tokens: int = 0
    tokens_in_window: int = 0  # tokens that arrived before the run's deadline: tok/s counts only these
    ttft_s: float = float("nan")
    tpot_s: list[float] = field(default_factory=list)
    error: str | None = None


async def one_request(http: httpx.AsyncClient, url: str, body: dict, key: str | None, deadline: float) -> Outcome:
    t0 = time.perf_counter()
    last, out = None, Outcome(ok=False)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.ok = out.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"].get("code") or "error"
                    continue
                now = time.perf_counter()
                if last is None:
                    out.ttft_s = now - t0
                else:
                    out.tpot_s.append(now - last)
                last, out.tokens = now, out.tokens + 1
                out.tokens_in_window += time.monotonic() < deadline
    except httpx.HTTPError as e:
        out.error = type(e).__name__
    return out


async def run_clients(url: str, clients: int, seconds: float, body_of, key: str | None) -> list[Outcome]:
    deadline = time.monotonic() + seconds
    outcomes: list[Outcome] = []
    bar = tqdm(total=round(seconds), desc=f"{clients} clients", unit="s")
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:
        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                outcomes.append(await one_request(http, url, body_of(i, n), key, deadline))
                n += 1

        async def tick() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                bar.update(1)
        await asyncio.gather(tick(), *(client(i) for i in range(clients)))
    bar.close()
    return outcomes


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    ttft = np.array([o.ttft_s for o in ok]) * 1e3
    tpot = np.array([t for o in ok for t in o.tpot_s]) * 1e3
    pct = lambda a, q: round(float(np.percentile(a, q)), 1) if len(a) else None  # noqa: E731
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error or "unknown"] = errors.get(o.error or "unknown", 0) + 1
    return {"requests": len(outcomes), "ok": len(ok), "failed": len(outcomes) - len(ok), "errors": errors,
            "tok_s": round(sum(o.tokens_in_window for o in outcomes) / seconds, 1),
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}}


def engine_rate(model: str, clients: int, max_tokens: int, prompts: list[str], seconds: float,
                threads: int | None = None, batch: int | None = None) -> float:
    """Tokens/s of the in-process engine kept at `clients` requests in flight for `seconds`
    (`threads`: torch's threads, None for every usable CPU; `batch`: the engine's batch, default
    min(clients, 8))."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=model, max_batch_size=batch or min(clients, 8), threads=threads))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    n, tokens, deadline = 0, 0, time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        while sum(engine.queue_lengths()) < clients:
            engine.add_request(prompts[n % len(prompts)], params)
            n += 1
        tokens += sum(len(o.new_token_ids) for o in engine.step().outputs)
    return tokens / (time.monotonic() - t0)


def wait_idle(limit_s: float = 120.0, idle_share: float = 0.9) -> float:
    """Wait (at most `limit_s`) until the CPUs are `idle_share` idle over 2 s: the cluster, still up
    beside the in-process engine, finishes its backlog (the shadow verifier's) first. -> idle share."""
    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    idle = 0.0
    for _ in range(int(limit_s / 2)):
        i0, t0 = times()
        time.sleep(2)
        i1, t1 = times()
        idle = (i1 - i0) / max(1, t1 - t0)
        if idle >= idle_share:
            break
    return idle


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2", help="the `model` field of every request")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--api-key", default=None)
    p.add_argument("--engine", default=None, help="also measure this model in-process at the same concurrency")
    p.add_argument("--engine-seconds", type=float, default=60.0)
    p.add_argument("--engine-threads", type=int, nargs="+", default=[0],
                   help="torch threads of each in-process engine measured (0: every usable CPU, the default "
                        "engine); give the replicas' count too to see the serving path's own cost apart")
    p.add_argument("--engine-batch", type=int, default=None, help="in-process engine's batch (default "
                   "min(clients, 8), one replica's default)")
    p.add_argument("--cluster-config", default=None, help="the config `helios serve` was started with: "
                   "recorded with the results (the default: embedded defaults)")
    p.add_argument("--out", default=str(RESULTS / "load-cpu.json"))
    args = p.parse_args(argv)
    prompts = humaneval_prompts(16)
    body_of = lambda i, n: {"model": args.model, "prompt": prompts[(i + n) % len(prompts)],  # noqa: E731
                            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    seconds = args.minutes * 60
    outcomes = asyncio.run(run_clients(args.url, args.clients, seconds, body_of, args.api_key))
    result = {"command": command(), "machine": machine("cpu"), "clients": args.clients, "seconds": seconds,
              "max_tokens": args.max_tokens, "cluster_config": args.cluster_config or "embedded defaults",
              "cluster": summarize(outcomes, seconds)}
    if args.engine:
        result["engine"], result["idle_before_engine"] = [], round(wait_idle(), 2)
        batch = args.engine_batch or min(args.clients, 8)
        for threads in args.engine_threads:
            rate = engine_rate(args.engine, args.clients, args.max_tokens, prompts, args.engine_seconds,
                               threads or None, batch)
            result["engine"].append({"threads": threads or usable_cpus(), "batch": batch, "tok_s": round(rate, 1),
                                     "cluster_over_engine": round(result["cluster"]["tok_s"] / rate, 2)})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
