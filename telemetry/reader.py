"""Controller-side telemetry: exit distributions, greedy-exit rates and throughput per candidate."""
from __future__ import annotations

import json
import time

import redis

from telemetry import schema


class TelemetryReader:
    def __init__(self, config: schema.TelemetryConfig | None = None, client: redis.Redis | None = None):
        self.config = config or schema.TelemetryConfig()
        self.redis = client or redis.Redis.from_url(self.config.redis_url, socket_timeout=2)

    def candidates(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(schema.CANDIDATES))

    def window(self, candidate: str, windows: int = 6, now: float | None = None) -> schema.WindowStats:
        """Sum of the last `windows` windows (the current, still-filling one included)."""
        last = schema.window_of(now if now is not None else time.time(), self.config.window_s)
        ids = range(last - windows + 1, last + 1)
        pipe = self.redis.pipeline(transaction=False)
        for w in ids:
            pipe.hgetall(schema.exits_key(candidate, w))
            pipe.hgetall(schema.counts_key(candidate, w))
        replies = pipe.execute()
        stats = schema.WindowStats(candidate, windows)
        for exits, counts in zip(replies[::2], replies[1::2]):
            for layer, n in exits.items():
                stats.exits[int(layer)] = stats.exits.get(int(layer), 0) + int(n)
            stats.add(counts)
        return stats

    def totals(self, candidate: str) -> schema.WindowStats:
        stats = schema.WindowStats(candidate, 0)
        stats.add(self.redis.hgetall(schema.totals_key(candidate)))
        return stats

    def shadow_by_layer(self, candidate: str) -> dict[int, tuple[int, int]]:
        """Exit layer -> (checked, agreed): every shadow re-check since the candidate started."""
        fields = {k.decode(): int(v) for k, v in self.redis.hgetall(schema.shadow_key(candidate)).items()}
        layers = {int(k.split(":")[0]) for k in fields}
        return {l: (fields.get(f"{l}:checked", 0), fields.get(f"{l}:agreed", 0)) for l in sorted(layers)}

    def recent_batches(self, count: int = 50) -> list[dict]:
        return [{"candidate": f[b"candidate"].decode(), **json.loads(f[b"summary"])}
                for _, f in self.redis.xrevrange(schema.BATCHES, count=count)]

