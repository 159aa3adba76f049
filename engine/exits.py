"""Exit heads and agreement predictors, trained per exit layer on a frozen backbone.

An exit point at layer l has
  * a head: an adapter on the hidden state whose output goes through the model's own final norm
    and LM head, so it costs one vocabulary projection, paid only by rows that exit;
  * a predictor: a small MLP estimating P(head's top token == full model's top token) from the
    hidden state; the per-row exit check is this number against the layer's threshold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def rms_norm(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)


class ResidualLinearHead(nn.Module):
    """h + W h, W zero-initialised so an untrained head is the model's final head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h):
        return h + self.proj(h)


class MLPHead(nn.Module):
    """h + W2 gelu(W1 rms(h)): a wider non-linear adapter."""

    def __init__(self, hidden: int, width: int | None = None):
        super().__init__()
        width = width or 2 * hidden
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, h):
        return h + self.down(torch.nn.functional.gelu(self.up(rms_norm(h))))


HEAD_TYPES = {"linear": ResidualLinearHead, "mlp": MLPHead}


class AgreementPredictor(nn.Module):
    """rms(h) -> MLP -> logit of agreement with the full-depth token."""

    def __init__(self, hidden: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, h):  # [..., hidden] -> [...] probabilities
        return torch.sigmoid(self.net(rms_norm(h)).squeeze(-1).float())


@dataclass(slots=True)
class ExitPoint:
    layer: int  # 1-based: the exit reads the output of decoder layer `layer`
    head: nn.Module
    predictor: nn.Module
    threshold: float  # exit when predictor >= threshold; > 1 disables the check at this layer


class ExitBank:
    """The exit points of one model, keyed by layer."""

    def __init__(self, head_type: str, points: dict[int, ExitPoint], meta: dict | None = None):
        self.head_type, self.points, self.meta = head_type, dict(sorted(points.items())), meta or {}

    @property
    def layers(self) -> list[int]:
        return list(self.points)

    @classmethod
    def new(cls, head_type: str, layers: list[int], hidden: int) -> "ExitBank":
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {head_type!r}; choose from {sorted(HEAD_TYPES)}")
        points = {l: ExitPoint(l, HEAD_TYPES[head_type](hidden), AgreementPredictor(hidden), 1.1) for l in layers}
        return cls(head_type, points)

    def thresholds(self) -> dict[int, float]:
        return {l: p.threshold for l, p in self.points.items()}

    def set_thresholds(self, thresholds: dict[int, float]) -> None:
        for layer, t in thresholds.items():
            if int(layer) in self.points:
                self.points[int(layer)].threshold = float(t)

    def to(self, device, dtype) -> "ExitBank":
        for p in self.points.values():
            p.head.to(device, dtype).eval()
            p.predictor.to(device, dtype).eval()
        return self

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for l, p in self.points.items():
            tensors.update({f"{l}.head.{k}": v.detach().float().contiguous() for k, v in p.head.state_dict().items()})
            tensors.update({f"{l}.pred.{k}": v.detach().float().contiguous()
                            for k, v in p.predictor.state_dict().items()})
        save_file(tensors, directory / "exits.safetensors")
        meta = {**self.meta, "head_type": self.head_type, "thresholds": self.thresholds()}
        (directory / "exits.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path, hidden: int) -> "ExitBank | None":
        if not (directory / "exits.json").is_file():
            return None
        meta = json.loads((directory / "exits.json").read_text())
        thresholds = {int(l): t for l, t in meta["thresholds"].items()}
        bank = cls.new(meta["head_type"], list(thresholds), hidden)
        tensors = load_file(directory / "exits.safetensors")
        for l, p in bank.points.items():
            p.head.load_state_dict({k.split(".head.", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{l}.head.")})
            p.predictor.load_state_dict({k.split(".pred.", 1)[1]: v for k, v in tensors.items()
                                         if k.startswith(f"{l}.pred.")})
        bank.set_thresholds(thresholds)
        bank.meta = meta
        return bank
