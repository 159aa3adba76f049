"""One Serve deployment class, bound once per candidate EE-LLM: a shim over its parts.

- the engine, stepped by its own thread (deployments.engine_loop), which alone touches it;
- requests: chat templating and tokenising (off the event loop), then the engine's admission checks;
- streams: each request's outputs as Chunks, text held back where a stop string may cut it
  (deployments.streaming);
- shadow sampling of early exits for the full-depth verifier (deployments.shadow);
- telemetry and metrics, and the stats the gateway and controller read.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Literal

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from controller.actor import bank_id, setpoints
from deployments.contracts import Chunk, GenerateRequest, ServerStats
from deployments.engine_loop import EngineLoop
from deployments.shadow import ShadowSampler
from deployments.streaming import HoldBack
from engine import EngineConfig, LLMEngine, RequestError
from engine.config import usable_cpus
from engine.sequence import ExitRecord, RequestOutput, StepOutput
from engine.protocol import Engine
from telemetry.metrics import ServerMetrics
from telemetry.schema import TelemetryConfig
from telemetry.writer import TelemetryWriter

log = logging.getLogger("ray.serve")


class CandidateConfig(BaseModel):
    """A candidate EE-LLM: one model, its loaded depth and exits, served by one deployment."""

    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    name: str = Field(description="Candidate name; the OpenAI `model` field that pins it.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Replica count (ignored under autoscaling_config). 'auto': on CPU, as many as "
        "the CPUs seen where the app is built give the engine's threads (usable CPUs // threads): two "
        "single-thread replicas on 2 cores, where one engine on both cores waits at every step for "
        "whichever core another process took (1.46x the tokens at 64 clients, 1.14x at 8); one "
        "replica wherever the engine gets more than half the CPUs, and on a GPU. A `memory_budget` "
        "share is split among them.",
        union_mode="left_to_right")
    autoscaling_config: dict | None = Field(None, description="Serve's autoscaling_config for this candidate "
                                            "(min_replicas, max_replicas, target_ongoing_requests, ...).")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica holds at once; default "
                                             "twice the engine's batch: one batch decoding, the next one "
                                             "waiting in the engine so a freed slot is refilled at once.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests waiting for a replica beyond that; more are "
                                     "refused with 503 and Retry-After (-1: unbounded).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (a fraction lets candidates share one).")
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels this candidate's "
                                        "replicas prefer; while no such node is alive they run on any node.")
    worker_niceness: int | None = Field(0, ge=0, le=19, description="Scheduling niceness of the replica's "
                                        "process; None keeps Ray's worker default (15), which yields the CPU "
                                        "to every other process on the node.")
    reserved_cpus: int = Field(1, ge=0, description="CPUs an engine whose `threads` is unset leaves to the "
                               "processes serving beside it (Serve's proxy, the gateway, Ray): on 2 cores, "
                               "decoding with 1 thread served 1.2x the tokens of decoding with both, which "
                               "stalled whenever another process took a core.")
    shadow_rate: float = Field(0.02, ge=0, le=1, description="Share of early and greedy exits re-checked at "
                                                             "full depth off the critical path (greedy and sampled requests).")

    def engine_config(self) -> EngineConfig:
        """The engine's config: its thread count set where the user left it unset, and a memory
        share split among the replicas `auto` places on this node."""
        update = {}
        if self.engine.threads is None:
            update["threads"] = self._threads()
        budget, replicas = self.engine.memory_budget, self.replicas()
        if self.num_replicas == "auto" and budget is not None and budget <= 1 and replicas > 1:
            update["memory_budget"] = budget / replicas  # replicas placed by CPU count share the node's memory
        return self.engine.model_copy(update=update) if update else self.engine

    def _threads(self) -> int:
        return self.engine.threads or max(1, usable_cpus() - self.reserved_cpus)

    def replicas(self) -> int:
        if self.num_replicas != "auto":
            return self.num_replicas
        if self.num_gpus > 0 or self.engine.device != "cpu":
            return 1
        return max(1, usable_cpus() // self._threads())

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.engine.max_batch_size


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (fast tests)
        return None


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ModelServer:
    def __init__(self, candidate: CandidateConfig | dict, telemetry: TelemetryConfig | dict, verifier=None,
                 engine_cls: Callable[[EngineConfig], Engine] = LLMEngine):
        # engine_cls: the real LLMEngine, or any engine of the same shape (engine.protocol): a
        # scripted one runs this class in fast tests, with no model and no Ray
        cfg = CandidateConfig.model_validate(candidate)
        self.name = cfg.name
        self.engine: Engine = engine_cls(cfg.engine_config())
        self.writer = TelemetryWriter(self.name, TelemetryConfig.model_validate(telemetry))
        self.metrics = ServerMetrics(self.name, self.engine.num_layers)
        self.shadow = ShadowSampler(self.name, verifier, cfg.shadow_rate, self.engine.num_layers)
        self.flush_every = self.writer.config.flush_every_s
        self.loop = EngineLoop(self.name, self.engine, self.writer, self.metrics, self._deliver, self.flush_every)
        # tokenising a long prompt and writing telemetry to a slow Redis must hold up neither the
        # event loop nor the step thread: each has its own thread
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-tok")
        self._flush_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-flush")
        self._bank = bank_id(self.engine.exits.meta if self.engine.exits is not None else None)
        self._follow(*self._setpoints())  # a replica that replaces a dead one starts where the controller left it
        self._queues: dict[str, asyncio.Queue] = {}  # request -> its stream's outputs
        self._timing: dict[str, list[float]] = {}  # request -> [arrival, last token] for TTFT / TPOT
        self._flush_task: asyncio.Task | None = None
        self._served = 0
        try:  # Serve builds a replica on its event loop: follow the controller before any request
            asyncio.get_running_loop()
        except RuntimeError:  # built outside one (fast tests): the first request starts it
            return
        self._start()

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest):
        """Stream the request's Chunks."""
        self._start()
        params, prompt = request.params, request.prompt
        if request.messages is not None:
            prompt = self.chat_prompt(request.messages)
        queue: asyncio.Queue = asyncio.Queue()
        if isinstance(prompt, str):
            self.engine.check_prompt_text(prompt)  # cheap: refuses what cannot fit before tokenising
            prompt = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._tokenize, prompt)
        rid = self.engine.add_request(prompt, params, request.request_id)  # raises RequestError
        self._queues[rid] = queue
        self._timing[rid] = [time.perf_counter(), 0.0]
        self.shadow.track(rid, prompt, params)
        self.loop.wake()
        text, finished = HoldBack(params), False
        try:
            while True:
                items = [await queue.get()]
                # a reader that fell behind by several steps gets them as one chunk: under load the
                # hops above cost per chunk, not per token
                while not queue.empty() and not items[-1][0].finished:
                    items.append(queue.get_nowait())
                if len(items) > 1 and items[-1][0].finish_reason == "error":
                    yield self._chunk(rid, items[:-1], text)  # what came before the failure
                    items = items[-1:]
                chunk = self._chunk(rid, items, text)  # raises StepFailed
                yield chunk
                if chunk.finished:
                    finished = True
                    return
        finally:
            self.shadow.forget(rid)
            self._timing.pop(rid, None)
            # the client went away first; the engine belongs to the step thread, so the abort runs
            # there (an abort of a request that finished meanwhile does nothing)
            if self._queues.pop(rid, None) is not None and not finished:
                self.loop.call_soon(lambda: self.engine.abort(rid))

    def _chunk(self, rid: str, items: list[tuple[RequestOutput, list[ExitRecord]]], text: HoldBack) -> Chunk:
        """Consecutive step outputs of one request as one Chunk."""
        outs, exits = [o for o, _ in items], [e for _, ex in items for e in ex]
        last = outs[-1]
        return Chunk(rid, "".join(text.delta(o) for o in outs), [t for o in outs for t in o.new_token_ids],
                     last.finished, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens, self.name,
                     [e.layer for e in exits], sum(e.greedy for e in exits), self.engine.depth)

    def _tokenize(self, prompt: str) -> list[int]:
        return self.engine.tokenizer(prompt)["input_ids"]

    def chat_prompt(self, messages: list[dict]) -> str:
        tok = self.engine.tokenizer
        if not tok.chat_template:
            raise RequestError("messages", f"candidate {self.name!r} has no chat template")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- operations ----------------------------------------------------------------------------
    async def load_layers(self, depth: int) -> int:
        """Change the resident depth between two steps; returns the new depth."""
        def grow():
            self.engine.load_layers(depth)
            return self.engine.depth
        self._start()
        return await self.loop.between_steps(grow)

    async def set_thresholds(self, thresholds: dict[int, float]) -> dict[int, float]:
        """Move exit thresholds between two steps; returns the thresholds now served."""
        def move():
            if self.engine.exits is not None:
                self.engine.exits.set_thresholds({int(l): t for l, t in thresholds.items()})
            return self._thresholds()
        self._start()
        return await self.loop.between_steps(move)

    # ---- following the controller -----------------------------------------------------------------
    # The controller's calls reach one replica of the candidate; every replica also reads the depth and
    # thresholds it set from Redis at start and after each telemetry flush, and serves them.
    def _setpoints(self) -> tuple[int | None, dict[int, float] | None]:
        try:
            return setpoints(self.writer.redis, self.name, self._bank)
        except Exception as e:  # noqa: BLE001 - no Redis, or a bad entry: serve as now
            log.warning("%s: could not read the controller's setpoints (%s); serving as now", self.name, e)
            return None, None

    def _moves_depth(self, depth: int | None) -> bool:
        return depth is not None and 1 <= depth <= self.engine.num_layers and depth != self.engine.depth

    def _differs(self, depth: int | None, thresholds: dict[int, float] | None) -> bool:
        now = self._thresholds()
        return self._moves_depth(depth) or bool(thresholds) and any(l in now and now[l] != t
                                                                   for l, t in thresholds.items())

    def _follow(self, depth: int | None, thresholds: dict[int, float] | None) -> None:
        """On the step thread (or before it starts): serve the controller's setpoints."""
        if self._moves_depth(depth):
            self.engine.load_layers(depth)
        if thresholds and self.engine.exits is not None:
            self.engine.exits.set_thresholds(thresholds)

    def _thresholds(self) -> dict[int, float]:
        return self.engine.exits.thresholds() if self.engine.exits is not None else {}

    def stats(self) -> ServerStats:
        exits = self.engine.exits
        waiting, running = self.engine.queue_lengths()
        return ServerStats(self.name, ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                           self.engine.depth, self.engine.num_layers, running, waiting, self._served,
                           self.engine.memory_bytes(), bool(self.engine.tokenizer.chat_template),
                           self.engine.config.exit_policy, asdict(self.engine.stats),
                           exits.meta if exits else None, self._thresholds(), torch.get_num_threads(), os.nice(0),
                           _replica_id())

    def check_health(self) -> None:
        if not self.loop.alive():
            raise RuntimeError("the step thread died")

    # ---- on the event loop ---------------------------------------------------------------------
    def _start(self) -> None:
        self.loop.start()
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Telemetry on its own thread: a hung Redis delays no token."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_every)
            await loop.run_in_executor(self._flush_pool, self.writer.flush)  # a failed flush keeps its data
            points = await loop.run_in_executor(self._flush_pool, self._setpoints)
            if self._differs(*points):
                try:
                    await self.loop.between_steps(lambda: self._follow(*points))
                except Exception:  # noqa: BLE001 - e.g. no memory for the deeper layers: serve as now
                    log.exception("%s: could not follow the controller's setpoints %s", self.name, points)

    def _observe_latency(self, rid: str, now: float) -> None:
        timing = self._timing.get(rid)
        if timing is None:
            return
        if timing[1]:
            self.metrics.tpot.observe(now - timing[1])
        else:
            self.metrics.ttft.observe(now - timing[0])
        timing[1] = now

    def _deliver(self, out: StepOutput) -> None:
        """One step's outputs, handed over by the step thread: to their streams."""
        by_request: dict[str, list] = {}
        for rec in out.exits:
            by_request.setdefault(rec.request_id, []).append(rec)
        try:
            self.shadow.sample(out)
        except Exception:  # noqa: BLE001 - quality sampling must never cost a request
            log.exception("%s: shadow sampling failed", self.name)
        now = time.perf_counter()
        for o in out.outputs:
            self._served += len(o.new_token_ids)
            self._observe_latency(o.request_id, now)
            q = self._queues.get(o.request_id)
            if q is not None:
                q.put_nowait((o, by_request.get(o.request_id, [])))
