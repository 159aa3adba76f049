"""Prefill in chunks under a token budget: same tokens as transformers, and decoding goes on meanwhile,
in alternating steps or riding the prefill steps themselves."""
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
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
    engine = LLMEngine(EngineConfig(model="smollm2", max_batch_size=2, max_prefill_tokens=32, home=smollm2.home,
                                    mixed_steps=False))
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


def test_mixed_steps_carry_the_decoding_requests_next_tokens_with_the_prompt_chunks():
    sched = Scheduler(4, [0], 256, lambda ids: "", prefill_budget=10, mixed=True)
    early, late = Sequence("early", [5, 6, 7], None), Sequence("late", list(range(1, 30)), None)
    sched.add(early)
    [chunk], _ = sched.schedule()
    chunk.seq.prefilled += chunk.length
    early.output_ids.append(9)
    sched.add(late)
    for start in (0, 9, 18, 27):  # every step: early's next token, then 9 of the budget's 10 for the prompt
        work, is_prefill = sched.schedule()
        assert is_prefill and [(c.seq.request_id, c.start, c.length, c.decode) for c in work] == [
            ("early", early.num_tokens - 1, 1, True), ("late", start, min(9, 29 - start), False)]
        work[1].seq.prefilled += work[1].length
        early.output_ids.append(9)
    assert sched.schedule() == ([early, late], False)  # both decode


@pytest.mark.parametrize("exits", [False, True])
def test_a_request_decodes_in_every_step_while_a_long_prompt_is_prefilled(smollm2, exits):
    cfg = EngineConfig(model="smollm2", max_batch_size=2, max_prefill_tokens=32, home=smollm2.home, exits=exits)
    engine = LLMEngine(cfg)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    early = engine.add_request(PROMPTS[3], params)
    tokens = {early: []}
    while len(tokens[early]) < 8:  # its prefill, then decode steps; under exits, up to one that exits early
        out = engine.step()
        for o in out.outputs:
            tokens[o.request_id] += o.new_token_ids
        if exits and len(tokens[early]) > 1 and out.exits[0].layer < engine.depth:
            break
    seq = engine.scheduler.running[0]
    pending = int((engine.model.kv.level[seq.slot, :seq.num_tokens - 1] < engine.depth).sum())
    assert pending > 0 if exits else pending == 0  # the deferred fill has a token to bring to depth
    before = len(tokens[early])
    late = engine.add_request(LONG, SamplingParams(max_tokens=4, ignore_eos=True))
    tokens[late] = []
    chunks = -(-len(engine.tokenizer(LONG)["input_ids"]) // 31)
    steps = 0
    while not tokens[late]:
        out = engine.step()
        steps += 1
        assert out.is_prefill and [o.request_id for o in out.outputs][0] == early  # it rode every prefill step
        for o in out.outputs:
            tokens[o.request_id] += o.new_token_ids
        # a prefill step leaves none of the decoding request's tokens short of the loaded depth
        assert bool((engine.model.kv.level[seq.slot, :seq.num_tokens - 1] == engine.depth).all())
    assert steps == chunks and len(tokens[early]) == before + chunks
    while engine.has_unfinished():
        for o in engine.step().outputs:
            tokens[o.request_id] += o.new_token_ids
    if not exits:  # exact: transformers' greedy tokens, whichever kind of step produced them
        assert tokens[early] == hf_greedy(smollm2, PROMPTS[3], 24)
        assert tokens[late] == hf_greedy(smollm2, LONG, 4)
    else:
        assert len(tokens[early]) == 24 and len(tokens[late]) == 4
