"""The whole cluster, real parts: Ray Serve, Redis, SmolLM2, the official openai client."""
import json
import time
import urllib.error
import urllib.request

import pytest
import ray

from cluster.config import ClusterConfig
from cluster.local import RedisUnreachable, start
from tests.cluster.conftest import API_KEY, FULL
from telemetry.reader import TelemetryReader
from telemetry.schema import TelemetryConfig

pytestmark = pytest.mark.slow


def _post(url: str, body: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body.encode(), headers={"content-type": "application/json",
                                                                   "authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_completions(client):
    assert {m.id for m in client.models.list().data} == {"auto", "shallow", "smollm2"}
    r = client.completions.create(model="smollm2", prompt="def fibonacci(n):", max_tokens=10, temperature=0,
                                  extra_body=FULL)
    assert r.choices[0].text and r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 0
    helios = r.model_extra["helios"]
    assert helios["candidate"] == "smollm2" and len(helios["exit_layers"]) == 10
    assert all(1 <= l <= 30 for l in helios["exit_layers"])


def test_stop_string_across_tokens_is_cut_streamed_or_not(client):
    """A stop string that starts inside one token and ends in another: nothing of it reaches the client."""
    args = dict(model="shallow", prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    free = client.completions.create(**args, extra_body=FULL).choices[0].text
    start = free.index(" ", 2) + 2  # mid-word, so the stop string spans a token boundary
    stop = free[start:start + 6]
    whole = client.completions.create(**args, stop=[stop]).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=[stop], stream=True))
    assert whole.finish_reason == "stop"
    assert whole.text == streamed == free[: free.index(stop)]


def test_chat_avoids_a_candidate_without_chat_template(cluster, client):
    msgs = [{"role": "user", "content": "Hi"}]
    status, reply = _post(cluster.url + "/v1/chat/completions", json.dumps({"model": "shallow", "messages": msgs}))
    assert status == 400 and reply["error"]["param"] == "messages"
    for _ in range(3):  # whichever candidate the controller routes to, chat lands on one that has a template
        r = client.chat.completions.create(model="auto", messages=msgs, max_tokens=4)
        assert r.model_extra["helios"]["candidate"] == "smollm2"


def test_chat_stream_and_not(client):
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 8 - 1
    streamed = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0,
                                              stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed]
    assert "".join(pieces) == text and len(pieces) > 1
    s = client.completions.create(model="shallow", prompt="Hello", max_tokens=5, extra_body=FULL, stream=True)
    assert len([c for c in s]) == 5


def test_workload_shift_controller_acts_and_logs_why(cluster, client):
    for _ in range(12):  # "auto" routes to the selected candidate, which breaches on every token
        r = client.completions.create(model="auto", prompt="The weather today", max_tokens=6, extra_body=FULL)
        assert r.usage.completion_tokens == 6
    deadline = time.time() + 300  # a wait, not a timing: under load a controller tick can lag
    acted = []
    while time.time() < deadline and not acted:
        acted = [d for d in ray.get(cluster.controller.decisions.remote()) if d["action"] in ("load_deeper", "switch")]
        time.sleep(0.5)
    assert acted, ray.get(cluster.controller.decisions.remote())
    d = acted[0]
    assert d["candidate"] in ("shallow", "smollm2") and "breaches" in d["reason"]
    reselected = [d for d in ray.get(cluster.controller.decisions.remote()) if "profiling round" in d["reason"]]
    assert reselected and set(reselected[-1]["evidence"]["profiles"]) == {"shallow", "smollm2"}
    assert all(p["tokens_per_s"] > 0 for p in reselected[-1]["evidence"]["profiles"].values())
    assert d["evidence"]["breaches_in_window"] > 10 and d["evidence"]["greedy_rate"] > 0.5
    r = client.completions.create(model="auto", prompt="And tomorrow", max_tokens=4, extra_body=FULL)
    assert r.usage.completion_tokens == 4


def test_telemetry_counts_equal_tokens_served(cluster, client):
    reader = TelemetryReader(TelemetryConfig(redis_url=cluster.config.telemetry.redis_url))
    served = {"shallow": 0, "smollm2": 0}
    for name in served:
        before = reader.totals(name).tokens
        for _ in range(3):
            r = client.completions.create(model=name, prompt="Count", max_tokens=7, extra_body=FULL)
            served[name] += r.usage.completion_tokens
        time.sleep(1.5)  # > flush interval
        assert reader.totals(name).tokens - before == served[name] == 21


def test_shadow_verification_measures_live_agreement(cluster, client):
    reader = TelemetryReader(TelemetryConfig(redis_url=cluster.config.telemetry.redis_url))
    # earlier tests' tokens may still be on their way through the verifier: count from when it has
    # re-checked every greedy exit so far (all of "shallow"'s tokens are greedy exits)
    deadline = time.time() + 300
    while time.time() < deadline and reader.totals("shallow").shadow_checked < reader.totals("shallow").greedy:
        time.sleep(0.5)
    before = reader.totals("shallow")
    for _ in range(3):
        client.completions.create(model="shallow", prompt="def add(a, b):", max_tokens=8, temperature=0,
                                  extra_body=FULL)
    deadline = time.time() + 300  # a wait, not a timing: the verifier may still be working off a backlog
    while time.time() < deadline and reader.totals("shallow").shadow_checked - before.shadow_checked < 24:
        time.sleep(0.5)
    after = reader.totals("shallow")
    checked = after.shadow_checked - before.shadow_checked
    agreed = after.shadow_agreed - before.shadow_agreed
    assert checked == 24  # every token exits early at 8 of 30 layers, and every one is re-checked
    assert agreed < checked  # 8 layers through the final head disagree with the full model
    # each disagreement is a breach on top of the greedy exits themselves
    assert after.breaches - before.breaches == (after.greedy - before.greedy) + (checked - agreed)


def test_unreachable_redis_is_a_clear_error():
    cfg = ClusterConfig.model_validate({"telemetry": {"redis_url": "redis://127.0.0.1:1/0"}})
    with pytest.raises(RedisUnreachable, match="redis://127.0.0.1:1/0"):
        start(cfg, embedded_redis=False)


def test_controller_restores_its_state_after_a_restart(cluster, client):
    import redis

    from cluster.local import start_controller
    from controller.actor import PROFILES

    store = redis.Redis.from_url(cluster.config.telemetry.redis_url)
    client.completions.create(model="auto", prompt="Measure me", max_tokens=4, extra_body=FULL)
    deadline = time.time() + 120
    while time.time() < deadline and not store.hlen(PROFILES):  # the loop persists what it measured
        time.sleep(0.5)
    before = ray.get(cluster.controller.state.remote())
    ray.kill(cluster.controller)
    time.sleep(1)
    # what the dead actor left behind; the live profile moves with the telemetry windows, this does not
    persisted = {k.decode(): json.loads(v) for k, v in store.hgetall(PROFILES).items()}
    assert persisted
    cluster.controller = fresh = start_controller(cluster.config)
    after = ray.get(fresh.state.remote())
    assert after["restored"] and after["current"] == before["current"]
    restore = next(d for d in ray.get(fresh.decisions.remote(5)) if d["action"] == "restore")
    for name, profile in persisted.items():
        assert restore["evidence"]["profiles"][name] == profile
    r = client.completions.create(model="auto", prompt="Still here?", max_tokens=3, extra_body=FULL)
    assert r.usage.completion_tokens == 3
