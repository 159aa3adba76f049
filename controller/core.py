"""The controller's decision loop as plain Python: routing, greedy loading, selection, breach
counting and load-deeper-or-switch. The Ray actor (controller.actor) wraps it with Redis and
replica calls; `helios bench` drives the same object in process, so the two cannot disagree.

The core only decides. Whoever drives it feeds each candidate's recent telemetry (`observe`) and
carries out what a decision asks of a replica (`load_layers`), then reports the depth it got
(`loaded`).
"""
from __future__ import annotations

from controller import policies as P
from controller.config import ControllerConfig
from telemetry.schema import WindowStats


class ControllerCore:
    def __init__(self, cfg: ControllerConfig, names: list[str], current: str | None = None,
                 pinned: str | None = None):
        self.cfg = cfg
        self.names = sorted(names)
        self.schedule = P.ProfilingSchedule(self.names, cfg.profile_every, cfg.profile_sample)
        self.breaches = P.BreachCounter(cfg.breach_window, cfg.breach_max)
        self.profiles: dict[str, P.CandidateProfile] = {}
        self.current = current or self.names[0]
        self.pinned = pinned  # set by an operator: every request goes there
        self._reselect = False  # a profiling round has been routed: choose again once it is measured

    def route(self) -> str:
        """The candidate for a new request: the pinned one, a profiling round's, or the selected one."""
        if self.pinned:
            return self.pinned
        was_profiling = self.schedule.profiling
        choice = self.schedule.next()
        self._reselect |= was_profiling and not self.schedule.profiling
        return choice or self.current

    # ---- start ---------------------------------------------------------------------------------
    def greedy_loads(self, profiles: dict[str, P.CandidateProfile]) -> list[P.Decision]:
        """Take the candidates' profiles; greedy loading: per candidate with calibrated exits, the
        depth that covers `greedy_share` of them, where it differs from the loaded one."""
        self.profiles = profiles
        loads = []
        for name, p in profiles.items():
            target = P.greedy_depth(p.exit_hist, self.cfg.greedy_share, p.num_layers)
            if p.exit_hist and target != p.depth:
                loads.append(P.Decision(P.Action.LOAD_LAYERS, name, target,
                                        f"greedy loading: {self.cfg.greedy_share:.0%} of calibrated exits happen "
                                        "by this depth", {"exit_hist": p.exit_hist}))
        return loads

    def loaded(self, name: str, depth: int) -> None:
        """A replica now holds `depth` layers."""
        self.profiles[name].depth = depth

    def initial_select(self) -> P.Decision:
        """The first choice, by calibrated quality and the objective (at the depths now loaded)."""
        best = P.select(list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor) \
            or self.profiles[self.current]
        self.current = best.name
        return P.Decision(P.Action.SELECT, best.name, best.depth,
                          "initial selection by calibrated quality and objective",
                          {"objective": self.cfg.objective.value, "quality_floor": self.cfg.quality_floor})

    # ---- each tick -----------------------------------------------------------------------------
    def observe(self, name: str, window: WindowStats, new_tokens: int, new_breaches: int) -> None:
        """A candidate's recent telemetry (`window`), and the tokens and breaches it served since the
        last call: measurements replace the profile's, breaches of the serving one are counted."""
        p = self.profiles[name]
        if window.tokens:
            p.tokens_per_s = window.tokens_per_busy_s
            p.step_ms = window.busy_ms / max(window.steps, 1)
            p.greedy_rate = window.greedy_rate
            p.mean_exit_layer = window.mean_exit_layer
        if window.shadow_checked >= self.cfg.min_shadow_checks:  # live quality replaces calibration's
            p.agreement = window.live_agreement
        if name == self.current and new_tokens > 0:
            self.breaches.observe(min(new_breaches, new_tokens), new_tokens)

    def decide(self) -> list[P.Decision]:
        """What the latest observations call for: a selection once a profiling round is measured,
        load-deeper-or-switch when the breach counter trips. A SWITCH takes effect here; a
        LOAD_DEEPER asks the driver to load `depth` layers and report them with `loaded`."""
        out = []
        if self._reselect and all(p.tokens_per_s > 0 for p in self.profiles.values()):
            self._reselect = False
            best = P.select(list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor)
            if best is not None:
                changed = best.name != self.current
                if changed:
                    self.current = best.name
                    self.breaches.reset()
                out.append(P.Decision(P.Action.SELECT, best.name, best.depth, "profiling round measured: best by "
                                      f"objective within the quality floor ({'switched' if changed else 'kept'})",
                                      {"objective": self.cfg.objective.value, "profiles": self.summary()}))
        if not self.breaches.tripped or self.pinned:
            return out
        cur = self.profiles[self.current]
        decision = P.on_breach(cur, list(self.profiles.values()), self.cfg.objective, self.cfg.quality_floor)
        decision.evidence["breaches_in_window"] = self.breaches.count
        if decision.action is P.Action.SWITCH:
            self.current = decision.candidate
        self.breaches.reset()
        return out + [decision]

    # ---- operators -----------------------------------------------------------------------------
    def pin(self, candidate: str | None) -> None:
        self.pinned = candidate
        if candidate:
            self.current = candidate
            self.breaches.reset()

    def reprofile(self) -> None:
        self.schedule.start_round()
        self._reselect = False

    def summary(self) -> dict:
        return {n: {"depth": p.depth, "capacity": p.max_batch(), "tokens_per_s": p.tokens_per_s,
                    "agreement": p.agreement, "greedy_rate": p.greedy_rate} for n, p in self.profiles.items()}
