"""Closed-loop serving driver: `batch` concurrent clients, each sending its next request when one ends.

A router picks the engine for each new request. `Single` always picks one; `Helios` runs the
controller's own decision loop in process (controller.core: profiling, selection, greedy loading,
breach counting, load-deeper-or-switch), so the benchmark measures the decisions the cluster
makes, without Ray or Redis in the timings.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from bench.workloads import Request
from controller import policies as P
from controller.config import ControllerConfig
from controller.core import ControllerCore
from engine import LLMEngine, SamplingParams
from engine.sequence import ExitRecord
from telemetry.schema import WindowStats, step_counts


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
    """HELIOS over candidate engines: the controller's own decision loop (controller.core), fed
    each engine step's exits as the actor feeds it Redis telemetry, its decisions carried out on
    the engines in process. Only the candidates in `greedy_loaded` are greedy-loaded (None: all)."""

    def __init__(self, engines: dict[str, LLMEngine], config: ControllerConfig,
                 greedy_loaded: list[str] | None = None, window_steps: int = 16):
        self.engines = engines
        self.core = ControllerCore(config, list(engines))
        self.decisions: list[dict] = []
        # each candidate's last steps: the telemetry window the core reads its speed and exits from
        self._steps = {n: deque(maxlen=window_steps) for n in engines}
        profiles = {n: P.CandidateProfile.from_calibration(n, e.num_layers, e.depth, e.exits.meta if e.exits else None,
                                                           e.memory_bytes())
                    for n, e in engines.items()}
        for d in self.core.greedy_loads(profiles):
            if greedy_loaded is None or d.candidate in greedy_loaded:
                self._load(d.candidate, d.depth)
                self._log(0, d)
        self._log(0, self.core.initial_select())

    def route(self, request: Request) -> str:
        return self.core.route()

    def observe(self, name: str, exits: list[ExitRecord], served: int, step_s: float) -> None:
        self._steps[name].append((exits, step_s))
        self.core.observe(name, self._window(name), len(exits), sum(e.breach for e in exits))
        for d in self.core.decide():
            if d.action is P.Action.LOAD_DEEPER:
                self._load(d.candidate, d.depth)
            self._log(served, d)

    def _window(self, name: str) -> WindowStats:
        """What the telemetry reader would sum for these steps."""
        w = WindowStats(name, windows=1)
        for exits, step_s in self._steps[name]:
            w.add(step_counts(exits, step_s))
            for e in exits:
                w.exits[e.layer] = w.exits.get(e.layer, 0) + 1
        return w

    def _load(self, name: str, depth: int) -> None:
        self.engines[name].load_layers(depth)
        # the window keeps the steps before the load, as the cluster's telemetry windows do
        self.core.loaded(name, self.engines[name].depth)

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
