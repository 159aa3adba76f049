"""LLMEngine: continuous batching over an early-exit model.

    seqs, is_prefill = scheduler.schedule()
    stack = run_stack(model, exits, ...)         # layers with per-row exits
    outputs = scheduler.postprocess(seqs, tokens)  # stop checks, slot release
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engine import deferred, inputs
from engine.buffer import BufferPlanner
from engine.config import EngineConfig, SamplingParams, unicode_problem
from engine.exit_gate import ExitGate, measure_check
from engine.exits import ExitBank
from engine.memory import MemoryModel, budget_bytes
from engine.model import EEModel
from engine.rebatch import RebatchPlanner, measure_cost
from engine.runner import StackOptions, extend_stack, run_stack
from engine.sampling import sample
from engine.scheduler import Scheduler
from engine.sequence import ExitRecord, PrefillChunk, Sequence, StepOutput
from engine.store import CheckpointError, LayerStore, ensure_converted

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_memory(device: torch.device) -> int:
    """Total memory of the device a budget share refers to: the GPU's, or physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return type(self), (self.field, str(self))


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters since the engine started."""

    tokens: int = 0
    row_layers: int = 0  # decoder-layer passes over one row: the compute actually spent
    greedy_exits: int = 0
    involuntary_exits: int = 0  # rows forced out before they were confident: 0 under `rebatch`
    splits: int = 0
    splits_skipped: int = 0
    preempted: int = 0  # sequences sent back to waiting when a deeper stack left room for fewer
    held: int = 0  # tokens that waited one step in the rebatching buffer (`buffer` policy)
    checks_skipped: int = 0  # exit checks the exit gate left out because they could not pay
    vocab_exits: int = 0  # tokens taken from the exit vocabulary (engine.exits), sparing the full LM head


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    exits: list[ExitRecord] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        self.config = config = (config or EngineConfig()).model_copy(update=overrides)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise CheckpointError("device 'cuda' requested but no CUDA device is available")
        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if config.device.startswith("cuda") else "float32")
        self.dtype = _DTYPES[dtype]
        # a decode step on CPU is bound by reading weights, which one thread cannot saturate; Ray
        # starts actors without CPUs of their own at OMP_NUM_THREADS=1, so the count is set here
        if torch.get_num_threads() != config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.store = LayerStore(ensure_converted(config.model, config.cache_home))
        self.name = self.store.root.name
        self.tokenizer = self.store.tokenizer()
        self.eos_ids = self.store.eos_token_ids(self.tokenizer)
        self.model = EEModel(self.store, config.depth or self.store.num_layers, config.device, self.dtype,
                             config.int8_weights, config.packed_head_copy)
        if config.tune_matmuls and self.model.device.type == "cpu":
            self.model.tune_matmuls()
        kv = self.model.allocate_cache(1, config.max_model_len)
        w = self.model.weight_bytes()
        self.memory = MemoryModel(w["base"], w["per_layer"], kv.slot_bytes_per_layer(), kv.slot_bytes_fixed(),
                                  self.store.num_layers)
        self.budget = budget_bytes(config.memory_budget, _device_memory(self.model.device))
        kv.set_slots(self._capacity_at(self.depth), [])
        self.exits = ExitBank.find(self.store, self.model.hidden_size) if config.exits else None
        if self.exits is not None:
            self._bind(self.exits)
            if config.thresholds:
                self.exits.set_thresholds(config.thresholds)
        # the split decision needs this device's layer costs; measured before any request owns a slot.
        # With one slot, or no exits, there is never a batch to split.
        splits = config.exit_policy in ("rebatch", "buffer") and self.exits is not None and kv.num_slots > 1
        self._defers = config.kv_fill == "deferred" and self.exits is not None
        gated = config.exit_gate and self.exits is not None and config.exit_policy != "full"
        cost = measure_cost(self.model, kv.num_slots) if splits or gated else None
        self.planner = RebatchPlanner(cost, deferred=self._defers) if splits else None
        self.buffer = (BufferPlanner(cost)
                       if splits and config.exit_policy == "buffer" and self._defers else None)
        self.gate = (ExitGate(cost, measure_check(self.exits, self.model.hidden_size, kv.num_slots, self.model.device,
                                                  self.dtype), config.kv_fill, self.buffer,
                              head_s=self._vocab_saves(cost)) if gated else None)
        # recent decode step time (EWMA): how long a held row's wait will last; until measured, a full
        # batch through every layer as the cost model prices it
        self._step_s = cost.step_fixed_s + self.depth * cost.layer_s(kv.num_slots) if cost else 0.0
        self.stats = EngineStats()
        self.scheduler = Scheduler(kv.num_slots, self.eos_ids, config.max_model_len, self._detokenize,
                                   config.max_prefill_tokens, config.mixed_steps)
        self._ids = itertools.count()
        # no token spells more characters than the longest vocabulary entry, so a text longer than
        # this cannot fit the context: it is refused before any tokenising work
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = longest * config.max_model_len

    # ---- public API ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.model.depth

    @property
    def num_layers(self) -> int:
        return self.store.num_layers

    @property
    def capacity(self) -> int:
        """Sequences the engine holds at once now: what fits the memory budget at the loaded depth."""
        return self.model.kv.num_slots

    def _capacity_at(self, depth: int) -> int:
        n = self.memory.capacity(depth, self.budget, self.config.max_batch_size)
        if n < 1:
            raise CheckpointError(f"memory_budget of {self.budget} bytes holds {depth} layers' weights "
                                  f"({self.memory.weights(depth)} bytes) but not one sequence of "
                                  f"max_model_len={self.config.max_model_len} ({self.memory.per_sequence(depth)} bytes)")
        return n

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            self.check_prompt_text(prompt)
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("prompt", "prompt is empty")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise RequestError("prompt", f"token ids must lie in 0..{self.model.config.vocab_size - 1}")
        if len(ids) + params.max_tokens > self.config.max_model_len:
            raise RequestError("max_tokens" if len(ids) < self.config.max_model_len else "prompt",
                               f"prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} it exceeds "
                               f"the context limit of {self.config.max_model_len}")
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq.request_id

    def check_prompt_text(self, prompt: str) -> None:
        """Refuse text that cannot be tokenised or cannot fit the context, before tokenising it."""
        if len(prompt) > self.max_prompt_chars:
            raise RequestError("prompt", f"prompt has {len(prompt)} characters; no prompt over "
                               f"{self.max_prompt_chars} fits the context limit of {self.config.max_model_len} tokens")
        problem = unicode_problem(prompt)
        if problem:
            raise RequestError("prompt", f"prompt is {problem}")

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def queue_lengths(self) -> tuple[int, int]:
        """(waiting, running) requests; reading two lengths is safe from any thread."""
        return len(self.scheduler.waiting), len(self.scheduler.running)

    def step(self) -> StepOutput:
        """One prefill or decode step. If it fails, only the requests it touched fail: each gets a
        finished output with finish_reason "error", their slots are freed, and the engine goes on."""
        work, is_prefill = self.scheduler.schedule()
        if not work:
            return StepOutput([], [], is_prefill)
        seqs = [c.seq for c in work] if is_prefill else work
        try:
            return self._step(work, is_prefill)
        except Exception as e:  # noqa: BLE001 - any fault of one step is confined to its rows
            log.exception("engine step failed; failing its %d requests", len(seqs))
            return StepOutput(self.scheduler.fail(seqs, f"{type(e).__name__}: {e}"), [], is_prefill)

    def _step(self, work: list[Sequence] | list[PrefillChunk], is_prefill: bool) -> StepOutput:
        start = time.perf_counter()
        if is_prefill:
            work = [inputs.with_pending(self.model, c) if c.decode else c for c in work]
            h, ctx, last_idx = inputs.prefill(self.model, work)
        else:
            h, ctx, last_idx = inputs.decode(self.model, work, self._defers)
        cfg = self.config
        slack = None if is_prefill or self.buffer is None else self._slack(work, start)
        checked = None if is_prefill or self.gate is None or self.exits is None else self._gated_checks(len(work))
        opts = StackOptions(cfg.exit_policy, cfg.kv_fill, self.planner, cfg.batch_quorum, cfg.max_deferred, self.buffer,
                            slack, checked)
        stack = run_stack(self.model, self.exits, h, ctx, last_idx, is_prefill, opts)
        if checked:
            self.gate.observe(checked, stack.confident_at)
        if self.gate is not None and stack.checks and not is_prefill:
            self.gate.observe_check(stack.check_s / stack.checks)
        rows = list(range(len(work)))
        if is_prefill:  # only a chunk that ends its prompt, or decodes, yields a token
            for c in work:
                c.seq.prefilled += 0 if c.decode else c.length
            rows = [r for r, c in enumerate(work) if c.completes]
        elif stack.held:  # rows waiting in the buffer: their tokens come next step
            held = set(stack.held)
            for r in held:
                work[r].held_since = start
            rows = [r for r in rows if r not in held]
        seqs = [work[r].seq for r in rows] if is_prefill else [work[r] for r in rows]
        exits = [stack.exits[r] for r in rows]
        tokens = sample(stack.logits[rows], seqs) if seqs else []
        now = time.perf_counter()
        records = [ExitRecord(s.request_id, s.num_tokens, e.layer, e.confidence, e.greedy, self.name, self.depth,
                              e.involuntary, now - s.held_since if s.held_since is not None else 0.0)
                   for s, e in zip(seqs, exits)]
        for s in seqs:
            s.held_since, s.last_token_at = None, now
        if not is_prefill:
            self._step_s = 0.8 * self._step_s + 0.2 * (now - start) if self._step_s else now - start
        outputs = self.scheduler.postprocess(seqs, tokens)
        st = self.stats
        st.tokens += len(tokens)
        st.row_layers += stack.row_layers
        st.greedy_exits += sum(e.greedy for e in exits)
        st.involuntary_exits += sum(e.involuntary for e in exits)
        st.held += len(stack.held)
        st.vocab_exits += stack.vocab_exits
        st.checks_skipped = self.gate.skipped if self.gate is not None else 0
        st.splits += stack.splits
        st.splits_skipped += stack.splits_skipped
        return StepOutput(outputs, records, is_prefill)

    def _gated_checks(self, rows: int) -> set[int]:
        """The exit points worth checking in a decode step of `rows` rows (engine.exit_gate)."""
        points = [l for l, p in self.exits.points.items() if l < self.depth and p.threshold <= 1.0]
        return self.gate.plan(points, rows, self.depth)

    def _slack(self, seqs: list[Sequence], now: float) -> torch.Tensor:
        """[b] seconds each row's next token could still wait if held one step (a held token comes at
        the end of the next step): its TPOT target less the time since its last token and two steps."""
        slack = []
        for s in seqs:
            slo_ms = s.params.tpot_slo_ms or self.config.tpot_slo_ms
            slack.append(float("inf") if slo_ms is None else slo_ms / 1e3 - (now - s.last_token_at) - 2 * self._step_s)
        return torch.tensor(slack, device=self.model.device)

    def _release_held(self) -> None:
        """Tokens waiting in the buffer start over from layer 0 next step (their KV below the level
        they waited at is recomputed, the same values): for changes of depth or slots."""
        for s in self.scheduler.running:
            if s.held_since is not None:
                self.model.kv.level[s.slot, s.num_tokens - 1] = 0
                s.held_since = None

    @torch.inference_mode()
    def next_token_logits(self, prefixes: list[list[int]]) -> torch.Tensor:
        """[n, vocab] logits after each prefix at the loaded depth, exits off: one prefill per
        `capacity` prefixes in the cache's first slots, on an engine with nothing in flight."""
        if self.has_unfinished():
            raise RuntimeError("next_token_logits needs an idle engine: its prefill uses the cache slots")
        out, dev, n = [], self.model.device, self.capacity
        for start in range(0, len(prefixes), n):
            batch = prefixes[start:start + n]
            t = max(map(len, batch))
            ids = torch.tensor([p + [0] * (t - len(p)) for p in batch], device=dev)
            ctx = self.model.make_ctx(torch.arange(len(batch), device=dev),
                                      torch.arange(t, device=dev).expand(len(batch), t))
            last = torch.tensor([len(p) - 1 for p in batch], device=dev)
            out.append(run_stack(self.model, None, self.model.embed_tokens(ids), ctx, last, True,
                                 StackOptions(policy="full")).logits.float())
        return torch.cat(out)

    def use_exits(self, bank: ExitBank | None) -> None:
        """Serve through `bank`'s exit points from the next step on (None: full depth, no exits)."""
        if self.has_unfinished():
            raise RuntimeError("exit heads can change only between requests")
        self.exits = None if bank is None else self._bind(bank)
        self._defers = self.config.kv_fill == "deferred" and self.exits is not None
        if self.gate is not None:  # what a step leaving through the new bank's vocabulary spares
            self.gate.head_s = self._vocab_saves(self.gate.cost)

    def _vocab_saves(self, cost) -> float:
        """What a step spares of the LM head when every row leaves through the exit vocabulary."""
        if self.exits is None or self.exits.vocab is None:
            return 0.0
        return cost.step_fixed_s * (1 - len(self.exits.vocab) / self.model.lm_head_weight.shape[0])

    def _bind(self, bank: ExitBank) -> ExitBank:
        bank.to(self.model.device, self.dtype)
        if not self.config.exit_vocab:  # this engine's exits read the full head
            bank.vocab = None
        return bank.bind_head(self.model.lm_head_weight)

    def load_layers(self, depth: int) -> None:
        """Grow or shrink the resident depth between steps; in-flight requests keep going. Under a
        memory budget the capacity follows: shrinking frees room for more sequences; growing first
        sends the sequences that no longer fit back to the waiting queue (they resume by recompute)."""
        if not 1 <= depth <= self.num_layers:
            raise CheckpointError(f"depth {depth} outside 1..{self.num_layers}")
        old, capacity = self.depth, self._capacity_at(depth)
        self._release_held()
        if capacity < self.capacity:  # before the new layers take the memory
            self._set_capacity(capacity)
        running = [s for s in self.scheduler.running if s.num_cached > 0]
        if depth > old and running and self._defers:  # new layers start from every token at the old top
            deferred.flush(self.model, [s.slot for s in running], [s.num_cached for s in running])
        self.model.set_depth(depth)
        if depth > old and running:
            slots = torch.tensor([s.slot for s in running], device=self.model.device)
            extend_stack(self.model, old, slots, [s.num_cached for s in running])
        if capacity > self.capacity:  # after the dropped layers freed theirs
            self._set_capacity(capacity)

    def _set_capacity(self, n: int) -> None:
        keep = self.scheduler.set_capacity(n)
        self.model.kv.set_slots(n, keep)
        self.stats.preempted = self.scheduler.preempted

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[GenerationResult]:
        """Run prompts to completion through the continuous-batching loop."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        results = {rid: GenerationResult(rid, [], "", None) for rid in ids}
        bar = tqdm(total=sum(p.max_tokens for p in params_list), disable=not progress, desc="generating", unit="tok")
        while self.has_unfinished():
            out = self.step()
            for o in out.outputs:
                r = results[o.request_id]
                r.token_ids.extend(o.new_token_ids)
                r.text, r.finish_reason = o.text, o.finish_reason
            for rec in out.exits:
                results[rec.request_id].exits.append(rec)
            bar.update(len(out.exits))
        bar.close()
        return [results[rid] for rid in ids]

    def memory_bytes(self) -> dict[str, int]:
        w = self.model.weight_bytes()
        kv = self.model.kv.nbytes()
        return {**w, "kv_cache": kv, "total": w["base"] + w["layers"] + kv, "budget": self.budget,
                "per_sequence": self.memory.per_sequence(self.depth), "capacity": self.capacity,
                "cap": self.config.max_batch_size, "model": self.memory.to_dict()}

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
