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
            sorted_p, order, keep = nucleus(probs, p.top_p)
            sorted_p[~keep] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
    return tokens


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities sorted descending, their token ids, which of them are kept): the smallest
    prefix whose mass reaches top_p, always at least one token."""
    sorted_p, order = probs.sort(descending=True)
    return sorted_p, order, sorted_p.cumsum(-1) - sorted_p < top_p


def in_support(logits: torch.Tensor, token: int, temperature: float, top_p: float) -> bool:
    """Could `logits` ([vocab]) have produced `token`: its top token under greedy decoding, a token
    of its nucleus at this temperature under sampling."""
    if temperature == 0.0:
        return int(logits.argmax()) == token
    _, order, keep = nucleus(torch.softmax(logits.float() / temperature, -1), top_p)
    return bool((order[keep] == token).any())
