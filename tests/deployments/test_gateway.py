"""The OpenAI gateway over model servers with scripted engines, in one process (tests.deployments.
in_process): response shapes, SSE framing, usage, errors, timeouts and refusals, in seconds. The
cluster tests send real HTTP through Serve's proxy to the same classes with real models."""
import asyncio
import json
import time
from functools import partial

import pytest

from deployments.model_server import ModelServer
from tests.deployments.in_process import client, sse_events
from tests.deployments.scripted_engine import ScriptedEngine, echo


def _server(redis_url, name="scripted", chat=True, **script):
    candidate = {"name": name, "engine": {"max_batch_size": 4, "max_model_len": 256}, "shadow_rate": 0}
    server = ModelServer.func_or_class(candidate, {"redis_url": redis_url},
                                       engine_cls=partial(ScriptedEngine, **script))
    if not chat:
        server.engine.tokenizer.chat_template = None
    return server


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_completions_and_chat_answer_in_the_openai_shape_with_usage_and_exits(redis_url):
    servers = {"scripted": _server(redis_url), "base": _server(redis_url, "base", chat=False)}

    async def go():
        async with client(servers) as c:
            models = (await c.get("/v1/models")).json()
            done = (await c.post("/v1/completions", json={"model": "scripted", "prompt": "hi", "max_tokens": 50})).json()
            chat = (await c.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})).json()
            return models, done, chat

    models, done, chat = _run(go())
    assert [m["id"] for m in models["data"]] == ["auto", "base", "scripted"]
    reply = echo("hi")
    assert done["object"] == "text_completion" and done["choices"][0]["text"] == reply
    assert done["choices"][0]["finish_reason"] == "stop"
    # the end-of-sequence token counts as generated, as in vLLM
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": len(reply) + 1, "total_tokens": len(reply) + 3}
    assert done["helios"]["candidate"] == "scripted" and done["helios"]["exit_layers"] == [4] * (len(reply) + 1)
    # "auto" does not send messages to the candidate without a chat template; the template was applied
    assert chat["model"] == "scripted" and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": echo("<user>hi<assistant>")}


def test_a_stream_is_sse_chunks_then_done_with_usage_on_the_last(redis_url):
    servers = {"scripted": _server(redis_url)}

    async def go():
        async with client(servers) as c:
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "yo"}], "max_tokens": 50, "stream": True})
            return r

    r = _run(go())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and len(events) > 3
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == chunks[0]["id"] for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == echo("<user>yo<assistant>")
    assert [e["choices"][0].get("finish_reason") for e in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["helios"]["candidate"] == "scripted"


def test_a_failing_step_is_a_500_or_an_error_event_and_the_next_request_is_served(redis_url):
    servers = {"scripted": _server(redis_url, reply=lambda p: "ok" if p == "fine" else "abc!def")}

    async def go():
        async with client(servers) as c:
            plain = await c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 20})
            streamed = await c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 20, "stream": True})
            after = await c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 20})
            return plain, streamed, after

    plain, streamed, after = _run(go())
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "generation_failed"
    events = sse_events(streamed.text)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "generation_failed"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "abc"  # what came before the failure
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == "ok"


def test_a_request_over_its_time_gets_408_or_an_error_event_and_frees_its_slot(redis_url):
    server = _server(redis_url, reply=lambda p: "z" * 200, step_s=0.02)

    async def go():
        async with client({"scripted": server}, limits={"request_timeout_s": 0.3}) as c:
            start = time.monotonic()
            plain = await c.post("/v1/completions", json={"prompt": "slow", "max_tokens": 200})
            took = time.monotonic() - start
            streamed = await c.post("/v1/completions", json={"prompt": "slow", "max_tokens": 200, "stream": True})
            for _ in range(100):  # the abort runs on the step thread
                if server.engine.queue_lengths() == (0, 0):
                    break
                await asyncio.sleep(0.02)
            return plain, took, streamed, server.engine.queue_lengths()

    plain, took, streamed, queues = _run(go())
    assert plain.status_code == 408 and plain.json()["error"]["code"] == "timeout" and took < 3
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    assert 0 < len(events) - 2 < 200  # some text came, then the deadline cut it
    assert queues == (0, 0)


BAD = [  # (path, body: JSON or raw bytes, status (None: any 4xx), the field the error names)
    ("completions", b"{not json", 400, "body"),
    ("completions", b'{"prompt": "\xff\xfe not UTF-8"}', 400, "body"),
    ("completions", b"[" * 20_000 + b"]" * 20_000, None, "body"),  # nested too deep
    ("completions", {"prompt": "x" * 70_000}, 413, "body"),
    ("completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("completions", {"prompt": "x", "max_tokens": -2}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),  # refused by the engine
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("completions", b'{"prompt": "a lone \\ud800 surrogate"}', 400, "prompt"),
    ("completions", {"prompt": "word " * 100}, 400, "prompt"),  # longer than the context
    ("chat/completions", {"messages": []}, 400, "messages"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_an_openai_error_naming_the_field_and_harm_nothing(redis_url, path, body, status, param):
    servers = {"scripted": _server(redis_url)}

    async def go():
        async with client(servers, limits={"max_body_bytes": 65536}) as c:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            bad = await c.post(f"/v1/{path}", content=raw, headers={"content-type": "application/json"})
            fine = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
            return bad, fine

    bad, fine = _run(go())
    assert bad.status_code == status if status else 400 <= bad.status_code < 500, bad.text
    assert bad.json()["error"]["param"] == param and bad.json()["error"]["message"], bad.text
    assert fine.status_code == 200 and fine.json()["choices"][0]["text"] == "You"


def test_api_keys_guard_v1_but_not_the_health_probe(redis_url):
    servers = {"scripted": _server(redis_url)}

    async def go():
        async with client(servers, limits={"api_keys": ["sesame", "other"]}) as c:
            refused = [await c.post("/v1/completions", json={"prompt": "x"}, headers=h)
                       for h in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sesame"})]
            refused.append(await c.get("/v1/models"))
            ok = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3},
                              headers={"Authorization": "Bearer other"})
            return refused, ok, await c.get("/health")

    refused, ok, health = _run(go())
    for r in refused:
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert ok.status_code == 200 and health.json()["status"] == "ok"
