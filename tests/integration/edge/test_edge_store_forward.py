"""Store-and-forward against real Mosquitto: broker outage, agent kill -9, full spool."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from edge_helpers import (
    agent_process,
    check_order_and_duplicates,
    metric,
    replay_file,
    scrape,
    write_yaml,
)

from reflexarc.brokers import MqttBroker, start_mqtt
from reflexarc.config import MqttSettings
from reflexarc.edge.agent import EdgeAgent
from reflexarc.edge.config import load_agent_config
from reflexarc.process import free_port

pytestmark = pytest.mark.integration


def _yaml(tmp: Path, port: int, sources: str, spool: str = "{}", extra: str = "") -> Path:
    return write_yaml(
        tmp / "agent.yaml",
        f"""
site: bl1
device: det1
state_dir: state
metrics_port: 0
delivery: broker  # no fog behind this broker: the PUBACK frees an event
mqtt: {{host: 127.0.0.1, port: {port}, protocol: "5"}}
publish: {{reconnect_min_s: 0.2, reconnect_max_s: 1.0, inflight: 200}}
spool: {spool}
sources:
{sources}
{extra}
""",
    )


@pytest.mark.timeout(120)
async def test_broker_outage_loses_nothing(tmp_path: Path, mosquitto: MqttBroker, collect) -> None:  # type: ignore[no-untyped-def]
    ids = replay_file(tmp_path / "events.jsonl", 2400)
    cfg = load_agent_config(_yaml(tmp_path, mosquitto.port, "  - {type: replay, path: events.jsonl, rate_hz: 150}"))
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port)
    sink = await collect(settings, "rx/bl1/det1/data/#")
    agent = EdgeAgent(cfg)
    await agent.start()
    try:
        await sink.wait_for(lambda: len(sink.events()) >= 200, 30, "first events")
        # Outage of >= 10 s while the source keeps emitting (150/s).
        await asyncio.to_thread(mosquitto.process.stop)
        down_at = time.monotonic()
        received_before = len(sink.events())
        await asyncio.sleep(10.5)
        assert agent.spool is not None and agent.spool.depth > 1000, "events should pile up in the spool"
        assert agent.read > received_before + 1000, "the source kept emitting during the outage"
        await asyncio.to_thread(mosquitto.restart)
        outage = time.monotonic() - down_at
        await sink.wait_for(lambda: len({e.id for e in sink.events()}) >= len(ids), 60, "all events after the outage")
        dupes = check_order_and_duplicates(sink.events(), ids)
        # Only QoS 1 redeliveries of the in-flight window may repeat.
        assert dupes <= 200 + 64, dupes
        print(f"outage {outage:.1f}s, {len(ids)} events, {dupes} QoS 1 duplicates")
        await sink.wait_for(lambda: agent.spool.depth == 0, 10, "an empty spool")
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        assert metric(text, "rx_edge_events_published_total") >= len(ids)
        assert metric(text, "rx_edge_reconnects_total") >= 1
    finally:
        await agent.stop()


@pytest.mark.timeout(120)
async def test_agent_kill9_loses_nothing(tmp_path: Path, mosquitto: MqttBroker, collect) -> None:  # type: ignore[no-untyped-def]
    ids = replay_file(tmp_path / "events.jsonl", 4000)
    path = _yaml(tmp_path, mosquitto.port, "  - {type: replay, path: events.jsonl, rate_hz: 2000}")
    sink = await collect(MqttSettings(host="127.0.0.1", port=mosquitto.port), "rx/bl1/det1/data/#")
    proc = agent_process(path, tmp_path / "agent.log").start()
    try:
        await sink.wait_for(lambda: len(sink.events()) >= 800, 60, "the agent to publish")
        proc.kill()  # SIGKILL mid-stream
        spool_db = tmp_path / "state" / "spool.db"
        db = sqlite3.connect(spool_db)
        accepted_line = int(db.execute("SELECT value FROM checkpoints").fetchone()[0])
        waiting = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        db.close()
        await asyncio.sleep(0.5)
        got_at_kill = {e.id for e in sink.events()}
        assert accepted_line < len(ids), "kill came too late to be mid-stream"
        # Everything the spool accepted is either delivered already or still waiting in it.
        assert len(got_at_kill) + waiting >= accepted_line
        proc = agent_process(path, tmp_path / "agent2.log").start()
        await sink.wait_for(lambda: len({e.id for e in sink.events()}) >= len(ids), 60, "all events")
        dupes = check_order_and_duplicates(sink.events(), ids)
        assert dupes <= 200 + 512, dupes
        print(f"killed at line {accepted_line} ({waiting} waiting), {dupes} duplicates")
    finally:
        proc.stop()


async def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_spool_full_drop_oldest(tmp_path: Path, collect) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = load_agent_config(
        _yaml(
            tmp_path,
            port,
            "  - {type: simulated, stream: t, rate_hz: 5000, count: 500}",
            spool="{max_events: 100, policy: drop_oldest, batch: 16}",
        )
    )
    agent = EdgeAgent(cfg)
    await agent.start()
    broker = None
    try:
        # No broker yet: everything piles up in the spool, which keeps the newest 100.
        await _wait(lambda: agent.spooled == 500, 30, "500 events spooled")
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        assert metric(text, "rx_edge_events_dropped_total") == 400
        assert metric(text, "rx_edge_spool_depth") == 100
        assert agent.status()["spool"]["dropped"] == 400
        broker = start_mqtt(tmp_path / "mq", port=port, flavour="mosquitto")
        sink = await collect(MqttSettings(host="127.0.0.1", port=port), "rx/bl1/det1/data/#")
        await _wait(lambda: agent.spool.depth == 0, 30, "the spool to drain")  # type: ignore[union-attr]
        await sink.wait_for(lambda: len(sink.events()) >= 0, 1, "")
        seqs = [e.data["seq"] for e in sink.events()]  # type: ignore[index]
        # The sink subscribed after the agent connected, so it may miss the first few;
        # what it got is the newest events (seq >= 400), in order.
        assert seqs and min(seqs) >= 400 and seqs == sorted(seqs)
    finally:
        await agent.stop()
        if broker:
            broker.process.stop()


@pytest.mark.timeout(90)
async def test_spool_full_blocks_source(tmp_path: Path, collect) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    broker = start_mqtt(tmp_path / "mq", port=port, flavour="mosquitto")
    sink = await collect(MqttSettings(host="127.0.0.1", port=port), "rx/bl1/det1/data/#")
    broker.process.stop()
    cfg = load_agent_config(
        _yaml(
            tmp_path,
            port,
            "  - {type: simulated, stream: t, rate_hz: 5000, count: 500}",
            spool="{max_events: 100, policy: block, batch: 16}",
        )
    )
    agent = EdgeAgent(cfg)
    await agent.start()
    try:
        await _wait(lambda: agent.spool.full, 30, "the spool to fill")  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
        # The source is blocked: it read only what spool + write buffer hold.
        assert agent.read <= 100 + 64 + 1, agent.read
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        assert metric(text, "rx_edge_spool_full") == 1
        assert metric(text, "rx_edge_sources_blocked") == 1
        assert metric(text, "rx_edge_events_dropped_total") == 0
        broker.restart()
        await sink.wait_for(lambda: len({e.id for e in sink.events()}) >= 500, 60, "all 500 events")
        seqs = [e.data["seq"] for e in sink.events()]  # type: ignore[index]
        assert sorted(set(seqs)) == list(range(500))
        first = list(dict.fromkeys(seqs))
        assert first == sorted(first)
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        assert metric(text, "rx_edge_spool_full") == 0
        assert metric(text, "rx_edge_source_blocked_seconds_total") > 0.5
    finally:
        await agent.stop()
        broker.process.stop()
