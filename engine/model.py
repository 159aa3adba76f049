"""The early-exit transformer: embeddings, a truncated stack of decoder layers, the final head.

Weights and per-module maths (norms, MLPs, RoPE tables) come from transformers' own classes so the
numerics match the reference; the attention, the KV cache and the layer loop are ours, because
exits, KV fill and hot layer loading need to stop, skip and resume inside the stack.
"""
from __future__ import annotations

import inspect
from bisect import bisect_right
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine import matmul_plan
from engine.matmul_plan import MatmulPlan, PlannedLinear
from engine.kv_cache import KVCache
from engine.store import CheckpointError, LayerStore


def run_start(idx: torch.Tensor) -> int | None:
    """`idx[0]` when `idx` is idx[0], idx[0]+1, ... in order (rows or slots readable as a view), else None."""
    if idx.numel() == 0:
        return None
    first = int(idx[0])
    return first if bool((idx == torch.arange(first, first + len(idx), device=idx.device)).all()) else None


@dataclass(slots=True)
class BatchCtx:
    """Where a batch of rows sits: which cache slots and positions, and their RoPE tables."""

    slots: torch.Tensor  # [b] cache slot per row
    positions: torch.Tensor  # [b, T] absolute position of each token
    length: int  # keys to read from the cache (max position + 1)
    rope: dict  # layer type -> (cos, sin), each [b, T, head_dim]
    masks: dict  # layer type -> [b, 1, T, length] bool, True where a query may attend
    first_slot: int | None  # slots are first_slot.. in order: the cache is read as a view, not gathered
    # deferred fill: layers each column has been through ([b, T], ascending along T; engine.deferred).
    # A column takes part in layer i once its level is <= i. None: every column takes part everywhere
    level: torch.Tensor | None = None
    write_at: torch.Tensor | None = None  # [b, T] where K/V go (the cache's scratch for idle columns)
    # prefill, packed: one row holding chunks of several prompts back to back, these their (first
    # position, length), one per slot. Linear layers run over every real token at once, attention
    # per chunk, over its prompt's cache up to it: no padding
    packed: tuple[tuple[int, int], ...] | None = None

    def select(self, rows: torch.Tensor) -> "BatchCtx":
        rope = {t: (c[rows], s[rows]) for t, (c, s) in self.rope.items()}
        masks = {t: m[rows] for t, m in self.masks.items()}
        slots = self.slots[rows]  # rows whose slots still form a run keep reading the cache as a view
        return replace(self, slots=slots, positions=self.positions[rows], rope=rope, masks=masks,
                       first_slot=run_start(slots), level=None if self.level is None else self.level[rows])

    # at_layer's answers, by how many of the levels present (`_levels`, ascending) are <= the layer: a
    # step's columns change only where a pending token joins, so the views are built a few times per
    # step, not per layer (a view is a dozen small ops: built per layer they cost a batch-1 step 2.5-3 ms)
    _levels: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    _views: dict[int, "ColumnView"] = field(default_factory=dict, init=False, repr=False, compare=False)

    def at_layer(self, i: int, scratch: int) -> "ColumnView":
        """The columns layer i needs: a prefix of T, since levels ascend; and which of them take part."""
        if self._levels is None:
            self._levels = sorted(set(self.level.flatten().tolist()))
        key = bisect_right(self._levels, i)
        if key not in self._views:
            self._views[key] = self._view(i, scratch)
        return self._views[key]

    def _view(self, i: int, scratch: int) -> "ColumnView":
        active = self.level <= i
        t = int(active.sum(1).max())
        active = active[:, :t]
        rope = {k: (c[:, :t], s[:, :t]) for k, (c, s) in self.rope.items()}
        masks = {k: m[:, :, :t] for k, m in self.masks.items()}
        write_at = torch.where(active, self.positions[:, :t], scratch)
        ctx = replace(self, positions=self.positions[:, :t], rope=rope, masks=masks, level=self.level[:, :t],
                      write_at=write_at)
        taking_part = int(active.sum())
        return ColumnView(ctx, active, taking_part, taking_part == active.numel())


@dataclass(slots=True)
class ColumnView:
    """Layer i's share of a deferred-fill batch (BatchCtx.at_layer)."""

    ctx: BatchCtx  # the prefix of columns the layer runs over
    active: torch.Tensor  # [b, t] the columns that take part (others' K/V go to the scratch position)
    count: int  # how many take part
    every: bool  # all t columns of every row take part: their outputs need no masking


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x, cos, sin):
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class EEModel(nn.Module):
    def __init__(self, store: LayerStore, depth: int, device: str | torch.device, dtype: torch.dtype,
                 int8_weights: bool = False, packed_head_copy: bool = True):
        super().__init__()
        self.int8_weights = int8_weights  # decoder layers' linear weights as int8 (matmul_plan.Int8Linear)
        self.packed_head_copy = packed_head_copy  # whether a plan may give the LM head a packed copy
        from transformers import AutoModelForCausalLM

        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.config = config = store.config()
        self.num_layers_total = store.num_layers
        one_layer = {"num_hidden_layers": 1}
        if getattr(config, "layer_types", None):
            one_layer["layer_types"] = config.layer_types[:1]
        skeleton_cfg = type(config).from_dict({**config.to_dict(), **one_layer})
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(skeleton_cfg)
        self.layer_cls = type(skeleton.model.layers[0])
        base = store.base()
        self.embed = self._materialise(skeleton.model.embed_tokens, {"weight": base["embed_tokens.weight"]})
        if hasattr(self.embed, "scalar_embed_scale"):  # Gemma scales embeddings by sqrt(hidden)
            self.embed.embed_scale = torch.tensor(self.embed.scalar_embed_scale, device=self.device)
        self.norm = self._materialise(skeleton.model.norm, {"weight": base["norm.weight"]})
        self.lm_head_weight = (self.embed.weight if "lm_head.weight" not in base
                               else base["lm_head.weight"].to(self.device, dtype))
        # int8 copy of the LM head for the row counts where it is faster (head_plan.int8_rows); the
        # dense one stays: the embedding and the exit vocabulary gather rows from it
        self.head_int8 = matmul_plan.Int8Linear(self.lm_head_weight) if int8_weights else None
        # oneDNN-packed copy of the LM head when head_plan.packed: the dense one stays for the same reasons
        self.head_packed: torch.Tensor | None = None
        self.rotary = type(skeleton.model.rotary_emb)(config).to(self.device)
        self._rope_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * store.num_layers)
        self.layers = nn.ModuleList()
        self.hidden_size = config.hidden_size
        attn = skeleton.model.layers[0].self_attn
        self.head_dim, self.kv_heads = attn.head_dim, config.num_key_value_heads
        self.sandwich_norms = hasattr(skeleton.model.layers[0], "pre_feedforward_layernorm")
        self.kv: KVCache | None = None
        # weight layout and small-row padding of the layers' and the LM head's matmuls (engine.matmul_plan)
        self.layer_plan = MatmulPlan()
        self.head_plan = MatmulPlan(int8_rows=matmul_plan.MAX_ROWS if int8_weights else 0)
        self.set_depth(depth)

    # ---- loading -------------------------------------------------------------------------
    def _materialise(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        module = module.to_empty(device=self.device)
        module.load_state_dict({k: v.to(self.dtype) for k, v in state.items()})
        return module.to(self.dtype).eval()

    def set_depth(self, depth: int) -> None:
        """Load or drop decoder layers so exactly `depth` are resident."""
        if not 1 <= depth <= self.num_layers_total:
            raise CheckpointError(f"depth {depth} outside 1..{self.num_layers_total}")
        while len(self.layers) < depth:
            i = len(self.layers)
            with torch.device("meta"):
                layer = self.layer_cls(self.config, i)
            layer = self._materialise(layer, self.store.layer(i))
            if self.int8_weights:
                matmul_plan.quantize_int8(layer)
            matmul_plan.apply(layer, self.layer_plan)
            self.layers.append(layer)
        del self.layers[depth:]
        if self.kv is not None:
            self.kv.resize(depth)
            self.kv.level.clamp_(max=depth)  # KV of dropped layers is gone; nothing pending there

    def allocate_cache(self, num_slots: int, max_len: int) -> KVCache:
        self.kv = KVCache(num_slots, max_len, self.kv_heads, self.head_dim, self.hidden_size, self.device, self.dtype)
        self.kv.resize(self.depth)
        return self.kv

    @property
    def depth(self) -> int:
        return len(self.layers)

    def weight_bytes(self) -> dict[str, int]:
        layers = [_param_bytes(layer) for layer in self.layers]
        base = sum(_param_bytes(m) for m in (self.embed, self.norm, self.head_int8) if m is not None)
        if self.head_packed is not None:
            base += self.head_packed.numel() * self.head_packed.element_size()
        return {"base": base, "layers": sum(layers),
                "per_layer": layers[0] if layers else 0}

    # ---- forward pieces ------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> dict:
        """Layer type -> (cos, sin) at these positions."""
        dummy = torch.empty(0, device=self.device, dtype=self.dtype)
        return {t: self.rotary(dummy, positions, t) if self._rope_by_type else self.rotary(dummy, positions)
                for t in set(self.layer_types)}

    def make_ctx(self, slots: torch.Tensor, positions: torch.Tensor, level: torch.Tensor | None = None) -> BatchCtx:
        length = int(positions.max()) + 1
        kpos = torch.arange(length, device=self.device)
        qpos = positions[:, None, :, None]  # [b, 1, T, 1]
        masks = {}
        for t in set(self.layer_types):
            masks[t] = kpos <= qpos
            if t == "sliding_attention":
                masks[t] = masks[t] & (kpos > qpos - self.config.sliding_window)
        return BatchCtx(slots, positions, length, self._rope(positions), masks, run_start(slots), level)

    def make_packed_ctx(self, slots: torch.Tensor, spans: list[tuple[int, int]]) -> BatchCtx:
        """Prefill chunks (first position, length) of these slots in one row (`BatchCtx.packed`); each
        chunk builds its own causal mask in the attention, so none is built here."""
        positions = torch.cat([torch.arange(start, start + n, device=self.device) for start, n in spans])[None]
        return BatchCtx(slots, positions, int(positions.max()) + 1, self._rope(positions), {}, None,
                        packed=tuple(spans))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def _qkv(self, i: int, x: torch.Tensor, ctx: BatchCtx, need_q: bool = True):
        attn = self.layers[i].self_attn
        b, t, _ = x.shape
        k = attn.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = attn.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) if need_q else None
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
            q = attn.q_norm(q) if need_q else None
        cos, sin = ctx.rope[self.layer_types[i]]
        k = _apply_rope(k, cos, sin)
        q = _apply_rope(q, cos, sin) if need_q else None
        return q, k, v

    def _attention(self, i: int, x: torch.Tensor, ctx: BatchCtx) -> torch.Tensor:
        attn = self.layers[i].self_attn
        b, t, _ = x.shape
        q, k, v = self._qkv(i, x, ctx)
        if ctx.packed is not None:
            return attn.o_proj(self._packed_attention(i, q, k, v, ctx).transpose(1, 2).reshape(b, t, -1))
        if ctx.write_at is not None:
            self.kv.write(i, ctx.slots, ctx.write_at, k, v, scattered=True)
        else:
            self.kv.write(i, ctx.slots, ctx.positions, k, v)
        keys, values = self.kv.read(i, ctx.slots, ctx.length, ctx.first_slot)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.masks[self.layer_types[i]],
                                             scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _packed_attention(self, i: int, q, k, v, ctx: BatchCtx) -> torch.Tensor:
        """Each chunk of a packed prefill attends to its own prompt only: the chunks before it, in the
        cache, and itself. Its K/V go to its slot at its positions."""
        attn, window = self.layers[i].self_attn, None
        if self.layer_types[i] == "sliding_attention":
            window = self.config.sliding_window
        outs, at = [], 0
        for slot, (start, n) in zip(ctx.slots.tolist(), ctx.packed):
            qs, ks, vs = (x[:, :, at:at + n] for x in (q, k, v))
            self.kv.k[i][slot, :, start:start + n], self.kv.v[i][slot, :, start:start + n] = ks[0], vs[0]
            if start:  # a later chunk: keys from the prompt's start, read as a view of the cache
                ks, vs = self.kv.k[i][slot:slot + 1, :, :start + n], self.kv.v[i][slot:slot + 1, :, :start + n]
            mask = None
            if start or (window is not None and n > window):
                q_pos = torch.arange(start, start + n, device=self.device)[:, None]
                k_pos = torch.arange(start + n, device=self.device)[None]
                mask = k_pos <= q_pos
                if window is not None:
                    mask = mask & (k_pos > q_pos - window)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                       scale=attn.scaling, enable_gqa=True))
            at += n
        return torch.cat(outs, 2)

    def layer_forward(self, i: int, h: torch.Tensor, ctx: BatchCtx) -> torch.Tensor:
        # h: [b, T, hidden]
        layer = self.layers[i]
        a = self._attention(i, layer.input_layernorm(h), ctx)
        if self.sandwich_norms:
            h = h + layer.post_attention_layernorm(a)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = h + a
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def fill_kv(self, start: int, h: torch.Tensor, ctx: BatchCtx) -> None:
        """State copy: project an exited token's hidden state through layers start.. as their K/V."""
        for i in range(start, self.depth):
            _, k, v = self._qkv(i, self.layers[i].input_layernorm(h), ctx, need_q=False)
            self.kv.write(i, ctx.slots, ctx.positions, k, v)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [..., hidden] -> [..., vocab]."""
        x = self.norm(h)
        if self._int8_head(x.numel() // x.shape[-1]):
            return self.head_int8(x)
        if self.head_packed is not None:
            return matmul_plan.packed_linear(x, self.head_packed)
        return matmul_plan.linear(x, self.lm_head_weight, None, self.head_plan.pad_to)

    def _int8_head(self, rows: int) -> bool:
        """Whether `rows` rows go through the LM head's int8 copy (the plan's row counts)."""
        return self.head_int8 is not None and rows <= self.head_plan.int8_rows

    def head_bytes(self, rows: int) -> int:
        """What the LM head reads for `rows` rows: its int8 copy or the dense weight."""
        if self._int8_head(rows):
            return _param_bytes(self.head_int8)
        return self.lm_head_weight.numel() * self.lm_head_weight.element_size()

    def vocab_logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Final norm and the LM head's `rows` only ([V, hidden], an exit vocabulary): [..., V]."""
        return self.norm(h) @ rows.T

    def tune_matmuls(self, sample_bytes: int = 128 << 20, may_pack: bool = True) -> None:
        """Measure this CPU's fastest weight layout and row padding, for the layers and for the LM
        head, on `sample_bytes` of their own weights (more than caches hold), and use them;
        `may_pack=False` leaves oneDNN's packed layout out (what a plan without it would be)."""
        sample, size = [], 0
        for m in self.layers.modules():
            if isinstance(m, PlannedLinear) and size < sample_bytes:
                w = m.weight.detach()
                sample.append(w.to_dense() if w.is_mkldnn else w.contiguous())  # packed by an earlier plan
                size += sample[-1].numel() * sample[-1].element_size()
        head = self.lm_head_weight.detach()
        head = head[: max(1, sample_bytes // (head.shape[1] * head.element_size()))].contiguous()
        layers = matmul_plan.plan(sample, may_pack) if sample else self.layer_plan  # int8 layers have their own kernel
        # the head is the embedding's storage too (tied) and the exit vocabulary's source: it stays
        # dense, and packed means a packed copy beside it
        head_plan = matmul_plan.plan([head], may_pack and self.packed_head_copy)
        if self.head_int8 is not None:
            head_plan.int8_rows = matmul_plan.plan_int8_rows(self.head_int8, head, head_plan)
        self.set_matmul_plans(layers, head_plan)

    def set_matmul_plans(self, layers: MatmulPlan, head: MatmulPlan) -> None:
        self.layer_plan, self.head_plan = layers, head
        for layer in self.layers:
            matmul_plan.apply(layer, layers)
        w = self.lm_head_weight.data
        w = matmul_plan.col_major(w) if head.col_major else w.contiguous()
        if isinstance(self.lm_head_weight, nn.Parameter):  # tied: the embedding reads the same storage
            self.lm_head_weight.data = w
        else:
            self.lm_head_weight = w
        if not head.packed:
            self.head_packed = None
        elif self.head_packed is None:  # the weights never change: a copy packed once stays right
            self.head_packed = matmul_plan.pack(w)
