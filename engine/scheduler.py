"""Continuous batching: admit waiting requests into free cache slots, retire finished ones."""
from __future__ import annotations

from collections import deque

from engine.sequence import PrefillChunk, RequestOutput, Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int, eos_ids: list[int], max_model_len: int, decode,
                 prefill_budget: int | None = None, mixed: bool = False):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.eos_ids, self.max_model_len, self.decode = set(eos_ids), max_model_len, decode
        self.prefill_budget = prefill_budget  # prompt tokens per prefill step; None: every waiting prompt whole
        self.mixed = mixed  # prefill steps carry every decoding sequence's next token too
        self.preempted = 0  # sequences sent back to waiting because the cache shrank
        self._last_prefill = False

    def set_capacity(self, num_slots: int) -> list[int]:
        """Hold `num_slots` sequences from now on. When fewer fit than run, the latest admitted go
        back to the front of the waiting queue (their KV is recomputed when they resume: nothing is
        lost or failed). Running sequences are renumbered into slots 0..; returns each one's old
        slot in new-slot order, for the cache to move them."""
        while len(self.running) > num_slots:
            seq = self.running.pop()
            seq.slot, seq.status, seq.prefill_len, seq.prefilled = -1, Status.WAITING, 0, 0
            self.waiting.appendleft(seq)
            self.preempted += 1
        self.running.sort(key=lambda s: s.slot)
        keep = [s.slot for s in self.running]
        for new, seq in enumerate(self.running):
            seq.slot = new
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, len(keep) - 1, -1))
        return keep

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence] | list[PrefillChunk], bool]:
        """A prefill step (chunks of admitted prompts, at most `prefill_budget` tokens; a preempted
        sequence recomputes its output so far too) or a decode step of every sequence past its
        prefill. While both kinds wait they alternate, so decoding goes on while prompts arrive; or,
        `mixed`, every prefill step also carries each decoding sequence's next token (one weight read
        for both), counted against the budget first."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.free_slots.pop(), Status.RUNNING
            seq.prefill_len, seq.prefilled = seq.num_tokens, 0
            self.running.append(seq)
        decoding = [s for s in self.running if not s.prefilling]
        prefilling = [s for s in self.running if s.prefilling]
        self._last_prefill = bool(prefilling) and (self.mixed or not (decoding and self._last_prefill))
        if not self._last_prefill:
            return decoding, False
        chunks = [PrefillChunk(s, s.num_tokens - 1, 1, decode=True) for s in decoding] if self.mixed else []
        budget = None if self.prefill_budget is None else max(self.prefill_budget - len(chunks), 1)
        for seq in prefilling:
            n = seq.prefill_len - seq.prefilled
            if budget is not None:
                if budget <= 0:
                    break
                n = min(n, budget)
                budget -= n
            chunks.append(PrefillChunk(seq, seq.prefilled, n))
        return chunks, True

    def abort(self, request_id: str) -> bool:
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                if seq in self.waiting:
                    self.waiting.remove(seq)
                self._finish(seq, "abort")
                return True
        return False

    def fail(self, seqs: list[Sequence], error: str) -> list[RequestOutput]:
        """Finish `seqs` with finish_reason "error" (their step failed), freeing their slots."""
        outputs = []
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "error")
            outputs.append(RequestOutput(seq.request_id, [], seq.text, True, "error", len(seq.prompt_ids),
                                         len(seq.output_ids), error))
        return outputs

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[RequestOutput]:
        outputs = []
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            reason = None
            if token in self.eos_ids and not seq.params.ignore_eos:
                reason = "stop"
            if reason is None and (len(seq.output_ids) >= seq.params.max_tokens
                                   or seq.num_tokens >= self.max_model_len):
                reason = "length"
            seen = len(seq.text)
            self._detokenize(seq, final=reason is not None)
            for stop in seq.params.stop:  # only where a stop string could end in the new text
                cut = seq.text.find(stop, max(0, seen - len(stop) + 1))
                if cut != -1:
                    seq.text, reason = seq.text[:cut], "stop"
            if reason:
                self._finish(seq, reason)
            outputs.append(RequestOutput(seq.request_id, [token], seq.text, reason is not None, reason,
                                         len(seq.prompt_ids), len(seq.output_ids)))
        return outputs

    def _detokenize(self, seq: Sequence, final: bool) -> None:
        """Append the text the newest token completes, decoding a few ids rather than the whole output.

        Both windows start at prefix_offset so tokenizers that drop a leading space at the start of a
        decode treat them alike; a window ending inside a UTF-8 character waits for the next token.
        """
        ids = seq.output_ids
        prefix = self.decode(ids[seq.prefix_offset:seq.read_offset])
        new = self.decode(ids[seq.prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            seq.text += new[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        seq.slot = -1
