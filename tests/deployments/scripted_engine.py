"""A scripted engine: LLMEngine's scheduling, stop strings, aborts and failure isolation, with a
script instead of a model, so the serving path above the engine is tested in seconds.

Tokens are characters (id = code point, 0 = end of sequence). A request's reply is
`reply(prompt text)`, one character per decode step; a `!` in it makes the step that would emit it
fail, as a real step fails: every request in that step gets finish_reason "error", the rest go on.
"""
from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

from engine import EngineConfig, LLMEngine
from engine.engine import EngineStats
from engine.scheduler import Scheduler
from engine.sequence import ExitRecord, StepOutput

EOS = 0
DEPTH = 4


class CharTokenizer:
    chat_template = "<role>content"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def echo(prompt: str) -> str:
    return f"You said: {prompt}"


class ScriptedEngine(LLMEngine):
    def __init__(self, config: EngineConfig | None = None, reply=echo, step_s: float = 0.0):
        # no super().__init__: nothing to load. The attributes LLMEngine's own methods read:
        self.config = config or EngineConfig()
        self.name, self.exits, self.stats = "scripted", None, EngineStats()
        self.tokenizer = CharTokenizer()
        self.store = SimpleNamespace(num_layers=DEPTH)
        self.model = SimpleNamespace(depth=DEPTH, config=SimpleNamespace(vocab_size=0x110000))
        self.scheduler = Scheduler(self.config.max_batch_size, [EOS], self.config.max_model_len,
                                   self.tokenizer.decode, self.config.max_prefill_tokens)
        self._ids = itertools.count()
        self.max_prompt_chars = self.config.max_model_len
        self.reply, self.step_s = reply, step_s

    @property
    def capacity(self) -> int:
        return self.scheduler.num_slots

    def load_layers(self, depth: int) -> None:
        self.model.depth = depth

    def memory_bytes(self) -> dict:
        return {"total": 0, "capacity": self.capacity}

    def _step(self, work, is_prefill: bool) -> StepOutput:
        time.sleep(self.step_s)
        if is_prefill:
            for c in work:
                c.seq.prefilled += c.length
            seqs = [c.seq for c in work if c.completes]
        else:
            seqs = work
        tokens = []
        for s in seqs:
            text = self.reply(self.tokenizer.decode(s.prompt_ids))
            ch = text[len(s.output_ids)] if len(s.output_ids) < len(text) else chr(EOS)
            if ch == "!":
                raise RuntimeError("scripted failure")
            tokens.append(ord(ch))
        records = [ExitRecord(s.request_id, s.num_tokens, self.depth, 1.0, False, self.name, self.depth)
                   for s in seqs]
        outputs = self.scheduler.postprocess(seqs, tokens)
        self.stats.tokens += len(tokens)
        return StepOutput(outputs, records, is_prefill)
