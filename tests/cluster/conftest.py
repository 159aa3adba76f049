"""One real cluster for every test in this package: Ray Serve, Redis, SmolLM2 with its exit heads."""
import socket
from pathlib import Path

import pytest

from cluster.config import ClusterConfig
from cluster.local import start

ADMIN_KEY = "test-admin-key"
API_KEY = "test-api-key"
# exact token counts are asserted; an early end-of-sequence must not cut a request short
FULL = {"ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_chat_template(home: Path, into: Path) -> Path:
    """The same converted SmolLM2, its tokenizer without a chat template, as the shipped Gemma-3 base
    model is: files are linked, not copied."""
    store = into / "smollm2"
    store.mkdir(parents=True, exist_ok=True)
    for f in (home / "smollm2").iterdir():
        if f.name != "chat_template.jinja" and not (store / f.name).exists():
            (store / f.name).symlink_to(f)
    return into


@pytest.fixture(scope="package")
def cluster(smollm2_calibrated, redis_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    ref, _ = smollm2_calibrated
    home = str(ref.home)
    base_home = str(without_chat_template(ref.home, tmp_path_factory.mktemp("base_home")))
    from engine import EngineConfig, LLMEngine

    memory = LLMEngine(EngineConfig(model="smollm2", exits=False, home=home, max_batch_size=1)).memory
    cfg = ClusterConfig.model_validate({
        "port": 8931,
        "metrics_port": free_port(),
        "admin_api_key": ADMIN_KEY,
        "candidates": [
            # no exit heads at 8 of 30 layers: every token is a greedy exit, so this one breaches;
            # and no chat template, so chat must avoid it
            # and it admits 2 requests with 2 queued, so a burst meets back-pressure
            # (one replica each: these tests count a replica's slots and kill "the" replica;
            # test_replicas runs several)
            {"name": "shallow", "engine": {"model": "smollm2", "depth": 8, "exits": False, "home": base_home},
             "shadow_rate": 1.0, "max_ongoing_requests": 2, "max_queued_requests": 2, "num_replicas": 1},
            # a memory budget of 8 full-depth sequences: a shallower stack holds more (up to 16)
            {"name": "smollm2", "engine": {"model": "smollm2", "home": home, "max_batch_size": 16,
                                           "memory_budget": memory.weights(30) + 8 * memory.per_sequence(30)},
             "shadow_rate": 1.0, "num_replicas": 1},
        ],
        "controller": {"quality_floor": 0.0, "breach_window": 30, "breach_max": 10, "profile_sample": 1,
                       "tick_s": 0.5, "thresholds": {"min_checks": 8}},
        "telemetry": {"redis_url": redis_url, "flush_every_s": 0.5},
        "gateway": {"api_keys": [API_KEY], "max_body_bytes": 65536},
    })
    c = start(cfg, embedded_redis=False)
    yield c
    c.shutdown()


@pytest.fixture(scope="package")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY)
