"""Exit telemetry through a real Redis: lossless, pipelined, readable by the controller."""
import pytest
import redis

from engine import EngineConfig, ExitRecord, LLMEngine, SamplingParams
from telemetry.reader import TelemetryReader
from telemetry.schema import TelemetryConfig
from telemetry.writer import TelemetryWriter
from tests.conftest import PROMPTS, RedisServer


def _records(layers, greedy_at=None, depth=20):
    return [ExitRecord("r", i, l, 0.9, l == greedy_at, "cand", depth) for i, l in enumerate(layers)]


@pytest.fixture
def cfg(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    return TelemetryConfig(redis_url=redis_url, window_s=10)


def test_histogram_and_counters_round_trip(cfg):
    writer, reader = TelemetryWriter("cand", cfg), TelemetryReader(cfg)
    writer.record(_records([4, 4, 20, 12], greedy_at=20), busy_s=0.5, now=1000.0)
    writer.record(_records([20, 20]), busy_s=0.25, now=1005.0)
    forced = ExitRecord("r", 9, 8, 0.2, False, "cand", 20, involuntary=True)  # pushed out by a batch rule
    writer.record(_records([8]) + [forced], busy_s=0.1, now=1012.0)  # next window
    assert writer.flush()
    both = reader.window("cand", windows=2, now=1012.0)
    assert both.exits == {4: 2, 8: 2, 12: 1, 20: 3}
    assert (both.tokens, both.greedy, both.involuntary, both.breaches, both.steps) == (8, 1, 1, 2, 3)
    assert both.busy_ms == 850 and both.tokens_per_busy_s == pytest.approx(8 / 0.85)
    assert reader.window("cand", windows=1, now=1012.0).tokens == 2
    assert reader.totals("cand").tokens == 8
    assert reader.candidates() == ["cand"]
    assert len(reader.recent_batches()) == 3


def test_shadow_checks_are_kept_per_exit_layer(cfg):
    writer, reader = TelemetryWriter("cand", cfg), TelemetryReader(cfg)
    writer.record_shadow({8: (3, 2), 0: (2, 0)}, now=1000.0)  # layer 0: greedy exits
    writer.record_shadow({8: (1, 1), 12: (4, 4)}, now=1011.0)
    assert writer.flush()
    assert reader.shadow_by_layer("cand") == {0: (2, 0), 8: (4, 3), 12: (4, 4)}
    t = reader.totals("cand")
    assert (t.shadow_checked, t.shadow_agreed, t.breaches) == (10, 7, 3)  # each disagreement is a breach
    assert reader.window("cand", windows=1, now=1011.0).live_agreement == 1.0
    assert reader.shadow_by_layer("other") == {}


def test_one_transaction_per_flush_whatever_the_token_count(cfg):
    client = redis.Redis.from_url(cfg.redis_url)
    writer = TelemetryWriter("cand", cfg)

    def execs():
        return client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    before = execs()
    for _ in range(50):
        writer.record(_records(range(1, 21)), busy_s=0.01, now=2000.0)
    writer.flush()
    assert execs() - before == 1
    assert TelemetryReader(cfg).totals("cand").tokens == 1000


def test_redis_outage_loses_nothing(tmp_path):
    server = RedisServer(tmp_path)
    cfg = TelemetryConfig(redis_url=server.url)
    writer = TelemetryWriter("cand", cfg)
    writer.record(_records([3, 5]), busy_s=0.1)
    assert writer.flush()
    server.stop()
    writer.record(_records([7, 7, 7]), busy_s=0.1)
    assert not writer.flush()
    assert writer.pending_tokens == 3
    server.start()  # an empty server (no persistence): only what was pending can arrive
    assert writer.flush()
    assert writer.pending_tokens == 0
    assert TelemetryReader(cfg).totals("cand").tokens == 3
    server.stop()


def test_overflowing_backlog_is_counted_as_dropped(cfg):
    writer = TelemetryWriter("cand", cfg, max_pending_windows=2)
    for w in range(4):
        writer.record(_records([1, 2]), busy_s=0.1, now=100.0 + 10 * w)
    assert writer.flush()
    totals = TelemetryReader(cfg).totals("cand")
    assert totals.tokens + totals.dropped == 8 and totals.dropped == 4


def test_tokens_served_equal_tokens_recorded(smollm2, cfg):
    engine = LLMEngine(EngineConfig(model="smollm2", exits=False, depth=12, home=smollm2.home))
    writer = TelemetryWriter(engine.name, cfg)
    served = 0
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_tokens=6))
    while engine.has_unfinished():
        step = engine.step()
        served += sum(len(o.new_token_ids) for o in step.outputs)
        writer.record(step.exits, busy_s=0.01)
    assert writer.flush()
    stats = TelemetryReader(cfg).totals(engine.name)
    assert stats.tokens == served == 6 * len(PROMPTS)
    assert stats.greedy == served  # depth 12 of 30 without heads: every token is a greedy exit
