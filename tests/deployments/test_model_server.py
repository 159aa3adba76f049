"""The model server over a scripted engine (no model, no Ray cluster): streaming, stop-string
hold-back, aborts, failures and refusals, in seconds. The cluster tests run the same class for real."""
import asyncio
import json
import time
from functools import partial

import pytest

from deployments.contracts import GenerateRequest
from deployments.model_server import ModelServer
from deployments.streaming import StepFailed
from engine import RequestError, SamplingParams
from tests.deployments.scripted_engine import ScriptedEngine


def _server(redis_url, chat=True, **script):
    candidate = {"name": "scripted", "engine": {"max_batch_size": 4, "max_model_len": 256}, "shadow_rate": 0}
    server = ModelServer.func_or_class(candidate, {"redis_url": redis_url},
                                       engine_cls=partial(ScriptedEngine, **script))
    if not chat:
        server.engine.tokenizer.chat_template = None
    return server


def _req(prompt=None, messages=None, **params):
    return GenerateRequest(SamplingParams(**params), prompt, messages)


def _run(coro):
    """One event loop per server, as in a replica: its step thread hands outputs to that loop."""
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _collect(server, request):
    return [c async for c in server.generate(request)]


def test_a_stream_never_shows_text_that_a_stop_string_later_cuts(redis_url):
    # "\nE" could begin "\nEND" twice before the real one: the client must never see it
    server = _server(redis_url, reply=lambda p: "a\nEx b\nEy c\nEND and more")
    chunks = _run(_collect(server, _req(prompt="go", max_tokens=40, stop=["\nEND"])))
    final = "a\nEx b\nEy c"
    shown = ""
    for c in chunks:
        shown += c.text
        assert final.startswith(shown), shown
    assert shown == final and chunks[-1].finish_reason == "stop" and chunks[-1].finished
    # usage: the prompt's tokens and every token generated, the cut stop string's included
    assert chunks[-1].prompt_tokens == 2 and chunks[-1].completion_tokens == len(final) + len("\nEND")
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].completion_tokens
    assert all(layer == 4 for c in chunks for layer in c.exit_layers) and chunks[-1].candidate == "scripted"


def test_max_tokens_ends_a_stream_with_length_and_chat_messages_use_the_template(redis_url):
    server = _server(redis_url)

    async def both():
        return await asyncio.gather(
            _collect(server, _req(messages=[{"role": "user", "content": "hi"}], max_tokens=12)),
            _collect(server, _req(prompt="ok", max_tokens=100)))

    chat, plain = _run(both())
    assert "".join(c.text for c in chat) == "You said: <u" and chat[-1].finish_reason == "length"
    assert "".join(c.text for c in plain) == "You said: ok" and plain[-1].finish_reason == "stop"  # end of sequence


def test_a_client_that_goes_away_frees_its_slot_at_once(redis_url):
    server = _server(redis_url, reply=lambda p: "x" * 200, step_s=0.01)

    async def leave_early():
        gen = server.generate(_req(prompt="go", max_tokens=200))
        for _ in range(3):
            await gen.__anext__()
        assert server.engine.queue_lengths() == (0, 1)
        await gen.aclose()  # what Serve does when the HTTP client disconnects
        t0 = time.monotonic()
        while server.engine.queue_lengths() != (0, 0):
            await asyncio.sleep(0.005)
        return time.monotonic() - t0

    assert _run(leave_early()) < 1.0
    assert server.engine.stats.tokens < 50  # it stopped generating for nobody


def test_a_reader_that_falls_behind_gets_the_steps_it_missed_as_one_chunk(redis_url):
    server = _server(redis_url, reply=lambda p: "abcdefghijklmnopqrstuvwxyz", step_s=0.01)

    async def slow_reader(delay_s: float):
        chunks = []
        async for c in server.generate(_req(prompt="go", max_tokens=26)):
            chunks.append(c)
            await asyncio.sleep(delay_s)  # the step thread goes on meanwhile
        return chunks

    async def both():
        return await slow_reader(0.0), await slow_reader(0.1)

    prompt, slow = _run(both())
    for chunks in (prompt, slow):
        assert "".join(c.text for c in chunks) == "abcdefghijklmnopqrstuvwxyz"
        assert sum(len(c.token_ids) for c in chunks) == sum(len(c.exit_layers) for c in chunks) == 26
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert len(prompt) > 20 and len(slow) < 8  # fewer, larger chunks: nothing lost


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(redis_url):
    server = _server(redis_url, reply=lambda p: "ok!" if p == "bad" else f"fine {p}")

    async def scenario():
        with pytest.raises(StepFailed, match="scripted failure"):
            await _collect(server, _req(prompt="bad", max_tokens=10))
        later = await _collect(server, _req(prompt="good", max_tokens=30))
        return "".join(c.text for c in later)

    assert _run(scenario()) == "fine good"
    server.check_health()  # the step thread lives on
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.tokens_served) == (0, 0, len("fine good") + 1 + len("ok"))
    # (its end-of-sequence token, and the failed request's tokens before its step failed)


def test_bad_requests_are_refused_naming_the_field_before_any_work(redis_url):
    server = _server(redis_url, chat=False)
    cases = [(_req(prompt="x" * 300), "prompt"),  # longer than the context
             (_req(prompt="hi", max_tokens=255), "max_tokens"),
             (_req(messages=[{"role": "user", "content": "hi"}]), "messages")]  # no chat template


    async def refused():
        fields = []
        for request, _ in cases:
            with pytest.raises(RequestError) as err:
                await _collect(server, request)
            fields.append(err.value.field)
        return fields

    assert _run(refused()) == [field for _, field in cases]
    assert server.engine.stats.tokens == 0 and server.engine.queue_lengths() == (0, 0)


def test_an_engine_without_a_thread_count_leaves_cores_to_the_processes_serving_beside_it(redis_url, monkeypatch):
    import deployments.model_server as ms

    monkeypatch.setattr(ms, "usable_cpus", lambda: 8)
    threads = {}
    for name, candidate in {"default": {}, "none reserved": {"reserved_cpus": 0}, "set": {"engine": {"threads": 3}},
                            "tiny": {"reserved_cpus": 16}}.items():
        server = ModelServer.func_or_class({"name": "s", "shadow_rate": 0, **candidate}, {"redis_url": redis_url},
                                           engine_cls=ScriptedEngine)
        threads[name] = server.engine.config.threads
    assert threads == {"default": 7, "none reserved": 8, "set": 3, "tiny": 1}


def test_every_replica_follows_the_depth_the_controller_set_and_a_new_one_starts_there(redis_url):
    import redis

    from controller.actor import STATE, bank_id, depth_field, setpoints

    name = "follower"  # its own STATE field: other tests' candidates keep theirs
    client = redis.Redis.from_url(redis_url)
    client.hdel(STATE, depth_field(name))

    def replica():
        candidate = {"name": name, "engine": {"max_batch_size": 2}, "shadow_rate": 0}
        return ModelServer.func_or_class(candidate, {"redis_url": redis_url, "flush_every_s": 0.05},
                                         engine_cls=ScriptedEngine)

    async def serve_then_move():
        a, b = replica(), replica()
        await _collect(a, _req(prompt="hi", max_tokens=2))  # b serves nothing: it follows all the same
        before = a.engine.depth, b.engine.depth
        # what the controller does: record the depth, then load it on the replica its handle picks
        client.hset(STATE, depth_field(name), 2)
        await a.load_layers(2)
        for _ in range(100):
            if b.engine.depth == 2:
                break
            await asyncio.sleep(0.05)
        return before, (a.engine.depth, b.engine.depth), replica().engine.depth

    before, after, newcomer = _run(serve_then_move())
    assert before == (4, 4) and after == (2, 2) and newcomer == 2
    assert setpoints(client, name, bank_id(None)) == (2, None)  # no thresholds set: the calibrated ones stay


def test_thresholds_tuned_for_one_exit_bank_do_not_reach_another(redis_url):
    import redis

    from controller.actor import STATE, bank_id, setpoints, thresholds_field

    client = redis.Redis.from_url(redis_url)
    old, new = bank_id({"agreement": 0.97}), bank_id({"agreement": 0.98})  # recalibrated since
    client.hset(STATE, thresholds_field("banks", old), json.dumps({"2": 0.9}))
    assert setpoints(client, "banks", old)[1] == {2: 0.9}
    assert setpoints(client, "banks", new)[1] is None and old != new
