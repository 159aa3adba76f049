"""What crosses the Ray hops between the gateway, the model servers and the controller.

The gateway sends a `GenerateRequest` to a candidate's `ModelServer.generate` and gets `Chunk`s
back; the gateway and the controller read a replica's `ServerStats`. Ray pickles these as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine import SamplingParams


@dataclass(slots=True)
class GenerateRequest:
    """One completion: a prompt (text or token ids) or chat messages, and how to sample it."""

    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # [{"role": ..., "content": ...}], through the chat template
    request_id: str | None = None


@dataclass(slots=True)
class Chunk:
    """One streamed piece of a request's output."""

    request_id: str
    text: str  # new text since the previous chunk
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    candidate: str
    exit_layers: list[int] = field(default_factory=list)  # exit layer of each new token
    greedy_exits: int = 0
    loaded_depth: int = 0


@dataclass(slots=True)
class ServerStats:
    """A model-server replica now."""

    candidate: str
    node_id: str | None  # the Ray node it runs on
    depth: int  # decoder layers loaded
    num_layers: int
    running: int
    waiting: int
    tokens_served: int
    memory: dict  # LLMEngine.memory_bytes(): weights, KV cache, budget, capacity
    chat: bool  # has a chat template: can take `messages`
    exit_policy: str
    engine: dict  # EngineStats as a dict
    calibration: dict | None  # the exit bank's calibration report
    thresholds: dict[int, float]
    threads: int  # torch threads
    niceness: int
    replica: str | None = None  # Serve's replica id: which of the candidate's replicas answered
