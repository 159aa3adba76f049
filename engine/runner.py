"""One pass through the loaded layer stack under an exit policy.

Decode, at each exit point, rows whose predictor clears the threshold take their token from that
layer's head. What happens to them next is the policy:
- `full`: no exit points are checked.
- `batch` (what earlier EE frameworks do): the batch leaves together only when every row is
  confident (or a `quorum` share of them: the rows forced out then are involuntary exits).
- `ride_along` (HELIOS): each row's token comes from its first confident layer, but the batch keeps
  its shape; done rows ride along, so their deeper KV is exact and nothing is saved on them.
- `rebatch` (DREX): done rows leave when the planner predicts the smaller batch pays for the
  regroup and the leavers' KV fill; otherwise they ride along. Nobody is forced out.
- `buffer` (DREX's rebatching buffer): `rebatch`, and when only a few rows continue past an exit
  point, they may wait there for the next step's continuing rows (engine.buffer decides); such a
  row comes back next step at that level, its token still to be decided.
With an exit vocabulary in the bank (engine.exits), a row its predictor passes also needs a clear
winner among those tokens to leave, and takes its token from them.
Only the exit points the engine's exit gate finds worth checking at this batch size are checked
(`checked`; engine.exit_gate). Under every policy the batch stops as soon as no row needs a deeper
layer. Rows still present at the last loaded layer exit there: normally at full depth, a "greedy
exit" when the stack is truncated and they never became confident.

Rows that leave early miss the KV of the layers they skip; `kv_fill` says how it is made up:
`deferred` (exact, in a later step: engine.deferred), `copy` (state copy now: approximate) or
`none` (left empty). A row that has `max_deferred` tokens pending rides to the last layer.

Prefill: every prompt position must reach every loaded layer (later tokens attend to all of
them), so rows are never dropped; the first generated token still comes from the first layer
whose check passes, so a token's exit means the same thing in prefill and decode.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine import deferred
from engine.buffer import BufferPlanner
from engine.exit_gate import NEVER
from engine.exit_vocab import VocabRows, vocab_check
from engine.exits import ExitBank
from engine.model import BatchCtx, EEModel, run_start
from engine.rebatch import RebatchPlanner

ExitPolicy = Literal["full", "batch", "ride_along", "rebatch", "buffer"]
KVFill = Literal["deferred", "copy", "none"]


@dataclass(slots=True)
class RowExit:
    layer: int
    confidence: float
    greedy: bool
    involuntary: bool = False  # left an exit point before its own predictor was confident


@dataclass(slots=True)
class StackOutput:
    logits: torch.Tensor  # [b, vocab], each row from the head it exited through
    exits: list[RowExit]  # one per row
    row_layers: int = 0  # sum over layers run of rows in the batch: the compute actually spent
    splits: int = 0  # regroups done (rebatch)
    splits_skipped: int = 0  # regroups the planner judged not worth it (rebatch)
    held: list[int] = field(default_factory=list)  # rows that wait in the buffer: no token this step
    vocab_exits: int = 0  # rows whose token came from the exit vocabulary (their LM head read skipped)
    # per row, the first exit point whose check it passed (exit_gate.NEVER if none): what the exit
    # gate learns from on the steps that check every point
    confident_at: list[int] = field(default_factory=list)
    checks: int = 0  # exit points checked
    check_s: float = 0.0  # wall time they took, the states they read included (what the exit gate prices)


def _max_prob(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).amax(-1)


@dataclass
class _Rows:
    """Bookkeeping of one pass: per original row, where and how it left."""

    b: int
    depth: int
    layer: torch.Tensor = field(init=False)
    conf: torch.Tensor = field(init=False)
    greedy: torch.Tensor = field(init=False)
    involuntary: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.layer = torch.full((self.b,), self.depth, dtype=torch.long)
        self.conf = torch.full((self.b,), float("nan"))
        self.greedy = torch.zeros(self.b, dtype=torch.bool)
        self.involuntary = torch.zeros(self.b, dtype=torch.bool)


@dataclass(slots=True)
class StackOptions:
    """How one pass treats its rows."""

    policy: ExitPolicy = "rebatch"
    kv_fill: KVFill = "deferred"
    planner: RebatchPlanner | None = None  # rebatch: whether a regroup pays
    quorum: float = 1.0  # batch: the share of confident rows that takes the whole batch out
    max_deferred: int = 16  # a row with this many pending tokens rides to the last layer
    buffer: BufferPlanner | None = None  # buffer: whether the continuing rows wait
    # buffer: [b] how much longer each row's next token may take than one step (negative: never hold it)
    slack_s: torch.Tensor | None = None
    checked: set[int] | None = None  # the exit points to check (engine.exit_gate); None: every one


@dataclass(slots=True)
class _Batch:
    """The rows still in the pass, each field indexed alike."""

    h: torch.Tensor  # [rows, T, hidden] (a packed prefill: [1, tokens, hidden])
    ctx: BatchCtx
    rows: torch.Tensor  # original index of each row
    last_idx: torch.Tensor  # index along T of each row's newest token, the one whose exit is decided
    live: torch.Tensor  # rows without a token yet
    tok_level: torch.Tensor  # the level each row's token starts at: above 0 after a wait in the buffer
    prev: torch.Tensor  # each row's state at the previous exit layer: the predictor reads how far it moved
    anchored: torch.Tensor | None  # rows whose pending tokens reached the cap: they go to the last layer

    def select(self, keep: torch.Tensor) -> "_Batch":
        return _Batch(self.h[keep], self.ctx.select(keep), self.rows[keep], self.last_idx[keep], self.live[keep],
                      self.tok_level[keep], self.prev[keep], None if self.anchored is None else self.anchored[keep])

    def lasts(self) -> torch.Tensor:
        return _lasts(self.h, self.last_idx, self.ctx)


@torch.inference_mode()
def run_stack(model: EEModel, bank: ExitBank | None, h: torch.Tensor, ctx: BatchCtx, last_idx: torch.Tensor,
              is_prefill: bool, opts: StackOptions | None = None) -> StackOutput:
    # h: [b, T, hidden]; last_idx: [b] index of each row's final real token along T. Decode under
    # the deferred fill: T columns per row (new token first, then its pending tokens) and ctx.level.
    opts = opts or StackOptions()
    b, depth = len(last_idx), model.depth  # rows: sequences (a packed prefill holds them in one row of h)
    columns = ctx.level is not None and (h.shape[1] > 1 or bool(ctx.level.any()))
    zeros = torch.zeros(b, dtype=torch.long, device=h.device)
    batch = _Batch(h, ctx, torch.arange(b, device=h.device), last_idx, torch.ones(b, dtype=torch.bool, device=h.device),
                   # a token that waited in the buffer starts above 0: its earlier exit points were judged last step
                   ctx.level[torch.arange(b, device=h.device), last_idx] if columns else zeros,
                   _lasts(h, last_idx, ctx),  # the embeddings, before the first exit layer
                   deferred.pending_counts(ctx) >= opts.max_deferred if columns else None)
    # each row's hidden state after its exit head; the vocabulary projection, memory-bound on the
    # LM head's weights, then runs once per step for all rows whatever layers they left at
    out = torch.empty(b, h.shape[-1], device=h.device, dtype=h.dtype)
    vocab, rec, result = VocabRows(b, bank), _Rows(b, depth), StackOutput(out, [])
    checks = {} if opts.policy == "full" or bank is None else {
        l: p for l, p in bank.points.items()
        if l < depth and p.threshold <= 1.0 and (opts.checked is None or l in opts.checked)}
    refs = _states_needed(bank, checks, depth, model.num_layers_total)
    first_conf = torch.full((b,), NEVER, dtype=torch.long, device=h.device)

    for i in range(depth):
        if columns:
            result.row_layers += deferred.layer_step(model, i, batch.h, batch.ctx)
        else:
            batch.h = model.layer_forward(i, batch.h, batch.ctx)
            result.row_layers += len(batch.rows)
        if i + 1 not in refs or i + 1 == depth:  # the last loaded layer is judged in _exit_at_depth
            continue
        t0 = time.perf_counter()
        last = batch.lasts()
        point, before, batch.prev = checks.get(i + 1), batch.prev, last
        if point is None:
            result.check_s += time.perf_counter() - t0  # a state a later check reads
            continue
        leave = _take_tokens(model, bank, point, i + 1, batch, last, before, opts, first_conf, out, vocab, rec,
                             result)
        result.check_s += time.perf_counter() - t0
        result.checks += 1
        if opts.buffer is not None and not is_prefill:
            leave = _hold(opts, i + 1, depth, batch, b, leave, out, vocab, rec, result)
        if is_prefill or leave is None:
            continue  # prefill: every position must reach every layer
        batch = _retire(model, opts, i + 1, depth, batch, result)
        if batch is None:
            break
    else:
        _exit_at_depth(model, bank, batch.h, batch.ctx, batch.rows, batch.last_idx, batch.live, is_prefill, out, rec,
                       batch.prev)

    logits = vocab.logits(model, out)
    final_head = rec.conf.isnan()
    if bool(final_head.any()):  # left through the model's own head: no predictor, use its max probability
        rec.conf[final_head] = _max_prob(logits[final_head.to(logits.device)]).float().cpu()
    result.logits = logits
    result.confident_at = first_conf.tolist()
    result.exits = [RowExit(int(l), float(c), bool(g), bool(v))
                    for l, c, g, v in zip(rec.layer, rec.conf, rec.greedy, rec.involuntary)]
    return result


def _take_tokens(model, bank, point, layer: int, batch: _Batch, last, before, opts: StackOptions, first_conf, out,
                 vocab, rec: _Rows, result: StackOutput) -> torch.Tensor | None:
    """Who leaves at exit point `layer` under the policy, their tokens taken from its head: the
    rows that now have a token ([rows] bool), or None when nobody leaves here."""
    c = point.predictor(last, before)
    confident = c >= point.threshold
    if opts.buffer is None and not bool(confident.any()):
        return None  # the common case at full depth: nothing to record (a small batch's check is mostly this)
    live = batch.live
    started = confident & (batch.tok_level < layer)
    short = None
    if bank.vocab_weight is not None and bool((started & live).any()):
        short = vocab_check(model, bank, point, last, started & live)
        confident = short.passed | (confident & ~live)
        started = confident & (batch.tok_level < layer)
    rows = batch.rows
    first_conf[rows[started]] = torch.clamp(first_conf[rows[started]], max=layer)
    leave = started & live
    if opts.policy == "batch":
        if int(leave.sum()) < max(1, opts.quorum * int(live.sum())):
            return None  # rows wait for the slowest
        leave = live.clone()
    if not bool(leave.any()):
        return None
    idx = leave.nonzero().squeeze(1)
    if short is not None and len(short.idx):  # every row that passed leaves now
        vocab.put(rows[short.idx], short.logits)
        result.vocab_exits += len(short.idx)
        idx = idx[~torch.isin(idx, short.idx)]
    out[rows[idx]] = point.head(last[idx])
    cpu_idx = rows[leave].cpu()
    rec.layer[cpu_idx], rec.conf[cpu_idx] = layer, c[leave].float().cpu()
    rec.involuntary[cpu_idx] = ~confident[leave].cpu()
    batch.live = live & ~leave
    return leave


def _hold(opts: StackOptions, layer: int, depth: int, batch: _Batch, b: int, leave, out, vocab, rec: _Rows,
          result: StackOutput) -> torch.Tensor | None:
    """The buffer: the continuing rows may wait at `layer` for the next step's; they then leave the
    stack like rows with a token, without one."""
    slack = None if opts.slack_s is None else opts.slack_s[batch.rows]
    hold = _to_hold(opts.buffer, batch.live, batch.anchored, batch.tok_level, slack, b, layer, depth)
    if hold is None:
        return leave
    held = batch.rows[hold]
    out[held] = 0
    vocab.tokenless.append(held)
    rec.conf[held.cpu()] = 0.0
    result.held += held.tolist()
    batch.live = batch.live & ~hold
    return hold if leave is None else leave | hold


def _retire(model: EEModel, opts: StackOptions, layer: int, depth: int, batch: _Batch,
            result: StackOutput) -> _Batch | None:
    """After some rows got their token at `layer`: whether the rows with a token leave the batch (a
    regroup, when others go on) and their KV is filled, or ride along. The batch that goes on, or
    None when no row does."""
    stay = batch.live if batch.anchored is None else batch.live | batch.anchored
    n, n_stay = len(batch.rows), int(stay.sum())
    if n_stay == n:
        return batch
    if n_stay:  # some rows could leave while others go on: a regroup
        if opts.policy not in ("rebatch", "buffer"):
            return batch  # ride_along and batch: done rows ride along
        loses_view = batch.ctx.first_slot is not None and run_start(stay.nonzero().squeeze(1)) is None
        if opts.planner is not None and not opts.planner.decide(n, n - n_stay, depth - layer, batch.ctx.length,
                                                                loses_view).split:
            result.splits_skipped += 1
            return batch
        result.splits += 1
    done = (~stay).nonzero().squeeze(1)  # every row with a token, riders included
    _leave(model, opts.kv_fill, layer, batch.h[done], batch.ctx.select(done))
    return batch.select(stay.nonzero().squeeze(1)) if n_stay else None


def _states_needed(bank: ExitBank | None, checks: dict, depth: int, total: int) -> set[int]:
    """Exit layers whose states the checks read: each checked layer and the one before it (the
    predictor reads how far the state moved since the previous exit layer); for a truncated stack
    also the one before the last loaded layer, whose exit is judged at the end."""
    if bank is None:
        return set()
    judged = list(checks) + ([depth] if depth < total else [])
    return (set(checks) | {bank.previous(l) for l in judged}) - {0}  # 0: the embeddings, read at the start


def _to_hold(buffer: BufferPlanner, live, anchored, tok_level, slack_s, n: int, layer: int, depth: int):
    """The rows to hold at exit point `layer`, or None. All continuing rows wait or none: if any row
    goes deeper this step (one that waited already, one with too many pending tokens, one whose
    deadline is near), the deeper layers run now anyway and the others ride that pass."""
    deeper = live if anchored is None else live | anchored
    hold = live & (tok_level == 0)  # a token waits at most once
    if not bool(hold.any()) or bool((deeper & ~hold).any()):
        return None
    if slack_s is not None and bool((slack_s[hold] < 0).any()):
        return None
    return hold if buffer.decide(n, int(hold.sum()), layer, depth).hold else None


def _lasts(h: torch.Tensor, last_idx: torch.Tensor, ctx: BatchCtx) -> torch.Tensor:
    """[rows, hidden]: each row's newest token, the one whose exit is being decided."""
    if ctx.packed is not None:
        return h[0, last_idx]
    return h[torch.arange(h.shape[0], device=h.device), last_idx]


def _leave(model: EEModel, kv_fill: KVFill, reached: int, h: torch.Tensor, ctx: BatchCtx) -> None:
    """Rows leave the stack after layer `reached`: record where their tokens stand, fill their KV."""
    if ctx.level is not None:
        deferred.settle(model, h, ctx, reached)
        return
    model.kv.top_hidden[ctx.slots, ctx.positions[:, 0]] = h[:, 0]
    model.kv.level[ctx.slots, ctx.positions[:, 0]] = model.depth  # nothing left to compute for it
    if kv_fill == "copy":
        model.fill_kv(reached, h, ctx)


def _exit_at_depth(model, bank, h, ctx, rows, last_idx, live, is_prefill, out, rec: _Rows, prev) -> None:
    """Rows that reached the last loaded layer leave there: a greedy exit unless the stack is whole."""
    if ctx.packed is not None:
        for slot, (start, n), piece in zip(ctx.slots.tolist(), ctx.packed, h[0].split([n for _, n in ctx.packed])):
            model.kv.top_hidden[slot, start:start + n] = piece
            model.kv.level[slot, start:start + n] = model.depth
    elif is_prefill:
        model.kv.top_hidden[ctx.slots, : h.shape[1]] = h
        model.kv.level[ctx.slots, : h.shape[1]] = model.depth
    else:
        _leave(model, "none", model.depth, h, ctx)
    pending = live.nonzero().squeeze(1)
    if pending.numel() == 0:
        return
    last = _lasts(h, last_idx, ctx)[pending]
    idx = rows[pending].cpu()
    point = bank.points.get(model.depth) if bank and model.depth < model.num_layers_total else None
    if model.depth == model.num_layers_total:
        out[rows[pending]] = last
    elif point is not None:
        out[rows[pending]] = point.head(last)
        c = point.predictor(last, prev[pending]).float().cpu()
        rec.conf[idx], rec.greedy[idx] = c, c < point.threshold
    else:  # truncated without a trained head: the model's own final head is the exit
        out[rows[pending]] = last
        rec.greedy[idx] = True


@torch.inference_mode()
def extend_stack(model: EEModel, start: int, slots: torch.Tensor, lengths: list[int]) -> None:
    """Run newly loaded layers start.. over tokens already cached, so their KV exists."""
    t = max(lengths)
    h = model.kv.top_hidden[slots, :t]
    positions = torch.arange(t, device=h.device).expand(len(lengths), t)
    ctx = model.make_ctx(slots, positions)
    for i in range(start, model.depth):
        h = model.layer_forward(i, h, ctx)
    for row, n in enumerate(lengths):
        model.kv.top_hidden[slots[row], :n] = h[row, :n]
        model.kv.level[slots[row], :n] = model.depth
