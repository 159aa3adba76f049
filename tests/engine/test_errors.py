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
