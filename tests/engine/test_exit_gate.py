"""The exit gate: an exit point is checked in a step only when the batch could leave there often
enough to pay for the check."""
import math
import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.exit_gate import NEVER, ExitGate
from engine.rebatch import LayerCost, measure_cost
from tests.conftest import PROMPTS

COST = LayerCost(layer_fixed_s=1e-3, layer_per_row_s=1e-4, fill_fixed_s=5e-4, fill_per_row_s=0.0, split_s=0.0)


def _gate(check_s=2e-4, **kw):
    return ExitGate(COST, check_s, **kw)


def test_a_point_is_checked_while_the_whole_batch_leaving_there_pays_for_the_check():
    gate = _gate()
    points = [12, 28]
    assert gate.plan(points, rows=8, depth=30) == {12, 28}  # the first step explores
    # 3 of 4 rows confident by 28, 1 of 4 by 12, over many steps
    for _ in range(50):
        gate.observe({12, 28}, [12, 28, 28, NEVER])
    assert 0.24 < gate.confident_by(12) < 0.27 and 0.73 < gate.confident_by(28) < 0.76
    # batch 1: 0.25 * 18 layers * 1 ms and 0.75 * 2 * 1 ms both beat a 0.2 ms check
    assert gate.plan(points, rows=1, depth=30) == {12, 28}
    # batch 8: 0.25**8 and 0.75**8 make the layers after either point a poor bet
    skipped = gate.skipped
    assert gate.plan(points, rows=8, depth=30) == set() and gate.skipped == skipped + 2
    # batch 4 with the 28 point's 0.75**4 * 2 ms = 0.63 ms: worth it; 12's 0.004 * 18 ms: not
    assert gate.plan(points, rows=4, depth=30) == {28}


def test_sparing_the_lm_head_makes_a_deep_point_pay_at_a_larger_batch():
    gate, with_head = _gate(3e-4), _gate(3e-4, head_s=4e-3)  # the exit vocabulary spares 4 ms of LM head
    for g in (gate, with_head):
        for _ in range(50):
            g.observe({28}, [28, 28, 28, NEVER])
    # batch 8: 0.75**8 * 2 ms = 0.2 ms is below a 0.3 ms check; with the head 0.75**8 * 6 ms = 0.6 ms is not
    assert gate.plan([28], rows=8, depth=30) == {28}  # the first step explores
    assert gate.plan([28], rows=8, depth=30) == set()
    with_head.plan([28], rows=8, depth=30)
    assert with_head.plan([28], rows=8, depth=30) == {28}


def test_every_sixteenth_step_explores_and_an_unseen_point_is_checked():
    gate = _gate(explore_every=16)
    for _ in range(200):
        gate.observe({20}, [NEVER] * 8)
    plans = [gate.plan([20], rows=8, depth=30) for _ in range(32)]
    assert [i for i, p in enumerate(plans) if p] == [0, 16]
    assert math.isclose(gate.confident_by(14), 0.5)  # never observed: checked while it could pay
    assert 14 in gate.plan([14, 20], rows=1, depth=30)


def test_a_point_after_a_checked_one_is_priced_by_the_tokens_it_adds():
    gate = _gate(check_s=1e-3, head_s=2e-3)
    for _ in range(5):  # at batch 1: half the tokens confident by 26, one in twenty first at 28
        for confident_at in [26] * 10 + [28] + [NEVER] * 9:
            gate.observe({26, 28}, [confident_at])
    gate.steps = 1  # past the exploring step
    assert gate.plan([28], rows=1, depth=30) == {28}  # alone, 0.55 * (2 layers + the head) beats the check
    # after 26 it runs on the half of the steps still there and ends 1 in 10 of them: not worth it
    gate.steps = 1
    assert gate.plan([26, 28], rows=1, depth=30) == {26}


def test_the_check_cost_follows_what_checks_cost_in_the_steps():
    gate = _gate(check_s=1e-3)
    for _ in range(100):
        gate.observe_check(3e-3)
    assert math.isclose(gate.check_s, 3e-3, rel_tol=1e-3)
    gate.check_weight = 0.0
    gate.observe_check(1.0)
    assert math.isclose(gate.check_s, 3e-3, rel_tol=1e-3)


def test_the_saving_of_a_layer_is_net_of_the_kv_its_tokens_still_need():
    assert _gate(kv_fill="deferred").saved_per_layer_s(8) == COST.layer_fixed_s  # rows' KV rides a later step
    assert _gate(kv_fill="none").saved_per_layer_s(8) == COST.layer_s(8)
    assert _gate(kv_fill="copy").saved_per_layer_s(8) == COST.layer_s(8) - COST.fill_s(8)


def test_with_one_slot_the_per_row_cost_is_what_a_second_column_adds(smollm2, monkeypatch):
    # at batch 1 a deferred token rides its row's next step as a second column: the gate must net
    # that out of what a skipped layer saves, so the cost model has to price it even with one slot
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=1, tune_matmuls=False))

    def layer(i, h, ctx):  # a layer of known cost: 2 ms, plus 4 ms per token it runs
        time.sleep(2e-3 + 4e-3 * h.shape[0] * h.shape[1])
        return h

    monkeypatch.setattr(engine.model, "layer_forward", layer)
    cost = measure_cost(engine.model, 1)
    assert cost.layer_per_row_s == pytest.approx(4e-3, rel=0.25)
    assert cost.layer_fixed_s == pytest.approx(2e-3, abs=1e-3)


def test_a_gate_that_checks_nothing_serves_full_depth_tokens_and_one_that_checks_all_changes_nothing(
        smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = LLMEngine(EngineConfig(model="smollm2", home=ref.home, max_batch_size=4,
                                    thresholds={l: 0.6 for l in range(2, 30, 2)}))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    gate = engine.gate
    assert gate is not None and gate.check_s > 0 and gate.cost.layer_fixed_s > 0  # measured at start-up

    def run():
        results = engine.generate(PROMPTS, params)
        return [r.token_ids for r in results], [e.layer for r in results for e in r.exits]

    start = gate.check_s
    run()
    assert gate.check_s != start and gate.check_s > 0  # the steps report what their checks cost
    engine.gate = None
    ungated, ungated_layers = run()
    assert min(ungated_layers) < 30
    gate.check_weight = 0.0  # the costs set below stay as set
    engine.gate, gate.check_s, skipped = gate, 0.0, gate.skipped  # every check pays
    assert run() == (ungated, ungated_layers) and gate.skipped == skipped
    gate.check_s, gate.explore_every = math.inf, 10**9  # no check pays, and none explores
    results = engine.generate(PROMPTS, params)
    assert gate.skipped > 0 and engine.stats.checks_skipped == gate.skipped
    # the prefill's first token is checked as ever; every decode step runs the full stack
    assert all(e.layer == 30 for r in results for e in r.exits[1:])


def test_under_the_buffer_a_point_is_also_checked_where_few_rows_are_expected_to_continue():
    from engine.buffer import BufferPlanner, HoldDecision

    class HoldsOne(BufferPlanner):
        def decide(self, rows, continuing, layer, depth):
            return HoldDecision(continuing == 1, 0.0, 1.0)

    gate = _gate(check_s=1.0, buffer=HoldsOne(COST))  # the batch leaving never pays for such a check
    for _ in range(50):
        gate.observe({12, 20}, [12] * 7 + [NEVER])  # 7 of 8 rows by 12: one expected to continue
    gate.steps = 1  # past the exploring step
    assert gate.plan([12], rows=8, depth=30) == {12}
    assert _gate(check_s=1.0).plan([12], rows=8, depth=30) == {12}  # (its own first step explores)
