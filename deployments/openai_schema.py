"""OpenAI-compatible request and response models (the subset a completions client uses)."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Annotated

from engine import SamplingParams
from engine.config import unicode_problem


def _unicode(v: str) -> str:
    problem = unicode_problem(v)
    if problem:
        raise ValueError(problem)
    return v


Text = Annotated[str, AfterValidator(_unicode)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not act on

    model: str = Field("auto", description="A candidate name, or 'auto' for the controller's choice.")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = None  # bounded by SamplingParams, which every request becomes
    logprobs: int | bool | None = Field(None, description="Not supported: refused unless null or false.")
    echo: bool = Field(False, description="Not supported: refused unless false.")
    top_logprobs: int | None = Field(None, description="Not supported: refused unless null.")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is generated.")
    ignore_eos: bool = Field(False, description="vLLM's extra parameter: generate past end-of-sequence.")

    @field_validator("logprobs", "echo", "top_logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        # silently ignoring them would hand a client something other than what it asked for
        if v is not None and v is not False and not (info.field_name == "top_logprobs" and v == 0):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    def sampling(self, default_max_tokens: int = 64) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p, stop=self.stop or [], seed=self.seed,
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: Text | list[int] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExitStats(BaseModel):
    """Extension field: which candidate served the request and how its tokens exited."""

    candidate: str
    loaded_depth: int
    mean_exit_layer: float
    greedy_exits: int
    exit_layers: list[int]


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    helios: ExitStats | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    helios: ExitStats | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    helios: ExitStats | None = None


def error_body(message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
