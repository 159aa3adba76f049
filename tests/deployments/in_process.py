"""The gateway and model servers in one process, with no Ray cluster: the same classes the cluster
deploys, their handles replaced by direct calls, HTTP by httpx's ASGI transport.

Serve builds an ingress class's routes so that each finds its replica's instance through a FastAPI
dependency (`get_current_servable_instance`); here that dependency is overridden with the
instance. A stream handle's `__anext__` and `cancel()` behave as Serve's do for the gateway: the
replica's generator runs to its next chunk, and a cancelled stream closes it (its `finally` aborts
the request in the engine).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json

import httpx

from deployments.gateway import Gateway


class _Stream:
    def __init__(self, agen):
        self._agen = agen

    def __anext__(self):
        return self._agen.__anext__()

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self._agen.aclose())


class _Method:
    def __init__(self, fn, stream: bool):
        self._fn, self._stream = fn, stream

    def remote(self, *args):
        if self._stream:
            return _Stream(self._fn(*args))

        async def call():
            out = self._fn(*args)
            return await out if asyncio.iscoroutine(out) else out
        return call()


class LocalHandle:
    """A DeploymentHandle stand-in that calls a deployment's instance in this process."""

    def __init__(self, instance, stream: bool = False):
        self._instance, self._stream = instance, stream

    def options(self, stream: bool = False) -> "LocalHandle":
        return LocalHandle(self._instance, stream)

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._instance, name), self._stream)


async def gateway(servers: dict, **kwargs):
    """A Gateway instance over these model server instances, and its ASGI app bound to it."""
    cls = Gateway.func_or_class
    gw = cls.__new__(cls)
    await cls.__init__(gw, {name: LocalHandle(s) for name, s in servers.items()}, **kwargs)
    app = gw.app
    for route in _routes(app.router):  # Serve gave each method's `self` a default: Depends(that function)
        instance = getattr(inspect.signature(route.endpoint).parameters.get("self"), "default", None)
        if getattr(instance, "dependency", None) is not None:
            app.dependency_overrides[instance.dependency] = lambda: gw
    return gw, app


def _routes(router):
    """Every route under `router`; FastAPI keeps included routers as nodes holding the original."""
    for route in router.routes:
        if hasattr(route, "original_router"):
            yield from _routes(route.original_router)
        elif hasattr(route, "endpoint"):
            yield route


@contextlib.asynccontextmanager
async def client(servers: dict, **kwargs):
    _, app = await gateway(servers, **kwargs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                 timeout=30) as c:
        yield c


def sse_events(body: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded; `[DONE]` as the string."""
    events = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
