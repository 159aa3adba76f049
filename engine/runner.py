"""One pass through the loaded layer stack with per-row early exits.

Decode: after each exit layer, rows whose predictor clears the threshold leave the batch; their
token comes from that layer's head, and the layers they skip get their KV by state copy. The rest
continue. Rows still present at the last loaded layer exit there: normally at full depth, a
"greedy exit" when the stack is truncated and they never became confident.

Prefill: every prompt position must reach every loaded layer (later tokens attend to all of
them), so rows are never dropped; the first generated token still comes from the first layer
whose check it passes, so a token's exit means the same thing in prefill and decode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.exits import ExitBank
from engine.model import BatchCtx, EEModel


@dataclass(slots=True)
class RowExit:
    layer: int
    confidence: float
    greedy: bool


@dataclass(slots=True)
class StackOutput:
    logits: torch.Tensor  # [b, vocab], each row from the head it exited through
    exits: list[RowExit]  # one per row


def _max_prob(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).amax(-1)


@torch.inference_mode()
def run_stack(model: EEModel, bank: ExitBank | None, h: torch.Tensor, ctx: BatchCtx, last_idx: torch.Tensor,
              is_prefill: bool, kv_fill: bool = True) -> StackOutput:
    # h: [b, T, hidden]; last_idx: [b] index of each row's final real token along T
    b, depth = h.shape[0], model.depth
    # each row's hidden state after its exit head; the vocabulary projection, memory-bound on the
    # LM head's weights, then runs once per step for all rows whatever layers they left at
    out = torch.empty(b, h.shape[-1], device=h.device, dtype=h.dtype)
    layer = torch.full((b,), depth, dtype=torch.long)
    conf = torch.full((b,), float("nan"))
    greedy = torch.zeros(b, dtype=torch.bool)
    rows = torch.arange(b, device=h.device)  # original index of each row still in the batch
    live = torch.ones(b, dtype=torch.bool, device=h.device)  # prefill: rows without a token yet
    checks = {l: p for l, p in bank.points.items() if l < depth and p.threshold <= 1.0} if bank else {}

    for i in range(depth):
        h = model.layer_forward(i, h, ctx)
        point = checks.get(i + 1)
        if point is None:
            continue
        last = h[torch.arange(h.shape[0], device=h.device), last_idx]
        c = point.predictor(last)
        leave = (c >= point.threshold) & live
        if not bool(leave.any()):
            continue
        idx = leave.nonzero().squeeze(1)
        out[rows[idx]] = point.head(last[idx])
        layer[rows[idx].cpu()], conf[rows[idx].cpu()] = i + 1, c[idx].float().cpu()
        if is_prefill:
            live &= ~leave
            continue
        model.kv.top_hidden[ctx.slots[idx], ctx.positions[idx, 0]] = h[idx, 0]
        if kv_fill:
            model.fill_kv(i + 1, h[idx], ctx.select(idx))
        keep = (~leave).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        h, ctx, rows, last_idx, live = h[keep], ctx.select(keep), rows[keep], last_idx[keep], live[keep]
    else:
        _exit_at_depth(model, bank, h, ctx, rows, last_idx, live, is_prefill, out, conf, greedy)

    logits = model.logits(out)
    final_head = conf.isnan()
    if bool(final_head.any()):  # left through the model's own head: no predictor, use its max probability
        conf[final_head] = _max_prob(logits[final_head.to(logits.device)]).float().cpu()
    exits = [RowExit(int(l), float(c), bool(g)) for l, c, g in zip(layer, conf, greedy)]
    return StackOutput(logits, exits)


def _exit_at_depth(model, bank, h, ctx, rows, last_idx, live, is_prefill, out, conf, greedy) -> None:
    """Rows that reached the last loaded layer leave there: a greedy exit unless the stack is whole."""
    if is_prefill:
        model.kv.top_hidden[ctx.slots, : h.shape[1]] = h
    else:
        model.kv.top_hidden[ctx.slots, ctx.positions[:, 0]] = h[:, 0]
    pending = live.nonzero().squeeze(1)
    if pending.numel() == 0:
        return
    last = h[pending, last_idx[pending]]
    idx = rows[pending].cpu()
    point = bank.points.get(model.depth) if bank and model.depth < model.num_layers_total else None
    if model.depth == model.num_layers_total:
        out[rows[pending]] = last
    elif point is not None:
        out[rows[pending]] = point.head(last)
        c = point.predictor(last).float().cpu()
        conf[idx], greedy[idx] = c, c < point.threshold
    else:  # truncated without a trained head: the model's own final head is the exit
        out[rows[pending]] = last
        greedy[idx] = True


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
