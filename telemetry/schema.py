"""The Redis schema of exit telemetry: every key the writer, reader and controller touch.

Per candidate c and time window w (w = floor(unix_time / window_s)):
    helios:c:{c}:w:{w}:exits     hash  exit layer -> tokens that left there
    helios:c:{c}:w:{w}:counts    hash  tokens, greedy, breaches, involuntary, steps, dropped, busy_ms,
                                       shadow_checked, shadow_agreed (full-depth re-checks of exits)
    helios:c:{c}:totals          hash  the same counts since the candidate started
    helios:c:{c}:shadow          hash  {layer}:checked, {layer}:agreed: shadow re-checks of confident exits
                                       per exit layer (layer 0: greedy exits), since the candidate
                                       started (live threshold tuning)
    helios:candidates            set   candidate names that ever wrote
    helios:batches               stream  one entry per flushed batch summary (capped, MAXLEN ~)
Window keys expire after `retention_s`, so Redis holds a bounded history.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "helios"
CANDIDATES = f"{PREFIX}:candidates"
BATCHES = f"{PREFIX}:batches"
COUNT_FIELDS = ("tokens", "greedy", "breaches", "involuntary", "steps", "dropped", "busy_ms", "shadow_checked", "shadow_agreed")


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Where exit telemetry is kept.")
    window_s: float = Field(10.0, gt=0, description="Width of one aggregation window.")
    retention_s: int = Field(3600, ge=60, description="How long window keys live.")
    flush_every_s: float = Field(1.0, gt=0, description="How often a replica flushes its aggregates.")
    stream_maxlen: int = Field(10_000, ge=100, description="Approximate cap of the batch-summary stream.")


def redact_url(url: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def window_of(t: float, window_s: float) -> int:
    return int(t // window_s)


def exits_key(candidate: str, window: int) -> str:
    return f"{PREFIX}:c:{candidate}:w:{window}:exits"


def counts_key(candidate: str, window: int) -> str:
    return f"{PREFIX}:c:{candidate}:w:{window}:counts"


def totals_key(candidate: str) -> str:
    return f"{PREFIX}:c:{candidate}:totals"


def shadow_key(candidate: str) -> str:
    return f"{PREFIX}:c:{candidate}:shadow"


def step_counts(exits: list, busy_s: float) -> dict[str, float]:
    """One engine step's exit records (engine.sequence.ExitRecord) as the counts a window sums;
    busy_ms unrounded."""
    return {"tokens": len(exits), "greedy": sum(r.greedy for r in exits), "breaches": sum(r.breach for r in exits),
            "involuntary": sum(r.involuntary for r in exits), "steps": 1, "busy_ms": busy_s * 1e3}


@dataclass(slots=True)
class WindowStats:
    """What one candidate did over some windows: the controller's view of a candidate."""

    candidate: str
    windows: int  # how many windows were summed
    exits: dict[int, int] = field(default_factory=dict)  # exit layer -> tokens
    tokens: int = 0
    greedy: int = 0
    breaches: int = 0
    involuntary: int = 0  # rows forced out by their batch before they were confident
    steps: int = 0
    dropped: int = 0
    busy_ms: float = 0.0
    shadow_checked: int = 0
    shadow_agreed: int = 0

    def add(self, counts: dict) -> None:
        """Add counts keyed by field name (str, or bytes as Redis returns them)."""
        for f, v in counts.items():
            name = f.decode() if isinstance(f, bytes) else f
            if name == "busy_ms":
                self.busy_ms += float(v)
            elif name in COUNT_FIELDS:
                setattr(self, name, getattr(self, name) + int(v))

    @property
    def live_agreement(self) -> float | None:
        """Share of shadow-verified early/greedy exits that matched the full model."""
        return self.shadow_agreed / self.shadow_checked if self.shadow_checked else None

    @property
    def greedy_rate(self) -> float:
        return self.greedy / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_busy_s(self) -> float:
        """Throughput while the replica was stepping (idle time does not count against it)."""
        return 1e3 * self.tokens / self.busy_ms if self.busy_ms else 0.0

    @property
    def mean_exit_layer(self) -> float:
        n = sum(self.exits.values())
        return sum(l * c for l, c in self.exits.items()) / n if n else 0.0
