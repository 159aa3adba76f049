"""The HELIOS controller: a named, detached Ray actor.

Each tick it reads every candidate's exit telemetry from Redis, feeds the serving candidate's
breaches into the sliding counter, and when the counter trips asks the policy whether to load
deeper layers or switch candidate, then does it. From the shadow verifier's per-layer counts it
moves each candidate's exit thresholds to hold the agreement floor (controller.thresholds) and
pushes them to the replicas. Routing answers come from the same state:
profiling rounds first, otherwise the selected candidate. Every decision goes to a Redis stream
with its evidence; the routing state is mirrored to Redis and restored on restart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict

import ray
import redis
from ray import serve

from controller import policies as P
from controller.config import ControllerConfig
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


MEASURED = ("tokens_per_s", "step_ms", "greedy_rate", "mean_exit_layer", "agreement")
log = logging.getLogger(__name__)


# restarted by Ray when its process dies; __init__ restores the routing state from Redis and the
# gateway's watchdog calls start() again, which resumes the loop
@ray.remote(num_cpus=0, max_restarts=-1)
class HeliosController:
    def __init__(self, config: dict, telemetry: dict, deployments: dict[str, str], app_name: str):
        self.cfg = ControllerConfig.model_validate(config)
        tcfg = TelemetryConfig.model_validate(telemetry)
        self.redis = redis.Redis.from_url(tcfg.redis_url, socket_timeout=2)
        self.reader = TelemetryReader(tcfg, self.redis)
        self.handles = {c: serve.get_deployment_handle(d, app_name) for c, d in deployments.items()}
        self.names = sorted(deployments)
        self.schedule = P.ProfilingSchedule(self.names, self.cfg.profile_every, self.cfg.profile_sample)
        self.breaches = P.BreachCounter(self.cfg.breach_window, self.cfg.breach_max)
        self.profiles: dict[str, P.CandidateProfile] = {}
        self.tuners: dict[str, ThresholdTuner] = {}
        self.seen: dict[str, tuple[int, int]] = {}  # candidate -> (tokens, breaches) already counted
        saved = self.redis.hgetall(STATE)
        self.current: str = saved.get(b"current", b"").decode() or self.names[0]
        self.restored = bool(saved)
        self.pinned: str | None = saved.get(b"pinned", b"").decode() or None  # set by an operator
        self.metrics = ControllerMetrics()
        self._reselect = False  # a profiling round has been routed: choose again once it is measured
        self._task = None
        self._started: asyncio.Future | None = None

    # ---- called by the gateway ---------------------------------------------------------------
    def route(self) -> str:
        if self.pinned:
            return self.pinned
        was_profiling = self.schedule.profiling
        choice = self.schedule.next()
        self._reselect |= was_profiling and not self.schedule.profiling
        return choice or self.current

    # ---- called by operators and tests ---------------------------------------------------------
    def state(self) -> dict:
        return {"current": self.current, "pinned": self.pinned, "profiling": self.schedule.profiling,
                "restored": self.restored, "breaches_in_window": self.breaches.count,
                "breach_limit": [self.cfg.breach_max, self.cfg.breach_window],
                "profiles": {n: {"depth": p.depth, "capacity": p.max_batch(), "tokens_per_s": p.tokens_per_s,
                                 "agreement": p.agreement, "greedy_rate": p.greedy_rate}
                             for n, p in self.profiles.items()},
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
        self.schedule.start_round()
        self._reselect = False
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
        self.pinned = candidate
        if candidate:
            self.current = candidate
            self.breaches.reset()
        self._log(P.Decision(P.Action.PIN if candidate else P.Action.UNPIN, self.current, self.profiles[self.current].depth,
                             f"operator pinned {candidate}" if candidate else "operator released the pin"))
        return self.state()

    async def set_depth(self, candidate: str, depth: int) -> dict:
        self._check_candidate(candidate)
        await self.start()
        p = self.profiles[candidate]
        if not 1 <= depth <= p.num_layers:
            raise ValueError(f"depth {depth} outside 1..{p.num_layers} for {candidate}")
        p.depth = await self.handles[candidate].load_layers.remote(depth)
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
        served = await self.handles[candidate].set_thresholds.remote({int(l): float(t) for l, t in thresholds.items()})
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
        for name in self.names:
            stats = await self.handles[name].stats.remote()  # a deployments.contracts.ServerStats
            self.profiles[name] = p = P.CandidateProfile.from_calibration(
                name, stats.num_layers, stats.depth, stats.calibration, stats.memory)
            for f in MEASURED:
                setattr(p, f, saved.get(name, {}).get(f, getattr(p, f)))
            self.seen[name] = self._totals(name)
            self.tuners[name] = ThresholdTuner(self.cfg.thresholds, {int(l): t for l, t in stats.thresholds.items()})
            self.tuners[name].reset(None, self.reader.shadow_by_layer(name))  # judge only what it serves from now
        if self.restored:
            self._log(P.Decision(P.Action.RESTORE, self.current, self.profiles[self.current].depth,
                                 "state restored from Redis after a restart",
                                 {"profiles": {n: {f: getattr(p, f) for f in MEASURED}
                                               for n, p in self.profiles.items()}}))
            return
        best = P.select(list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor) \
            or self.profiles[self.current]
        self.current = best.name
        for name, p in self.profiles.items():
            target = P.greedy_depth(p.exit_hist, self.cfg.greedy_share, p.num_layers)
            if p.exit_hist and target != p.depth:
                p.depth = await self.handles[name].load_layers.remote(target)
                self._log(P.Decision(P.Action.LOAD_LAYERS, name, p.depth, f"greedy loading: {self.cfg.greedy_share:.0%} "
                                     "of calibrated exits happen by this depth", {"exit_hist": p.exit_hist}))
        self._log(P.Decision(P.Action.SELECT, self.current, self.profiles[self.current].depth,
                             "initial selection by calibrated quality and objective",
                             {"objective": self.cfg.objective.value, "quality_floor": self.cfg.quality_floor}))

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bad tick must not end the control loop
                log.exception("controller tick failed")
            await asyncio.sleep(self.cfg.tick_s)

    async def tick(self) -> P.Decision | None:
        for name in self.names:
            window = self.reader.window(name, windows=self.cfg.windows)
            p = self.profiles[name]
            if window.tokens:
                p.tokens_per_s = window.tokens_per_busy_s
                p.step_ms = window.busy_ms / max(window.steps, 1)
                p.greedy_rate = window.greedy_rate
                p.mean_exit_layer = window.mean_exit_layer
            if window.shadow_checked >= self.cfg.min_shadow_checks:  # live quality replaces calibration's
                p.agreement = window.live_agreement
            if window.tokens:
                self.redis.hset(PROFILES, name, json.dumps({f: getattr(p, f) for f in MEASURED}))
            tokens, breaches = self._totals(name)
            old_t, old_b = self.seen.get(name, (0, 0))
            self.seen[name] = (tokens, breaches)
            if name == self.current and tokens > old_t:
                self.breaches.observe(min(breaches - old_b, tokens - old_t), tokens - old_t)
        if self.cfg.thresholds.enabled:
            for name in self.names:
                await self._tune(name)
        if self._reselect and all(p.tokens_per_s > 0 for p in self.profiles.values()):
            self._reselect = False
            best = P.select(list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor)
            if best is not None:
                changed = best.name != self.current
                if changed:
                    self.current = best.name
                    self.breaches.reset()
                self._log(P.Decision(P.Action.SELECT, best.name, best.depth, "profiling round measured: best by objective "
                                     f"within the quality floor ({'switched' if changed else 'kept'})",
                                     {"objective": self.cfg.objective.value, "profiles": self.state()["profiles"]}))
        if not self.breaches.tripped or self.pinned:
            return None
        cur = self.profiles[self.current]
        decision = P.on_breach(cur, list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor)
        decision.evidence["breaches_in_window"] = self.breaches.count
        if decision.action is P.Action.LOAD_DEEPER:
            cur.depth = await self.handles[self.current].load_layers.remote(decision.depth)
        elif decision.action is P.Action.SWITCH:
            self.current = decision.candidate
        self.breaches.reset()
        self._log(decision)
        return decision

    async def _tune(self, name: str) -> None:
        changes = self.tuners[name].observe(self.reader.shadow_by_layer(name))
        if not changes:
            return
        served = await self.handles[name].set_thresholds.remote({c.layer: c.new for c in changes})
        self._log(P.Decision(P.Action.SET_THRESHOLDS, name, self.profiles[name].depth, "; ".join(c.reason for c in changes),
                             {"changes": [asdict(c) for c in changes], "floor": self.cfg.thresholds.floor,
                              "thresholds": served}))

    # ---- helpers ---------------------------------------------------------------------------------
    def _totals(self, name: str) -> tuple[int, int]:
        t = self.reader.totals(name)
        return t.tokens, t.breaches

    def _log(self, decision: P.Decision) -> None:
        entry = {**decision.to_dict(), "t": time.time()}
        pipe = self.redis.pipeline()
        pipe.xadd(DECISIONS, {"decision": json.dumps(entry)}, maxlen=10_000, approximate=True)
        pipe.hset(STATE, mapping={"current": self.current, "pinned": self.pinned or "",
                                  **{depth_field(n): p.depth for n, p in self.profiles.items()}})
        pipe.execute()
        self.metrics.decision(decision.action.value, decision.candidate)


def ensure_controller(config: dict, telemetry: dict, deployments: dict[str, str], app_name: str):
    """The named, detached controller actor: the running one, or a new one."""
    cfg = ControllerConfig.model_validate(config)
    return HeliosController.options(name=cfg.actor_name, namespace=cfg.namespace, lifetime="detached",
                                    get_if_exists=True).remote(config, telemetry, deployments, app_name)
