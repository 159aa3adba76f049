"""The thread that owns a replica's engine.

The engine steps here, one step after another: each step's outputs go to the replica's event loop
(`deliver`, called there), and the thread never waits for that loop, so a busy loop (streaming,
Ray calls) costs no step. Anything that changes the engine (aborts, load_layers, thresholds) is
queued and applied between steps, so a step never sees a half-changed model and the scheduler
has one owner.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

from engine.sequence import StepOutput
from engine.protocol import Engine
from telemetry.metrics import ServerMetrics
from telemetry.writer import TelemetryWriter

log = logging.getLogger("ray.serve")


class EngineLoop:
    def __init__(self, name: str, engine: Engine, writer: TelemetryWriter, metrics: ServerMetrics,
                 deliver: Callable[[StepOutput], None], idle_wait_s: float):
        self.name, self.engine, self.writer, self.metrics = name, engine, writer, metrics
        self.deliver, self.idle_wait_s = deliver, idle_wait_s
        self._ops: collections.deque = collections.deque()
        self._wake = threading.Event()  # work arrived for the step thread
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """From the replica's event loop, on its first request or operation."""
        if self._thread is None:
            loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, args=(loop,), daemon=True, name=f"{self.name}-step")
            self._thread.start()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def call_soon(self, op: Callable[[], object]) -> None:
        """Run `op` on the step thread before the next step; nobody waits for it."""
        self._ops.append(op)
        self._wake.set()

    async def between_steps(self, fn):
        """Run `fn` on the step thread between two steps; its result or error reaches the caller,
        and the replica keeps serving either way."""
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def op():
            try:
                loop.call_soon_threadsafe(done.set_result, fn())
            except Exception as e:
                loop.call_soon_threadsafe(done.set_exception, e)
        self.call_soon(op)
        return await done

    def _step(self) -> StepOutput | None:
        while self._ops:
            op = self._ops.popleft()
            try:
                op()
            except Exception:  # noqa: BLE001 - e.g. an abort of a request already gone
                log.exception("%s: operation between steps failed", self.name)
        if not self.engine.has_unfinished():
            return None
        t = time.perf_counter()
        out = self.engine.step()
        self.writer.record(out.exits, time.perf_counter() - t)
        self.metrics.step(out.exits, self.engine.depth, *self.engine.queue_lengths(), self.engine.capacity)
        return out

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            self._wake.clear()  # before looking for work: a wake-up after this is never lost
            try:
                out = self._step()
            except Exception:  # noqa: BLE001 - an operation between steps failed; the loop goes on
                log.exception("%s: step loop iteration failed", self.name)
                continue
            if out is None:
                self._wake.wait(timeout=self.idle_wait_s)
                continue
            loop.call_soon_threadsafe(self.deliver, out)
