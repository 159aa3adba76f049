"""HELIOS control policies as plain Python: no Ray, no Redis, no GPU.

The controller actor feeds these with telemetry and calibration facts and acts on what they
return; every decision carries the evidence it was made on.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from engine.memory import MemoryModel
from engine.thresholds import depth_for_share


class Objective(str, enum.Enum):
    MAX_THROUGHPUT = "max_throughput"
    MIN_LATENCY = "min_latency"
    MAX_BATCH = "max_batch"
    MIN_ENERGY = "min_energy"


@dataclass(slots=True)
class CandidateProfile:
    """What the controller knows of one candidate: static facts plus the last measurements."""

    name: str
    num_layers: int
    depth: int  # layers loaded now
    agreement: float  # calibrated (or live, shadow-verified) agreement with the full model
    tokens_per_s: float = 0.0  # measured while busy
    step_ms: float = 0.0  # mean decode step latency (TPOT proxy)
    greedy_rate: float = 0.0  # share of tokens that left unconfident at the last loaded layer
    memory: MemoryModel | None = None  # the replica's bytes by depth (None: capacity is `batch_cap` at any depth)
    budget: int | None = None  # the replica's memory budget for weights plus KV
    batch_cap: int = 1  # its max_batch_size: the most sequences whatever the budget
    mean_exit_layer: float = 0.0
    exit_hist: dict[int, int] = field(default_factory=dict)  # calibration's exit layer -> tokens

    @classmethod
    def from_calibration(cls, name: str, num_layers: int, depth: int, calibration: dict | None,
                         memory: dict[str, int]) -> "CandidateProfile":
        """Before any measurement: quality and exit depths from the calibration report (a candidate
        without one is trusted only at full depth), sizes from the engine's `memory_bytes()`."""
        cal = calibration or {}
        return cls(name=name, num_layers=num_layers, depth=depth,
                   agreement=cal.get("agreement", 1.0 if depth == num_layers else 0.0),
                   memory=MemoryModel(**memory["model"]), budget=memory.get("budget"),
                   batch_cap=memory["cap"],
                   exit_hist={int(k): v for k, v in cal.get("exit_share_by_layer", {}).items()})

    def max_batch(self) -> int:
        """Sequences the replica holds at this profile's depth: what its engine would size its cache to."""
        if self.memory is None:
            return self.batch_cap
        return self.memory.capacity(self.depth, self.budget, self.batch_cap)

    def energy_per_token(self) -> float:
        """Proxy: layers computed per token (energy follows compute on a busy accelerator)."""
        return self.mean_exit_layer or float(self.depth)


def score(p: CandidateProfile, objective: Objective) -> float:
    """Higher is better for every objective."""
    if objective is Objective.MAX_THROUGHPUT:
        return p.tokens_per_s
    if objective is Objective.MIN_LATENCY:
        return -p.step_ms if p.step_ms else -math.inf
    if objective is Objective.MAX_BATCH:
        return float(p.max_batch())
    return -p.energy_per_token()


def select(profiles: list[CandidateProfile], objective: Objective, quality_floor: float) -> CandidateProfile | None:
    """The best candidate by the objective among those meeting the quality floor."""
    eligible = [p for p in profiles if p.agreement >= quality_floor]
    return max(eligible, key=lambda p: score(p, objective), default=None)


def greedy_depth(exit_hist: dict[int, int], share: float, num_layers: int) -> int:
    """Greedy loading: the fewest layers that cover `share` of calibrated exits."""
    return depth_for_share(exit_hist, share) if exit_hist else num_layers


class BreachCounter:
    """Confidence breaches over a sliding window of the most recent tokens (HELIOS: 100 / 50)."""

    def __init__(self, window: int = 100, max_breaches: int = 50):
        self.window, self.max_breaches = window, max_breaches
        self._flags: deque[bool] = deque(maxlen=window)

    def observe(self, breaches: int, tokens: int) -> None:
        # spread a batch's breaches over its tokens; order inside one step carries no meaning
        self._flags.extend([True] * breaches + [False] * (tokens - breaches))

    @property
    def count(self) -> int:
        return sum(self._flags)

    @property
    def tripped(self) -> bool:
        return len(self._flags) >= self.window and self.count > self.max_breaches

    def reset(self) -> None:
        self._flags.clear()


class Action(str, enum.Enum):
    """What a decision did; its value is what the decision log and the metrics label say."""

    SELECT = "select"  # routing chose a candidate (initial, or after a profiling round)
    LOAD_LAYERS = "load_layers"  # greedy loading at start: the depth that covers most calibrated exits
    LOAD_DEEPER = "load_deeper"  # breaches tripped: grow the serving candidate's depth
    SWITCH = "switch"  # breaches tripped: route to another candidate
    HOLD = "hold"  # breaches tripped but nothing better exists
    RESTORE = "restore"  # state read back from Redis after a restart
    REPROFILE = "reprofile"  # operator: start a profiling round
    PIN = "pin"  # operator: route everything to one candidate
    UNPIN = "unpin"
    SET_DEPTH = "set_depth"  # operator: load a depth
    SET_THRESHOLDS = "set_thresholds"  # operator or live tuning: move exit thresholds


@dataclass(slots=True)
class Decision:
    action: "Action"
    candidate: str
    depth: int
    reason: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "action": self.action.value}


def on_breach(current: CandidateProfile, others: list[CandidateProfile], objective: Objective,
              quality_floor: float) -> Decision:
    """Load deeper or switch, whichever is predicted to serve the objective better.

    Deeper: compute per token grows with depth, so throughput is predicted to fall by
    depth/new_depth and step latency to rise likewise. Switching: the other candidate's last
    profile, if it meets the quality floor.
    """
    step = max(2, math.ceil(current.num_layers * max(current.greedy_rate, 0.1)))
    new_depth = min(current.num_layers, current.depth + step)
    evidence = {"greedy_rate": current.greedy_rate, "depth": current.depth, "objective": objective.value}
    deeper = None
    if new_depth > current.depth:
        ratio = current.depth / new_depth
        deeper = replace(current, depth=new_depth, tokens_per_s=current.tokens_per_s * ratio,
                         step_ms=current.step_ms / ratio, mean_exit_layer=current.mean_exit_layer / ratio)
    options = [p for p in others if p.name != current.name and p.agreement >= quality_floor]
    best_other = max(options, key=lambda p: score(p, objective), default=None)
    if deeper is None and best_other is None:
        return Decision(Action.HOLD, current.name, current.depth, "breaching at full depth with no eligible candidate",
                        evidence)
    s_deeper = score(deeper, objective) if deeper else -math.inf
    s_other = score(best_other, objective) if best_other else -math.inf
    evidence.update({"predicted_deeper": s_deeper, "predicted_switch": s_other,
                     "switch_to": best_other.name if best_other else None})
    if s_deeper >= s_other:
        return Decision(Action.LOAD_DEEPER, current.name, new_depth,
                        f"breaches over limit; {current.depth}->{new_depth} layers predicted better than switching",
                        evidence)
    return Decision(Action.SWITCH, best_other.name, best_other.depth,
                    f"breaches over limit; {best_other.name} predicted better than loading deeper", evidence)


class ProfilingSchedule:
    """Every `every` requests, the next `sample` requests per candidate go to that candidate."""

    def __init__(self, candidates: list[str], every: int = 150, sample: int = 5):
        self.candidates, self.every, self.sample = candidates, every, sample
        self.seen = 0
        self._queue: list[str] = self._round()  # profile at start

    def _round(self) -> list[str]:
        return [c for c in self.candidates for _ in range(self.sample)]

    def start_round(self) -> None:
        """Profile every candidate again, beginning with the next request."""
        self._queue = self._round()

    def next(self) -> str | None:
        """The candidate a new request must be profiled on, or None to follow the routing table."""
        self.seen += 1
        if self.seen % self.every == 0:
            self._queue = self._round()
        return self._queue.pop(0) if self._queue else None

    @property
    def profiling(self) -> bool:
        return bool(self._queue)

    @property
    def pending(self) -> int:
        """Requests the current profiling round still routes."""
        return len(self._queue)
