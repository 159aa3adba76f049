"""Slot-based KV cache: one slot per running sequence, one tensor pair per loaded layer.

Each slot has one spare position past `max_len`: writes that must not land anywhere (columns of a
deferred-fill batch that sit out a layer, padding) go there, and no read ever reaches it.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_slots: int, max_len: int, kv_heads: int, head_dim: int, hidden: int, device, dtype):
        self.num_slots, self.max_len = num_slots, max_len
        self.scratch = max_len  # the spare position
        self.shape = (num_slots, kv_heads, max_len + 1, head_dim)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # hidden state each cached token left the layer stack with; lets deeper layers be loaded
        # later and filled for tokens already in flight
        self.top_hidden = torch.zeros(num_slots, max_len, hidden, device=device, dtype=dtype)
        # decoder layers each cached token has been through: its KV exists in layers < level. Under
        # the deferred fill an exited token stops short of the loaded depth until a later step needs
        # its deeper KV; top_hidden then holds its state at that level
        self.level = torch.zeros(num_slots, max_len, dtype=torch.long, device=device)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def resize(self, num_layers: int) -> None:
        """Allocate or free per-layer tensors so memory follows the loaded depth."""
        while len(self.k) < num_layers:
            self.k.append(torch.zeros(self.shape, device=self.device, dtype=self.dtype))
            self.v.append(torch.zeros(self.shape, device=self.device, dtype=self.dtype))
        del self.k[num_layers:], self.v[num_layers:]

    def set_slots(self, num_slots: int, keep: list[int]) -> None:
        """Hold `num_slots` sequences; slot keep[j]'s contents move to slot j. One layer at a time, so
        the change needs one layer's worth of extra memory. Depth changes are rare: the copy is paid
        here, once, and slots stay one tensor each, read as views when they form a run."""
        if len(keep) > num_slots:
            raise ValueError(f"{len(keep)} slots to keep do not fit in {num_slots}")
        src = torch.tensor(keep, dtype=torch.long, device=self.device)
        n = len(keep)

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((num_slots, *t.shape[1:]), device=self.device, dtype=t.dtype)
            out[:n] = t.index_select(0, src)
            return out

        for i in range(len(self.k)):
            self.k[i], self.v[i] = moved(self.k[i]), moved(self.v[i])
        self.top_hidden, self.level = moved(self.top_hidden), moved(self.level)
        self.num_slots, self.shape = num_slots, (num_slots, *self.shape[1:])

    def slot_bytes_per_layer(self) -> int:
        """K and V of one slot in one layer."""
        return 2 * self.shape[1] * self.shape[2] * self.shape[3] * self.top_hidden.element_size()

    def slot_bytes_fixed(self) -> int:
        """What one slot holds at any depth: each position's top hidden state and level."""
        return (self.top_hidden[0].numel() * self.top_hidden.element_size()
                + self.level[0].numel() * self.level.element_size())

    def nbytes(self) -> int:
        return self.num_slots * (len(self.k) * self.slot_bytes_per_layer() + self.slot_bytes_fixed())

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scattered: bool = False):
        # slots: [b]; positions: [b, T]; k, v: [b, kv_heads, T, head_dim]
        if scattered:  # any positions per row (deferred fill): one indexed write
            self.k[layer][slots[:, None], :, positions] = k.transpose(1, 2)
            self.v[layer][slots[:, None], :, positions] = v.transpose(1, 2)
        elif k.shape[2] == 1:
            pos = positions[:, 0]
            self.k[layer][slots, :, pos] = k[:, :, 0]
            self.v[layer][slots, :, pos] = v[:, :, 0]
        else:  # prefill-shaped writes always start at position 0 (right-padded rows)
            t = k.shape[2]
            self.k[layer][slots, :, :t] = k
            self.v[layer][slots, :, :t] = v

    def read(self, layer: int, slots: torch.Tensor, length: int, first_slot: int | None = None):
        # -> [b, kv_heads, length, head_dim]: a view when slots are contiguous, else a gather
        if first_slot is not None:
            end = first_slot + len(slots)
            return self.k[layer][first_slot:end, :, :length], self.v[layer][first_slot:end, :, :length]
        return (self.k[layer][:, :, :length].index_select(0, slots),
                self.v[layer][:, :, :length].index_select(0, slots))
