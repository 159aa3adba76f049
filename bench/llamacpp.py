"""llama.cpp on the same GGUF: the engine a CPU user would otherwise pick.

An optional extra of the benchmark (`pip install '.[llamacpp]'` compiles llama.cpp in 3-15 minutes),
never a CI dependency. Requests run one after another: the Python binding serves a single sequence,
which is how a one-user CPU setup runs it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from bench.workloads import Request


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(slots=True)
class LlamaRun:
    tokens: list[list[int]] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    file_bytes: int = 0


def run(gguf_path: str, requests: list[Request], tokenize, new_tokens: int, threads: int | None = None) -> LlamaRun:
    """Greedy decoding of exactly `new_tokens` per request (EOS does not stop it, as in the others).

    Prompts are tokenized by `tokenize` (the engine's tokenizer), so every system sees the same ids.
    """
    from llama_cpp import Llama
    from tqdm.auto import tqdm

    llm = Llama(model_path=gguf_path, n_ctx=4096, n_threads=threads or os.cpu_count(), verbose=False,
                logits_all=False)
    out = LlamaRun(file_bytes=os.path.getsize(gguf_path))
    t0 = time.perf_counter()
    for req in tqdm(requests, desc="llama.cpp", leave=False):
        ids = tokenize(req.prompt)
        got, start, last = [], time.perf_counter(), None
        # top_k=1 is greedy; `generate` never stops on its own, so EOS cannot cut a request short
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            now = time.perf_counter()
            if last is None:
                out.ttft_s.append(now - start)
            else:
                out.tpot_s.append(now - last)
            last = now
            got.append(int(tok))
            if len(got) == new_tokens:
                break
        out.tokens.append(got)
    out.wall_s = time.perf_counter() - t0
    return out
