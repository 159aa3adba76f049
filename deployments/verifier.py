"""Shadow verification: re-check a sample of early and greedy exits at full depth, off the critical path.

Model servers send (prefix token ids, emitted token) samples without waiting for an answer; the
verifier runs each prefix through the full model, compares its greedy token with the emitted
one, and writes checked/agreed counts (disagreements count as breaches) to the candidate's
telemetry. Operators see a live agreement rate per candidate; the controller uses it as quality.
"""
from __future__ import annotations

import asyncio
import concurrent.futures

from ray import serve

from engine import EngineConfig, LLMEngine, SamplingParams
from telemetry.metrics import shadow_breaches
from telemetry.schema import TelemetryConfig
from telemetry.writer import TelemetryWriter


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Verifier:
    def __init__(self, engine: dict, telemetry: dict):
        cfg = EngineConfig.model_validate({**engine, "depth": None, "exits": False})
        self.engine = LLMEngine(cfg)
        self.telemetry = TelemetryConfig.model_validate(telemetry)
        self.writers: dict[str, TelemetryWriter] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verifier")
        self.breaches = shadow_breaches()

    async def verify(self, candidate: str, samples: list[tuple[list[int], int]]) -> tuple[int, int]:
        """-> (checked, agreed) for samples of (prefix token ids, token the candidate emitted)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, candidate, samples)

    def _verify(self, candidate: str, samples: list[tuple[list[int], int]]) -> tuple[int, int]:
        limit = self.engine.config.max_model_len - 1
        samples = [(p, t) for p, t in samples if 0 < len(p) <= limit]
        results = self.engine.generate([p for p, _ in samples], SamplingParams(max_tokens=1, ignore_eos=True))
        agreed = sum(r.token_ids[0] == t for r, (_, t) in zip(results, samples))
        writer = self.writers.setdefault(candidate, TelemetryWriter(candidate, self.telemetry))
        writer.record_shadow(len(samples), agreed)
        writer.flush()  # a failed flush keeps its counts for the next batch
        if len(samples) > agreed:
            self.breaches.inc(len(samples) - agreed, tags={"candidate": candidate})
        return len(samples), agreed
