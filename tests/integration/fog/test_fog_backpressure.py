"""Acceptance: Kafka unavailable for over 10 s — no loss, bounded memory, resumes by itself."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from fog_helpers import bridge_process, fog_config, ids_of, publish_events, read_topic, rss_kib, scrape, wait_for_log

from reflexarc.brokers import KafkaBroker
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess, free_port
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
T = Topics()
RECEIVE_MAXIMUM = 500
SIZE = 2048


async def test_fog_survives_kafka_outage_with_bounded_memory(
    tmp_path: Path,
    mqtt_settings: MqttSettings,
    tansu: KafkaBroker,
    kafka_settings: KafkaSettings,
    procs: list[ManagedProcess],
) -> None:
    port = free_port()
    cfg = fog_config(
        mqtt_settings,
        kafka_settings,
        metrics_port=port,
        ingest={"client_id": "fog-bp", "receive_maximum": RECEIVE_MAXIMUM, "request_timeout_ms": 3000},
        commands={"enabled": False},
    )
    bridge = bridge_process(tmp_path, "fog-bp", cfg)
    procs.append(bridge)
    bridge.start()
    await asyncio.to_thread(wait_for_log, bridge, "running")
    assert bridge.pid is not None

    await publish_events(mqtt_settings, 0, 2000, size=SIZE)
    await read_topic(kafka_settings, T.kafka_data, lambda r: len(r) >= 2000, timeout=60)
    baseline = rss_kib(bridge.pid)

    tansu.process.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        # 20,000 x 2 KiB = 40 MiB arrive while Kafka is away: the broker must keep them.
        await publish_events(mqtt_settings, 2000, 22_000, size=SIZE)
        peak_rss = baseline
        peak_unacked = 0.0
        backpressure_seen = False
        while time.monotonic() - paused_at < 12:
            m = await asyncio.to_thread(scrape, port)
            peak_unacked = max(peak_unacked, m.get("rx_fog_mqtt_unacked", 0))
            backpressure_seen |= m.get("rx_fog_backpressure", 0) == 1
            peak_rss = max(peak_rss, rss_kib(bridge.pid))
            await asyncio.sleep(0.25)
    finally:
        tansu.process.signal(signal.SIGCONT)
    outage = time.monotonic() - paused_at

    want = {f"e-{i}" for i in range(22_000)}
    records = await read_topic(kafka_settings, T.kafka_data, lambda r: want <= set(ids_of(r)), timeout=120)
    missing = want - set(ids_of(records))
    after = scrape(port)
    print(
        f"outage {outage:.1f}s; RSS {baseline} -> peak {peak_rss} KiB; peak unacked {peak_unacked}; "
        f"retries {after.get('rx_fog_kafka_retries_total')}"
    )
    assert outage >= 10
    assert not missing, f"{len(missing)} events lost"
    assert backpressure_seen, "the intake never reported waiting for Kafka"
    assert peak_unacked <= RECEIVE_MAXIMUM
    # 40 MiB went through the broker during the outage; the bridge held at most a window of it.
    assert peak_rss - baseline < 20 * 1024, f"bridge memory grew by {(peak_rss - baseline) // 1024} MiB"
    assert after["rx_fog_mqtt_unacked"] == 0
