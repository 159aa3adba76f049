"""Live threshold tuning as pure policy: scripted shadow counts in, threshold changes out."""
from controller.thresholds import OFF, ThresholdTuner, TunerConfig


def _tuner(**kw):
    return ThresholdTuner(TunerConfig(floor=0.9, margin=0.05, step=0.05, min_checks=10, max_threshold=0.95, **kw),
                          {4: 0.7, 8: 0.8, 12: OFF})


def test_a_layer_under_the_floor_is_raised_and_one_with_margin_lowered():
    t = _tuner()
    changes = t.observe({4: (10, 6), 8: (10, 10), 12: (10, 0)})
    assert [(c.layer, c.old, c.new) for c in changes] == [(4, 0.7, 0.75), (8, 0.8, 0.75)]
    assert changes[0].agreement == 0.6 and changes[0].checks == 10 and "raised" in changes[0].reason
    assert t.thresholds == {4: 0.75, 8: 0.75, 12: OFF}  # a switched-off layer stays off


def test_each_judgement_uses_only_checks_made_since_the_last_one():
    t = _tuner()
    t.observe({4: (10, 6)})
    assert t.observe({4: (19, 15)}) == []  # 9 new checks: not enough to judge
    change, = t.observe({4: (20, 16)})  # the 10 since the raise all agree: lowered again
    assert (change.old, change.new, change.agreement) == (0.75, 0.7, 1.0)
    assert t.observe({4: (30, 25)}) == []  # 0.9 <= agreement < floor + margin: hold


def test_raising_past_the_bound_switches_the_layer_off_and_greedy_exits_are_left_alone():
    t = _tuner()
    t.thresholds[4] = 0.95
    change, = t.observe({0: (50, 0), 4: (10, 0)})  # layer 0: greedy exits, no threshold of theirs
    assert change.new == OFF and "switched off" in change.reason
    assert t.observe({4: (40, 0)}) == []


def test_reset_adopts_thresholds_set_from_outside_and_forgets_older_checks():
    t = _tuner()
    t.reset({4: 0.9, 8: 0.8, 12: OFF}, {4: (100, 10)})
    assert t.observe({4: (105, 15)}) == []
    change, = t.observe({4: (110, 20)})
    assert change.old == 0.9 and change.new == 0.85  # the 10 checks since the reset all agree
