"""How many sequences fit beside the loaded layers under a memory budget.

HELIOS's second insight: the weights and the KV of layers a model does not load are memory that
can hold more sequences at once. The engine sizes its KV cache by this arithmetic whenever its
depth changes, and the controller scores candidates' batch with the same numbers. Plain Python.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """Bytes of one model as a function of its loaded depth and the sequences it holds."""

    base_bytes: int  # embeddings, final norm, LM head: resident at any depth
    layer_bytes: int  # weights of one decoder layer
    kv_layer_bytes: int  # K and V of one sequence of max_model_len tokens in one layer
    sequence_bytes: int  # per sequence at any depth: each position's top hidden state and level
    num_layers: int

    def weights(self, depth: int) -> int:
        return self.base_bytes + depth * self.layer_bytes

    def per_sequence(self, depth: int) -> int:
        return depth * self.kv_layer_bytes + self.sequence_bytes

    def capacity(self, depth: int, budget: int | None, cap: int) -> int:
        """Sequences of max_model_len that fit at `depth` (at most `cap`); None budget: `cap`."""
        if budget is None:
            return cap
        return max(0, min(cap, (budget - self.weights(depth)) // self.per_sequence(depth)))

    def to_dict(self) -> dict:
        return asdict(self)


def budget_bytes(spec: float | None, device_total: int) -> int | None:
    """`memory_budget` as bytes: above 1 it is bytes already, up to 1 a share of the device's memory."""
    if spec is None:
        return None
    return int(spec * device_total) if spec <= 1 else int(spec)
