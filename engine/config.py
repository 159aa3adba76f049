"""Engine-level configuration: what users write, validated at the edge."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def helios_home() -> Path:
    """Root of converted checkpoints and calibration artefacts (`HELIOS_HOME`, default ~/.cache/helios)."""
    return Path(os.environ.get("HELIOS_HOME", Path.home() / ".cache" / "helios"))


MIN_TEMPERATURE = 1e-2


def usable_cpus() -> int:
    """CPUs this process may run on, within a cgroup v2 CPU quota (a Kubernetes CPU limit) if any."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (JSON may spell a lone surrogate, which no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text ({e.reason} at character {e.start})"
    return None


class SamplingParams(BaseModel):
    """Per-request decoding settings; the same names OpenAI and vLLM use."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1, description="Maximum number of new tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="Generation ends when any of these strings appears.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="Seed of this request's own sampling generator (torch's range).")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    tpot_slo_ms: float | None = Field(None, gt=0, description="This request's time-per-output-token target, "
                                      "overriding the engine's `tpot_slo_ms` (the `buffer` policy never "
                                      "holds a row whose next token would then miss it).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("temperature")
    @classmethod
    def _temperature_the_maths_allows(cls, v):
        # logits / 1e-40 overflow to inf and the softmax to NaN; below MIN_TEMPERATURE sampling is
        # greedy in all but name anyway, so such a temperature is raised to it (vLLM does the same)
        return MIN_TEMPERATURE if 0.0 < v < MIN_TEMPERATURE else v


class EngineConfig(BaseModel):
    """One early-exit model instance: which checkpoint, how deep, how it exits."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="'smollm2', 'gemma3', or a local Hugging Face checkpoint directory.")
    depth: int | None = Field(None, ge=1, description="Decoder layers to load (greedy loading); None loads all.")
    exits: bool = Field(True, description="Use calibrated exit heads when they exist; False runs plain full-depth decoding.")
    thresholds: dict[int, float] | None = Field(
        None, description="Per-layer confidence thresholds overriding the calibrated ones (layer -> threshold)."
    )
    exit_vocab: bool = Field(
        True, description="Let exits emit only the calibrated exit vocabulary, checking the head's margin over it and "
        "sparing the full LM head (engine.exits); False: exits read the full head. Banks without one ignore it.")
    exit_policy: Literal["full", "batch", "ride_along", "rebatch", "buffer"] = Field(
        "rebatch", description="full: no exits; batch: the batch leaves when every row is confident; ride_along "
        "(HELIOS; `greedy` is read as this name): rows take their token at their first confident layer and ride "
        "along; rebatch (DREX): "
        "confident rows leave and the rest regroup when the planner predicts it pays; buffer (DREX's "
        "rebatching buffer): rebatch, and the rows that continue past an exit point may wait there for the "
        "next step's, so the deeper layers run once for both, when that is cheaper per token (needs "
        "kv_fill='deferred').")
    exit_gate: bool = Field(
        True, description="Check an exit point in a decode step only when it can pay: the chance that the "
        "whole batch has its tokens there (measured every 16th step) times the layers it would skip outweighs "
        "the check's cost, or (`buffer` policy) the rows expected to continue there are few enough to hold "
        "(engine.exit_gate). Rows then take a deeper exit's or the full model's token. False: check every point "
        "with a threshold.")
    tpot_slo_ms: float | None = Field(
        None, gt=0, description="Time-per-output-token target of every request (a request may set its own): "
        "the `buffer` policy holds a row only when its next token still comes within it. None: no target.")
    batch_quorum: float = Field(1.0, gt=0.0, le=1.0, description="`batch` policy: share of rows that must be "
                                "confident for the batch to leave; below 1 the others are forced out.")
    kv_fill: Literal["deferred", "copy", "none"] = Field(
        "deferred", description="How skipped layers' KV is filled for exited tokens: deferred (computed "
        "exactly in a later step of the row, batched with its newer tokens), state copy (approximate), "
        "or left empty.")
    max_deferred: int = Field(16, ge=1, description="Deferred fill: pending tokens a row may hold before "
                              "its next step must run every loaded layer.")
    device: str = Field("cpu", description="'cpu' or 'cuda'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is float32 on CPU and bfloat16 on CUDA. On a CPU with bf16 matmuls "
        "bfloat16 decodes 1.3x faster at 0.99 token agreement with float32, but the shipped exits were "
        "calibrated in float32 and lose about a point of agreement under it (bench/results/weights-*.md)."
    )
    int8_weights: bool = Field(
        False, description="CPU: store the decoder layers' linear weights as int8, one scale per output "
        "channel (weight-only; activations stay bfloat16, so it needs dtype='bfloat16'), and keep an int8 "
        "copy of the LM head for the row counts where start-up measured it faster. Half the bytes of "
        "bf16 per decode step; its tokens differ from fp32's about as much as bf16's do.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch's kernels; None: every CPU this "
                                "process may run on (a Ray worker otherwise inherits OMP_NUM_THREADS=1).")
    tune_matmuls: bool = Field(
        True, description="CPU: measure at start-up which weight layout (row- or column-major) and which "
        "zero-padding of few-row matmuls this CPU's BLAS runs fastest, for the layers and the LM head, and "
        "use them (engine.matmul_plan). False: weights as loaded, no padding.")
    packed_head_copy: bool = Field(
        True, description="CPU, with tune_matmuls: where start-up measures oneDNN's packed layout fastest for "
        "the LM head too, multiply through a packed copy of it (the embedding and the exit vocabulary go on "
        "reading the dense rows). Costs the head's bytes once more, counted in the engine's memory: fp32 "
        "SmolLM2 108 MiB, Gemma-3-270M 640 MiB. False: no copy, the head in the best dense layout.")
    max_batch_size: int = Field(8, ge=1, le=512, description="Concurrent sequences (KV cache slots); under a "
                                "`memory_budget`, the most the budget may give.")
    memory_budget: float | None = Field(
        None, gt=0, description="Bytes for weights plus KV cache (up to 1.0: that share of the device's memory, "
        "physical RAM on CPU). The cache then holds as many sequences of max_model_len as fit beside the "
        "loaded layers, and follows the depth: fewer layers, more sequences. None: max_batch_size.")
    max_model_len: int = Field(1024, ge=16, description="Prompt plus generated tokens per sequence.")
    max_prefill_tokens: int | None = Field(
        512, ge=1, description="Prompt tokens per prefill step (decoding requests' tokens riding it count "
        "first): longer prompts are prefilled in chunks, and the running requests go on decoding meanwhile. "
        "None: every admitted prompt whole.")
    mixed_steps: bool = Field(True, description="A prefill step also carries every decoding request's next "
                              "token, so decoding never waits for a prompt and both share one read of the "
                              "weights (those tokens go to full depth; exits still choose them). False: "
                              "prefill and decode steps alternate.")
    home: Path | None = Field(None, description="Converted-checkpoint cache; defaults to HELIOS_HOME.")

    @field_validator("exit_policy", mode="before")
    @classmethod
    def _policy_alias(cls, v):
        # `greedy` named this policy once; "greedy" also means greedy decoding, greedy exits and greedy loading
        return "ride_along" if v == "greedy" else v

    @model_validator(mode="after")
    def _int8_weights_run_on_the_cpu_kernel_with_bf16(self):
        if self.int8_weights and (self.dtype != "bfloat16" or not self.device.startswith("cpu")):
            raise ValueError("int8_weights runs torch's CPU int8-weight kernel with bfloat16 activations: it "
                             f"needs dtype='bfloat16' and a CPU device, not dtype={self.dtype!r} on {self.device!r}")
        return self

    @model_validator(mode="after")
    def _buffer_keeps_states_as_the_deferred_fill_does(self):
        if self.exit_policy == "buffer" and self.kv_fill != "deferred":
            raise ValueError("exit_policy 'buffer' holds rows' states where the deferred fill keeps them: "
                             f"it needs kv_fill='deferred', not {self.kv_fill!r}")
        return self

    @property
    def cache_home(self) -> Path:
        return self.home or helios_home()

    @property
    def cpu_threads(self) -> int:
        return self.threads or usable_cpus()


def from_pairs(model: type[BaseModel], defaults: dict, pairs: list[str], flag: str) -> BaseModel:
    """A config model from `defaults` and command-line FIELD=VALUE pairs (values read as YAML scalars):
    every field is settable without a flag of its own, and a typo is refused naming it."""
    import yaml
    from pydantic import ValidationError

    fields = dict(defaults)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes FIELD=VALUE, got {pair!r}")
        fields[key] = yaml.safe_load(value)
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise SystemExit(f"{flag}: " + "; ".join(problems(e))) from None


def problems(e) -> list[str]:
    """A pydantic ValidationError as `where.in.the.config: what`, one per problem."""
    return [f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()]
