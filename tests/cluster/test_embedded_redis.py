"""The redis-server `helios serve` embeds: its data survives the process, which comes back by itself."""
import time

import redis

from cluster.local import EmbeddedRedis
from telemetry.schema import redact_url


def test_a_killed_embedded_redis_comes_back_on_its_port_with_its_data(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.hset("helios:controller:state", "current", "gemma3")
        server.proc.kill()
        deadline = time.time() + 20
        while time.time() < deadline and server.restarts == 0:
            time.sleep(0.2)
        assert server.restarts == 1
        assert client.hget("helios:controller:state", "current") == b"gemma3"  # append-only file, same port
    finally:
        server.stop()


def test_passwords_stay_out_of_printed_urls():
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://user:s3cret@redis/0") == "redis://user:***@redis/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
