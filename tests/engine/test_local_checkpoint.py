"""Any local Hugging Face checkpoint directory of a supported family loads and matches transformers."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


@pytest.mark.parametrize("arch, extra", [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "query_pre_attn_scalar": 16}),
])
def test_local_checkpoint_matches_transformers(smollm2, tmp_path, arch, extra):
    tokenizer = smollm2.tokenizer
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), **SMALL, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is near-uniform; a wider spread makes argmax decisive
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)

    engine = LLMEngine(EngineConfig(model=str(tmp_path / arch), home=tmp_path / "home", max_batch_size=2))
    prompts = ["def add(a, b):", "A long prompt that runs past the sliding window of eight tokens, twice over."]
    results = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert result.token_ids == out[0, ids["input_ids"].shape[1]:].tolist()
    assert engine.store.num_layers == 4


def _first_use(ckpt: str, home: str) -> str:
    from engine.store import ensure_converted

    return str(ensure_converted(ckpt, Path(home)))


def test_concurrent_first_use_converts_once_and_whole(smollm2, tmp_path):
    """Replicas of one model start together; each must find a complete store, none a half-written one."""
    from engine.store import LayerStore

    config = AutoConfig.for_model("llama", vocab_size=len(smollm2.tokenizer), **SMALL)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    smollm2.tokenizer.save_pretrained(tmp_path / "ckpt")
    home = tmp_path / "home"
    home.mkdir()
    (home / "stale").mkdir()  # an unrelated directory stays untouched
    # processes, as replicas are: threads would share transformers' process-wide loading state
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        outs = list(pool.map(_first_use, [str(tmp_path / "ckpt")] * 3, [str(home)] * 3))
    assert len(set(outs)) == 1
    store = LayerStore(Path(outs[0]))
    assert store.num_layers == 4 and all(store.layer(i) for i in range(4))
    assert sorted(p.name for p in home.iterdir()) == sorted(["stale", Path(outs[0]).name])  # no temp dirs left
