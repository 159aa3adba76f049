"""Deferred KV fill: exact KV for tokens that left the stack early, paid when a later step needs it.

A token that exits at layer e has K/V in layers < e only. State copy projects its deeper K/V from
its exit state: cheap, but later tokens then attend to keys the full model never computed, and the
error compounds through the context. Under the deferred fill the token stays *pending* at level e
(`KVCache.level`, its state in `top_hidden`) and joins its row's next step as an extra column: from
layer e+1 on it is computed like any token, so its K/V equal the full model's (EE-LLM's KV
recomputation). It goes only as deep as that step goes, so a layer that no row needs is never run,
and when a step does go deep, every pending token of a row rides one read of the weights.

A decode row's columns are [new token, pending tokens by ascending level] (a row whose newest token
waits in the rebatching buffer has it among the pending ones, at its level); layer i needs the
columns whose level is <= i, a prefix (`BatchCtx.at_layer`). Columns of other rows inside that
prefix, and padding, sit the layer out: their K/V go to the cache's scratch position.
"""
from __future__ import annotations

import torch

from engine.model import BatchCtx, EEModel

PAD = 1 << 30  # level of a padding column: it never takes part


def pending_columns(model: EEModel, slots: list[int], new_pos: list[int], with_new: bool = True,
                    held: list[bool] | None = None):
    """Positions and levels [b, T] of each row's columns, padded to the longest row, and [b] the
    column of each row's newest token.

    `new_pos[r]`: position of row r's newest token; cached tokens before it whose level is under
    the loaded depth are pending. With `with_new`, column 0 is the newest token at level 0, unless
    the row is `held`: its newest token already waits at some level (engine.buffer) and takes its
    place among the pending tokens by level.
    """
    kv, depth = model.kv, model.depth
    rows, token_col = [], []
    for r, (slot, p) in enumerate(zip(slots, new_pos)):
        waiting = held is not None and held[r]
        level = kv.level[slot, :p + 1 if waiting else p]
        idx = (level < depth).nonzero().squeeze(1)
        idx = idx[level[idx].argsort(stable=True)]
        pos, lvl = idx.tolist(), level[idx].tolist()
        if waiting:
            rows.append((pos, lvl))
            token_col.append(pos.index(p))
        else:
            rows.append(([p] + pos, [0] + lvl) if with_new else (pos, lvl))
            token_col.append(0)
    t = max(len(pos) for pos, _ in rows)
    positions = [pos + [pos[0] if pos else 0] * (t - len(pos)) for pos, _ in rows]
    levels = [lvl + [PAD] * (t - len(lvl)) for _, lvl in rows]
    dev = model.device
    return (torch.tensor(positions, device=dev), torch.tensor(levels, device=dev),
            torch.tensor(token_col, device=dev))


def pending_counts(ctx: BatchCtx) -> torch.Tensor:
    """[b] pending tokens riding with each row's new token."""
    return (ctx.level < PAD).sum(1) - 1


def layer_step(model: EEModel, i: int, h: torch.Tensor, ctx: BatchCtx) -> int:
    """Run layer i over the columns that take part, in place; returns how many took part."""
    view = ctx.at_layer(i, model.kv.scratch)
    t = view.active.shape[1]
    if t == 0:
        return 0
    out = model.layer_forward(i, h[:, :t], view.ctx)
    h[:, :t] = out if view.every else torch.where(view.active[..., None], out, h[:, :t])
    return view.count


def settle(model: EEModel, h: torch.Tensor, ctx: BatchCtx, reached: int) -> None:
    """Rows leave after layer `reached`: every column that took part is now at that level."""
    r, c = (ctx.level < reached).nonzero(as_tuple=True)
    slots, pos = ctx.slots[r], ctx.positions[r, c]
    model.kv.level[slots, pos] = reached
    model.kv.top_hidden[slots, pos] = h[r, c]


@torch.inference_mode()
def flush(model: EEModel, slots: list[int], lengths: list[int]) -> None:
    """Bring every pending token of these slots (cached tokens before `lengths`) to the loaded depth."""
    positions, level, _ = pending_columns(model, slots, lengths, with_new=False)
    if positions.shape[1] == 0:
        return
    slot_t = torch.tensor(slots, device=model.device)
    h = model.kv.top_hidden[slot_t[:, None], positions]
    ctx = model.make_ctx(slot_t, positions, level)
    for i in range(int(level.min()), model.depth):
        layer_step(model, i, h, ctx)
    settle(model, h, ctx, model.depth)
