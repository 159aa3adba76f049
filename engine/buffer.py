"""DREX's rebatching buffer: may the rows that continue past an exit point wait for the next step's?

At an exit point some rows are confident and leave; the rest continue into the deeper layers. When
few rows continue, the deeper layers cost this step almost as much as for a full batch (a decode
layer is bound by reading its weights: `LayerCost.layer_fixed_s` dominates). Holding those rows at
the exit point, their states kept where they are (`KVCache.top_hidden` at their level, as the
deferred fill keeps an exited token's: no copy), lets the next step's continuing rows join them, so
the deeper layers run once for both groups. The price: a held row produces no token this step and
no new token next step (its slot in the next step's shallow layers is idle), and its request waits
one step longer for that token.

`BufferPlanner.decide` is the adaptive rebatching threshold (ART): it compares the time per token
of two steps without the buffer with two steps where this step's continuing rows wait, from the
measured per-layer costs and the share of rows that continue here now, and holds only when waiting
is cheaper per token. The SLA part is the engine's: a row whose time-per-output-token target would
be missed by waiting one more step is never offered (its `slack_s` is negative), and a held row is
never held twice for the same token, so no token waits more than one step.

Plain Python over a measured cost model, testable without a model.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.rebatch import LayerCost


@dataclass(frozen=True, slots=True)
class HoldDecision:
    hold: bool
    per_token_s: float  # predicted time per token over two steps, rows held
    baseline_per_token_s: float  # the same without the buffer

    @property
    def reason(self) -> str:
        return "waiting pays" if self.hold else "forwarding now is cheaper per token"


class BufferPlanner:
    def __init__(self, cost: LayerCost):
        # cost.step_fixed_s, what a decode step costs whatever its rows (the LM head over the batch),
        # weighs against holding: a held row spends it without producing a token
        self.cost = cost

    def _layers_s(self, layers: int, rows: float) -> float:
        return layers * self.cost.layer_s(rows) if rows > 0 else 0.0

    def decide(self, rows: int, continuing: int, layer: int, depth: int) -> HoldDecision:
        """`rows` in the step, `continuing` of them past exit point `layer` (1-based: layers 0..layer-1
        are behind them) of a `depth`-layer stack.

        Two consecutive steps in steady state, n rows, c continuing:
          forward both times: 2 (F + S(n) + D(c))                    for 2n tokens
          hold this time:     F + S(n) + F + S(n - c) + D(c + c')   for 2n - c tokens
        with S shallow layers, D deep layers, F the step's fixed cost, and c' = c/n (n - c) the rows
        of the next step expected to continue (today's share).
        """
        n, c, deep = rows, continuing, depth - layer
        if not 0 < c <= n or deep <= 0:
            return HoldDecision(False, float("inf"), float("inf"))
        f, shallow = self.cost.step_fixed_s, layer
        base = 2 * (f + self._layers_s(shallow, n) + self._layers_s(deep, c)) / (2 * n)
        if c == n:  # nothing else in the next step's shallow layers: waiting only delays
            return HoldDecision(False, float("inf"), base)
        joining = c / n * (n - c)
        held = (2 * f + self._layers_s(shallow, n) + self._layers_s(shallow, n - c)
                + self._layers_s(deep, c + joining)) / (2 * n - c)
        return HoldDecision(held < base, held, base)
