"""Shadow verification: re-check a sample of early and greedy exits at full depth, off the critical path.

Model servers send samples of (prefix token ids, emitted token, exit layer or 0 for a greedy
exit, temperature, top_p) without waiting for an answer; the verifier runs each prefix through
the full model and judges the emitted token: for greedy decoding, is it the full model's top
token; for sampled requests, is it inside the full model's nucleus at the request's temperature
(top_p, capped at `SAMPLED_NUCLEUS`, since a nucleus of the whole vocabulary would accept
anything). It writes checked/agreed counts per exit layer (disagreements count as breaches) to the candidate's
telemetry: operators see live agreement, the controller tunes each layer's threshold with it.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures

from ray import serve

from engine import EngineConfig, LLMEngine
from engine.sampling import in_support
from telemetry.metrics import shadow_breaches
from telemetry.schema import TelemetryConfig
from telemetry.writer import TelemetryWriter

SAMPLED_NUCLEUS = 0.9  # a sampled token agrees when it lies in the full model's nucleus of this mass at most


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Verifier:
    def __init__(self, engine: EngineConfig, telemetry: TelemetryConfig):
        cfg = EngineConfig.model_validate(engine).model_copy(update={"depth": None, "exits": False})
        self.engine = LLMEngine(cfg)
        self.telemetry = TelemetryConfig.model_validate(telemetry)
        self.writers: dict[str, TelemetryWriter] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verifier")
        self.breaches = shadow_breaches()

    async def verify(self, candidate: str, samples: list[tuple]) -> tuple[int, int]:
        """-> (checked, agreed) for samples of (prefix ids, emitted token, exit layer, temperature, top_p)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, candidate, samples)

    def _verify(self, candidate: str, samples: list[tuple]) -> tuple[int, int]:
        limit = self.engine.config.max_model_len - 1
        samples = [s for s in samples if 0 < len(s[0]) <= limit]
        if not samples:
            return 0, 0
        logits = self.engine.next_token_logits([s[0] for s in samples])
        by_layer: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        for row, (_, token, layer, temperature, top_p) in zip(logits, samples):
            counts = by_layer[layer]
            counts[0] += 1
            counts[1] += agrees(row, token, temperature, top_p)
        checked, agreed = sum(c for c, _ in by_layer.values()), sum(a for _, a in by_layer.values())
        writer = self.writers.setdefault(candidate, TelemetryWriter(candidate, self.telemetry))
        writer.record_shadow({l: (c, a) for l, (c, a) in by_layer.items()})
        writer.flush()  # a failed flush keeps its counts for the next batch
        if checked > agreed:
            self.breaches.inc(checked - agreed, tags={"candidate": candidate})
        return checked, agreed


def agrees(logits, token: int, temperature: float, top_p: float) -> bool:
    """Would the full model have produced `token` here (see the module docstring)."""
    return in_support(logits, token, temperature, min(top_p, SAMPLED_NUCLEUS))
