"""Threshold choice and exit simulation: pure logic on synthetic scores."""
import pytest
import torch

from types import SimpleNamespace

from engine.thresholds import OFF, choose_rule, choose_threshold, depth_for_share, gate, halves, place_exits, simulate


def test_one_threshold_holds_the_target_in_every_domain():
    # tokens 0-3 code, 4-7 chat; at layer 2 the chat tokens are confident but often wrong
    conf = {2: torch.tensor([0.9, 0.9, 0.9, 0.6, 0.85, 0.85, 0.96, 0.96]),
            4: torch.tensor([0.99] * 8)}
    agree = {2: torch.tensor([True, True, True, False, False, False, True, True]),
             4: torch.tensor([True] * 8)}
    domain = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    code = torch.arange(4)
    code_only = choose_threshold({l: c[code] for l, c in conf.items()}, {l: a[code] for l, a in agree.items()},
                                 domain[code], 0.95, num_layers=6)
    both = choose_threshold(conf, agree, domain, 0.95, num_layers=6)
    assert code_only == pytest.approx(0.605)  # the lowest level that keeps token 3 from exiting wrong
    assert both == pytest.approx(0.855)  # chat's wrong tokens at 0.85 raise the bar for everyone
    sim = simulate(conf, agree, {l: both for l in conf}, num_layers=6)
    assert sim["agreement"] == 1.0 and sim["exit_share_by_layer"] == {2: 5, 4: 3}
    assert sim["mean_depth"] == (5 * 2 + 3 * 4) / 8 / 6


def test_no_level_reaching_the_target_switches_exits_off():
    conf = {2: torch.tensor([0.999, 0.999])}
    agree = {2: torch.tensor([False, True])}
    assert choose_threshold(conf, agree, torch.tensor([0, 0]), 0.95, num_layers=4) == OFF


def test_held_out_prompts_are_halved_within_each_domain():
    group = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5])
    domain = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    tune, measure = halves(SimpleNamespace(group=group, domain=domain), torch.arange(9))
    assert set(group[tune].tolist()) == {0, 2, 3, 5} and set(group[measure].tolist()) == {1, 4}
    for part in (tune, measure):
        assert set(domain[part].tolist()) == {0, 1}


def test_greedy_loading_depth_and_exit_placement():
    assert depth_for_share({4: 50, 8: 40, 30: 10}, 0.9) == 8
    assert depth_for_share({4: 50, 8: 39, 30: 11}, 0.9) == 30
    sim = {"exit_share_by_layer": {2: 1, 20: 50, 30: 49}, "tokens": 100}
    placed = place_exits({2: 0.9, 20: 0.8}, sim, num_layers=30, cost_in_layers=0.5)
    assert placed == {2: OFF, 20: 0.8}  # 1% of tokens saving 28 layers does not pay 0.5 layer per token


def test_a_margin_lets_a_lower_threshold_keep_the_target():
    # at layer 2 the predictor cannot tell tokens 2-3 (wrong) from 0-1 (right); the head's margin can
    conf = {2: torch.tensor([0.9, 0.9, 0.9, 0.9]), 4: torch.tensor([0.99] * 4)}
    agree = {2: torch.tensor([True, True, False, False]), 4: torch.tensor([True] * 4)}
    margin = {2: torch.tensor([3.5, 2.5, 0.5, 1.5]), 4: torch.tensor([5.0] * 4)}
    domain = torch.zeros(4, dtype=torch.long)
    assert gate(conf, margin, 2.0)[2].tolist() == pytest.approx([0.9, 0.9, 0.0, 0.0])
    m, t = choose_rule(conf, agree, margin, domain, 0.95, num_layers=6, with_margin=True)
    assert m == 2.0 and t <= 0.9  # tokens 0-1 leave at layer 2, 2-3 at layer 4: all agree
    # without an exit vocabulary there is no margin check: the predictor alone must hold the target
    assert choose_rule(conf, agree, margin, domain, 0.95, num_layers=6, with_margin=False) == (0.0, pytest.approx(0.905))
