"""Faults against the real cluster: hostile requests beside a healthy stream, back-pressure, a frozen
Redis, a killed controller, a killed replica mid-stream. Runs after the other cluster tests (file
order): the last one replaces a replica."""
import concurrent.futures
import json
import time

import httpx
import pytest
import ray
import redis

from tests.cluster.conftest import ADMIN_KEY, API_KEY, FULL

pytestmark = pytest.mark.slow
AUTH = {"authorization": f"Bearer {API_KEY}"}


def _stream(url: str, body: dict, timeout: float = 300) -> tuple[int, list, dict]:
    """(status, the SSE events as parsed JSON or the string "[DONE]", response headers)."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=timeout) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(r.read())], dict(r.headers)
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return 200, [e if e == "[DONE]" else json.loads(e) for e in events], dict(r.headers)


def _text_tokens(events: list) -> int:
    return sum(1 for e in events if isinstance(e, dict) and "choices" in e)


# every refusal is tested fast (tests/deployments/test_gateway.py); these go through Serve's HTTP
# proxy as bytes, where framing and size limits act, and across the Ray hop to a replica
@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "smollm2", "prompt": "\xff\xfe not UTF-8"}', 400, "body"),
    (b"[" * 100_000 + b"]" * 100_000, None, "body"),  # nested too deep, or simply too large: refused either way
    (json.dumps({"model": "smollm2", "prompt": "x" * 70_000}).encode(), 413, "body"),
    (json.dumps({"model": "smollm2", "prompt": "x", "seed": 2**64}).encode(), 400, "seed"),
    # refused in the replica: the error crosses the Ray hop wrapped, and still names its field
    (json.dumps({"model": "smollm2", "prompt": "word " * 1500}).encode(), 400, "prompt"),
])
def test_hostile_requests_get_openai_errors(cluster, body, status, param):
    r = httpx.post(f"{cluster.url}/v1/completions", content=body, timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status if status else 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_a_poisoned_request_beside_healthy_streams_harms_nobody(cluster):
    healthy = {"model": "smollm2", "prompt": "Count slowly:", "max_tokens": 24, **FULL}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(_stream, cluster.url, healthy) for _ in range(2)]
        time.sleep(1.0)
        # 1e-40 once overflowed the sampler and ended the replica's step loop
        poison = httpx.post(f"{cluster.url}/v1/completions", headers=AUTH, timeout=120, json={
            "model": "smollm2", "prompt": "Poison", "max_tokens": 4, "temperature": 1e-40, **FULL})
        results = [f.result() for f in streams]
    assert poison.status_code == 200 and poison.json()["usage"]["completion_tokens"] == 4
    for status, events, _ in results:
        assert status == 200 and events[-1] == "[DONE]" and _text_tokens(events) == 24


def test_wrong_or_missing_api_key_is_a_401(cluster):
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(f"{cluster.url}/v1/completions", json={"prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{cluster.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{cluster.url}/health", timeout=30).json()["status"] == "ok"  # probes need no key


def test_a_burst_beyond_the_queue_gets_503_with_retry_after_and_the_rest_are_served(cluster):
    body = {"model": "shallow", "prompt": "Burst", "max_tokens": 32, **FULL}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: _stream(cluster.url, body), range(10)))
    refused = [(events, headers) for status, events, headers in results if status == 503]
    served = [events for status, events, _ in results if status == 200]
    assert refused and served and len(refused) + len(served) == 10
    for events, headers in refused:
        assert events[0]["error"]["code"] == "overloaded" and int(headers["retry-after"]) >= 1
    assert all(events[-1] == "[DONE]" and _text_tokens(events) == 32 for events in served)


def test_a_frozen_redis_does_not_hold_up_generation_and_loses_no_telemetry(cluster, client):
    from telemetry.reader import TelemetryReader

    store = redis.Redis.from_url(cluster.config.telemetry.redis_url)
    reader = TelemetryReader(cluster.config.telemetry, store)
    time.sleep(2)  # earlier requests' telemetry is flushed
    before = reader.totals("smollm2").tokens
    store.execute_command("CLIENT", "PAUSE", 20_000, "ALL")  # every Redis command hangs for 20 s
    t0 = time.monotonic()
    r = client.completions.create(model="smollm2", prompt="While Redis sleeps", max_tokens=12, extra_body=FULL)
    took = time.monotonic() - t0
    assert r.usage.completion_tokens == 12
    assert took < 18, f"generation waited for Redis ({took:.1f} s)"  # telemetry writes never block a step
    time.sleep(max(0.0, 21 - (time.monotonic() - t0)))  # the pause ends by itself
    deadline = time.time() + 60
    while time.time() < deadline and reader.totals("smollm2").tokens < before + 12:
        time.sleep(0.5)
    assert reader.totals("smollm2").tokens - before == 12  # buffered through the freeze, then written


def test_a_killed_controller_comes_back_with_its_state_and_routing_goes_on(cluster, client):
    before = ray.get(cluster.controller.state.remote())
    ray.kill(cluster.controller, no_restart=False)  # the process dies; Ray restarts the actor
    r = client.completions.create(model="auto", prompt="Anyone there?", max_tokens=3, extra_body=FULL)
    assert r.usage.completion_tokens == 3 and r.model in {"shallow", "smollm2"}  # routed while it was away
    deadline, state = time.time() + 120, None
    while time.time() < deadline:
        s = httpx.get(f"{cluster.url}/admin/state", timeout=30)
        if s.status_code == 200 and s.json()["restored"] and len(s.json()["profiles"]) == 2:  # loop resumed
            state = s.json()
            break
        time.sleep(1)
    assert state is not None and state["current"] == before["current"]
    cluster.controller = ray.get_actor(cluster.config.controller.actor_name, cluster.config.controller.namespace)


def _busy(server) -> bool:
    stats = server.stats.remote().result()
    return bool(stats.running or stats.waiting)


def test_a_client_that_goes_away_frees_its_slot(cluster):
    from ray import serve

    server = serve.get_deployment_handle("model-smollm2", cluster.config.app_name)
    deadline = time.time() + 120  # requests of earlier tests (streams cut on the client side) finish first
    while time.time() < deadline and _busy(server):
        time.sleep(0.5)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", headers=AUTH, timeout=120, json={
            "model": "smollm2", "prompt": "Tell me everything:", "max_tokens": 400, "stream": True, **FULL}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
        assert server.stats.remote().result().running == 1
    deadline = time.time() + 10
    while time.time() < deadline and server.stats.remote().result().running:
        time.sleep(0.2)
    stats = server.stats.remote().result()
    assert stats.running == 0 and stats.waiting == 0


def test_a_killed_replica_ends_its_streams_with_an_error_and_returns_at_the_controllers_depth(cluster, client):
    set_depth = httpx.post(f"{cluster.url}/admin/depth", json={"candidate": "smollm2", "depth": 22}, timeout=60,
                           headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert set_depth.status_code == 200, set_depth.text
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "model-smollm2" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(_stream, cluster.url, {"model": "smollm2", "prompt": "Long story:",
                                                      "max_tokens": 200, **FULL}) for _ in range(2)]
        time.sleep(3)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]))
        results = [f.result() for f in streams]
    for status, events, _ in results:
        assert status == 200 and events[-1] == "[DONE]"
        assert "error" in events[-2] and _text_tokens(events) < 200  # cut, and the client is told
    deadline, served = time.time() + 240, None
    while time.time() < deadline and served is None:
        try:
            served = client.completions.create(model="smollm2", prompt="Back?", max_tokens=2, extra_body=FULL)
        except Exception:  # noqa: BLE001 - the replacement is still loading
            time.sleep(2)
    assert served is not None and served.model_extra["helios"]["loaded_depth"] == 22


def test_fuzzed_openai_bodies_never_get_a_5xx(cluster):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=20))
    value = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                           max_size=3), max_leaves=8)
    fields = {"model": st.one_of(st.sampled_from(["auto", "smollm2", "shallow", "nope"]), value),
              "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 60_000), max_size=6), value),
              "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", 1]),
                                                                     "content": st.text(max_size=20)}), max_size=2),
                                    value),
              # generation stays short: the point is the refusals, not the tokens
              "max_tokens": st.one_of(st.integers(-3, 2), value),
              "temperature": st.one_of(st.floats(-1, 3), value), "top_p": st.one_of(st.floats(-1, 2), value),
              "seed": st.one_of(st.integers(-2**70, 2**70), value), "stop": value, "stream": st.booleans(),
              "n": value, "logprobs": value, "echo": value}

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["completions", "chat/completions"]), st.fixed_dictionaries({}, optional=fields))
    def check(path, body):
        if "max_tokens" not in body or not isinstance(body["max_tokens"], int):
            body["max_tokens"] = 2  # an absent or refused value would default to 64 tokens
        r = httpx.post(f"{cluster.url}/v1/{path}", content=json.dumps(body), timeout=120,  # NaN and Infinity too
                       headers={**AUTH, "content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert "error" in r.json(), r.text
    check()
