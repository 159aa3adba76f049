"""Exit policies on the real SmolLM2 with its calibrated heads: full, batch, ride_along, rebatch."""
from collections import defaultdict

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.rebatch import LayerCost, RebatchPlanner
from tests.conftest import PROMPTS

EXIT_LAYERS = range(2, 30, 2)
# splits always pay / never pay under these made-up costs: the test picks the planner's answer
ALWAYS = LayerCost(0.0, 1.0, 0.0, 0.0, 0.0)
NEVER = LayerCost(1.0, 0.0, 1.0, 0.0, 1.0)


def _engine(ref, policy, thresholds, planner=None, **kw):
    # every point checked: these tests are about what each policy does with a check (engine.exit_gate
    # leaves out checks that cannot pay, from measured timings; tests/engine/test_exit_gate.py)
    engine = LLMEngine(EngineConfig(model="smollm2", home=ref.home, exit_policy=policy, max_batch_size=4,
                                    thresholds=thresholds, exit_gate=False, **kw))
    if planner is not None:
        engine.planner = RebatchPlanner(planner)
    return engine


def _run_by_step(engine, max_tokens=12):
    """Decode steps' exit records, one list per step, and each request's tokens."""
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in PROMPTS]
    steps, tokens = [], defaultdict(list)
    while engine.has_unfinished():
        out = engine.step()
        if not out.is_prefill:
            steps.append(out.exits)
        for o in out.outputs:
            tokens[o.request_id] += o.new_token_ids
    return steps, [tokens[i] for i in ids]


def test_rebatch_equals_full_when_no_row_is_confident(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    never = {l: 1.0 for l in EXIT_LAYERS}
    steps, rebatch = _run_by_step(_engine(ref, "rebatch", never, ALWAYS))
    _, full = _run_by_step(_engine(ref, "full", never))
    assert all(r.layer == 30 for step in steps for r in step)
    assert rebatch == full


def test_rebatch_never_forces_a_row_out_and_batch_waits_for_the_slowest(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    mixed = {l: 0.6 for l in EXIT_LAYERS}
    rebatch = _engine(ref, "rebatch", mixed, ALWAYS)
    steps, _ = _run_by_step(rebatch)
    assert any(len({r.layer for r in step}) > 1 for step in steps), "rows should leave at different layers"
    assert rebatch.stats.splits > 0 and rebatch.stats.involuntary_exits == 0
    for step in steps:
        for r in step:  # every early exit cleared its own threshold
            assert r.layer == 30 or r.confidence >= mixed[r.layer]

    batch = _engine(ref, "batch", mixed)
    bsteps, _ = _run_by_step(batch)
    assert all(len({r.layer for r in step}) == 1 for step in bsteps)  # the batch leaves together
    assert batch.stats.involuntary_exits == 0
    mean = lambda ss: sum(r.layer for s in ss for r in s) / sum(len(s) for s in ss)  # noqa: E731
    assert mean(bsteps) > mean(steps)

    majority = _engine(ref, "batch", mixed, batch_quorum=0.5)
    _run_by_step(majority)  # a majority rule drags the unconfident rows out with it
    assert majority.stats.involuntary_exits > 0


def test_riding_along_gives_the_same_tokens_as_the_first_confident_head(smollm2_calibrated):
    """`ride_along` keeps done rows in the batch; `rebatch` with splits that never pay does the same."""
    ref, _ = smollm2_calibrated
    mixed = {l: 0.6 for l in EXIT_LAYERS}
    riders = _engine(ref, "ride_along", mixed)
    gsteps, gtokens = _run_by_step(riders)
    skipped = _engine(ref, "rebatch", mixed, NEVER)
    ssteps, stokens = _run_by_step(skipped)
    assert gtokens == stokens and skipped.stats.splits == 0 and skipped.stats.splits_skipped > 0
    split = _engine(ref, "rebatch", mixed, ALWAYS)
    _run_by_step(split)
    assert split.stats.row_layers < riders.stats.row_layers  # leaving rows stop costing compute


def test_planner_splits_only_when_the_smaller_batch_pays_for_the_regroup():
    weight_bound = LayerCost(layer_fixed_s=3e-3, layer_per_row_s=1e-5, fill_fixed_s=1e-3, fill_per_row_s=1e-6,
                             split_s=1e-4)
    compute_bound = LayerCost(layer_fixed_s=1e-4, layer_per_row_s=1e-3, fill_fixed_s=5e-5, fill_per_row_s=1e-5,
                              split_s=2e-3)
    assert not RebatchPlanner(weight_bound).decide(rows=8, leaving=4, remaining_layers=10).split
    d = RebatchPlanner(compute_bound).decide(rows=32, leaving=16, remaining_layers=10)
    assert d.split and d.reason == "pays" and d.saved_s > d.cost_s
    # with one layer left, one leaving row saves less than the regroup costs
    assert not RebatchPlanner(compute_bound).decide(rows=32, leaving=1, remaining_layers=1).split
    # a split that turns the stayers' cache reads from a view into a gather pays that on every layer
    gathering = LayerCost(1e-4, 1e-3, 5e-5, 1e-5, 2e-3, gather_per_token_s=1e-6)
    keeps_view = RebatchPlanner(gathering).decide(rows=8, leaving=2, remaining_layers=10, context=900)
    loses_view = RebatchPlanner(gathering).decide(rows=8, leaving=2, remaining_layers=10, context=900,
                                                  loses_view=True)
    assert keeps_view.split and not loses_view.split and loses_view.cost_s > keeps_view.cost_s


@pytest.mark.parametrize("field, value", [("exit_policy", "sometimes"), ("batch_quorum", 0.0)])
def test_bad_policy_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
