"""One real cluster for every test in this package: Ray Serve, Redis, SmolLM2 with its exit heads."""
import socket

import pytest

from cluster.config import ClusterConfig
from cluster.local import start

ADMIN_KEY = "test-admin-key"
# exact token counts are asserted; an early end-of-sequence must not cut a request short
FULL = {"ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def cluster(smollm2_calibrated, redis_url):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    ref, _ = smollm2_calibrated
    home = str(ref.home)
    cfg = ClusterConfig.model_validate({
        "port": 8931,
        "metrics_port": free_port(),
        "admin_api_key": ADMIN_KEY,
        "candidates": [
            # no exit heads at 8 of 30 layers: every token is a greedy exit, so this one breaches
            {"name": "shallow", "engine": {"model": "smollm2", "depth": 8, "exits": False, "home": home},
             "shadow_rate": 1.0},
            {"name": "smollm2", "engine": {"model": "smollm2", "home": home}},
        ],
        "controller": {"quality_floor": 0.0, "breach_window": 30, "breach_max": 10, "profile_sample": 1,
                       "tick_s": 0.5},
        "telemetry": {"redis_url": redis_url, "flush_every_s": 0.5},
    })
    c = start(cfg, embedded_redis=False)
    yield c
    c.shutdown()


@pytest.fixture(scope="package")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
