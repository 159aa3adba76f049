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


def test_text_grows_by_whole_characters_and_ends_as_the_decoded_output(smollm2):
    """Streaming clients append each step's new text: it must never show half a UTF-8 character
    (an emoji is several byte-level tokens) nor rewrite what was already sent."""
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence

    tok = smollm2.tokenizer
    ids = tok("Größe: 世界 🌍🚀 done.\n    return x", add_special_tokens=False)["input_ids"]
    sched = Scheduler(1, [], 10_000, lambda x: tok.decode(x, skip_special_tokens=True))
    seq = Sequence("r", [1], SamplingParams(max_tokens=len(ids)))
    texts = [sched.postprocess([seq], [t])[0].text for t in ids]
    assert all("\ufffd" not in t for t in texts)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert texts[-1] == tok.decode(ids)


def test_in_support_is_the_top_token_when_greedy_and_the_nucleus_when_sampled():
    import torch

    from engine.sampling import in_support

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert in_support(logits, 0, 0.0, 1.0) and not in_support(logits, 1, 0.0, 1.0)
    assert [in_support(logits, t, 1.0, 0.75) for t in range(4)] == [True, True, False, False]
    assert [in_support(logits, t, 1.0, 0.9) for t in range(4)] == [True, True, True, False]
    # a higher temperature flattens the distribution: the same mass takes in more tokens
    assert in_support(logits, 2, 3.0, 0.75)
