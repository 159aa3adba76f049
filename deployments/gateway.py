"""OpenAI-compatible REST gateway: /v1/completions, /v1/chat/completions, /v1/models, /health,
plus the operator page (/dashboard) and its admin API (/admin/...).

`model: "auto"` asks the controller actor which candidate serves the request; a candidate's name
pins it. Every response carries a `helios` extension field (OpenAI clients ignore it): the
candidate that served it and how its tokens exited.
"""
from __future__ import annotations

import logging

import ray
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import openai_schema as oai
from controller.actor import ensure_controller
from controller.config import ControllerConfig
from deployments import operator as op
from engine import RequestError
from telemetry.metrics import GatewayMetrics

log = logging.getLogger("ray.serve")
app = FastAPI(title="helios-serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = "body" if err.get("type") == "json_invalid" or not loc else ".".join(loc)
    return JSONResponse(oai.error_body(f"{param}: {err.get('msg')}", param), status_code=400)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return JSONResponse(oai.error_body(exc.message, exc.param, code=exc.code), status_code=exc.status)


def _as_api_error(exc: Exception) -> APIError:
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception; .cause is the original
    if isinstance(cause, RequestError):
        return APIError(400, str(cause), cause.field)
    if isinstance(cause, ValidationError):
        e = cause.errors()[0]
        field = ".".join(str(x) for x in e.get("loc", ())) or None
        return APIError(400, f"{field}: {e.get('msg')}", field)
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
    def __init__(self, servers: dict[str, DeploymentHandle], controller: dict | None = None,
                 default_max_tokens: int = 64, admin_key: str | None = None):
        self.servers = {name: h.options(stream=True) for name, h in servers.items()}
        self.default_max_tokens = default_max_tokens
        self.controller = None  # (actor name, namespace)
        if controller is not None:
            actor = ensure_controller(**controller)
            self._controller_started = actor.start.remote()  # waits for the model servers; not awaited here
            cfg = ControllerConfig.model_validate(controller["config"])
            self.controller = (cfg.actor_name, cfg.namespace)
        self._chat: set[str] | None = None  # candidates with a chat template, learnt on first chat request
        self.admin_key = admin_key
        self.metrics = GatewayMetrics()

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "candidates": sorted(self.servers)}

    @app.get("/v1/models")
    async def models(self) -> dict:
        names = ["auto", *sorted(self.servers)]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "helios"} for n in names]}

    @app.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest):
        candidate, stream = await self._start(body, {"prompt": body.prompt})
        if body.stream:
            return self._sse(stream, lambda c, first: oai.CompletionResponse(
                id=first.request_id, model=c.candidate,
                choices=[oai.CompletionChoice(text=c.text, finish_reason=c.finish_reason)]))
        chunks = await self._drain(stream)
        return oai.CompletionResponse(model=candidate, choices=[oai.CompletionChoice(
            text="".join(c.text for c in chunks), finish_reason=chunks[-1].finish_reason)],
            usage=_usage(chunks[-1]), helios=_stats(chunks))

    @app.post("/v1/chat/completions")
    async def chat(self, body: oai.ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        candidate, stream = await self._start(body, {"messages": messages})
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
        return await self._controller_call("snapshot")

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
        try:
            actor = ray.get_actor(*self.controller) if self.controller else None
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
    async def _route(self, requested: str, chat: bool) -> str:
        if requested != "auto":
            self._known(requested, "model")
            if chat and requested not in await self._chat_candidates():  # refused here, not in the replica
                raise APIError(400, f"candidate {requested!r} has no chat template; use /v1/completions",
                               "messages")
            self.metrics.routed(requested, "pinned")
            return requested
        choice = sorted(self.servers)[0]
        if self.controller:
            try:
                choice = await ray.get_actor(*self.controller).route.remote()
            except ValueError:  # controller not started (yet): the first candidate serves
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
            self._chat = {n for n, s in stats.items() if s["chat"]}
        return self._chat

    async def _start(self, body, payload: dict):
        """Route, submit, and wait for the first chunk so bad requests fail before any byte is sent."""
        candidate = await self._route(body.model, chat="messages" in payload)
        try:
            params = body.sampling(self.default_max_tokens)
        except ValidationError as e:
            raise _as_api_error(e)
        gen = self.servers[candidate].generate.remote({**payload, "params": params.model_dump()})
        try:
            first = await gen.__anext__()
        except Exception as e:
            raise _as_api_error(e)
        return candidate, (first, gen)

    @staticmethod
    async def _drain(stream) -> list:
        first, gen = stream
        chunks = [first]
        if not first.finished:
            async for c in gen:
                chunks.append(c)
        return chunks

    def _sse(self, stream, render) -> StreamingResponse:
        first, gen = stream

        async def events():
            seen = [first]
            yield f"data: {render(first, first).model_dump_json(exclude_none=True)}\n\n"
            if not first.finished:
                async for c in gen:
                    seen.append(c)
                    body = render(c, first)
                    if c.finished:
                        body.helios = _stats(seen)
                    yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
