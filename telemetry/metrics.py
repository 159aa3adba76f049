"""Prometheus metrics, exported through Ray's metrics agent (`ray.serve.metrics`).

Ray prefixes every application metric with `ray_` and exports a counter with a `_total` suffix,
so `helios_tokens` below is scraped as `ray_helios_tokens_total`. `EXPORTED` lists the names as
Prometheus sees them; the Grafana dashboards are built from it, and a test checks each one
against a live scrape. Inside a Serve replica the `deployment`, `replica` and `application`
labels are added by Serve itself.
"""
from __future__ import annotations

from engine.sequence import ExitRecord

PREFIX = "ray_"
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def exported(name: str, kind: str) -> str:
    return PREFIX + name + ("_total" if kind == "counter" else "")


# name -> (kind, help); the single list of what the service exports
METRICS = {
    "helios_tokens": ("counter", "Generated tokens, by candidate."),
    "helios_exit_layer": ("histogram", "Decoder layer each generated token exited at."),
    "helios_greedy_exits": ("counter", "Tokens that left unconfident at the last loaded layer."),
    "helios_involuntary_exits": ("counter", "Tokens forced out by their batch before they were confident."),
    "helios_confidence_breaches": ("counter", "Greedy or involuntary exits, plus shadow-check disagreements."),
    "helios_loaded_depth_layers": ("gauge", "Decoder layers resident in the candidate's replicas."),
    "helios_queue_depth_requests": ("gauge", "Requests waiting for a cache slot in a replica."),
    "helios_running_requests": ("gauge", "Requests decoding in a replica."),
    "helios_capacity_requests": ("gauge", "Requests a replica's KV cache holds at once at its loaded depth."),
    "helios_ttft_seconds": ("histogram", "Time from a request's arrival at a replica to its first token."),
    "helios_tpot_seconds": ("histogram", "Time between consecutive tokens of a request."),
    "helios_requests": ("counter", "Requests the gateway routed, by candidate and how it was chosen."),
    "helios_controller_decisions": ("counter", "Controller decisions, by action and candidate."),
}
EXPORTED = {name: exported(name, kind) for name, (kind, _) in METRICS.items()}


def _make(name: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None):
    from ray.serve import metrics  # here, so the names above stay importable without Ray

    kind, help_ = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description=help_, tag_keys=tag_keys)
    if kind == "gauge":
        return metrics.Gauge(name, description=help_, tag_keys=tag_keys)
    return metrics.Histogram(name, description=help_, boundaries=boundaries, tag_keys=tag_keys)


def _zero(counter) -> None:
    """Export a counter at 0 before its first event, as Prometheus advises, so rate() sees a series
    from the start; Ray's public `inc` refuses 0, its recorder does not."""
    counter._record(0)


class ServerMetrics:
    """A model-server replica's metrics. Called from its step thread, after each engine step."""

    def __init__(self, candidate: str, num_layers: int):
        tags = ("candidate",)
        self.tokens = _make("helios_tokens", tags)
        # one bucket per layer, so the histogram is the exit-depth distribution itself
        self.exit_layer = _make("helios_exit_layer", tags, [l + 0.5 for l in range(1, num_layers)])
        self.greedy = _make("helios_greedy_exits", tags)
        self.involuntary = _make("helios_involuntary_exits", tags)
        self.breaches = _make("helios_confidence_breaches", tags)
        self.depth = _make("helios_loaded_depth_layers", tags)
        self.queue = _make("helios_queue_depth_requests", tags)
        self.running = _make("helios_running_requests", tags)
        self.capacity = _make("helios_capacity_requests", tags)
        self.ttft = _make("helios_ttft_seconds", tags, LATENCY_BUCKETS_S)
        self.tpot = _make("helios_tpot_seconds", tags, LATENCY_BUCKETS_S)
        for m in (self.tokens, self.exit_layer, self.greedy, self.involuntary, self.breaches, self.depth,
                  self.queue, self.running, self.capacity, self.ttft, self.tpot):
            m.set_default_tags({"candidate": candidate})
        for counter in (self.tokens, self.greedy, self.involuntary, self.breaches):
            _zero(counter)

    def step(self, exits: list[ExitRecord], depth: int, waiting: int, running: int, capacity: int) -> None:
        if exits:
            self.tokens.inc(len(exits))
            for rec in exits:
                self.exit_layer.observe(rec.layer)
            for counter, n in ((self.greedy, sum(r.greedy for r in exits)),
                               (self.involuntary, sum(r.involuntary for r in exits)),
                               (self.breaches, sum(r.breach for r in exits))):
                if n:  # Ray's `inc` refuses 0
                    counter.inc(n)
        self.depth.set(depth)
        self.queue.set(waiting)
        self.running.set(running)
        self.capacity.set(capacity)


def shadow_breaches():
    """The verifier's share of `helios_confidence_breaches`: shadow checks that disagreed."""
    return _make("helios_confidence_breaches", ("candidate",))


class GatewayMetrics:
    def __init__(self):
        self.requests = _make("helios_requests", ("candidate", "routed_by"))

    def routed(self, candidate: str, routed_by: str) -> None:
        self.requests.inc(1, tags={"candidate": candidate, "routed_by": routed_by})


class ControllerMetrics:
    def __init__(self):
        self.decisions = _make("helios_controller_decisions", ("action", "candidate"))

    def decision(self, action: str, candidate: str) -> None:
        self.decisions.inc(1, tags={"action": action, "candidate": candidate})
