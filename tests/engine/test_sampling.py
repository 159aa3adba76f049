"""Sampling parameters behave as in OpenAI / vLLM."""
from engine import EngineConfig, LLMEngine, SamplingParams


def _engine(ref):
    return LLMEngine(EngineConfig(model="smollm2", exits=False, home=ref.home))


def test_seeded_sampling_is_reproducible_and_seed_dependent(smollm2):
    engine = _engine(smollm2)
    p = "Once upon a time"
    runs = engine.generate([p] * 3, [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in (7, 7, 8)])
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


def test_tiny_top_p_is_greedy(smollm2):
    engine = _engine(smollm2)
    greedy, nucleus = engine.generate(["The capital of France is"] * 2, [
        SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=1)])
    assert greedy.token_ids == nucleus.token_ids


def test_stop_strings_and_length(smollm2):
    engine = _engine(smollm2)
    free, stopped = engine.generate(["def fibonacci(n):"] * 2, [
        SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, stop=["return"])])
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    assert "return" in free.text
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("return")]


def test_eos_ends_a_request_unless_ignored(smollm2):
    engine = _engine(smollm2)
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                                add_generation_prompt=True)
    normal, ignoring = engine.generate([chat] * 2, [SamplingParams(max_tokens=60),
                                                    SamplingParams(max_tokens=60, ignore_eos=True)])
    assert normal.finish_reason == "stop" and normal.token_ids[-1] in engine.eos_ids
    assert len(ignoring.token_ids) == 60
