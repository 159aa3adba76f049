"""Token choice from logits: greedy, temperature and nucleus sampling with per-request seeds."""
from __future__ import annotations

import torch

from engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    # logits: [b, vocab], one row per sequence
    tokens = logits.argmax(-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0.0:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
    return tokens
