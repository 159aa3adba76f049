"""Which exit points are worth checking in a decode step: an exit that cannot pay is not tried.

A check costs the same whether or not anyone leaves (the predictor over the batch, a gather, a
comparison, and the exit-vocabulary check of the rows the predictor passes), and what it can buy
depends on the batch: the layers after a point are saved only when the whole batch has its tokens
there (rows that leave while others go on save little; engine.rebatch). With `n` rows that each
have their token by layer l with probability R_l, the batch is done by l with probability about
R_l ** n (an upper bound when rows differ). A check at l runs only on the steps that reach it,
those not done by the last point checked before it (k), and what it adds is the steps done at l
but not by k. So, going up from the shallowest point, l is checked when

    (R_l ** n - R_k ** n) * ((depth - l) * saved_per_layer(n) + head_s)  >=  (1 - R_k ** n) * check_s

where saved_per_layer is a layer's time at the deferred fill net of the per-row part (the leavers'
deeper KV is still computed, riding a later step), and head_s what the step saves on the LM head
when every row leaves through the exit vocabulary (engine.exits): the full head is then not read.
A deep point right after a shallower one adds the few tokens that first become confident there, and
at batch 1 on the shipped SmolLM2 heads that is not worth a check every step.

At batch 8 most points are skipped: their rows take the token of a deeper exit or of the full
model, which is also the better token. Under the `buffer` policy a point is also checked where the
rows expected to continue (n (1 - R_l)) are few enough for the buffer to hold them (engine.buffer).
Every `explore_every`-th decode step checks every point, and the share of rows confident by each
layer (R_l) is measured at the points each step checks, decayed so the estimate follows the
workload. `check_s` starts as `measure_check`'s figure and then follows what checks cost in the
engine's own steps (`observe_check`): in a decode step a check's small kernels take several times
what they do alone.

Plain Python over a measured cost model, testable without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.buffer import BufferPlanner
from engine.rebatch import LayerCost, timed

# a row never confident in the step counts as confident past every layer
NEVER = 1 << 30


@dataclass
class ExitGate:
    cost: LayerCost
    check_s: float  # one exit check over a full batch
    kv_fill: Literal["deferred", "copy", "none"] = "deferred"
    # under the `buffer` policy a point also pays when the rows expected to continue there are few
    # enough for the buffer to hold them
    buffer: BufferPlanner | None = None
    head_s: float = 0.0  # the full LM head's read, spared when the whole batch leaves through the exit vocabulary
    explore_every: int = 16
    decay: float = 0.97  # weight of past steps in R_l per step observed, so R_l follows the workload
    check_weight: float = 0.1  # weight of each step's measured check cost in check_s (0: keep the start-up figure)
    steps: int = 0
    skipped: int = 0  # checks not run because they could not pay
    _hits: dict[int, float] = field(default_factory=dict)  # decayed rows confident by l
    _seen: dict[int, float] = field(default_factory=dict)  # decayed rows observed at l

    def confident_by(self, layer: int) -> float:
        """R_l, with one pseudo-row either way: a point never observed is checked."""
        return (self._hits.get(layer, 0.0) + 1) / (self._seen.get(layer, 0.0) + 2)

    def saved_per_layer_s(self, rows: int) -> float:
        """What one layer the batch does not run saves, net of the KV its tokens still need."""
        c = self.cost
        if self.kv_fill == "deferred":  # the per-row work moves to a later step's weight read
            return c.layer_fixed_s
        if self.kv_fill == "copy":
            return max(c.layer_s(rows) - c.fill_s(rows), 0.0)
        return c.layer_s(rows)

    def pays(self, layer: int, rows: int, depth: int, done_before: float = 0.0) -> bool:
        """Whether checking `layer` pays, given that the batch is done by the point checked before it
        with probability `done_before`."""
        r = self.confident_by(layer)
        gain = max(r ** rows - done_before, 0.0) * ((depth - layer) * self.saved_per_layer_s(rows) + self.head_s)
        if gain >= (1 - done_before) * self.check_s:
            return True
        continuing = round(rows * (1 - r))
        return self.buffer is not None and 0 < continuing < rows and self.buffer.decide(rows, continuing, layer,
                                                                                          depth).hold

    def plan(self, candidates: list[int], rows: int, depth: int) -> set[int]:
        """The exit points (1-based layers) to check in this step."""
        self.steps += 1
        if (self.steps - 1) % self.explore_every == 0:
            return set(candidates)
        keep, done = set(), 0.0
        for l in sorted(candidates):
            if self.pays(l, rows, depth, done):
                keep.add(l)
                done = max(done, self.confident_by(l) ** rows)
        self.skipped += len(candidates) - len(keep)
        return keep

    def observe_check(self, seconds: float) -> None:
        """What one check cost in a step just run."""
        self.check_s += self.check_weight * (seconds - self.check_s)

    def observe(self, checked: set[int], confident_at: list[int]) -> None:
        """A step's outcome at the points it checked: per row, the first layer whose check it passed
        (NEVER if none). A row confident at a skipped shallower point and not at a checked one counts
        as not confident there: the estimate errs towards skipping less."""
        if not confident_at:
            return
        for l in checked:
            hits = sum(c <= l for c in confident_at)
            self._hits[l] = self.decay * self._hits.get(l, 0.0) + hits
            self._seen[l] = self.decay * self._seen.get(l, 0.0) + len(confident_at)


@torch.inference_mode()
def measure_check(bank, hidden: int, rows: int, device, dtype, reps: int = 20) -> float:
    """Seconds for one exit check over `rows` rows: the predictor, the comparison and the test for
    anyone leaving, plus the two state gathers it reads."""
    point = next(iter(bank.points.values()))
    h = torch.randn(rows, 2, hidden, device=device, dtype=dtype)
    idx = torch.zeros(rows, dtype=torch.long, device=device)
    arange = torch.arange(rows, device=device)

    def check():
        last, prev = h[arange, idx], h[arange, idx + 1]
        return bool((point.predictor(last, prev) >= point.threshold).any())

    return timed(check, reps)
