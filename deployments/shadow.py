"""Shadow sampling: a share of a replica's early and greedy exits goes to the full-depth verifier,
off the critical path, with the tokens before each one (the verifier re-runs that prefix)."""
from __future__ import annotations

import collections
import random

from engine import SamplingParams
from engine.sequence import StepOutput


class ShadowSampler:
    def __init__(self, name: str, verifier, rate: float, num_layers: int):
        self.name, self.verifier, self.num_layers = name, verifier, num_layers
        self.rate = rate if verifier is not None else 0.0
        self._history: dict[str, tuple[list[int], SamplingParams]] = {}  # tokens so far, per request
        # recent verifier calls stay referenced here: nothing awaits them, and a dropped response
        # object must not take its request with it
        self._in_flight: collections.deque = collections.deque(maxlen=256)

    def track(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if self.rate:
            self._history[request_id] = (list(prompt), params)

    def forget(self, request_id: str) -> None:
        self._history.pop(request_id, None)

    def sample(self, out: StepOutput) -> None:
        """Send a sample of this step's early and greedy exits to the verifier."""
        samples = []
        tokens = {o.request_id: o.new_token_ids for o in out.outputs}
        for rec in out.exits:
            history, params = self._history.get(rec.request_id, (None, None))
            if history is None:
                continue
            if rec.layer < self.num_layers and random.random() < self.rate:
                # a greedy exit (unconfident at the last loaded layer) is no threshold's doing: layer 0
                samples.append((history[: rec.position], tokens[rec.request_id][0], 0 if rec.greedy else rec.layer,
                                params.temperature, params.top_p))
            history.extend(tokens[rec.request_id])
        if samples:  # fire and forget: the verifier writes its findings to telemetry itself
            self._in_flight.append(self.verifier.verify.remote(self.name, samples))
