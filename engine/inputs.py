"""A step's inputs: the hidden states entering layer 0, where each row sits in the cache, and which
column of each row carries the token the step decides."""
from __future__ import annotations

import itertools

import torch

from engine import deferred
from engine.model import BatchCtx, EEModel
from engine.sequence import PrefillChunk, Sequence


def with_pending(model: EEModel, chunk: PrefillChunk) -> PrefillChunk:
    """A decoding sequence riding a prefill step starts at its first token still short of the
    loaded depth (an early exit's, under the deferred fill; one waiting in the buffer): the step
    recomputes them from the embeddings, so every layer's K/V is exact after it."""
    seq, p = chunk.seq, chunk.seq.num_tokens - 1
    short = (model.kv.level[seq.slot, :p] < model.depth).nonzero()
    start = int(short[0]) if len(short) else p
    return PrefillChunk(seq, start, p + 1 - start, decode=True)


def prefill(model: EEModel, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, BatchCtx, torch.Tensor]:
    """Prompt chunks packed back to back, not padded; a preempted sequence recomputes its output so far."""
    dev = model.device
    ids = [(c.seq.prompt_ids + c.seq.output_ids)[c.start:c.start + c.length] for c in chunks]
    ids = torch.tensor([list(itertools.chain.from_iterable(ids))], device=dev)
    ctx = model.make_packed_ctx(torch.tensor([c.seq.slot for c in chunks], device=dev),
                                [(c.start, c.length) for c in chunks])
    last_idx = torch.tensor([c.length for c in chunks], device=dev).cumsum(0) - 1
    return model.embed_tokens(ids), ctx, last_idx


def decode(model: EEModel, seqs: list[Sequence], defers: bool) -> tuple[torch.Tensor, BatchCtx, torch.Tensor]:
    """Each row's newest token; under the deferred fill (`defers`) its pending tokens ride along as
    columns, and a token that waited in the buffer comes back at its level, its state from the cache."""
    dev = model.device
    slots = torch.tensor([s.slot for s in seqs], device=dev)
    h = model.embed_tokens(torch.tensor([[s.output_ids[-1]] for s in seqs], device=dev))
    positions, level = torch.tensor([[s.num_tokens - 1] for s in seqs], device=dev), None
    last_idx = torch.zeros(len(seqs), dtype=torch.long, device=dev)
    if defers:
        held = [s.held_since is not None for s in seqs]
        positions, level, last_idx = deferred.pending_columns(model, [s.slot for s in seqs],
                                                              [s.num_tokens - 1 for s in seqs], held=held)
        if positions.shape[1] > 1 or any(held):
            columns = model.kv.top_hidden[slots[:, None], positions]
            fresh = torch.tensor([not x for x in held], device=dev)
            columns[fresh, :1] = h[fresh]
            h = columns
    return h, model.make_ctx(slots, positions, level), last_idx
