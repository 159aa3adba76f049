"""What a model server drives: the engine's interface, which `LLMEngine` implements.

`deployments.model_server.ModelServer` builds its engine from any class of this shape
(`engine_cls`), so the serving path (streaming, stop-string hold-back, aborts, errors) can be
tested against a scripted engine with no model and no Ray (tests/deployments/scripted_engine.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.config import EngineConfig, SamplingParams
    from engine.engine import EngineStats
    from engine.exits import ExitBank
    from engine.sequence import StepOutput


class Engine(Protocol):
    name: str  # the checkpoint's name
    config: "EngineConfig"
    tokenizer: Any  # a transformers tokenizer: __call__(text)["input_ids"], chat_template, apply_chat_template
    exits: "ExitBank | None"  # exit heads and thresholds in use, None at plain full depth
    stats: "EngineStats"

    @property
    def depth(self) -> int: ...  # decoder layers loaded

    @property
    def num_layers(self) -> int: ...  # decoder layers of the model

    @property
    def capacity(self) -> int: ...  # sequences held at once at this depth

    def add_request(self, prompt: str | list[int], params: "SamplingParams | None" = None,
                    request_id: str | None = None) -> str: ...  # raises RequestError naming the field

    def check_prompt_text(self, prompt: str) -> None: ...  # refuses text that cannot fit, before tokenising

    def abort(self, request_id: str) -> bool: ...

    def has_unfinished(self) -> bool: ...

    def queue_lengths(self) -> tuple[int, int]: ...  # (waiting, running) requests

    def step(self) -> "StepOutput": ...  # one step; a failure fails only the requests it carried

    def load_layers(self, depth: int) -> None: ...

    def memory_bytes(self) -> dict[str, Any]: ...
