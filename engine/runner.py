"""One pass through the loaded layer stack under an exit policy.

Decode, at each exit point, rows whose predictor clears the threshold take their token from that
layer's head. What happens to them next is the policy:
- `full`: no exit points are checked.
- `batch` (what earlier EE frameworks do): the batch leaves together only when every row is
  confident (or a `quorum` share of them: the rows forced out then are involuntary exits).
- `greedy` (HELIOS): each row's token comes from its first confident layer, but the batch keeps
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

from dataclasses import dataclass, field
from typing import Literal

import torch

from engine import deferred
from engine.buffer import BufferPlanner
from engine.exit_gate import NEVER
from engine.exits import ExitBank
from engine.model import BatchCtx, EEModel, run_start
from engine.rebatch import RebatchPlanner

ExitPolicy = Literal["full", "batch", "greedy", "rebatch", "buffer"]
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


@torch.inference_mode()
def run_stack(model: EEModel, bank: ExitBank | None, h: torch.Tensor, ctx: BatchCtx, last_idx: torch.Tensor,
              is_prefill: bool, kv_fill: KVFill = "deferred", policy: ExitPolicy = "rebatch",
              planner: RebatchPlanner | None = None, quorum: float = 1.0, max_deferred: int = 16,
              buffer: BufferPlanner | None = None, slack_s: torch.Tensor | None = None,
              checked: set[int] | None = None) -> StackOutput:
    # h: [b, T, hidden]; last_idx: [b] index of each row's final real token along T. Decode under
    # the deferred fill: T columns per row (new token first, then its pending tokens) and ctx.level.
    # `buffer` (policy "buffer"): may hold the rows that continue past an exit point; `slack_s`: [b]
    # how much longer each row's next token may take than one step (negative: never hold it);
    # `checked`: the exit points to check (engine.exit_gate), None for every one
    b, depth = len(last_idx), model.depth  # rows: sequences (a packed prefill holds them in one row of h)
    columns = ctx.level is not None and (h.shape[1] > 1 or bool(ctx.level.any()))
    # the level each row's token starts at: above 0 for a token that waited in the buffer. Its exit
    # points before that level were judged last step
    tok_level = (ctx.level[torch.arange(b, device=h.device), last_idx] if columns
                 else torch.zeros(b, dtype=torch.long, device=h.device))
    # rows whose pending tokens reached the cap go to the last layer: bounds a row's columns
    anchored = deferred.pending_counts(ctx) >= max_deferred if columns else None
    # each row's hidden state after its exit head; the vocabulary projection, memory-bound on the
    # LM head's weights, then runs once per step for all rows whatever layers they left at
    out = torch.empty(b, h.shape[-1], device=h.device, dtype=h.dtype)
    vocab = _VocabRows(b, bank)
    rec = _Rows(b, depth)
    result = StackOutput(out, [])
    rows = torch.arange(b, device=h.device)  # original index of each row still in the batch
    live = torch.ones(b, dtype=torch.bool, device=h.device)  # rows without a token yet
    checks = {} if policy == "full" or bank is None else {
        l: p for l, p in bank.points.items() if l < depth and p.threshold <= 1.0 and (checked is None or l in checked)}
    refs = _states_needed(bank, checks, depth, model.num_layers_total)
    first_conf = torch.full((b,), NEVER, dtype=torch.long, device=h.device)
    # each row's state at the previous exit layer (the embeddings before the first): the predictor
    # reads how far it moved
    prev = _lasts(h, last_idx, ctx)

    for i in range(depth):
        if columns:
            result.row_layers += deferred.layer_step(model, i, h, ctx)
        else:
            h = model.layer_forward(i, h, ctx)
            result.row_layers += len(last_idx)
        if i + 1 not in refs or i + 1 == depth:  # the last loaded layer is judged in _exit_at_depth
            continue
        last = _lasts(h, last_idx, ctx)
        point, before, prev = checks.get(i + 1), prev, last
        if point is None:
            continue
        c = point.predictor(last, before)
        confident = c >= point.threshold
        if buffer is None and not bool(confident.any()):
            continue  # the common case at full depth: nothing to record (a small batch's check is mostly this)
        started = confident & (tok_level <= i)
        short = None
        if bank.vocab_weight is not None and bool((started & live).any()):
            short = _vocab_check(model, bank, point, last, started & live)
            confident = short.passed | (confident & ~live)
            started = confident & (tok_level <= i)
        first_conf[rows[started]] = torch.clamp(first_conf[rows[started]], max=i + 1)
        leave = started & live
        if policy == "batch":
            n_live = int(live.sum())
            if int(leave.sum()) < max(1, quorum * n_live):
                continue  # rows wait for the slowest
            leave = live.clone()
        if bool(leave.any()):
            idx = leave.nonzero().squeeze(1)
            if short is not None and len(short.idx):  # every row that passed leaves now
                vocab.put(rows[short.idx], short.logits)
                result.vocab_exits += len(short.idx)
                idx_full = idx[~torch.isin(idx, short.idx)]
            else:
                idx_full = idx
            out[rows[idx_full]] = point.head(last[idx_full])
            cpu_idx = rows[idx].cpu()
            rec.layer[cpu_idx], rec.conf[cpu_idx] = i + 1, c[idx].float().cpu()
            rec.involuntary[cpu_idx] = ~confident[idx].cpu()
            live &= ~leave
        if buffer is not None and not is_prefill:
            hold = _to_hold(buffer, live, anchored, tok_level, None if slack_s is None else slack_s[rows], b, i + 1,
                            depth)
            if hold is not None:  # they leave the stack like done rows, without a token
                out[rows[hold]] = 0
                vocab.tokenless.append(rows[hold])
                rec.conf[rows[hold].cpu()] = 0.0
                result.held += rows[hold].tolist()
                live &= ~hold
                leave = leave | hold
        if is_prefill or not bool(leave.any()):
            continue
        stay = live if anchored is None else live | anchored
        n_stay = int(stay.sum())
        if n_stay == h.shape[0]:
            continue
        if n_stay:  # some rows could leave while others go on: a regroup
            if policy not in ("rebatch", "buffer"):
                continue  # greedy and batch: done rows ride along
            loses_view = ctx.first_slot is not None and run_start(stay.nonzero().squeeze(1)) is None
            if planner is not None and not planner.decide(h.shape[0], h.shape[0] - n_stay, depth - i - 1,
                                                          ctx.length, loses_view).split:
                result.splits_skipped += 1
                continue
            result.splits += 1
        done = (~stay).nonzero().squeeze(1)  # every row with a token, riders included
        _leave(model, kv_fill, i + 1, h[done], ctx.select(done))
        if n_stay == 0:
            break
        keep = stay.nonzero().squeeze(1)
        h, ctx, rows, last_idx, live = h[keep], ctx.select(keep), rows[keep], last_idx[keep], live[keep]
        tok_level = tok_level[keep]
        prev, anchored = prev[keep], None if anchored is None else anchored[keep]
    else:
        _exit_at_depth(model, bank, h, ctx, rows, last_idx, live, is_prefill, out, rec, prev)

    logits = vocab.logits(model, out)
    final_head = rec.conf.isnan()
    if bool(final_head.any()):  # left through the model's own head: no predictor, use its max probability
        rec.conf[final_head] = _max_prob(logits[final_head.to(logits.device)]).float().cpu()
    result.logits = logits
    result.confident_at = first_conf.tolist()
    result.exits = [RowExit(int(l), float(c), bool(g), bool(v))
                    for l, c, g, v in zip(rec.layer, rec.conf, rec.greedy, rec.involuntary)]
    return result


@dataclass(slots=True)
class _Short:
    passed: torch.Tensor  # [rows] bool: the predictor passed them and their head has a clear winner
    idx: torch.Tensor  # their batch indices
    logits: torch.Tensor  # [len(idx), V] their head's logits over the exit vocabulary


def _vocab_check(model: EEModel, bank: ExitBank, point, last: torch.Tensor, cand: torch.Tensor) -> _Short:
    """Rows `cand` ([rows] bool) that the predictor passed: their exit head over the exit vocabulary;
    a row passes if its top token beats the runner-up by the bank's margin."""
    idx = cand.nonzero().squeeze(1)
    logits = model.vocab_logits(point.head(last[idx]), bank.vocab_weight)
    top = logits.topk(2, -1).values
    ok = top[:, 0] - top[:, 1] >= bank.margin
    passed = torch.zeros_like(cand)
    passed[idx[ok]] = True
    return _Short(passed, idx[ok], logits[ok])


class _VocabRows:
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
            rows, short = torch.cat(self.rows), torch.cat(self.parts)
            sub = torch.full((len(rows), n_vocab), float("-inf"), device=out.device, dtype=out.dtype)
            sub[:, self.bank.vocab] = short.to(out.dtype)
            logits[rows] = sub
        return logits


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
