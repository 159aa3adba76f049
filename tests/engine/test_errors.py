"""Bad input gets a clear error naming what is wrong, and the engine keeps serving."""
import json

import pytest
from pydantic import ValidationError

from engine import CheckpointError, EngineConfig, LLMEngine, RequestError, SamplingParams


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nowhere"), home=tmp_path))


def test_directory_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "ckpt"), home=tmp_path))


def test_unsupported_architecture(tmp_path):
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        LLMEngine(EngineConfig(model=str(ckpt), home=tmp_path / "home"))


def test_depth_outside_range(smollm2):
    with pytest.raises(ValidationError, match="depth"):
        EngineConfig(model="smollm2", depth=0)
    with pytest.raises(CheckpointError, match="depth 31 outside 1..30"):
        LLMEngine(EngineConfig(model="smollm2", depth=31, home=smollm2.home))
    engine = LLMEngine(EngineConfig(model="smollm2", depth=4, exits=False, home=smollm2.home))
    with pytest.raises(CheckpointError, match="depth 0 outside"):
        engine.load_layers(0)
    assert engine.depth == 4


@pytest.mark.parametrize("bad, field", [({"temperature": -0.5}, "temperature"), ({"max_tokens": -1}, "max_tokens"),
                                        ({"top_p": 0.0}, "top_p"), ({"bogus": 1}, "bogus")])
def test_bad_sampling_parameters(bad, field):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**bad)


def test_bad_requests_are_refused_and_engine_keeps_going(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_model_len=64, home=smollm2.home))
    with pytest.raises(RequestError) as e:
        engine.add_request("word " * 100, SamplingParams(max_tokens=4))
    assert e.value.field == "prompt" and "context limit of 64" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.add_request("hello", SamplingParams(max_tokens=64))
    assert e.value.field == "max_tokens"
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([10**9], SamplingParams())
    [result] = engine.generate(["hello"], SamplingParams(max_tokens=3))
    assert len(result.token_ids) == 3


def test_sampling_parameters_the_maths_cannot_take_are_clamped_or_refused():
    assert SamplingParams(temperature=1e-40).temperature == 1e-2  # 1/1e-40 overflows the softmax
    assert SamplingParams(temperature=0).temperature == 0
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValidationError, match="seed"):
            SamplingParams(seed=seed)
    SamplingParams(seed=2**64 - 1)


def test_text_that_cannot_fit_or_encode_is_refused_before_tokenising(smollm2):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, max_model_len=64, home=smollm2.home))
    with pytest.raises(RequestError, match="characters") as e:
        engine.add_request("x" * (engine.max_prompt_chars + 1), SamplingParams(max_tokens=2))
    assert e.value.field == "prompt"
    with pytest.raises(RequestError, match="Unicode") as e:
        engine.add_request("a lone \ud800 surrogate", SamplingParams(max_tokens=2))
    assert e.value.field == "prompt"


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(smollm2, monkeypatch):
    import engine.engine as engine_module

    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, home=smollm2.home))
    [reference] = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=6, ignore_eos=True))
    real_sample, calls = engine_module.sample, []

    def faulty(logits, seqs):  # the third step breaks, as a NaN or a device fault would
        calls.append(len(seqs))
        if len(calls) == 3:
            raise RuntimeError("probability tensor contains nan")
        return real_sample(logits, seqs)
    monkeypatch.setattr(engine_module, "sample", faulty)
    a = engine.add_request("first request", SamplingParams(max_tokens=8, ignore_eos=True))
    b = engine.add_request("second request", SamplingParams(max_tokens=8, ignore_eos=True))
    finished = {}
    while engine.has_unfinished():
        for o in engine.step().outputs:
            if o.finished:
                finished[o.request_id] = o
    assert {finished[a].finish_reason, finished[b].finish_reason} == {"error"}
    assert "nan" in finished[a].error and finished[a].num_output_tokens == 2
    monkeypatch.setattr(engine_module, "sample", real_sample)
    [again] = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=6, ignore_eos=True))
    assert again.token_ids == reference.token_ids and engine.scheduler.free_slots  # slots came back
    assert len(engine.scheduler.free_slots) == engine.config.max_batch_size
