"""Prefill in chunks under a token budget: same tokens as transformers, and decoding goes on meanwhile."""
from engine import EngineConfig, LLMEngine, SamplingParams
from tests.conftest import PROMPTS, hf_greedy

LONG = "def parse(lines):\n" + "".join(f"    # step {i}: read field {i} and check it\n" for i in range(24))


def test_chunks_give_the_tokens_of_a_whole_prefill(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=4, max_prefill_tokens=16,
                                    home=smollm2.home))
    prompts = [LONG, *PROMPTS[:3]]
    assert len(engine.tokenizer(LONG)["input_ids"]) > 8 * 16  # at least nine chunks
    results = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(smollm2, prompt, 6), prompt[:30]


def test_running_requests_decode_while_a_long_prompt_is_prefilled(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", max_batch_size=2, max_prefill_tokens=32, home=smollm2.home))
    early = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()  # its prefill
    late = engine.add_request(LONG, SamplingParams(max_tokens=4, ignore_eos=True))
    chunks = -(-len(engine.tokenizer(LONG)["input_ids"]) // 32)
    tokens = {early: 0, late: 0}
    while not tokens[late]:
        for o in engine.step().outputs:
            tokens[o.request_id] += len(o.new_token_ids)
    # prefill chunks and decode steps alternate: the early request was never held up for the whole prompt
    assert tokens[early] >= chunks - 1
    while engine.has_unfinished():
        engine.step()
