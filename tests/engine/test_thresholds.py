"""Threshold choice and exit simulation: pure logic on synthetic scores."""
import pytest
import torch

from engine.thresholds import OFF, choose_thresholds, depth_for_share, place_exits, simulate


def test_choose_thresholds_keeps_exiting_tokens_above_target():
    conf = {2: torch.tensor([0.9, 0.8, 0.7, 0.2]), 4: torch.tensor([0.1, 0.1, 0.95, 0.9])}
    agree = {2: torch.tensor([True, True, False, False]), 4: torch.tensor([True, True, True, True])}
    th = choose_thresholds(conf, agree, [2, 4], target=0.95, min_exits=1)
    assert th[2] == pytest.approx(0.8)  # tokens 0 and 1 agree; adding token 2 would drop precision to 2/3
    assert th[4] == pytest.approx(0.9)  # of tokens 2 and 3, both agree at layer 4
    sim = simulate(conf, agree, th, num_layers=6)
    assert sim["agreement"] == 1.0
    assert sim["exit_share_by_layer"] == {2: 2, 4: 2}
    assert sim["mean_depth"] == (2 + 2 + 4 + 4) / 4 / 6


def test_layer_with_too_few_confident_tokens_is_disabled():
    conf = {2: torch.tensor([0.9, 0.8])}
    agree = {2: torch.tensor([False, True])}
    assert choose_thresholds(conf, agree, [2], target=0.95, min_exits=1) == {2: OFF}


def test_greedy_loading_depth_and_exit_placement():
    assert depth_for_share({4: 50, 8: 40, 30: 10}, 0.9) == 8
    assert depth_for_share({4: 50, 8: 39, 30: 11}, 0.9) == 30
    sim = {"exit_share_by_layer": {2: 1, 20: 50, 30: 49}, "tokens": 100}
    placed = place_exits({2: 0.9, 20: 0.8}, sim, num_layers=30, cost_in_layers=0.5)
    assert placed == {2: OFF, 20: 0.8}  # 1% of tokens saving 28 layers does not pay 0.5 layer per token
