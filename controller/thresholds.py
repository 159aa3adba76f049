"""Live threshold tuning: hold each exit layer's shadow-verified agreement above a floor.

Calibration picks thresholds on its own prompts; a workload it never saw (chat after code) can
make an exit layer's tokens disagree with the full model far more often. The shadow verifier
re-checks a sample of early exits at full depth, per exit layer. From those counts, each layer's
threshold moves on its own:
- agreement under `floor` (with enough checks since its last change): raise it by `step`; past
  `max_threshold` the layer is switched off;
- agreement at least `floor + margin`: lower it by `step`, never under `min_threshold`;
- otherwise hold. Each judgement uses the checks made since the layer's previous one, so a change
  is judged on the tokens it produced.
Plain Python: the controller feeds it cumulative per-layer counts and pushes what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

OFF = 1.1  # as engine.thresholds.OFF: no probability reaches it


class TunerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    enabled: bool = Field(True, description="Move exit thresholds to hold the agreement floor.")
    floor: float = Field(0.95, gt=0, le=1, description="Agreement each exit layer must keep (shadow-verified).")
    margin: float = Field(0.03, ge=0, le=0.5, description="Agreement above floor + margin lowers a threshold.")
    step: float = Field(0.02, gt=0, le=0.5, description="How far one change moves a threshold.")
    min_checks: int = Field(20, ge=1, description="Checks since a layer's last change needed to judge it.")
    min_threshold: float = Field(0.5, ge=0, le=1)
    max_threshold: float = Field(0.995, ge=0, le=1, description="Raising past this switches the layer off.")


@dataclass(slots=True)
class ThresholdChange:
    layer: int
    old: float
    new: float
    agreement: float
    checks: int

    @property
    def reason(self) -> str:
        verb = "switched off" if self.new > 1 else "raised" if self.new > self.old else "lowered"
        return f"layer {self.layer} {verb} {self.old:.3f}->{self.new:.3f}: live agreement {self.agreement:.3f} " \
               f"over {self.checks} checks"


@dataclass
class ThresholdTuner:
    config: TunerConfig
    thresholds: dict[int, float]  # the candidate's thresholds as served now
    _base: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (checked, agreed) last judged at

    def reset(self, thresholds: dict[int, float] | None, totals: dict[int, tuple[int, int]]) -> None:
        """Thresholds set from outside (None: keep them); only checks after `totals` judge them."""
        if thresholds is not None:
            self.thresholds = {int(l): t for l, t in thresholds.items()}
        self._base = dict(totals)

    def observe(self, totals: dict[int, tuple[int, int]]) -> list[ThresholdChange]:
        """`totals`: per exit layer, cumulative (checked, agreed). Returns the changes to push."""
        cfg, changes = self.config, []
        for layer, (checked, agreed) in sorted(totals.items()):
            if layer not in self.thresholds or self.thresholds[layer] > 1:
                continue
            c0, a0 = self._base.setdefault(layer, (0, 0))
            n = checked - c0
            if n < cfg.min_checks:
                continue
            rate, old = (agreed - a0) / n, self.thresholds[layer]
            self._base[layer] = (checked, agreed)
            if rate < cfg.floor:
                new = old + cfg.step if old + cfg.step <= cfg.max_threshold else OFF
            elif rate >= cfg.floor + cfg.margin and old > cfg.min_threshold:
                new = max(cfg.min_threshold, old - cfg.step)
            else:
                continue
            self.thresholds[layer] = new = round(new, 4)
            changes.append(ThresholdChange(layer, old, new, rate, n))
        return changes
