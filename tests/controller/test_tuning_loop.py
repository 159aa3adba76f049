"""Live threshold tuning closed around the real engine: exits served by SmolLM2's heads, judged by
the full model as the shadow verifier judges them, thresholds moved by the controller's tuner."""
from collections import defaultdict

import pytest

from controller.thresholds import ThresholdTuner, TunerConfig
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.prompts import chat_questions, humaneval, render_chat
from engine.sampling import in_support
from tests.conftest import shipped_only

pytestmark = pytest.mark.slow
FLOOR, BATCH, TOKENS = 0.9, 8, 24


def _serve_and_judge(engine, judge, prompts):
    """Generate, then judge every confident early exit: [(layer, agreed)] in serving order."""
    results = engine.generate(prompts, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    samples = []
    for prompt, r in zip(prompts, results):
        ids = engine.tokenizer(prompt)["input_ids"]
        for i, e in enumerate(r.exits):
            if e.layer < engine.num_layers and not e.greedy:
                samples.append((ids + r.token_ids[:i], r.token_ids[i], e.layer))
    if not samples:
        return []
    logits = judge.next_token_logits([s[0] for s in samples])
    return [(layer, in_support(row, token, 0.0, 1.0)) for row, (_, token, layer) in zip(logits, samples)]


def test_a_shift_to_chat_trips_the_tuner_and_agreement_recovers(smollm2, tmp_path):
    home = shipped_only(smollm2.home, tmp_path)  # the heads the package ships, not a test-sized calibration
    # every point checked: the tuner's loop is under test, not which checks pay at this batch
    engine = LLMEngine(EngineConfig(model="smollm2", home=home, max_batch_size=BATCH, exit_gate=False))
    # thresholds well under calibration's: what code tolerates, chat will not
    engine.exits.set_thresholds({l: 0.6 for l in engine.exits.layers})
    judge = LLMEngine(EngineConfig(model="smollm2", home=home, exits=False, max_batch_size=BATCH))
    tuner = ThresholdTuner(TunerConfig(floor=FLOOR, step=0.1, min_checks=16), engine.exits.thresholds())
    totals = defaultdict(lambda: [0, 0])
    timeline, raised_in_chat = [], 0
    code = humaneval(0, 16)
    chat = [render_chat(engine.tokenizer, q) for q in chat_questions()[:64]]
    for kind, prompts in (("code", code), ("chat", chat)):
        for start in range(0, len(prompts), BATCH):
            checked = _serve_and_judge(engine, judge, prompts[start:start + BATCH])
            timeline += [(kind, ok) for _, ok in checked]
            for layer, ok in checked:
                totals[layer][0] += 1
                totals[layer][1] += ok
            changes = tuner.observe({l: tuple(v) for l, v in totals.items()})
            engine.exits.set_thresholds({c.layer: c.new for c in changes})
            raised_in_chat += kind == "chat" and sum(c.new > c.old for c in changes)
    chat_checks = [ok for kind, ok in timeline if kind == "chat"]
    assert raised_in_chat > 0, "chat at code's thresholds should trip the tuner"
    first = sum(chat_checks[:32]) / 32
    last = sum(chat_checks[-64:]) / 64
    assert first < FLOOR <= last, (first, last)  # fell under the floor, and is back above it
    assert len(chat_checks) >= 64 and engine.exits.thresholds() == tuner.thresholds
