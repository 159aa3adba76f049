"""Exit heads and agreement predictors, trained per exit layer on a frozen backbone.

An exit point at layer l has
  * a head: an adapter on the hidden state whose output goes through the model's own final norm
    and LM head, so it costs one vocabulary projection, paid only by rows that exit;
  * a predictor: a small MLP estimating P(head's top token == full model's top token) from the
    hidden state and how far it moved since the previous exit layer (the embeddings before the
    first); the per-row exit check is this number against the layer's threshold.

A bank may also carry an exit vocabulary: the few thousand tokens that the text calibration saw
is written in. Then a row the predictor passes projects onto those tokens only (a sliver of the
LM head, whose full read costs SmolLM2 about four decoder layers on a CPU and Gemma-3-270M more than
all of its layers), and leaves only if
the head's top token there beats the runner-up by `margin` logits: a token outside the list, or
one the head hesitates on, goes deeper. When every row of a step leaves this way, the full LM head
is not read at all.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# compact exit banks trained by `helios calibrate --ship` for the models the package knows by name:
# a first start serves with trained exits before any calibration of the user's own
SHIPPED = Path(__file__).parent / "trained"


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
    """[rms(h), rms(h) - rms(h_prev)] -> MLP -> agreement with the full-depth token. A state that
    still moves between exit layers has not settled on its token; the state alone over-fits the
    prompts it was trained on."""

    def __init__(self, hidden: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(), nn.Linear(width, 1))

    def logit(self, h, prev):  # [..., hidden] twice -> [...]
        x = rms_norm(h)
        return self.net(torch.cat([x, x - rms_norm(prev)], -1)).squeeze(-1)

    def forward(self, h, prev):  # -> [...] probabilities
        return torch.sigmoid(self.logit(h, prev).float())


@dataclass(slots=True)
class ExitPoint:
    layer: int  # 1-based: the exit reads the output of decoder layer `layer`
    head: nn.Module
    predictor: nn.Module
    threshold: float  # exit when predictor >= threshold; > 1 disables the check at this layer


class ExitBank:
    """The exit points of one model, keyed by layer."""

    def __init__(self, head_type: str, points: dict[int, ExitPoint], meta: dict | None = None,
                 vocab: torch.Tensor | None = None, margin: float = 0.0):
        self.head_type, self.points, self.meta = head_type, dict(sorted(points.items())), meta or {}
        self.vocab, self.margin = vocab, margin  # exit vocabulary (sorted token ids) or None: the full one
        self.vocab_weight: torch.Tensor | None = None  # the LM head's rows for `vocab` (bind_head)

    @property
    def layers(self) -> list[int]:
        return list(self.points)

    @property
    def reference_layers(self) -> list[int]:
        """Every exit layer calibration trained with, in use or not (a compact bank keeps only the
        points in use, but their predictors read the state at the layer before them)."""
        return sorted(set(self.meta.get("exit_layers", [])) | set(self.points))

    def previous(self, layer: int) -> int:
        """The reference layer before `layer` (0: the embeddings): the predictor reads how far the
        state moved since then."""
        return max((l for l in self.reference_layers if l < layer), default=0)

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

    def bind_head(self, lm_head_weight: torch.Tensor) -> "ExitBank":
        """Keep the LM head's rows of the exit vocabulary (a copy: a few MB) for the exit checks."""
        self.vocab_weight = None
        if self.vocab is not None:
            self.vocab = self.vocab.to(lm_head_weight.device)
            self.vocab_weight = lm_head_weight.detach()[self.vocab].contiguous()
        return self

    def save(self, directory: Path, compact: bool = False, min_share: float = 0.02) -> None:
        """`compact` (what the package ships): half precision, and only the exit points in use that
        calibration saw at least `min_share` of tokens leave through: a point few tokens use costs
        a check every step and its share of the package for little depth."""
        directory.mkdir(parents=True, exist_ok=True)
        shares, total = self.meta.get("exit_share_by_layer", {}), self.meta.get("eval_tokens") or 1
        points = {l: p for l, p in self.points.items()
                  if not compact or (p.threshold <= 1.0 and shares.get(str(l), shares.get(l, 0)) >= min_share * total)}
        dtype = torch.float16 if compact else torch.float32
        tensors = {}
        for l, p in points.items():
            for prefix, module in (("head", p.head), ("pred", p.predictor)):
                tensors.update({f"{l}.{prefix}.{k}": v.detach().to(dtype).contiguous()
                                for k, v in module.state_dict().items()})
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.to(torch.int32).cpu().contiguous()
        save_file(tensors, directory / "exits.safetensors")
        meta = {**self.meta, "head_type": self.head_type, "thresholds": {l: p.threshold for l, p in points.items()},
                "margin": self.margin}
        (directory / "exits.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def find(cls, store, hidden: int) -> "ExitBank | None":
        """The model's own calibration in its store, else the heads shipped for it with the package."""
        try:
            bank = cls.load(store.exits_dir, hidden)
        except RuntimeError:  # written by an older calibration whose predictors had another shape
            warnings.warn(f"exit heads in {store.exits_dir} are from an older calibration; "
                          "run `helios calibrate` again. Serving the packaged heads meanwhile.")
            bank = None
        if bank is None and (SHIPPED / store.root.name).is_dir():
            bank = cls.load(SHIPPED / store.root.name, hidden)
            if bank is not None and bank.meta.get("num_layers") != store.num_layers:
                return None  # trained on another version of the weights
        return bank

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
        if "vocab" in tensors:
            bank.vocab, bank.margin = tensors["vocab"].long(), float(meta.get("margin", 0.0))
        return bank


def build_vocab(token_ids: list[list[int]], size: int, vocab_size: int) -> torch.Tensor:
    """The exit vocabulary: the `size` tokens most frequent in `token_ids` (calibration's prompts
    and the text the model wrote), topped up with the lowest ids (a BPE's earliest, most common
    merges) when the text holds fewer; sorted."""
    counts = torch.bincount(torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long),
                            minlength=vocab_size)[:vocab_size]
    seen = counts.nonzero().squeeze(1)
    top = seen[counts[seen].argsort(descending=True, stable=True)][:size]
    rest = torch.ones(vocab_size, dtype=torch.bool)
    rest[top] = False
    fill = rest.nonzero().squeeze(1)[: max(0, size - len(top))]
    return torch.cat([top, fill]).sort().values
