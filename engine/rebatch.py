"""DREX's split decision: does regrouping the rows that stay pay for itself?

When some rows of a decode batch become confident at an exit point, they can leave (the batch
shrinks and the rest continue) or ride along to the last loaded layer (their token is already
fixed; the compute spent on them is wasted but their deeper KV comes out exact). Leaving saves the
leavers' share of every remaining layer, but costs a gather of the rows that stay plus the leavers'
KV over the layers they skip: a state copy now, or under the deferred fill the same per-row work
in a later step (engine.deferred), which moves that work rather than saving it. Whether a split
pays depends on the device: on a CPU or a GPU at small batch a decoder layer costs nearly the same
for 8 rows as for 4 (it is bound by reading the weights), so splits rarely pay; at large batch and
with state copy they do. What saves time under the deferred fill is the whole batch leaving: the
layers it skips are not run at all, and its tokens' deeper KV rides a later step's weight reads.

The planner is plain Python over a measured cost model so it can be tested without a model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LayerCost:
    """Seconds for one decode step of one decoder layer (and of one KV fill) as `fixed + per_row * rows`."""

    layer_fixed_s: float
    layer_per_row_s: float
    fill_fixed_s: float
    fill_per_row_s: float
    split_s: float  # regrouping the rows that stay: index selects of hidden states and batch context
    # reading one cached token of one row in one layer by gather rather than as a view: a split
    # that breaks a contiguous run of slots makes every later layer gather the stayers' KV
    gather_per_token_s: float = 0.0
    # the rest of a decode step, whatever its rows: the final norm and LM head over a full batch
    step_fixed_s: float = 0.0

    def layer_s(self, rows: int) -> float:
        return self.layer_fixed_s + self.layer_per_row_s * rows

    def fill_s(self, rows: int) -> float:
        return self.fill_fixed_s + self.fill_per_row_s * rows


@dataclass(frozen=True, slots=True)
class SplitDecision:
    saved_s: float  # predicted time saved on the remaining layers
    cost_s: float  # predicted price of regrouping plus the leavers' KV fill

    @property
    def split(self) -> bool:
        return self.saved_s > self.cost_s

    @property
    def reason(self) -> str:
        return "pays" if self.split else "does not pay"


class RebatchPlanner:
    def __init__(self, cost: LayerCost, deferred: bool = False):
        self.cost, self.deferred = cost, deferred

    def decide(self, rows: int, leaving: int, remaining_layers: int, context: int = 0,
               loses_view: bool = False) -> SplitDecision:
        """`rows` in the batch now, `leaving` of them done, `remaining_layers` still to run;
        `context` tokens cached per row, `loses_view` when the stayers' slots would stop being contiguous.

        There is no separate latency rule: within one step every row waits for the step to end, so
        the split that saves time overall is also the one that serves each request's deadline.
        """
        c, r = self.cost, remaining_layers
        saved = r * (c.layer_s(rows) - c.layer_s(rows - leaving))
        fill = c.layer_per_row_s * leaving if self.deferred else c.fill_s(leaving)
        price = c.split_s + r * fill
        if loses_view:
            price += r * c.gather_per_token_s * (rows - leaving) * context
        return SplitDecision(saved, price)


def timed(fn, reps: int) -> float:
    """Seconds per call of `fn`, after one warm-up call (allocations, kernel selection)."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def measure_cost(model, max_rows: int, reps: int = 5) -> LayerCost:
    """Time one decode step of layer 0 and its KV fill at 1 and `max_rows` rows (1 or more), one
    regroup, and the LM head over `max_rows` rows. With one slot the per-row term is timed as a
    second column of that row: what a deferred token adds to the step that carries it (on a CPU
    whose matmul at 2 rows costs more than one weight read, most of a layer).

    It writes KV at positions 0-1 of the first slots; run it before any request is admitted.
    """
    dev = model.device
    big = max(max_rows, 1)

    def setup(rows, columns=1):
        slots = torch.arange(rows, device=dev)
        ctx = model.make_ctx(slots, torch.arange(columns, device=dev).expand(rows, columns))
        h = torch.randn(rows, columns, model.hidden_size, device=dev, dtype=model.dtype) * 0.1
        return h, ctx

    def fill_once(h, ctx):
        _, k, v = model._qkv(0, model.layers[0].input_layernorm(h), ctx, need_q=False)
        model.kv.write(0, ctx.slots, ctx.positions, k, v)

    (h1, c1), (hb, cb) = setup(1), setup(big) if big > 1 else setup(1, 2)
    l1 = timed(lambda: model.layer_forward(0, h1, c1), reps)
    lb = timed(lambda: model.layer_forward(0, hb, cb), reps)
    f1 = timed(lambda: fill_once(h1, c1), reps)
    fb = timed(lambda: fill_once(hb, cb), reps)
    keep = torch.arange(big // 2, device=dev)
    s = timed(lambda: (hb[keep], cb.select(keep)), reps)
    length = model.kv.k[0].shape[2]
    slots = torch.arange(big, device=dev)
    view = timed(lambda: [t.sum() for t in model.kv.read(0, slots, length, 0)], reps)
    gather = timed(lambda: [t.sum() for t in model.kv.read(0, slots, length, None)], reps)
    head = timed(lambda: model.logits(hb[:, 0]), reps)
    extra = max(big - 1, 1)  # rows (or, with one slot, columns) beyond the first
    per_row, fill_per_row = max(lb - l1, 0.0) / extra, max(fb - f1, 0.0) / extra
    return LayerCost(max(l1 - per_row, 0.0), per_row, max(f1 - fill_per_row, 0.0), fill_per_row, s,
                     max(gather - view, 0.0) / (big * length), head)
