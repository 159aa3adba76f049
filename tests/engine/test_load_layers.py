"""Hot layer loading with requests in flight: nothing dropped, new layers' KV is exact."""
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from tests.conftest import PROMPTS


def test_grow_depth_mid_flight_fills_kv_exactly(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", depth=15, exits=False, home=smollm2.home))
    ids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in PROMPTS]
    records, outputs = [], {i: [] for i in ids}
    for _ in range(4):
        step = engine.step()
        records += step.exits
        for o in step.outputs:
            outputs[o.request_id] += o.new_token_ids
    grown_at = {i: len(t) for i, t in outputs.items()}
    engine.load_layers(30)
    while engine.has_unfinished():
        step = engine.step()
        records += step.exits
        for o in step.outputs:
            outputs[o.request_id] += o.new_token_ids
    assert all(len(t) == 10 for t in outputs.values()), "every request finishes with all its tokens"
    assert {r.loaded_depth for r in records} == {15, 30}
    assert all(r.greedy == (r.loaded_depth == 15) for r in records)
    # after the grow, each token is what the full model predicts for the same context: the new
    # layers' cache over earlier tokens (computed from the stored depth-15 states) must be exact
    for rid, prompt in zip(ids, PROMPTS):
        prompt_ids = engine.tokenizer(prompt)["input_ids"]
        seq = prompt_ids + outputs[rid]
        with torch.no_grad():
            logits = smollm2.hf(torch.tensor([seq])).logits[0]
        n = len(prompt_ids)
        predicted = logits[n - 1:-1].argmax(-1).tolist()
        after = grown_at[rid]
        assert outputs[rid][after:] == predicted[after:]


def test_shrink_depth_mid_flight(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, home=smollm2.home))
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_tokens=8))
    engine.step()
    engine.step()
    engine.load_layers(10)
    assert engine.memory_bytes()["layers"] == 10 * engine.memory_bytes()["per_layer"]
    records = []
    while engine.has_unfinished():
        records += engine.step().exits
    assert len(records) == 6 * len(PROMPTS)
    assert all(r.layer == 10 and r.greedy for r in records)


def test_resident_memory_scales_with_depth(smollm2):
    sizes = {}
    for depth in (6, 12, 24):
        engine = LLMEngine(EngineConfig(model="smollm2", depth=depth, exits=False, home=smollm2.home))
        sizes[depth] = engine.memory_bytes()
    per_layer = sizes[6]["per_layer"]
    assert per_layer > 0
    for depth, mem in sizes.items():
        assert mem["layers"] == depth * per_layer
        assert mem["kv_cache"] > 0
    assert sizes[24]["kv_cache"] > sizes[12]["kv_cache"] > sizes[6]["kv_cache"]
