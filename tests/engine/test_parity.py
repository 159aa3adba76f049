"""With exits off and every layer loaded, the engine is the model: same greedy tokens as transformers."""
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from tests.conftest import PROMPTS, hf_greedy

NEW = 20


def _check(ref, batch_size):
    engine = LLMEngine(EngineConfig(model=ref.name, exits=False, max_batch_size=batch_size, home=ref.home))
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=False))
    for prompt, result in zip(PROMPTS, results):
        expected = hf_greedy(ref, prompt, NEW)
        assert result.token_ids == expected[: len(result.token_ids)], prompt
        assert len(result.token_ids) == NEW or result.finish_reason == "stop"


@pytest.mark.parametrize("batch_size", [1, 4])
def test_smollm2_matches_transformers(smollm2, batch_size):
    _check(smollm2, batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_gemma3_matches_transformers(gemma3, batch_size):
    _check(gemma3, batch_size)


def test_batch_mixes_prefill_and_decode_lengths(smollm2):
    """Requests admitted while others decode (fewer slots than requests) still match."""
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=2, home=smollm2.home))
    results = engine.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in (5, 12, 8, 16)])
    for prompt, result, n in zip(PROMPTS, results, (5, 12, 8, 16)):
        assert result.token_ids == hf_greedy(smollm2, prompt, n)[: len(result.token_ids)]


@pytest.mark.slow
def test_packed_prefill_keeps_gemma3s_sliding_window(gemma3):
    """Prompts are prefilled back to back in one row, each attending to itself only; one longer than
    Gemma-3's 512-token sliding window must see only the window in its sliding layers."""
    long = " ".join(f"item {i}: value {i * 7 % 13}." for i in range(90))  # about 840 tokens
    prompts = [long, "The sky is", PROMPTS[0]]
    engine = LLMEngine(EngineConfig(model="gemma3", exits=False, max_batch_size=3, home=gemma3.home))
    assert len(engine.tokenizer(long)["input_ids"]) > engine.model.config.sliding_window
    results = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(gemma3, prompt, 4), prompt[:40]
