"""One trace of routing and engine steps through both drivers of the controller's decision loop: the
cluster's actor (telemetry through a real TelemetryWriter, Redis and TelemetryReader; its replica
calls answered in process) and `helios bench`'s HELIOS router (steps fed directly). They must make
the same decisions in the same order."""
import asyncio
import json
import random
from urllib.parse import urlsplit, urlunsplit

import redis

from bench.serving import Helios
from controller import actor as actor_mod
from controller.config import ControllerConfig
from deployments.contracts import ServerStats
from engine.sequence import ExitRecord
from telemetry.schema import TelemetryConfig
from telemetry.writer import TelemetryWriter
from tests.controller.test_core import ScriptedEngine
from tests.deployments.in_process import LocalHandle

CFG = ControllerConfig(profile_sample=1, profile_every=12, breach_window=10, breach_max=4, quality_floor=0.9,
                       tick_s=3600, thresholds={"enabled": False})
NAMES = ["a", "b"]


class Replica:
    """What the actor calls on a model server, over a scripted engine."""

    def __init__(self, name: str, engine: ScriptedEngine):
        self.name, self.engine = name, engine

    async def stats(self) -> ServerStats:
        e = self.engine
        return ServerStats(self.name, None, e.depth, e.num_layers, 0, 0, 0, e.memory_bytes(), False, "rebatch", {},
                           e.exits.meta, {}, 1, 0)

    async def load_layers(self, depth: int) -> int:
        self.engine.load_layers(depth)
        return self.engine.depth


def _trace(seed: int = 7, events: int = 80) -> list[tuple]:
    """("route",) or ("step", candidate, tokens, breaches, step seconds): speeds per candidate differ,
    breaches come in bursts, so the trace selects, loads deeper and switches."""
    rng = random.Random(seed)
    speed = {"a": 0.05, "b": 0.08}
    out = []
    for i in range(events):
        if rng.random() < 0.3:
            out.append(("route",))
            continue
        name = rng.choice(NAMES)
        burst = (i // 20) % 2 == 1  # every other stretch of the trace breaches heavily
        tokens = rng.randint(4, 8)
        out.append(("step", name, tokens, rng.randint(tokens // 2, tokens) if burst else rng.randint(0, 1),
                    speed[name] * rng.choice((1, 2))))
    return out


def _records(name: str, tokens: int, breaches: int, depth: int) -> list[ExitRecord]:
    return [ExitRecord(f"{name}{i}", i, min(20, depth), 0.5, i < breaches, name, depth) for i in range(tokens)]


def _key(d: dict) -> tuple:
    """A decision as the log keeps it (JSON: the actor's come back from Redis)."""
    return d["action"], d["candidate"], d["depth"], d["reason"], json.dumps(d["evidence"], sort_keys=True)


async def _through_the_actor(url: str, trace: list[tuple], monkeypatch) -> tuple[list[dict], list[str]]:
    replicas = {n: Replica(n, ScriptedEngine()) for n in NAMES}
    monkeypatch.setattr(actor_mod.serve, "get_deployment_handle", lambda d, app: LocalHandle(replicas[d]))
    tcfg = TelemetryConfig(redis_url=url, window_s=3600)  # the whole trace falls in the windows read
    writers = {n: TelemetryWriter(n, tcfg) for n in NAMES}
    actor = actor_mod.HeliosController.__ray_actor_class__(actor_mod.ControllerSpec(CFG, tcfg, {n: n for n in NAMES},
                                                                                    "app"))
    await actor.start()
    for _ in range(3):  # the loop's first tick, on no telemetry yet
        await asyncio.sleep(0)
    routes = []
    for ev in trace:
        if ev[0] == "route":
            routes.append(actor.route())
            continue
        _, name, tokens, breaches, step_s = ev
        writers[name].record(_records(name, tokens, breaches, replicas[name].engine.depth), step_s)
        assert writers[name].flush()
        await actor.tick()
    actor._task.cancel()
    return list(reversed(actor.decisions(1000))), routes


def _through_the_bench(trace: list[tuple]) -> tuple[list[dict], list[str]]:
    engines = {n: ScriptedEngine() for n in NAMES}
    router = Helios(engines, CFG, window_steps=10_000)  # the actor's windows hold the whole trace too
    routes, served = [], 0
    for ev in trace:
        if ev[0] == "route":
            routes.append(router.route(None))
            continue
        _, name, tokens, breaches, step_s = ev
        served += tokens
        router.observe(name, _records(name, tokens, breaches, engines[name].depth), served, step_s)
    return router.decisions, routes


def test_the_cluster_actor_and_the_benchmark_decide_alike_on_one_trace(redis_url, monkeypatch):
    # a database of its own: the cluster tests' controller may still be writing to database 0
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(path="/9"))
    redis.Redis.from_url(url).flushdb()
    trace = _trace()
    by_actor, actor_routes = asyncio.run(_through_the_actor(url, trace, monkeypatch))
    by_bench, bench_routes = _through_the_bench(trace)
    assert actor_routes == bench_routes
    assert [_key(d) for d in by_actor] == [_key(d) for d in by_bench]
    actions = [d["action"] for d in by_bench]
    # the trace is worth comparing: it exercises every decision the loop makes on its own
    assert {"load_layers", "select", "load_deeper", "switch"} <= set(actions), actions
