"""The exit vocabulary: exits emit the calibration text's frequent tokens, checked by their margin,
and a step whose rows all leave that way never reads the full LM head."""
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.exits import ExitBank, build_vocab
from tests.conftest import PROMPTS


def _engine(ref, **kw):
    # every predictor passes: what a row does is then the margin's decision alone
    return LLMEngine(EngineConfig(model="smollm2", home=ref.home, exit_gate=False,
                                  thresholds={l: 0.0 for l in range(2, 30, 2)}, **kw))


def test_build_vocab_keeps_the_most_frequent_tokens_then_the_lowest_ids():
    vocab = build_vocab([[7, 7, 7, 3, 3, 9], [9, 9, 9, 42]], size=3, vocab_size=50)
    assert vocab.tolist() == [3, 7, 9]  # 9 (4x), 7 (3x), 3 (2x); 42 once: cut
    assert build_vocab([[40, 40]], size=4, vocab_size=50).tolist() == [0, 1, 2, 40]


def test_calibration_chooses_a_vocabulary_and_a_margin(smollm2_calibrated):
    ref, report = smollm2_calibrated
    s = report.summary
    assert s["exit_vocab"] == 2048 and s["margin"] >= 0
    bank = ExitBank.load(ref.home / "smollm2" / "exits", 576)
    assert len(bank.vocab) == 2048 and bank.vocab.tolist() == sorted(set(bank.vocab.tolist()))
    assert bank.margin == s["margin"]
    for rules in report.frontier.values():
        assert {"predictor and margin", "predictor", "max_softmax"} <= set(rules)


def test_rows_that_leave_through_the_vocabulary_skip_the_lm_head(smollm2_calibrated, monkeypatch):
    ref, _ = smollm2_calibrated
    engine = _engine(ref)
    engine.exits.margin = 0.0  # every row leaves at the first exit point
    vocab = set(engine.exits.vocab.tolist())
    head_rows = []
    real = engine.model.logits
    monkeypatch.setattr(engine.model, "logits", lambda h: head_rows.append(h.shape[0]) or real(h))
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert all(e.layer == 2 for r in results for e in r.exits)
    assert all(t in vocab for r in results for t in r.token_ids)
    assert head_rows == []  # no step read the full LM head
    assert engine.stats.vocab_exits == engine.stats.tokens == 12 * len(PROMPTS)


def test_the_exit_token_is_the_heads_best_in_the_vocabulary(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    with_vocab = _engine(ref)
    with_vocab.exits.margin = 0.0
    full_head = _engine(ref, exit_vocab=False)  # the same heads read through the whole LM head
    assert full_head.exits.vocab is None
    vocab = set(with_vocab.exits.vocab.tolist())
    params = SamplingParams(max_tokens=1)
    checked_outside = 0
    for prompt in PROMPTS + ["Once upon a time", "import numpy as np\n"]:
        [v] = with_vocab.generate([prompt], params)
        [f] = full_head.generate([prompt], params)
        assert v.exits[0].layer == f.exits[0].layer == 2
        if f.token_ids[0] in vocab:
            assert v.token_ids == f.token_ids
        else:
            checked_outside += 1
            assert v.token_ids[0] in vocab
    assert checked_outside < len(PROMPTS) + 2  # at least one token the two agree on


def test_a_margin_no_head_reaches_keeps_every_token_at_full_depth(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = _engine(ref)
    engine.exits.margin = float("inf")
    reference = LLMEngine(EngineConfig(model="smollm2", home=ref.home, exits=False))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    got = engine.generate(PROMPTS, params)
    want = reference.generate(PROMPTS, params)
    assert all(e.layer == 30 for r in got for e in r.exits)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_the_vocabulary_and_margin_survive_save_and_load(smollm2_calibrated, tmp_path):
    ref, _ = smollm2_calibrated
    bank = ExitBank.load(ref.home / "smollm2" / "exits", 576)
    bank.margin = 2.5
    for compact in (False, True):
        bank.save(tmp_path / str(compact), compact=compact)
        again = ExitBank.load(tmp_path / str(compact), 576)
        assert torch.equal(again.vocab, bank.vocab) and again.margin == 2.5


def test_the_exit_gate_prices_the_head_of_the_bank_in_use(smollm2_calibrated):
    ref, _ = smollm2_calibrated
    engine = LLMEngine(EngineConfig(model="smollm2", home=ref.home))
    assert engine.gate.head_s > 0  # every row leaving through the vocabulary spares most of the head
    bank = ExitBank.load(ref.home / "smollm2" / "exits", 576)
    bank.vocab = None  # exits that read the whole head spare none of it
    engine.use_exits(bank)
    assert engine.gate.head_s == 0
