"""Replica-side telemetry: aggregate exit records in memory, flush with one pipeline.

Never one write per token: `record` only bumps in-memory counters; `flush` sends a window's
histogram and counters in one MULTI/EXEC pipeline. If Redis is unreachable the aggregates stay
pending and are retried at the next flush, so tokens served always equal tokens recorded; only
when pending data outgrows `max_pending_windows` is the oldest window discarded, and its token
count goes into the `dropped` counter of the next successful flush.
Thread-safe: the engine's step thread records while another thread flushes, so a slow or hung
Redis never holds up token generation; a flush takes the pending data under a lock and writes it
outside the lock.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict

import redis

from engine.sequence import ExitRecord
from telemetry import schema


class TelemetryWriter:
    def __init__(self, candidate: str, config: schema.TelemetryConfig | None = None, client: redis.Redis | None = None,
                 max_pending_windows: int = 360):
        self.candidate, self.config = candidate, config or schema.TelemetryConfig()
        self.redis = client or redis.Redis.from_url(self.config.redis_url, socket_timeout=2)
        self.max_pending = max_pending_windows
        self._exits: dict[int, Counter] = defaultdict(Counter)  # window -> layer -> tokens
        self._counts: dict[int, Counter] = defaultdict(Counter)  # window -> field -> value
        self._batches: list[dict] = []
        self._shadow: Counter = Counter()  # "{layer}:checked" / "{layer}:agreed" -> count
        self._dropped = 0
        self._lock = threading.Lock()

    def record(self, exits: list[ExitRecord], busy_s: float, now: float | None = None) -> None:
        """Account one engine step: its exit records and how long it kept the replica busy."""
        w = schema.window_of(now if now is not None else time.time(), self.config.window_s)
        hist = Counter(rec.layer for rec in exits)
        counts = schema.step_counts(exits, busy_s)
        counts["busy_ms"] = round(counts["busy_ms"])  # Redis counters are integers
        with self._lock:
            self._exits[w].update(hist)
            self._counts[w].update(counts)
            if exits:
                self._batches.append({"t": round(time.time(), 3), "rows": len(exits), "greedy": counts["greedy"],
                                      "mean_layer": round(sum(r.layer for r in exits) / len(exits), 2),
                                      "depth": exits[0].loaded_depth})
            self._bound()

    def record_shadow(self, by_layer: dict[int, tuple[int, int]], now: float | None = None) -> None:
        """Full-depth re-checks done off the critical path, (checked, agreed) per exit layer; each
        disagreement is a breach."""
        w = schema.window_of(now if now is not None else time.time(), self.config.window_s)
        checked, agreed = sum(c for c, _ in by_layer.values()), sum(a for _, a in by_layer.values())
        with self._lock:
            self._counts[w].update({"shadow_checked": checked, "shadow_agreed": agreed, "breaches": checked - agreed})
            for layer, (c, a) in by_layer.items():
                self._shadow.update({f"{layer}:checked": c, f"{layer}:agreed": a})

    def flush(self) -> bool:
        """Send everything pending; False (and nothing lost) if Redis cannot be reached."""
        with self._lock:  # take what is pending; records made from here on wait for the next flush
            taken = (self._exits, self._counts, self._batches, self._shadow, self._dropped)
            self._exits, self._counts, self._batches = defaultdict(Counter), defaultdict(Counter), []
            self._shadow, self._dropped = Counter(), 0
        exits, counts_by_w, batches, shadow, dropped = taken
        if not counts_by_w and not dropped:
            return True
        c = self.candidate
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(schema.CANDIDATES, c)
        totals = Counter()
        for w, counts in counts_by_w.items():
            for layer, n in exits[w].items():
                pipe.hincrby(schema.exits_key(c, w), str(layer), n)
            for f, n in counts.items():
                pipe.hincrby(schema.counts_key(c, w), f, n)
            pipe.expire(schema.exits_key(c, w), self.config.retention_s)
            pipe.expire(schema.counts_key(c, w), self.config.retention_s)
            totals.update(counts)
        if dropped:
            totals["dropped"] += dropped
        for f, n in totals.items():
            pipe.hincrby(schema.totals_key(c), f, n)
        for f, n in shadow.items():
            pipe.hincrby(schema.shadow_key(c), f, n)
        for b in batches:
            pipe.xadd(schema.BATCHES, {"candidate": c, "summary": json.dumps(b)},
                      maxlen=self.config.stream_maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError:
            with self._lock:  # put it back in front of what was recorded meanwhile
                for w, counts in counts_by_w.items():
                    self._counts[w].update(counts)
                    self._exits[w].update(exits[w])
                self._batches[:0] = batches
                self._shadow.update(shadow)
                self._dropped += dropped
                self._bound()
            return False
        return True

    @property
    def pending_tokens(self) -> int:
        with self._lock:
            return sum(c["tokens"] for c in self._counts.values())

    def _bound(self) -> None:
        while len(self._counts) > self.max_pending:
            oldest = min(self._counts)
            self._dropped += self._counts.pop(oldest)["tokens"]
            self._exits.pop(oldest, None)
        del self._batches[: max(0, len(self._batches) - self.config.stream_maxlen)]
