"""The HELIOS controller: a named, detached Ray actor around the decision loop of controller.core.

Each tick it reads every candidate's exit telemetry from Redis and hands it to the core, which
counts the serving candidate's breaches and, when the counter trips, decides whether to load
deeper layers or switch candidate; the actor carries it out on the replicas. From the shadow
verifier's per-layer counts it moves each candidate's exit thresholds to hold the agreement floor
(controller.thresholds) and pushes them to the replicas. Routing answers come from the core:
profiling rounds first, otherwise the selected candidate. Every decision goes to a Redis stream
with its evidence; the routing state is mirrored to Redis and restored on restart.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import ray
import redis
from ray import serve

from controller import policies as P
from controller.config import ControllerConfig
from controller.core import ControllerCore
from controller.thresholds import ThresholdTuner
from telemetry.metrics import ControllerMetrics
from telemetry.reader import TelemetryReader
from telemetry.schema import PREFIX, TelemetryConfig

DECISIONS = f"{PREFIX}:decisions"
STATE = f"{PREFIX}:controller:state"
PROFILES = f"{PREFIX}:controller:profiles"  # candidate -> last measured profile (performance history)
def depth_field(candidate: str) -> str:
    """Field of STATE holding the depth the controller last set for `candidate`: a replica that
    replaces a dead one reads it and loads that depth."""
    return f"depth:{candidate}"


def bank_id(calibration: dict | None) -> str:
    """Which exit bank a candidate serves (a digest of its calibration report): thresholds tuned for
    one bank mean nothing to another, e.g. after `helios calibrate` and a restart on the same Redis."""
    return hashlib.sha1(json.dumps(calibration, sort_keys=True, default=str).encode()).hexdigest()[:12]


def thresholds_field(candidate: str, bank: str) -> str:
    """Field of STATE holding the exit thresholds (JSON) the controller last served `candidate`'s `bank`."""
    return f"thresholds:{candidate}:{bank}"


def setpoints(client: redis.Redis, candidate: str, bank: str) -> tuple[int | None, dict[int, float] | None]:
    """The depth and exit thresholds the controller last set for `candidate` (None: never set).
    Every replica of the candidate follows them: the controller's own call reaches one replica (a
    Serve handle picks one), and a replica that replaces a dead one starts from them."""
    depth, thresholds = client.hmget(STATE, [depth_field(candidate), thresholds_field(candidate, bank)])
    return (int(depth) if depth is not None else None,
            {int(l): float(t) for l, t in json.loads(thresholds).items()} if thresholds is not None else None)


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    """What the controller actor is started with: its settings, where telemetry lives, and the Serve
    deployment of each candidate (the gateway and `helios serve` both start it from this)."""

    config: ControllerConfig
    telemetry: TelemetryConfig
    deployments: dict[str, str]  # candidate -> deployment name
    app_name: str


MEASURED = ("tokens_per_s", "step_ms", "greedy_rate", "mean_exit_layer", "agreement")
log = logging.getLogger(__name__)


# restarted by Ray when its process dies; __init__ restores the routing state from Redis and the
# gateway's watchdog calls start() again, which resumes the loop
@ray.remote(num_cpus=0, max_restarts=-1)
class HeliosController:
    def __init__(self, spec: ControllerSpec):
        self.cfg = spec.config
        self.redis = redis.Redis.from_url(spec.telemetry.redis_url, socket_timeout=2)
        self.reader = TelemetryReader(spec.telemetry, self.redis)
        self.handles = {c: serve.get_deployment_handle(d, spec.app_name) for c, d in spec.deployments.items()}
        self.names = sorted(spec.deployments)
        self.tuners: dict[str, ThresholdTuner] = {}
        self.banks: dict[str, str] = {}  # candidate -> bank_id of the exits it serves
        self.seen: dict[str, tuple[int, int]] = {}  # candidate -> (tokens, breaches) already counted
        saved = self.redis.hgetall(STATE)
        self.restored = bool(saved)
        self.core = ControllerCore(self.cfg, self.names, saved.get(b"current", b"").decode() or None,
                                   saved.get(b"pinned", b"").decode() or None)
        self.metrics = ControllerMetrics()
        self._task = None
        self._started: asyncio.Future | None = None

    # ---- called by the gateway ---------------------------------------------------------------
    @property
    def current(self) -> str:
        return self.core.current

    @property
    def profiles(self) -> dict[str, P.CandidateProfile]:
        return self.core.profiles

    def route(self) -> str:
        return self.core.route()

    # ---- called by operators and tests ---------------------------------------------------------
    def state(self) -> dict:
        core = self.core
        return {"current": core.current, "pinned": core.pinned, "profiling": core.schedule.profiling,
                "restored": self.restored, "breaches_in_window": core.breaches.count,
                "breach_limit": [self.cfg.breach_max, self.cfg.breach_window], "profiles": core.summary(),
                "thresholds": {n: t.thresholds for n, t in self.tuners.items()}}

    def decisions(self, count: int = 50) -> list[dict]:
        return [json.loads(f[b"decision"]) for _, f in self.redis.xrevrange(DECISIONS, count=count)]

    def snapshot(self, windows: int | None = None) -> dict:
        """Everything the operator page shows: routing state, live telemetry per candidate, decisions."""
        windows = windows or self.cfg.windows
        live = {}
        for name in self.names:
            w = self.reader.window(name, windows=windows)
            live[name] = {"exits": w.exits, "tokens": w.tokens, "greedy": w.greedy, "breaches": w.breaches,
                          "involuntary": w.involuntary, "tokens_per_s": w.tokens_per_busy_s,
                          "live_agreement": w.live_agreement, "mean_exit_layer": w.mean_exit_layer}
        return {**self.state(), "window_s": windows * self.reader.config.window_s, "candidates": live,
                "decisions": self.decisions(20)}

    # ---- operator actions (the gateway's admin API) ----------------------------------------------
    async def reprofile(self) -> dict:
        await self.start()  # after a restart, profiles exist once the initial round has run
        self.core.reprofile()
        self._log(P.Decision(P.Action.REPROFILE, self.current, self.profiles[self.current].depth,
                             "operator asked for a profiling round"))
        return self.state()

    def _check_candidate(self, candidate: str) -> None:
        if candidate not in self.names:
            raise ValueError(f"unknown candidate {candidate!r}; expected one of {self.names}")

    async def pin(self, candidate: str | None) -> dict:
        """Route every request to `candidate`; None hands routing back to the controller."""
        await self.start()
        if candidate is not None:
            self._check_candidate(candidate)
        self.core.pin(candidate)
        self._log(P.Decision(P.Action.PIN if candidate else P.Action.UNPIN, self.current, self.profiles[self.current].depth,
                             f"operator pinned {candidate}" if candidate else "operator released the pin"))
        return self.state()

    async def set_depth(self, candidate: str, depth: int) -> dict:
        self._check_candidate(candidate)
        await self.start()
        p = self.profiles[candidate]
        if not 1 <= depth <= p.num_layers:
            raise ValueError(f"depth {depth} outside 1..{p.num_layers} for {candidate}")
        p.depth = await self._load(candidate, depth)
        self._log(P.Decision(P.Action.SET_DEPTH, candidate, p.depth, "operator set the loaded depth"))
        return self.state()

    async def set_thresholds(self, candidate: str, thresholds: dict[int, float]) -> dict:
        """Serve `candidate` with these exit thresholds; live tuning goes on from them."""
        self._check_candidate(candidate)
        await self.start()
        tuner = self.tuners[candidate]
        unknown = set(map(int, thresholds)) - set(tuner.thresholds)
        if unknown:
            raise ValueError(f"{candidate} has no exit point at layers {sorted(unknown)}")
        served = await self._serve_thresholds(candidate, {int(l): float(t) for l, t in thresholds.items()})
        tuner.reset(served, self.reader.shadow_by_layer(candidate))
        self._log(P.Decision(P.Action.SET_THRESHOLDS, candidate, self.profiles[candidate].depth,
                             "operator set exit thresholds", {"thresholds": served}))
        return self.state()

    async def start(self) -> None:
        """Initial profile, selection and greedy loading, then the telemetry loop (once, however often called)."""
        if self._started is None or (self._started.done() and self._started.exception() is not None):
            self._started = asyncio.ensure_future(self._start())  # a failed start is tried again
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self._initial()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    # ---- the loop --------------------------------------------------------------------------------
    async def _initial(self) -> None:
        saved = {k.decode(): json.loads(v) for k, v in self.redis.hgetall(PROFILES).items()}
        profiles = {}
        for name in self.names:
            stats = await self.handles[name].stats.remote()  # a deployments.contracts.ServerStats
            profiles[name] = p = P.CandidateProfile.from_calibration(
                name, stats.num_layers, stats.depth, stats.calibration, stats.memory)
            for f in MEASURED:
                setattr(p, f, saved.get(name, {}).get(f, getattr(p, f)))
            self.seen[name] = self._totals(name)
            self.tuners[name] = ThresholdTuner(self.cfg.thresholds, {int(l): t for l, t in stats.thresholds.items()})
            self.banks[name] = bank_id(stats.calibration)
            self.tuners[name].reset(None, self.reader.shadow_by_layer(name))  # judge only what it serves from now
        loads = self.core.greedy_loads(profiles)
        if self.restored:
            self._log(P.Decision(P.Action.RESTORE, self.current, self.profiles[self.current].depth,
                                 "state restored from Redis after a restart",
                                 {"profiles": {n: {f: getattr(p, f) for f in MEASURED}
                                               for n, p in self.profiles.items()}}))
            return  # the replicas kept the depths set before the restart (a new one reads them from STATE)
        for d in loads:
            self.core.loaded(d.candidate, await self._load(d.candidate, d.depth))
            self._log(d)
        self._log(self.core.initial_select())

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bad tick must not end the control loop
                log.exception("controller tick failed")
            await asyncio.sleep(self.cfg.tick_s)

    async def tick(self) -> list[P.Decision]:
        for name in self.names:
            window = self.reader.window(name, windows=self.cfg.windows)
            tokens, breaches = self._totals(name)
            old_t, old_b = self.seen.get(name, (0, 0))
            self.seen[name] = (tokens, breaches)
            self.core.observe(name, window, tokens - old_t, breaches - old_b)
            if window.tokens:
                p = self.profiles[name]
                self.redis.hset(PROFILES, name, json.dumps({f: getattr(p, f) for f in MEASURED}))
        if self.cfg.thresholds.enabled:
            for name in self.names:
                await self._tune(name)
        decisions = self.core.decide()
        for d in decisions:
            if d.action is P.Action.LOAD_DEEPER:
                self.core.loaded(d.candidate, await self._load(d.candidate, d.depth))
            self._log(d)
        return decisions

    async def _tune(self, name: str) -> None:
        changes = self.tuners[name].observe(self.reader.shadow_by_layer(name))
        if not changes:
            return
        served = await self._serve_thresholds(name, {c.layer: c.new for c in changes})
        self._log(P.Decision(P.Action.SET_THRESHOLDS, name, self.profiles[name].depth, "; ".join(c.reason for c in changes),
                             {"changes": [asdict(c) for c in changes], "floor": self.cfg.thresholds.floor,
                              "thresholds": served}))

    # ---- helpers ---------------------------------------------------------------------------------
    # A setpoint goes to STATE before the call: the replica the call reaches reads STATE too, and
    # must not find the old value there and go back to it.
    async def _load(self, name: str, depth: int) -> int:
        """Load `depth` on one replica at once, on the others from STATE within a telemetry flush."""
        self.redis.hset(STATE, depth_field(name), depth)
        return await self.handles[name].load_layers.remote(depth)

    async def _serve_thresholds(self, name: str, thresholds: dict[int, float]) -> dict[int, float]:
        """Serve `thresholds` (some layers) on one replica at once, on the others from STATE."""
        field = thresholds_field(name, self.banks[name])
        self.redis.hset(STATE, field, json.dumps({**self.tuners[name].thresholds, **thresholds}))
        served = await self.handles[name].set_thresholds.remote(thresholds)
        self.redis.hset(STATE, field, json.dumps(served))
        return served

    def _totals(self, name: str) -> tuple[int, int]:
        t = self.reader.totals(name)
        return t.tokens, t.breaches

    def _log(self, decision: P.Decision) -> None:
        entry = {**decision.to_dict(), "t": time.time()}
        pipe = self.redis.pipeline()
        pipe.xadd(DECISIONS, {"decision": json.dumps(entry)}, maxlen=10_000, approximate=True)
        pipe.hset(STATE, mapping={"current": self.current, "pinned": self.core.pinned or "",
                                  **{depth_field(n): p.depth for n, p in self.profiles.items()}})
        pipe.execute()
        self.metrics.decision(decision.action.value, decision.candidate)


def ensure_controller(spec: ControllerSpec):
    """The named, detached controller actor: the running one, or a new one."""
    cfg = spec.config
    return HeliosController.options(name=cfg.actor_name, namespace=cfg.namespace, lifetime="detached",
                                    get_if_exists=True).remote(spec)
