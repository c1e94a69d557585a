"""Unit tests of the fog bridge's pure parts: config, validation, dedupe window, ordered acks, shaping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from reflexarc.config import ConfigError, parse_yaml
from reflexarc.envelope import Envelope, EventType
from reflexarc.fog.config import FogConfig, ShapeSettings, StreamSettings, load_config
from reflexarc.fog.dedupe import DedupeWindow
from reflexarc.fog.sender import AckQueue, Ticket
from reflexarc.fog.shaping import (
    AGGREGATE_SHAPE,
    BATCH_TYPE,
    AggregateShaper,
    BatchShaper,
    DownsampleShaper,
)
from reflexarc.fog.validation import build_validator
from reflexarc.mqtt import MqttMessage

EXAMPLE = Path(__file__).resolve().parents[3] / "fog" / "examples" / "fog.yaml"


# ---- config -------------------------------------------------------------------
def test_fog_empty_config_uses_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_MQTT_PORT", "18830")
    monkeypatch.setenv("RX_MQTT_PROTOCOL", "3.1.1")
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    cfg = parse_yaml("", FogConfig)
    assert cfg.mqtt.port == 18830 and cfg.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert cfg.ingest.share_group == "rx-fog"
    assert cfg.share_group() is None  # no shared subscriptions on MQTT 3.1.1


def test_fog_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert [s.match for s in cfg.streams] == ["temp", "counts", "vibration"]
    assert cfg.stream("counts") is cfg.streams[1]
    assert cfg.stream("unknown") is None
    for s in cfg.streams:
        build_validator(s)


def test_fog_config_errors_name_line_and_field() -> None:
    text = "ingest:\n  receive_maximum: 0\nstreams:\n  - match: t\n    shape: {mode: zigzag}\n"
    with pytest.raises(ConfigError) as err:
        parse_yaml(text, FogConfig, "fog.yaml")
    msg = str(err.value)
    assert "fog.yaml:2:3: ingest.receive_maximum" in msg
    assert "streams[0].shape.mode" in msg


def test_fog_config_rejects_bad_schema_and_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid JSON Schema"):
        parse_yaml("streams:\n  - schema: {type: [1]}\n", FogConfig)
    with pytest.raises(ConfigError, match=r"ingest\.share_group"):
        parse_yaml("ingest: {share_group: 'a/#'}\n", FogConfig)
    with pytest.raises(ConfigError, match="send large data by reference"):
        parse_yaml("streams:\n  - max_payload_bytes: 5000000\n", FogConfig)
    with pytest.raises(ConfigError, match="cannot read schema file"):
        parse_yaml("streams:\n  - schema_file: nope.json\n", FogConfig, str(tmp_path / "fog.yaml"))


def test_fog_schema_file_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "temp.json").write_text('{"type": "object", "required": ["value"]}')
    (tmp_path / "fog.yaml").write_text("streams:\n  - match: temp\n    schema_file: temp.json\n")
    cfg = load_config(tmp_path / "fog.yaml")
    check = build_validator(cfg.streams[0])
    assert check is not None
    assert check({"value": 1}) is None
    assert "'value' is a required property" in (check({}) or "")


def test_fog_yaml_cannot_construct_objects() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("ingest: !!python/object/apply:os.system ['true']\n", FogConfig)


# ---- validation ---------------------------------------------------------------
def test_fog_json_schema_validator_names_the_field() -> None:
    s = StreamSettings.model_validate(
        {"schema": {"type": "object", "properties": {"v": {"type": "number", "maximum": 10}}, "required": ["v"]}}
    )
    check = build_validator(s)
    assert check is not None
    assert check({"v": 3}) is None
    assert check({"v": 11}) == "schema violation at v: 11 is greater than the maximum of 10"
    assert check(b"\x00") == "data must be a JSON object for this stream's schema"


def test_fog_declared_fields_are_strict() -> None:
    s = StreamSettings.model_validate(
        {
            "fields": {
                "value": {"type": "number", "ge": 0},
                "unit": {"type": "string", "required": False, "enum": ["C", "K"]},
                "n": {"type": "integer", "required": False},
            },
            "extra_fields": "forbid",
        }
    )
    check = build_validator(s)
    assert check is not None
    assert check({"value": 1.5}) is None
    assert check({"value": 2, "unit": "K", "n": 3}) is None
    assert "value" in (check({"value": "1"}) or "")
    assert "greater than or equal to 0" in (check({"value": -1}) or "")
    assert "unit" in (check({"value": 1, "unit": "F"}) or "")
    assert "n" in (check({"value": 1, "n": True}) or "")
    assert "extra" in (check({"value": 1, "x": 0}) or "").lower()


def test_fog_no_rules_means_no_validator() -> None:
    assert build_validator(StreamSettings()) is None
    check = build_validator(StreamSettings(require_json=True))
    assert check is not None and check(b"raw") == "data must be a JSON object"


# ---- dedupe -------------------------------------------------------------------
def test_fog_dedupe_window_by_count_and_age() -> None:
    now = [0.0]
    w = DedupeWindow(size=3, max_age_s=10, clock=lambda: now[0])
    assert not w.seen("a") and w.seen("a")
    for k in ("b", "c", "d"):
        assert not w.seen(k)
    assert len(w) == 3
    assert not w.seen("a"), "evicted by count: no longer recognised"
    now[0] = 100.0
    assert not w.seen("d"), "expired by age"
    assert len(w) == 1
    w.forget("d")
    assert not w.seen("d")


# ---- ordered acks -------------------------------------------------------------
def _msg(mid: int) -> MqttMessage:
    return MqttMessage("t", b"", 1, mid)


def test_fog_acks_go_out_in_arrival_order() -> None:
    acked: list[int] = []
    q = AckQueue(lambda m: acked.append(m.mid))
    t1, t2, t3 = q.new(_msg(1)), q.new(_msg(2)), q.new(_msg(3))
    for t in (t1, t2, t3):
        q.hold(t)  # a Kafka record each
        q.release(t)  # the handler is done
    q.release(t3)
    q.release(t2)
    assert acked == [], "message 1 is not in Kafka yet"
    q.release(t1)
    assert acked == [1, 2, 3]
    assert len(q) == 0


async def test_fog_ack_queue_wait_empty() -> None:
    q = AckQueue(lambda m: None)
    t = q.new(_msg(1))
    assert not await q.wait_empty(0.01)
    q.release(t)
    assert await q.wait_empty(0.01)


# ---- shaping ------------------------------------------------------------------
class _Sink:
    """Collects emitted records and plays Kafka: ``commit()`` releases their tickets."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.queue = AckQueue(lambda m: self.acked.append(m.mid))
        self.out: list[tuple[Envelope, list[Ticket]]] = []

    async def emit(self, env: Envelope, tickets: list[Ticket]) -> None:
        self.out.append((env, tickets))

    def commit(self) -> None:
        for _, tickets in self.out:
            for t in tickets:
                t.owner.release(t)

    async def feed(self, shaper, n: int, data=lambda i: {"v": i}, device: str = "d1") -> None:  # type: ignore[no-untyped-def]
        for i in range(n):
            env = Envelope.for_device(EventType.DATA, "s1", device, data(i), subject="x", id=f"e{i}")
            t = self.queue.new(_msg(i + 1))
            await shaper.add(("s1", device, "x"), env, t)
            self.queue.release(t)


async def test_fog_batch_shaper_by_count_and_time() -> None:
    sink = _Sink()
    shaper = BatchShaper(ShapeSettings(mode="batch", max_events=3, max_ms=20), sink.emit, sink.queue)
    await sink.feed(shaper, 4)
    assert len(sink.out) == 1
    env, tickets = sink.out[0]
    assert env.type == BATCH_TYPE and env.subject == "x" and env.device == "d1"
    assert isinstance(env.data, dict)
    assert [e["id"] for e in env.data["events"]] == ["e0", "e1", "e2"]
    assert env.data["count"] == 3 and len(tickets) == 3
    assert sink.acked == [], "nothing is acknowledged before the batch is in Kafka"
    await asyncio.sleep(0.03)
    await shaper.tick(time.monotonic())  # the open batch of one event is now older than max_ms
    assert len(sink.out) == 2 and sink.out[1][0].data["count"] == 1  # type: ignore[index]
    sink.commit()
    assert sink.acked == [1, 2, 3, 4]


async def test_fog_batch_ids_are_stable_for_the_same_events() -> None:
    a, b = _Sink(), _Sink()
    for sink in (a, b):
        shaper = BatchShaper(ShapeSettings(mode="batch", max_events=2), sink.emit, sink.queue)
        await sink.feed(shaper, 2)
    assert a.out[0][0].id == b.out[0][0].id


async def test_fog_downsample_keeps_one_in_n_and_acks_the_rest() -> None:
    sink = _Sink()
    dropped = []
    shaper = DownsampleShaper(
        ShapeSettings(mode="downsample", every=3), sink.emit, sink.queue, lambda: dropped.append(1)
    )
    await sink.feed(shaper, 7)
    assert [e.id for e, _ in sink.out] == ["e0", "e3", "e6"]
    assert len(dropped) == 4
    assert sink.acked == [], "message 1 is held by its record"
    sink.commit()
    assert sink.acked == list(range(1, 8))


async def test_fog_aggregate_shaper_statistics() -> None:
    sink = _Sink()
    settings = ShapeSettings(mode="aggregate", max_events=4, stats=["mean", "min", "max", "last", "sum"])
    shaper = AggregateShaper(settings, sink.emit, sink.queue)
    await sink.feed(shaper, 4, data=lambda i: {"v": float(i), "flag": True, "name": "x"})
    assert len(sink.out) == 1
    env, tickets = sink.out[0]
    assert env.extensions["shape"] == AGGREGATE_SHAPE and env.type == EventType.DATA.value
    assert env.data == {
        "count": 4,
        "window_start": env.data["window_start"],  # type: ignore[index]
        "window_end": env.data["window_end"],  # type: ignore[index]
        "mean": {"v": 1.5},
        "min": {"v": 0.0},
        "max": {"v": 3.0},
        "last": {"v": 3.0},
        "sum": {"v": 6.0},
    }
    assert len(tickets) == 4
    await shaper.flush_all()
    assert len(sink.out) == 1


# ---- CLI ----------------------------------------------------------------------
def test_fog_cli_check(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from reflexarc.fog.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "ok" in ok.output and "3 stream rule(s)" in ok.output
    bad = tmp_path / "fog.yaml"
    bad.write_text("ingest:\n  recieve_maximum: 3\n")
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 1  # problems found (2 is for a check that cannot run)
    assert "fog.yaml:2:3: ingest.recieve_maximum: unknown field (did you mean 'receive_maximum'?)" in res.output


def test_fog_metrics_hot_path_counts_reach_prometheus_at_scrape() -> None:
    """Counts summed in ints on the hot path are exact in every scrape, and never counted twice."""
    from prometheus_client import REGISTRY, generate_latest

    from reflexarc.fog.metrics import BridgeMetrics, value

    m = BridgeMetrics("unit-flush")
    m.in_data_total += 3
    m.count_out("rx.data", 2)
    text = generate_latest(REGISTRY).decode()
    assert 'rx_fog_messages_in_total{bridge="unit-flush",kind="data"} 3.0' in text
    assert 'rx_fog_records_out_total{bridge="unit-flush",topic="rx.data"} 2.0' in text
    m.flush()
    m.in_data_total += 1
    m.flush()
    generate_latest(REGISTRY)
    assert value(m.in_data) == 4
    assert value(m.out("rx.data")) == 2
