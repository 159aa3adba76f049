"""Decode matmuls in the layout and row padding measured fastest: the choice, the maths, real weights."""
import pytest
import torch
import torch.nn.functional as F

from engine import EngineConfig, LLMEngine, SamplingParams
from engine import matmul_plan
from engine.matmul_plan import MatmulPlan, PlannedLinear
from tests.conftest import PROMPTS


def test_padding_only_where_a_larger_count_beats_the_margin():
    # the shape torch 2.13's MKL showed on an AMD EPYC: 2-4 rows cost more than 5
    amd = {1: 36.0, 2: 51.0, 3: 58.0, 4: 48.0, 5: 40.0, 6: 41.0, 7: 44.0, 8: 41.0}
    assert matmul_plan.choose_padding(amd) == {2: 5, 3: 5, 4: 5}
    assert matmul_plan.choose_padding({m: 30.0 + m for m in range(1, 9)}) == {}
    assert matmul_plan.choose_padding({1: 10.0, 2: 10.0, 3: 9.0}) == {}  # within the margin: noise


def test_int8_head_takes_the_row_counts_up_to_its_first_loss():
    dense = {m: 10.0 for m in range(1, 9)}
    int8 = {1: 4.0, 2: 4.0, 3: 5.0, 4: 8.0, 5: 9.5, 6: 6.0, 7: 12.0, 8: 16.0}  # a win at 6 after a loss
    assert matmul_plan.choose_int8_rows(int8, dense) == 4
    assert matmul_plan.choose_int8_rows({m: 20.0 for m in dense}, dense) == 0
    assert matmul_plan.choose_int8_rows({m: 1.0 for m in dense}, dense) == 8


def test_layout_is_the_one_whose_worst_row_count_loses_least():
    # an LM head measured there: column-major halves 1-3 rows and costs ~15% at 8
    row = {1: 9.5, 2: 22.6, 3: 34.0, 4: 17.0, 5: 17.0, 6: 22.0, 7: 34.0, 8: 16.0}
    col = {1: 4.8, 2: 9.0, 3: 13.2, 4: 19.0, 5: 20.0, 6: 22.0, 7: 24.0, 8: 18.0}
    assert matmul_plan.choose(row, col).col_major
    # decoder layers there: column-major 15% faster at one row, 25% slower at eight: stay row-major
    row = {1: 36.0, 2: 51.0, 3: 58.0, 4: 48.0, 5: 36.0, 6: 37.0, 7: 40.0, 8: 40.0}
    col = {1: 31.0, 2: 40.0, 3: 48.0, 4: 50.0, 5: 37.0, 6: 35.0, 7: 50.0, 8: 50.0}
    plan = matmul_plan.choose(row, col)
    assert not plan.col_major and plan.pad_to == {2: 5, 3: 5, 4: 5}
    assert not matmul_plan.choose(row, row).col_major  # a tie keeps the weights as loaded


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 1, 64), (1, 3, 64), (3, 2, 64), (9, 1, 64)])
def test_padded_rows_and_either_layout_give_the_plain_result(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(48, 64), torch.randn(48)
    pad = {m: 8 for m in range(2, 8)}
    for weight in (w, matmul_plan.col_major(w)):
        out = matmul_plan.linear(x, weight, b, pad)
        assert out.shape == (*shape[:-1], 48)
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    wide = torch.randn(shape[0], shape[1] + 1, 64)[:, 1:]  # a column slice of a decode batch
    torch.testing.assert_close(matmul_plan.linear(wide, w, None, pad), F.linear(wide, w), rtol=1e-5, atol=1e-4)


def test_any_plan_decodes_the_same_tokens(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=3, tune_matmuls=False))
    model = engine.model
    assert model.layer_plan == MatmulPlan() and model.head_plan == MatmulPlan()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [r.token_ids for r in engine.generate(PROMPTS[:3], params)]
    plain_logits = engine.next_token_logits([[1, 2, 3]])  # a 3-token prefill: 3 rows
    embedded = model.embed_tokens(torch.tensor([[5, 7]]))
    plan = MatmulPlan(True, {2: 8, 3: 8})
    model.set_matmul_plans(plan, MatmulPlan(True, {2: 8, 3: 8}))
    wrapped = [m for m in model.layers.modules() if isinstance(m, PlannedLinear)]
    assert len(wrapped) == 7 * engine.depth and all(m.pad_to is model.layer_plan.pad_to for m in wrapped)
    assert all(m.weight.t().is_contiguous() for m in wrapped) and model.lm_head_weight.t().is_contiguous()
    torch.testing.assert_close(model.embed_tokens(torch.tensor([[5, 7]])), embedded)  # tied: same values
    torch.testing.assert_close(engine.next_token_logits([[1, 2, 3]]), plain_logits, rtol=1e-4, atol=1e-3)
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], params)] == plain
    model.set_depth(engine.depth - 2)  # layers loaded later take the plan too
    model.set_depth(engine.depth + 2)
    assert model.layers[-1].mlp.up_proj.weight.t().is_contiguous()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_packed_for_onednn_decode_the_dense_weights_tokens(smollm2, dtype):
    if not matmul_plan.packable(torch.zeros(1, dtype=getattr(torch, dtype))):
        pytest.skip(f"this CPU's oneDNN has no {dtype} kernels")
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=3, dtype=dtype,
                                    tune_matmuls=False))
    model = engine.model
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    dense = [r.token_ids for r in engine.generate(PROMPTS[:3], params)]
    layer_bytes = engine.memory_bytes()["layers"]
    model.set_matmul_plans(MatmulPlan(packed=True), MatmulPlan())
    wrapped = [m for m in model.layers.modules() if isinstance(m, PlannedLinear)]
    assert len(wrapped) == 7 * engine.depth and all(m.weight.is_mkldnn for m in wrapped)
    assert engine.memory_bytes()["layers"] == layer_bytes  # the same bytes, reordered
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], params)] == dense
    model.set_depth(engine.depth - 2)  # layers loaded later are packed too
    model.set_depth(engine.depth + 2)
    assert model.layers[-1].mlp.up_proj.weight.is_mkldnn
    model.set_matmul_plans(MatmulPlan(), MatmulPlan())  # and back to dense
    assert not model.layers[0].mlp.up_proj.weight.is_mkldnn
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], params)] == dense

    # the LM head: a packed copy beside the dense weight, which the embedding still reads
    base, logits = engine.memory_bytes()["base"], engine.next_token_logits([[1, 2, 3], [4, 5, 6]])
    embedded = model.embed_tokens(torch.tensor([[5, 7]]))
    model.set_matmul_plans(MatmulPlan(), MatmulPlan(packed=True))
    head = model.lm_head_weight
    assert model.head_packed is not None and not head.is_mkldnn
    assert engine.memory_bytes()["base"] == base + head.numel() * head.element_size()  # the copy is counted
    torch.testing.assert_close(engine.next_token_logits([[1, 2, 3], [4, 5, 6]]), logits, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(model.embed_tokens(torch.tensor([[5, 7]])), embedded, rtol=0, atol=0)
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], params)] == dense
    model.set_matmul_plans(MatmulPlan(), MatmulPlan())
    assert model.head_packed is None and engine.memory_bytes()["base"] == base


def test_the_lm_head_gets_a_packed_copy_only_where_the_config_allows(smollm2, monkeypatch):
    asked = []  # may_pack of each plan measured: the layers', then the head's

    def plan(weights, may_pack=True):
        asked.append(may_pack)
        return MatmulPlan(packed=may_pack)
    monkeypatch.setattr(matmul_plan, "plan", plan)
    for allowed in (True, False):
        asked.clear()
        engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_batch_size=1, packed_head_copy=allowed))
        assert asked == [True, allowed] and (engine.model.head_packed is not None) == allowed


def test_packing_is_chosen_like_any_layout_by_its_worst_row_count(monkeypatch):
    fast, slow = {m: 10.0 for m in range(1, 9)}, {m: 20.0 for m in range(1, 9)}
    monkeypatch.setattr(matmul_plan, "packable", lambda w: True)
    monkeypatch.setattr(matmul_plan, "pack", lambda w: w)
    timings = iter([slow, slow, fast])  # row-major, column-major, packed
    monkeypatch.setattr(matmul_plan, "measure", lambda *a, **k: next(timings))
    assert matmul_plan.plan([torch.zeros(4, 4)]) == MatmulPlan(packed=True)
    timings = iter([slow, slow, {**fast, 1: 19.0}])  # a near tie at one row, twice as fast elsewhere
    assert matmul_plan.plan([torch.zeros(4, 4)]).packed
    timings = iter([slow, slow, {**fast, 1: 40.0}])  # batch 1 would lose as much as the others gain
    assert matmul_plan.plan([torch.zeros(4, 4)]) == MatmulPlan()
    timings = iter([slow, slow, fast])
    assert not matmul_plan.plan([torch.zeros(4, 4)], may_pack=False).packed
    timings = iter([slow, {**fast, 1: 9.0}, fast])  # column-major at least as good everywhere
    assert matmul_plan.plan([torch.zeros(4, 4)]).col_major


def test_int8_weights_dequantise_to_the_weights_and_halve_the_layer_bytes(smollm2):
    from pydantic import ValidationError
    from torch import nn

    base = nn.Linear(576, 64).bfloat16()
    q = matmul_plan.Int8Linear(base.weight, base.bias)
    dequant = q.weight.float() * q.scale.float()[:, None]
    # half a step of rounding, plus up to half a step from the scale itself being stored in bf16
    assert bool(((dequant - base.weight.float()).abs().amax(1) <= q.scale.float() * 1.01).all())
    x = torch.randn(2, 3, 576).bfloat16()
    torch.testing.assert_close(q(x).float(), F.linear(x.float(), dequant, base.bias.float()), rtol=2e-2, atol=2e-2)

    kw = dict(model="smollm2", exits=False, max_batch_size=2, dtype="bfloat16")
    bf16, int8 = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(**kw, int8_weights=True))
    assert 0.45 < int8.memory_bytes()["layers"] / bf16.memory_bytes()["layers"] < 0.55  # int8 plus a scale per row
    prefixes = [bf16.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    cos = F.cosine_similarity(int8.next_token_logits(prefixes), bf16.next_token_logits(prefixes), dim=-1)
    assert bool((cos > 0.98).all()), cos
    [r] = int8.generate(PROMPTS[:1], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(r.token_ids) == 8
    # the LM head: its int8 copy up to the plan's row count, the dense bf16 weight above it
    head, h = int8.model, torch.randn(2, 576).bfloat16()
    assert head.head_int8 is not None and bf16.model.head_int8 is None
    head.head_plan.int8_rows = 2
    assert torch.equal(head.logits(h), head.head_int8(head.norm(h)))
    vocab, hidden = head.lm_head_weight.shape
    assert (head.head_bytes(2), head.head_bytes(3)) == (vocab * hidden + 2 * vocab, 2 * vocab * hidden)  # bf16 scales
    head.head_plan.int8_rows = 1
    torch.testing.assert_close(head.logits(h), F.linear(head.norm(h), head.lm_head_weight))
    assert int8.memory_bytes()["base"] > bf16.memory_bytes()["base"]  # the int8 copy is counted
    int8.load_layers(int8.depth - 2)  # layers loaded later are int8 too
    int8.load_layers(int8.depth + 2)
    assert isinstance(int8.model.layers[-1].mlp.up_proj, matmul_plan.Int8Linear)
    with pytest.raises(ValidationError, match="int8_weights"):
        EngineConfig(int8_weights=True)  # fp32 activations: not on the int8 kernel's fast path
