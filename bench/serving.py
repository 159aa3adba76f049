"""Closed-loop serving driver: `batch` concurrent clients, each sending its next request when one ends.

A router picks the engine for each new request. `Single` always picks one; `Helios` runs the
controller's own policies in-process (profiling, selection, greedy loading, breach counting,
load-deeper-or-switch), so the benchmark measures the same decisions the cluster makes, without
Ray or Redis in the timings.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from bench.workloads import Request
from controller import policies as P
from engine import LLMEngine, SamplingParams
from engine.sequence import ExitRecord


@dataclass
class Run:
    tokens: list[list[int]]  # per request, in workload order
    ttft_s: list[float]  # per request: admission to first token
    tpot_s: list[float]  # every gap between consecutive tokens of a request
    wall_s: float
    exits: list[ExitRecord] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)  # each with the served-token count it came at
    kinds: list[str] = field(default_factory=list)  # request kind per served token, for the drift trace


class Single:
    def __init__(self, engine: LLMEngine):
        self.engines = {engine.name: engine}
        self.decisions: list[dict] = []

    def route(self, request: Request) -> str:
        return next(iter(self.engines))

    def observe(self, name: str, exits: list[ExitRecord], served: int, step_s: float) -> None:
        pass


class Helios:
    """HELIOS over candidate engines, driven by `controller.policies`."""

    def __init__(self, engines: dict[str, LLMEngine], objective=P.Objective.MAX_THROUGHPUT, greedy_share=0.9,
                 window=100, max_breaches=50, profile_tokens=32, quality_floor=0.0,
                 greedy_loaded: list[str] | None = None):
        self.engines, self.objective, self.floor = engines, objective, quality_floor
        self.decisions: list[dict] = []
        self.profiles = {n: P.CandidateProfile.from_calibration(n, e.num_layers, e.depth,
                                                                e.exits.meta if e.exits else None, e.memory_bytes())
                         for n, e in engines.items()}
        for name, p in self.profiles.items():  # greedy loading from calibration
            if greedy_loaded is not None and name not in greedy_loaded:
                continue
            depth = P.greedy_depth(p.exit_hist, greedy_share, p.num_layers)
            if depth != engines[name].depth:
                engines[name].load_layers(depth)
                p.depth = depth
                self._log(0, P.Decision(P.Action.LOAD_LAYERS, name, depth, f"{greedy_share:.0%} of calibrated exits by here"))
        self.profile_tokens = profile_tokens
        self.selected = False
        self._rr = 0
        self.current = next(iter(engines))
        self.breaches = P.BreachCounter(window, max_breaches)
        self._busy = {n: [0, 0.0] for n in engines}  # tokens, seconds while stepping
        self._served = 0

    def route(self, request: Request) -> str:
        if self.selected:
            return self.current
        self._rr += 1  # profiling: requests are served round-robin until every candidate is measured
        return list(self.engines)[self._rr % len(self.engines)]

    def _select(self) -> None:
        for n, p in self.profiles.items():
            p.tokens_per_s = self._speed(n)
        best = P.select(list(self.profiles.values()), self.objective, self.floor)
        self.selected = True
        if best is not None:
            self.current = best.name
            self._log(self._served, P.Decision(P.Action.SELECT, best.name, best.depth, "profiling round done",
                                               {n: round(p.tokens_per_s, 2) for n, p in self.profiles.items()}))

    def observe(self, name: str, exits: list[ExitRecord], served: int, step_s: float) -> None:
        self._served = served
        self._busy[name][0] += len(exits)
        self._busy[name][1] += step_s
        p = self.profiles[name]
        if exits:
            p.greedy_rate = 0.8 * p.greedy_rate + 0.2 * sum(e.greedy for e in exits) / len(exits)
            if name == self.current and self.selected:
                self.breaches.observe(sum(e.breach for e in exits), len(exits))
        if not self.selected and all(t >= self.profile_tokens for t, _ in self._busy.values()):
            self._select()
        if not self.breaches.tripped:
            return
        cur = self.profiles[self.current]
        cur.tokens_per_s = self._speed(cur.name)
        d = P.on_breach(cur, [q for q in self.profiles.values() if q.name != cur.name], self.objective, self.floor)
        d.evidence["breaches_in_window"] = self.breaches.count
        if d.action is P.Action.LOAD_DEEPER:
            self.engines[d.candidate].load_layers(d.depth)
            cur.depth = d.depth
            self._busy[d.candidate] = [0, 0.0]  # its speed is re-measured at the new depth
        elif d.action is P.Action.SWITCH:
            self.current = d.candidate  # in-flight requests finish where they started
        self.breaches.reset()
        self._log(served, d)

    def _speed(self, name: str) -> float:
        tokens, secs = self._busy[name]
        return tokens / secs if secs else 0.0

    def _log(self, served: int, d: P.Decision) -> None:
        self.decisions.append({"token": served, **d.to_dict()})


def serve(router, requests: list[Request], batch: int, new_tokens: int, desc: str = "") -> Run:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    pending = deque(enumerate(requests))
    inflight: dict[str, int] = {}
    tokens = [[] for _ in requests]
    admitted, stamps = [0.0] * len(requests), [[] for _ in requests]
    run = Run(tokens, [], [], 0.0)
    bar = tqdm(total=len(requests) * new_tokens, desc=desc, unit="tok", leave=False)
    t0 = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < batch:
            i, req = pending.popleft()
            rid = router.engines[router.route(req)].add_request(req.prompt, params, request_id=f"r{i}")
            inflight[rid], admitted[i] = i, time.perf_counter()
        for name, engine in router.engines.items():
            if not engine.has_unfinished():
                continue
            s = time.perf_counter()
            out = engine.step()
            now = time.perf_counter()
            for o in out.outputs:
                i = inflight[o.request_id]
                tokens[i] += o.new_token_ids
                stamps[i].append(now)
                if o.finished:
                    del inflight[o.request_id]
            run.exits += out.exits
            run.kinds += [requests[int(e.request_id[1:])].kind for e in out.exits]
            router.observe(name, out.exits, len(run.exits), now - s)
            bar.update(len(out.exits))
    run.wall_s = time.perf_counter() - t0
    bar.close()
    for i, ts in enumerate(stamps):
        run.ttft_s.append(ts[0] - admitted[i])
        run.tpot_s += [b - a for a, b in zip(ts, ts[1:])]
    run.decisions = list(router.decisions)
    return run
