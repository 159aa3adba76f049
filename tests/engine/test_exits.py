"""Per-token exits with trained heads: records, greedy exits, KV fill."""
import math
from types import SimpleNamespace

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.deferred import flush
from engine.exits import SHIPPED
from engine.thresholds import OFF
from tests.conftest import PROMPTS, shipped_only


def _engine(ref, **kw):
    return LLMEngine(EngineConfig(model="smollm2", home=ref.home, **kw))


def test_calibration_writes_heads_thresholds_and_report(smollm2_calibrated):
    ref, report = smollm2_calibrated
    exits = ref.home / "smollm2" / "exits"
    for name in ("exits.json", "exits.safetensors", "report.json", "report.png"):
        assert (exits / name).is_file(), name
    s = report.summary
    assert s["exit_layers"] == list(range(2, 30, 2))
    assert all(t in (s["threshold"], OFF) for t in s["thresholds"].values())  # one level, or switched off
    assert 0.0 < s["mean_depth"] <= 1.0 and 0.0 <= s["agreement"] <= 1.0
    assert sum(s["exit_share_by_layer"].values()) == s["eval_tokens"]
    assert s["check_cost"]["check_ms"] > 0
    # judged per domain, on held-out prompts' text written with the exits on
    assert s["rounds"] == 2 and s["on_policy"]
    assert set(s["domains"]) == set(report.frontier) == {"code", "chat"}
    assert sum(d["tokens"] for d in s["domains"].values()) == s["eval_tokens"]
    for rules in report.frontier.values():
        depth = [p["mean_depth"] for p in rules["predictor"]]
        assert depth == sorted(depth)  # a higher threshold never exits earlier


def test_sampled_replies_add_contexts_under_their_prompt(smollm2):
    from engine.calibrate import CalibrationConfig, _write_text, collect

    engine = _engine(smollm2, exits=False)
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    cfg = CalibrationConfig(max_new_tokens=12, sample_temperature=1.5)
    greedy = _write_text(engine, ids, cfg, None)
    sampled = _write_text(engine, ids, cfg, None, seed=7)
    assert sampled == _write_text(engine, ids, cfg, None, seed=7) != greedy  # seeded: the same text again
    text = greedy + sampled
    feats = collect(engine, text, [0, 4], 4, [0, 1], prompt_of=[0, 1, 0, 1])
    # each prompt's own positions once, each reply's positions under its prompt and domain
    for g in (0, 1):
        (p, a), (_, b) = text[g], text[g + 2]
        assert int((feats.group == g).sum()) == len(p) - 1 + len(a) + len(b)
        assert int(feats.generated[feats.group == g].sum()) == len(a) + len(b)
        assert bool((feats.domain[feats.group == g] == g).all())


def test_a_store_without_calibration_serves_the_shipped_exits(smollm2, tmp_path):
    engine = _engine(SimpleNamespace(home=shipped_only(smollm2.home, tmp_path)))
    assert engine.exits is not None and engine.exits.meta["model"] == "smollm2"
    assert engine.exits.meta["agreement"] >= 0.9 and set(engine.exits.meta["domains"]) == {"code", "chat"}
    # only the points in use are shipped; their predictors still read the state at the layer before
    assert engine.exits.reference_layers == engine.exits.meta["exit_layers"] != engine.exits.layers
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert any(e.layer < 30 for r in results for e in r.exits), "shipped heads should let tokens exit early"
    shipped = sum(f.stat().st_size for f in (SHIPPED / "smollm2").iterdir())
    assert shipped < 8 * 2**20, shipped


def test_gemma3_ships_its_exits_too(gemma3, tmp_path):
    engine = LLMEngine(EngineConfig(model="gemma3", home=shipped_only(gemma3.home, tmp_path, "gemma3")))
    assert engine.exits is not None and engine.exits.meta["model"] == "gemma3"
    assert min(d["agreement"] for d in engine.exits.meta["domains"].values()) >= 0.95  # held-out, per domain
    [result] = engine.generate(["def is_prime(n):"], SamplingParams(max_tokens=16, ignore_eos=True))
    assert any(e.layer < engine.num_layers for e in result.exits), "shipped heads should let tokens exit early"
    assert sum(f.stat().st_size for f in (SHIPPED / "gemma3").iterdir()) < 8 * 2**20


def test_exit_records_one_per_token_and_greedy_flag_exact(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    thresholds = {l: 0.6 for l in range(2, 30, 2)}
    engine = _engine(ref, depth=20, thresholds=thresholds)
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=16))
    layers = set()
    for r in results:
        assert len(r.exits) == len(r.token_ids)
        assert [e.position for e in r.exits] == sorted({e.position for e in r.exits})
        for e in r.exits:
            layers.add(e.layer)
            assert 1 <= e.layer <= 20 and e.loaded_depth == 20 and e.model == "smollm2"
            reached = e.confidence >= thresholds[e.layer]
            assert e.greedy == (not reached)
            assert not e.greedy or e.layer == 20  # only the last loaded layer exits unconfident
    assert len(layers) > 1, "rows of the batches should leave at different layers"


def test_full_depth_exits_are_never_greedy(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = _engine(ref, thresholds={l: 0.8 for l in range(2, 30, 2)})
    for r in engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12)):
        assert all(not e.greedy and not math.isnan(e.confidence) for e in r.exits)


def test_disabled_thresholds_give_full_model_tokens(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    off = _engine(ref, thresholds={l: OFF for l in range(2, 30, 2)}).generate(PROMPTS, SamplingParams(max_tokens=16))
    plain = _engine(ref, exits=False).generate(PROMPTS, SamplingParams(max_tokens=16))
    assert [r.token_ids for r in off] == [r.token_ids for r in plain]
    assert all(e.layer == 30 for r in off for e in r.exits)


def _logits_after_forced_exit(ref, kv_fill: str, exit_layer: int):
    """Prefill at full depth, generate one token that exits at `exit_layer`, then return the
    full-depth logits of the following token and the token ids they condition on."""
    engine = _engine(ref, kv_fill=kv_fill)
    bank = engine.exits
    prompt = engine.tokenizer(PROMPTS[3])["input_ids"]
    engine.add_request(prompt, SamplingParams(max_tokens=3))
    bank.set_thresholds({l: OFF for l in bank.layers})
    first = engine.step().outputs[0].new_token_ids  # prefill at full depth
    bank.set_thresholds({exit_layer: 0.0})  # every row leaves at exit_layer
    step = engine.step()
    assert step.exits[0].layer == exit_layer
    bank.set_thresholds({l: OFF for l in bank.layers})
    captured = {}
    original = engine.model.logits
    engine.model.logits = lambda h: captured.setdefault("logits", original(h))
    engine.step()
    return captured["logits"][0].float(), prompt + first + step.outputs[0].new_token_ids


def test_kv_fill_brings_later_tokens_closer_to_full_depth(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    deferred, ids = _logits_after_forced_exit(ref, "deferred", 8)
    with_fill, ids_copy = _logits_after_forced_exit(ref, "copy", 8)
    without, ids_without = _logits_after_forced_exit(ref, "none", 8)
    assert ids == ids_copy == ids_without
    with torch.no_grad():
        full_logits = ref.hf(torch.tensor([ids])).logits[0, -1].float()
    full = torch.log_softmax(full_logits, -1)

    def kl(logits):
        return float(torch.sum(full.exp() * (full - torch.log_softmax(logits, -1))))
    assert kl(with_fill) < kl(without), (kl(with_fill), kl(without))
    # the deferred fill computes the exited token's layers 9..30 in the next step: its KV is the
    # full model's (what riding along would give), so the next token's logits are too
    torch.testing.assert_close(deferred, full_logits, atol=2e-3, rtol=1e-4)
    assert not torch.allclose(with_fill, full_logits, atol=2e-3, rtol=1e-4)
    assert kl(deferred) < 1e-5 < kl(with_fill)


def _cache_error_after_mixed_exits(ref, kv_fill: str) -> tuple[float, list[int], int]:
    """Decode with rows leaving at many depths, bring every token to full depth, and compare the
    whole cache with a full-depth prefill of the same tokens: max |dK|, |dV| over layers and positions."""
    mixed = {l: 0.6 for l in range(2, 30, 2)}
    engine = _engine(ref, kv_fill=kv_fill, thresholds=mixed, max_batch_size=4, max_deferred=6, exit_gate=False)
    engine.planner = None  # every confident row leaves the batch: the fill is under test, not whether a split pays
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True))
    layers = []
    for _ in range(14):
        layers += [e.layer for e in engine.step().exits]
    running = sorted(engine.scheduler.running, key=lambda s: s.slot)
    flush(engine.model, [s.slot for s in running], [s.num_cached for s in running])
    full = _engine(ref, exits=False, max_batch_size=4)
    for s in running:  # admitted in slot order: the same slots as in `engine`
        full.add_request(s.prompt_ids + s.output_ids[:-1], SamplingParams(max_tokens=1))
    full.step()
    err = 0.0
    for layer in range(30):
        for s in running:
            n = s.num_cached
            for ours, theirs in ((engine.model.kv.k, full.model.kv.k), (engine.model.kv.v, full.model.kv.v)):
                err = max(err, float((ours[layer][s.slot, :, :n] - theirs[layer][s.slot, :, :n]).abs().max()))
    return err, layers, engine.stats.splits


@pytest.mark.parametrize("kv_fill", ["deferred", "copy"])
def test_deferred_fill_leaves_the_cache_the_full_model_would(smollm2_calibrated, kv_fill):
    ref, _ = smollm2_calibrated
    err, layers, splits = _cache_error_after_mixed_exits(ref, kv_fill)
    assert len(set(layers)) > 3 and min(layers) < 30, "rows should have left at several depths"
    assert splits > 0, "rows should have left the batch while others went on"
    if kv_fill == "deferred":
        assert err < 1e-3, err
    else:  # state copy's keys for skipped layers are projections of the exit state: far off
        assert err > 0.1, err
