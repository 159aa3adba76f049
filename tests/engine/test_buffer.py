"""DREX's rebatching buffer on the real SmolLM2: rows that continue past an exit point wait for the
next step's, and nothing a request sees changes but when its token arrives."""
import time
from collections import defaultdict

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.buffer import BufferPlanner, HoldDecision
from engine.rebatch import LayerCost
from tests.conftest import PROMPTS

MIXED = {l: 0.6 for l in range(2, 30, 2)}  # rows leave at different layers, some continue
WEIGHT_BOUND = LayerCost(layer_fixed_s=1e-3, layer_per_row_s=5e-5, fill_fixed_s=0.0, fill_per_row_s=0.0,
                         split_s=0.0, step_fixed_s=5e-3)


class AlwaysHold(BufferPlanner):
    """Holds whenever the engine offers: the buffer's bookkeeping under the most traffic."""

    def decide(self, rows, continuing, layer, depth):
        return HoldDecision(True, 0.0, 1.0)


def test_art_holds_few_continuing_rows_where_a_layer_costs_its_weight_reads():
    art = BufferPlanner(WEIGHT_BOUND)
    assert art.decide(rows=8, continuing=1, layer=10, depth=30).hold
    d = art.decide(rows=8, continuing=7, layer=10, depth=30)  # the next step would run its shallow layers half empty
    assert not d.hold and d.per_token_s > d.baseline_per_token_s and d.reason.startswith("forwarding")
    assert not art.decide(rows=8, continuing=1, layer=28, depth=30).hold  # two layers left: little to share
    assert not art.decide(rows=1, continuing=1, layer=10, depth=30).hold  # nobody to merge with
    assert not art.decide(rows=8, continuing=8, layer=10, depth=30).hold
    compute_bound = LayerCost(1e-5, 1e-3, 0.0, 0.0, 0.0, step_fixed_s=5e-3)
    assert not BufferPlanner(compute_bound).decide(rows=8, continuing=1, layer=10, depth=30).hold


def _engine(ref, **kw):
    # every point checked, so runs with and without the buffer see the same checks
    return LLMEngine(EngineConfig(model="smollm2", home=ref.home, exit_policy="buffer", max_batch_size=4,
                                  thresholds=MIXED, exit_gate=False, **kw))


def _run(engine, params):
    """Each request's tokens and exit records, and (time, request id, record) of every token."""
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    tokens, records, stamps = defaultdict(list), defaultdict(list), []
    while engine.has_unfinished():
        out = engine.step()
        now = time.perf_counter()
        for o in out.outputs:
            tokens[o.request_id] += o.new_token_ids
            assert o.finish_reason in (None, "length")
        for r in out.exits:
            records[r.request_id].append(r)
            stamps.append((now, r.request_id, r))
    return [tokens[i] for i in ids], [records[i] for i in ids], stamps


def test_held_rows_decode_the_same_tokens_through_the_same_exits(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = _engine(ref)
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * len(PROMPTS)
    engine.buffer = None  # the same engine without the buffer: within-step rebatching only
    plain_tokens, plain_records, _ = _run(engine, params)
    assert engine.stats.held == 0
    engine.buffer = AlwaysHold(engine.planner.cost)
    tokens, records, _ = _run(engine, params)
    assert engine.stats.held > 0
    assert tokens == plain_tokens and all(len(t) == 16 for t in tokens)
    assert [[r.layer for r in rs] for rs in records] == [[r.layer for r in rs] for rs in plain_records]
    held = [r for rs in records for r in rs if r.held_s > 0]
    assert held and engine.stats.involuntary_exits == 0
    assert all(r.layer > 2 for r in held)  # a held token's exit comes after the point it waited at


def test_a_held_token_waits_one_step_at_most_and_a_tight_target_is_never_held(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = _engine(ref, tpot_slo_ms=10_000)
    engine.buffer = AlwaysHold(engine.planner.cost)
    tight = SamplingParams(max_tokens=6, ignore_eos=True, tpot_slo_ms=0.001)
    params = [tight] + [SamplingParams(max_tokens=14, ignore_eos=True)] * (len(PROMPTS) - 1)
    tokens, records, stamps = _run(engine, params)
    assert [len(t) for t in tokens] == [p.max_tokens for p in params]  # every request finishes
    assert all(r.held_s == 0 for r in records[0])
    assert any(r.held_s > 0 for rs in records[1:] for r in rs)

    # the engine's own target, near two steps: a token is held only if it still comes in time
    engine = _engine(ref)
    engine.buffer = AlwaysHold(engine.planner.cost)
    _run(engine, [SamplingParams(max_tokens=4, ignore_eos=True)] * len(PROMPTS))  # warm: step time known
    slo_s = 2.5 * engine._step_s
    engine.config = engine.config.model_copy(update={"tpot_slo_ms": slo_s * 1e3})
    _, _, stamps = _run(engine, [SamplingParams(max_tokens=14, ignore_eos=True)] * len(PROMPTS))
    steps = sorted({t for t, _, _ in stamps})
    longest = max(b - a for a, b in zip(steps, steps[1:]))
    last, held_gaps = {}, []
    for t, rid, r in stamps:
        if rid in last and r.held_s > 0:
            held_gaps.append(t - last[rid])
        last[rid] = t
    assert all(gap <= slo_s + longest for gap in held_gaps)


def test_a_depth_change_releases_held_tokens_and_every_request_finishes(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = _engine(ref)
    engine.buffer = AlwaysHold(engine.planner.cost)
    ids = [engine.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in PROMPTS]
    counts = defaultdict(int)
    while not any(s.held_since is not None for s in engine.scheduler.running):
        for o in engine.step().outputs:
            counts[o.request_id] += len(o.new_token_ids)
    engine.load_layers(20)
    assert all(s.held_since is None for s in engine.scheduler.running)
    while engine.has_unfinished():
        for o in engine.step().outputs:
            counts[o.request_id] += len(o.new_token_ids)
    assert [counts[i] for i in ids] == [10] * len(PROMPTS)


def test_the_buffer_needs_the_deferred_fill():
    with pytest.raises(ValueError, match="kv_fill"):
        EngineConfig(exit_policy="buffer", kv_fill="copy")
