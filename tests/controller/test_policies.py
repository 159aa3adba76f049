"""HELIOS policies on plain data."""
import pytest

from controller.policies import (BreachCounter, CandidateProfile, Objective, ProfilingSchedule, greedy_depth,
                                 on_breach, select)
from engine.memory import MemoryModel

SMOL = MemoryModel(base_bytes=110 << 20, layer_bytes=14 << 20, kv_layer_bytes=1536 << 10, sequence_bytes=2 << 20,
                   num_layers=30)


def _p(name, **kw):
    base = dict(num_layers=30, depth=24, agreement=0.96, tokens_per_s=100.0, step_ms=50.0, memory=SMOL,
                budget=1 << 30, batch_cap=256, mean_exit_layer=20.0)
    return CandidateProfile(name, **{**base, **kw})


def test_select_respects_objective_and_quality_floor():
    a = _p("a", tokens_per_s=120, step_ms=60, mean_exit_layer=22)
    b = _p("b", tokens_per_s=90, step_ms=40, mean_exit_layer=12, depth=18)
    bad = _p("bad", tokens_per_s=500, step_ms=5, agreement=0.80)
    assert select([a, b, bad], Objective.MAX_THROUGHPUT, 0.9).name == "a"
    assert select([a, b, bad], Objective.MIN_LATENCY, 0.9).name == "b"
    assert select([a, b, bad], Objective.MIN_ENERGY, 0.9).name == "b"
    assert select([a, b, bad], Objective.MAX_BATCH, 0.9).name == "b"  # shallower: more sequences fit
    assert select([bad], Objective.MAX_THROUGHPUT, 0.9) is None


def test_max_batch_is_what_the_replica_would_hold_at_that_depth():
    p, shallow = _p("a"), _p("a", depth=12)
    assert shallow.max_batch() > p.max_batch() > 0
    assert p.max_batch() == SMOL.capacity(24, 1 << 30, 256)
    assert _p("a", batch_cap=4).max_batch() == 4
    assert _p("a", budget=None, batch_cap=8).max_batch() == _p("a", depth=12, budget=None, batch_cap=8).max_batch() == 8


def test_greedy_depth_covers_share():
    assert greedy_depth({6: 40, 12: 30, 20: 20, 30: 10}, 0.9, 30) == 20
    assert greedy_depth({}, 0.9, 30) == 30


def test_breach_counter_sliding_window():
    c = BreachCounter(window=100, max_breaches=50)
    c.observe(40, 60)
    assert not c.tripped  # window not full yet
    c.observe(20, 40)
    assert c.count == 60 and c.tripped
    c.observe(0, 100)
    assert c.count == 0 and not c.tripped


def test_on_breach_prefers_deeper_unless_another_candidate_is_better():
    cur = _p("a", depth=15, greedy_rate=0.4, tokens_per_s=100)
    weak = _p("b", tokens_per_s=40)
    d = on_breach(cur, [cur, weak], Objective.MAX_THROUGHPUT, 0.9)
    assert d.action == "load_deeper" and d.depth == 27 and d.candidate == "a"
    assert d.evidence["predicted_deeper"] == pytest.approx(100 * 15 / 27)
    strong = _p("c", tokens_per_s=80)
    d = on_breach(cur, [strong], Objective.MAX_THROUGHPUT, 0.9)
    assert d.action == "switch" and d.candidate == "c"
    full = _p("a", depth=30, greedy_rate=0.5)
    assert on_breach(full, [], Objective.MAX_THROUGHPUT, 0.9).action == "hold"


def test_profiling_schedule_samples_each_candidate_at_start_and_every_n():
    s = ProfilingSchedule(["a", "b"], every=20, sample=2)
    first = [s.next() for _ in range(6)]
    assert first == ["a", "a", "b", "b", None, None]
    rest = [s.next() for _ in range(14)]
    assert rest[-1] == "a" and s.profiling  # request 20 starts a new round


def test_profile_from_calibration_trusts_an_uncalibrated_candidate_only_at_full_depth():
    mem = {"model": SMOL.to_dict(), "budget": 1 << 30, "cap": 64, "capacity": 20}
    cal = {"agreement": 0.96, "exit_share_by_layer": {"8": 3, "30": 7}}
    p = CandidateProfile.from_calibration("a", 30, 24, cal, mem)
    assert (p.agreement, p.exit_hist, p.memory, p.budget, p.batch_cap) == (0.96, {8: 3, 30: 7}, SMOL, 1 << 30, 64)
    assert CandidateProfile.from_calibration("b", 30, 30, None, mem).agreement == 1.0
    assert CandidateProfile.from_calibration("c", 30, 24, None, mem).agreement == 0.0
