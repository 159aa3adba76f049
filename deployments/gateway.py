"""OpenAI-compatible REST gateway: /v1/completions, /v1/chat/completions, /v1/models, /health,
plus the operator page (/dashboard) and its admin API (/admin/...).

`model: "auto"` asks the controller actor which candidate serves the request; a candidate's name
pins it. Every response carries a `helios` extension field (OpenAI clients ignore it): the
candidate that served it and how its tokens exited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import ray
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.actor import ControllerSpec, ensure_controller
from deployments import openai_schema as oai
from deployments.contracts import GenerateRequest
from deployments import operator as op
from deployments.http_limits import BodyLimit, GatewayConfig, key_accepted
from deployments.streaming import StepFailed
from engine import RequestError
from telemetry.metrics import GatewayMetrics

log = logging.getLogger("ray.serve")
app = FastAPI(title="helios-serve", docs_url=None, redoc_url=None)
_limits = GatewayConfig()  # this replica's, set by Gateway.__init__; the middleware reads it per request
app.add_middleware(BodyLimit, limit=lambda: _limits.max_body_bytes)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError):
    err = exc.errors()[0]
    # union members show up in loc as type tags ("function-after[...]", "list[int]"): not fields
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not any(c in str(x) for c in "[(")]
    param = "body" if err.get("type") == "json_invalid" or not loc else ".".join(loc)
    return JSONResponse(oai.error_body(f"{param}: {err.get('msg')}", param), status_code=400)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return JSONResponse(oai.error_body(exc.message, exc.param, code=exc.code), status_code=exc.status,
                        headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    # FastAPI's own refusals (a body that is not UTF-8 or nests too deep, a route that does not
    # exist, a body too large) in the OpenAI shape too
    param = "body" if exc.status_code in (400, 413) else None
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return JSONResponse(oai.error_body(str(exc.detail), param, code=code), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    log.error("unhandled error: %r", exc)
    return JSONResponse(oai.error_body(f"internal error: {type(exc).__name__}", None, "server_error",
                                       "internal_error"), status_code=500)


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception; .cause is the original
    if isinstance(cause, RequestError):
        return APIError(400, str(cause), cause.field)
    if isinstance(cause, ValidationError):
        e = cause.errors()[0]
        field = ".".join(str(x) for x in e.get("loc", ())) or None
        return APIError(400, f"{field}: {e.get('msg')}", field)
    if isinstance(cause, BackPressureError):
        return APIError(503, "the model is at capacity; retry later", None, "overloaded",
                        {"Retry-After": str(_limits.retry_after_s)})
    if isinstance(cause, StepFailed):
        return APIError(500, str(cause), None, "generation_failed")
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return APIError(503, "the replica serving this request went away; retry", None, "replica_unavailable",
                        {"Retry-After": str(_limits.retry_after_s)})
    log.exception("request failed")
    return APIError(500, f"internal error: {type(cause).__name__}", None, "internal_error")


def _stats(chunks: list) -> oai.ExitStats:
    layers = [l for c in chunks for l in c.exit_layers]
    last = chunks[-1]
    return oai.ExitStats(candidate=last.candidate, loaded_depth=last.loaded_depth,
                         mean_exit_layer=sum(layers) / len(layers) if layers else 0.0,
                         greedy_exits=sum(c.greedy_exits for c in chunks), exit_layers=layers)


def _usage(last) -> oai.Usage:
    return oai.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                     total_tokens=last.prompt_tokens + last.completion_tokens)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, servers: dict[str, DeploymentHandle], controller: ControllerSpec | None = None,
                 default_max_tokens: int = 64, admin_key: str | None = None,
                 limits: GatewayConfig | dict | None = None):
        global _limits
        _limits = self.limits = GatewayConfig.model_validate(limits or {}).with_env()
        self.servers = {name: h.options(stream=True) for name, h in servers.items()}
        self.default_max_tokens = default_max_tokens
        self.controller = controller  # None: routing without a controller actor
        self._last_route: str | None = None  # routing goes on with this while the controller is away
        if controller is not None:
            ensure_controller(controller).start.remote()  # waits for the model servers; not awaited here
        self._watchdog: asyncio.Task | None = None  # started by the first request (needs the running loop)
        self._chat: set[str] | None = None  # candidates with a chat template, learnt on first chat request
        self._ready = False
        self.admin_key = admin_key
        self.metrics = GatewayMetrics()

    def _watch_controller(self) -> None:
        if self.controller and self._watchdog is None:
            tick = self.controller.config.tick_s
            self._watchdog = asyncio.get_running_loop().create_task(self._keep_controller(tick))

    async def _keep_controller(self, every_s: float) -> None:
        """Start the controller, and start it again whenever it is gone: Ray restarts a dead actor
        (max_restarts) and its __init__ restores state from Redis, but only start() resumes its loop;
        an actor that is gone for good is recreated."""
        while True:
            try:
                actor = ensure_controller(self.controller)
                await actor.start.remote()  # returns at once when already started
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("controller unavailable (%r); routing with the last table", e)
            await asyncio.sleep(max(every_s, 1.0))

    @app.get("/health")
    async def health(self):
        """Ready once every candidate answers, so a load balancer never sends a request too early."""
        self._watch_controller()
        if not self._ready:
            try:
                await asyncio.wait_for(asyncio.gather(*(h.options(stream=False).stats.remote()
                                                        for h in self.servers.values())), 5)
                self._ready = True
            except Exception:  # noqa: BLE001 - not yet
                return JSONResponse({"status": "starting", "candidates": sorted(self.servers)}, status_code=503)
        return {"status": "ok", "candidates": sorted(self.servers)}

    def _authorize(self, authorization: str | None) -> None:
        if self.limits.api_keys and not key_accepted(self.limits.api_keys, authorization):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", None, "invalid_api_key")

    @app.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict:
        self._authorize(authorization)
        names = ["auto", *sorted(self.servers)]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "helios"} for n in names]}

    @app.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest, authorization: str | None = Header(None)):
        self._authorize(authorization)
        candidate, stream = await self._start(body, prompt=body.prompt)
        if body.stream:
            return self._sse(stream, lambda c, first: oai.CompletionResponse(
                id=first.request_id, model=c.candidate,
                choices=[oai.CompletionChoice(text=c.text, finish_reason=c.finish_reason)]))
        chunks = await self._drain(stream)
        return oai.CompletionResponse(model=candidate, choices=[oai.CompletionChoice(
            text="".join(c.text for c in chunks), finish_reason=chunks[-1].finish_reason)],
            usage=_usage(chunks[-1]), helios=_stats(chunks))

    @app.post("/v1/chat/completions")
    async def chat(self, body: oai.ChatCompletionRequest, authorization: str | None = Header(None)):
        self._authorize(authorization)
        messages = [m.model_dump() for m in body.messages]
        candidate, stream = await self._start(body, messages=messages)
        if body.stream:
            return self._sse(stream, lambda c, first: oai.ChatCompletionChunk(
                id=first.request_id, model=c.candidate, choices=[oai.ChatChunkChoice(
                    delta=oai.ChatDelta(role="assistant" if c is first else None, content=c.text),
                    finish_reason=c.finish_reason)]))
        chunks = await self._drain(stream)
        return oai.ChatCompletionResponse(model=candidate, choices=[oai.ChatChoice(
            message=oai.ChatMessageOut(content="".join(c.text for c in chunks)),
            finish_reason=chunks[-1].finish_reason)], usage=_usage(chunks[-1]), helios=_stats(chunks))

    # ---- operator page and admin API --------------------------------------------------------------
    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(self) -> str:
        return op.PAGE.read_text()

    @app.get("/admin/state")
    async def admin_state(self) -> dict:
        try:
            return await self._controller_call("snapshot")
        except APIError:
            raise
        except Exception as e:  # e.g. Redis down under the controller: still an answer the page can show
            raise APIError(503, f"controller state unavailable: {type(e).__name__}", None, "controller_unavailable")

    @app.post("/admin/reprofile")
    async def admin_reprofile(self, authorization: str | None = Header(None)) -> dict:
        self._admin(authorization)
        return await self._controller_call("reprofile")

    @app.post("/admin/pin")
    async def admin_pin(self, body: op.PinBody, authorization: str | None = Header(None)) -> dict:
        self._admin(authorization)
        if body.candidate is not None:
            self._known(body.candidate, "candidate")
        return await self._controller_call("pin", body.candidate)

    @app.post("/admin/depth")
    async def admin_depth(self, body: op.DepthBody, authorization: str | None = Header(None)) -> dict:
        self._admin(authorization)
        self._known(body.candidate, "candidate")
        return await self._controller_call("set_depth", body.candidate, body.depth, param="depth")

    @app.post("/admin/thresholds")
    async def admin_thresholds(self, body: op.ThresholdsBody, authorization: str | None = Header(None)) -> dict:
        self._admin(authorization)
        self._known(body.candidate, "candidate")
        return await self._controller_call("set_thresholds", body.candidate, body.thresholds, param="thresholds")

    def _known(self, name: str, param: str) -> None:
        if name not in self.servers:
            raise APIError(404, f"{param} {name!r} does not exist; see /v1/models", param, "model_not_found")

    def _admin(self, authorization: str | None) -> None:
        refused = op.check_admin(self.admin_key, authorization)
        if refused:
            raise APIError(refused[0], refused[1], "authorization", "unauthorized")

    async def _controller_call(self, method: str, *args, param: str | None = None):
        self._watch_controller()
        try:
            actor = self._actor() if self.controller else None
        except ValueError:
            actor = None
        if actor is None:
            raise APIError(503, "the controller is not running", None, "controller_unavailable")
        try:
            return await getattr(actor, method).remote(*args)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):  # the controller refused the arguments
                raise APIError(400, str(e.cause), param)
            raise

    # ---- plumbing ----------------------------------------------------------------------------------
    def _actor(self):
        """The running controller actor (ValueError when there is none)."""
        cfg = self.controller.config
        return ray.get_actor(cfg.actor_name, cfg.namespace)

    async def _route(self, requested: str, chat: bool) -> str:
        self._watch_controller()
        if requested != "auto":
            self._known(requested, "model")
            if chat and requested not in await self._chat_candidates():  # refused here, not in the replica
                raise APIError(400, f"candidate {requested!r} has no chat template; use /v1/completions",
                               "messages")
            self.metrics.routed(requested, "pinned")
            return requested
        choice = self._last_route or sorted(self.servers)[0]
        if self.controller:
            try:
                choice = self._last_route = await asyncio.wait_for(self._actor().route.remote(), 5)
            except Exception:  # noqa: BLE001 - controller away: route as it last said
                pass
        if chat:  # a base model without a chat template cannot take messages; "auto" avoids it
            able = await self._chat_candidates()
            if choice not in able and able:
                choice = sorted(able)[0]
        self.metrics.routed(choice, "auto")
        return choice

    async def _chat_candidates(self) -> set[str]:
        if self._chat is None:
            stats = {n: await h.options(stream=False).stats.remote() for n, h in self.servers.items()}
            self._chat = {n for n, s in stats.items() if s.chat}
        return self._chat

    async def _start(self, body, prompt=None, messages: list[dict] | None = None):
        """Route, submit, and wait for the first chunk so bad requests fail before any byte is sent."""
        deadline = time.monotonic() + self.limits.request_timeout_s
        candidate = await self._route(body.model, chat=messages is not None)
        try:
            params = body.sampling(self.default_max_tokens)
        except ValidationError as e:
            raise _as_api_error(e)
        gen = self.servers[candidate].generate.remote(GenerateRequest(params, prompt, messages))
        try:
            first = await self._next(gen, deadline)
        except Exception as e:
            raise _as_api_error(e)
        return candidate, (first, gen, deadline)

    async def _next(self, gen, deadline: float):
        """The next chunk, or a 408 once the request's time is up (the replica then frees its slot)."""
        try:
            return await asyncio.wait_for(gen.__anext__(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            gen.cancel()
            raise APIError(408, f"request exceeded request_timeout_s={self.limits.request_timeout_s:g}", None,
                           "timeout")

    async def _drain(self, stream) -> list:
        first, gen, deadline = stream
        chunks = [first]
        try:
            while not chunks[-1].finished:
                chunks.append(await self._next(gen, deadline))
        except Exception as e:  # the replica failed or died mid-request, or the deadline passed
            raise _as_api_error(e)
        return chunks

    def _sse(self, stream, render) -> StreamingResponse:
        first, gen, deadline = stream

        async def events():
            seen = [first]
            yield f"data: {render(first, first).model_dump_json(exclude_none=True)}\n\n"
            try:
                while not seen[-1].finished:
                    c = await self._next(gen, deadline)
                    seen.append(c)
                    body = render(c, first)
                    if c.finished:
                        body.helios = _stats(seen)
                    yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent: the client gets an error event
                err = _as_api_error(e)
                yield f"data: {json.dumps(oai.error_body(err.message, err.param, code=err.code))}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
