"""A memory budget sizes the KV cache, and the capacity follows the loaded depth."""
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.memory import MemoryModel, budget_bytes
from engine.store import CheckpointError
from tests.conftest import PROMPTS

PROMPTS6 = PROMPTS + ["import numpy as np\n", "Once upon a time"]


def test_capacity_arithmetic():
    m = MemoryModel(base_bytes=100, layer_bytes=10, kv_layer_bytes=2, sequence_bytes=5, num_layers=30)
    assert m.weights(30) == 400 and m.per_sequence(30) == 65
    assert m.capacity(30, 400 + 3 * 65 + 64, cap=64) == 3  # whole sequences only
    assert m.capacity(10, 400 + 3 * 65, cap=64) == (595 - 200) // 25 == 15  # fewer layers, more sequences
    assert m.capacity(10, 10**9, cap=8) == 8  # max_batch_size caps it
    assert m.capacity(30, 300, cap=8) == 0
    assert m.capacity(30, None, cap=8) == 8
    assert budget_bytes(0.5, 1000) == 500 and budget_bytes(2e9, 1000) == 2_000_000_000 and budget_bytes(None, 1) is None


def _budget_for(smollm2, depth: int, sequences: int, max_model_len: int) -> int:
    probe = LLMEngine(EngineConfig(model="smollm2", exits=False, home=smollm2.home, max_batch_size=1,
                                   max_model_len=max_model_len))
    return probe.memory.weights(depth) + sequences * probe.memory.per_sequence(depth)


def test_fewer_layers_hold_more_sequences_within_the_budget(smollm2):
    budget = _budget_for(smollm2, 30, 2, max_model_len=128)
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, home=smollm2.home, max_batch_size=64,
                                    max_model_len=128, memory_budget=budget))
    assert engine.capacity == 2
    held = {}
    for depth in (30, 20, 10, 30):
        engine.load_layers(depth)
        mem = engine.memory_bytes()
        held[depth] = engine.capacity
        assert engine.capacity == engine.memory.capacity(depth, budget, 64)
        assert mem["total"] <= budget, f"depth {depth}: {mem['total']} bytes over a budget of {budget}"
        assert mem["capacity"] == engine.capacity and mem["budget"] == budget
    assert held[30] == 2 < held[20] < held[10]
    with pytest.raises(CheckpointError, match="not one sequence"):
        LLMEngine(EngineConfig(model="smollm2", exits=False, home=smollm2.home, max_model_len=128,
                               memory_budget=engine.memory.weights(30) + 1))


def _run(engine: LLMEngine, grow_after: int) -> tuple[dict[str, list[int]], int]:
    ids = [engine.add_request(p, SamplingParams(max_tokens=8)) for p in PROMPTS6]
    out, most_running = {i: [] for i in ids}, 0
    for step in range(10**4):
        if not engine.has_unfinished():
            break
        if step == grow_after:
            engine.load_layers(30)
        for o in engine.step().outputs:
            assert o.finish_reason != "error"
            out[o.request_id] += o.new_token_ids
        most_running = max(most_running, len(engine.scheduler.running))
        assert len(engine.scheduler.running) <= engine.capacity
    return [out[i] for i in ids], most_running


def test_growing_depth_preempts_what_no_longer_fits_and_loses_nothing(smollm2):
    # at depth 15 all six prompts fit; at 30 only two: four go back to waiting and resume by recompute
    budget = _budget_for(smollm2, 30, 2, max_model_len=128)
    cfg = EngineConfig(model="smollm2", depth=15, exits=False, home=smollm2.home, max_batch_size=6,
                       max_model_len=128)
    budgeted = LLMEngine(cfg.model_copy(update={"memory_budget": budget}))
    assert budgeted.capacity == 6
    outputs, most = _run(budgeted, grow_after=3)
    assert most == 6 and budgeted.capacity == 2
    assert budgeted.stats.preempted == 4
    reference, _ = _run(LLMEngine(cfg), grow_after=3)  # same depths, room for all: nobody preempted
    assert all(len(t) == 8 for t in outputs), "every request finishes with all its tokens"
    assert outputs == reference, "greedy outputs do not depend on being preempted"
