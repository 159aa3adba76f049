"""Exits through the exit vocabulary (engine.exits): the margin check of the rows a predictor
passed, and one step's logits assembled so the full LM head runs only for rows that need it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.exits import ExitBank
from engine.model import EEModel


@dataclass(slots=True)
class Short:
    passed: torch.Tensor  # [rows] bool: the predictor passed them and their head has a clear winner
    idx: torch.Tensor  # their batch indices
    logits: torch.Tensor  # [len(idx), V] their head's logits over the exit vocabulary


def vocab_check(model: EEModel, bank: ExitBank, point, last: torch.Tensor, cand: torch.Tensor) -> Short:
    """Rows `cand` ([rows] bool) that the predictor passed: their exit head over the exit vocabulary;
    a row passes if its top token beats the runner-up by the bank's margin."""
    idx = cand.nonzero().squeeze(1)
    logits = model.vocab_logits(point.head(last[idx]), bank.vocab_weight)
    top = logits.topk(2, -1).values
    ok = top[:, 0] - top[:, 1] >= bank.margin
    passed = torch.zeros_like(cand)
    passed[idx[ok]] = True
    return Short(passed, idx[ok], logits[ok])


class VocabRows:
    """Logits of the rows that left through the exit vocabulary; the full LM head runs only for
    the others, and not at all when there are none."""

    def __init__(self, b: int, bank: ExitBank | None):
        self.bank, self.b = bank, b
        self.rows: list[torch.Tensor] = []
        self.parts: list[torch.Tensor] = []
        self.tokenless: list[torch.Tensor] = []  # rows held in the buffer: no token this step

    def put(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        self.rows.append(rows)
        self.parts.append(logits)

    def logits(self, model: EEModel, out: torch.Tensor) -> torch.Tensor:
        if not self.rows and not self.tokenless:
            return model.logits(out)
        n_vocab = model.lm_head_weight.shape[0]
        logits = torch.full((self.b, n_vocab), float("-inf"), device=out.device, dtype=out.dtype)
        full = torch.ones(self.b, dtype=torch.bool, device=out.device)
        for rows in self.rows + self.tokenless:
            full[rows] = False
        if bool(full.any()):
            logits[full] = model.logits(out[full]).to(out.dtype)
        if self.rows:
            rows = torch.cat(self.rows)
            logits[rows.unsqueeze(1), self.bank.vocab] = torch.cat(self.parts).to(out.dtype)
        return logits
