"""The gateway's limits and keys: what it admits, how long it waits, who may call it.

Every limit is a field a user can change in the cluster config (`gateway:`), not a framework
default: Serve admits 5 requests per replica and queues the rest without bound unless told.
"""
from __future__ import annotations

import hmac
import json
import os

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from deployments.openai_schema import error_body


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    max_ongoing_requests: int = Field(512, ge=1, description="Requests the gateway replica holds at once "
                                      "(streams included); Serve's proxy queues the ones beyond.")
    max_queued_requests: int = Field(256, ge=-1, description="Requests queued in front of the gateway; more "
                                      "get 503 from Serve's proxy (-1: unbounded).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger ones get 413.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still generating after this gets 408 "
                                     "(or, when streaming, an error event); its slot is freed.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503 when a candidate's queue is full.")
    api_keys: list[str] = Field(default_factory=list, description="Keys accepted on /v1 as `Authorization: "
                                "Bearer <key>`; empty leaves /v1 open. HELIOS_API_KEYS (comma-separated) "
                                "overrides.")

    def with_env(self) -> "GatewayConfig":
        keys = os.environ.get("HELIOS_API_KEYS")
        if keys:
            self.api_keys = [k.strip() for k in keys.split(",") if k.strip()]
        return self


def key_accepted(keys: list[str], authorization: str | None) -> bool:
    """Constant-time check of `Authorization: Bearer <key>` against every configured key."""
    scheme, _, given = (authorization or "").partition(" ")
    ok = False
    for key in keys:  # no early return: the time taken does not say which key came close
        ok |= hmac.compare_digest(given.strip().encode(), key.encode())
    return scheme.lower() == "bearer" and ok


class BodyLimit:
    """ASGI middleware: refuse a body over `limit()` bytes with 413, before it is parsed; the
    declared Content-Length is checked first, a chunked body as it arrives."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        limit = self.limit()
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply_413(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI passes an HTTPException from body reading through as is
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message
        await self.app(scope, counted, send)


async def _reply_413(send, limit: int) -> None:
    body = json.dumps(error_body(f"request body exceeds {limit} bytes", "body", code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
