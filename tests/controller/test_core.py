"""The controller's decision loop (controller.core) on plain data, and the benchmark's HELIOS router
carrying out that loop's decisions on engines."""
from dataclasses import asdict, dataclass, field

import pytest

from bench.serving import Helios
from controller.config import ControllerConfig
from controller.core import ControllerCore
from controller.policies import Action, CandidateProfile
from engine.sequence import ExitRecord
from telemetry.schema import WindowStats
from tests.controller.test_policies import SMOL

CFG = ControllerConfig(profile_sample=1, breach_window=10, breach_max=4, quality_floor=0.9)


def _profiles(**depths) -> dict[str, CandidateProfile]:
    return {n: CandidateProfile(n, num_layers=30, depth=d, agreement=0.97, memory=SMOL, budget=1 << 30, batch_cap=8,
                                exit_hist={12: 60, 20: 30, 30: 10})
            for n, d in depths.items()}


def _window(name: str, tokens: int, busy_ms: float, greedy: int = 0) -> WindowStats:
    return WindowStats(name, 1, exits={20: tokens}, tokens=tokens, greedy=greedy, breaches=greedy, steps=tokens,
                       busy_ms=busy_ms)


def test_greedy_loading_then_profiling_then_selection_by_measured_speed():
    core = ControllerCore(CFG, ["b", "a"])
    loads = core.greedy_loads(_profiles(a=30, b=30))
    assert [(d.action, d.candidate, d.depth) for d in loads] == [(Action.LOAD_LAYERS, "a", 20),
                                                                 (Action.LOAD_LAYERS, "b", 20)]
    for d in loads:
        core.loaded(d.candidate, d.depth)
    assert core.initial_select().action is Action.SELECT and core.current == "a"
    assert [core.route() for _ in range(3)] == ["a", "b", "a"]  # one profiling request each, then the choice
    assert core.decide() == []  # nothing measured yet
    core.observe("a", _window("a", 10, 500.0), 10, 0)  # 20 tok/s
    core.observe("b", _window("b", 10, 200.0), 10, 0)  # 50 tok/s
    [d] = core.decide()
    assert (d.action, d.candidate, core.current) == (Action.SELECT, "b", "b")
    assert core.decide() == []  # chosen once per round


def test_breaches_load_deeper_then_switch_and_a_pin_holds():
    core = ControllerCore(CFG, ["a", "b"])
    core.greedy_loads(_profiles(a=20, b=30))
    core.initial_select()
    for n, ms in (("a", 100.0), ("b", 1000.0)):
        core.observe(n, _window(n, 10, ms), 0, 0)
    core.observe("a", _window("a", 10, 100.0, greedy=8), 10, 8)  # 8 of 10 tokens breached
    [d] = core.decide()
    assert (d.action, d.candidate, d.depth) == (Action.LOAD_DEEPER, "a", 30)
    core.loaded("a", 30)
    core.observe("a", _window("a", 10, 100.0, greedy=8), 10, 8)  # breaching at full depth: b is the way out
    [d] = core.decide()
    assert (d.action, d.candidate, core.current) == (Action.SWITCH, "b", "b")
    core.pin("a")
    core.observe("a", _window("a", 10, 100.0, greedy=8), 10, 8)
    assert core.decide() == [] and core.route() == "a"


@dataclass
class ScriptedEngine:
    """What the HELIOS router reads of an engine; it loads what it is told."""

    num_layers: int = 30
    depth: int = 30
    loads: list[int] = field(default_factory=list)

    @property
    def exits(self):
        return type("Bank", (), {"meta": {"agreement": 0.97, "exit_share_by_layer": {"12": 60, "20": 30, "30": 10}}})

    def memory_bytes(self) -> dict:
        return {"model": asdict(SMOL), "budget": 1 << 30, "cap": 8}

    def load_layers(self, depth: int) -> None:
        self.loads.append(depth)
        self.depth = depth


def _exits(n: int, breaches: int) -> list[ExitRecord]:
    return [ExitRecord(f"r{i}", i, 20, 0.5, i < breaches, "m", 20) for i in range(n)]


def test_the_benchmark_router_carries_out_the_cores_decisions():
    greedy, full = ScriptedEngine(), ScriptedEngine()
    router = Helios({"m@greedy": greedy, "m@full": full}, CFG, greedy_loaded=["m@greedy"])
    assert greedy.loads == [20] and full.loads == []  # greedy loading only where asked
    assert [d["action"] for d in router.decisions] == ["load_layers", "select"]
    assert router.core.current == "m@greedy"  # nothing measured, calibrated quality alike: the first
    assert router.core.schedule.pending == 2  # what bench.helios.start_up serves before the clock starts
    assert [router.route(None) for _ in range(2)] == ["m@full", "m@greedy"]  # the profiling round
    assert router.core.schedule.pending == 0
    router.observe("m@full", _exits(10, 0), 10, 1.0)  # 10 tok/s
    router.observe("m@greedy", _exits(10, 0), 20, 0.2)  # 50 tok/s: selected again, now on measurements
    assert router.decisions[-1]["action"] == "select" and "kept" in router.decisions[-1]["reason"]
    router.observe("m@greedy", _exits(10, 8), 30, 0.2)  # breaches trip: deeper
    assert router.decisions[-1]["action"] == "load_deeper" and greedy.depth == router.core.profiles["m@greedy"].depth
    assert greedy.loads == [20, greedy.depth] and greedy.depth > 20


def test_the_benchmarks_controller_settings_are_the_configs_fields():
    from bench.helios import controller_config

    cfg = controller_config({"profile_sample": 1}, ["breach_window=8", "objective=min_latency"])
    assert (cfg.breach_window, cfg.objective.value, cfg.profile_sample) == (8, "min_latency", 1)
    with pytest.raises(SystemExit, match="breach_windw"):  # a typo is refused, naming the field
        controller_config({}, ["breach_windw=8"])
