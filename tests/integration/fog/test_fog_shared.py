"""Acceptance: two bridges on a shared subscription split the traffic and together deliver everything;
killing one moves its load (and its unacknowledged messages) to the other without loss."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from fog_helpers import KafkaTail, bridge_process, fog_config, ids_of, log_size, publish_events, wait_for_log

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess, free_port
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
T = Topics()
RECEIVE_MAXIMUM = 500


def taken(port: int) -> float:
    """MQTT messages a bridge took, from its metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("rx_fog_messages_in_total")
    )


async def test_fog_shared_subscription_split_and_takeover(
    tmp_path: Path, mqtt_settings: MqttSettings, kafka_settings: KafkaSettings, procs: list[ManagedProcess]
) -> None:
    ports = {"fog-a": free_port(), "fog-b": free_port()}
    bridges = {}
    for me, peer in (("fog-a", "fog-b"), ("fog-b", "fog-a")):
        cfg = fog_config(
            mqtt_settings,
            kafka_settings,
            metrics_port=ports[me],
            ingest={"client_id": me, "peers": [peer], "receive_maximum": RECEIVE_MAXIMUM},
            commands={"enabled": False},
        )
        assert cfg.share_group() == "rx-fog"
        bridges[me] = bridge_process(tmp_path, me, cfg)
        procs.append(bridges[me])
        bridges[me].start()
    for b in bridges.values():
        await asyncio.to_thread(wait_for_log, b, "running")

    async with KafkaTail(kafka_settings, T.kafka_data) as tail:
        # Phase 1: both bridges take a share.
        await publish_events(mqtt_settings, 0, 10_000)
        await tail.until(lambda r: len(r) >= 10_000, timeout=90)
        share = {name: await asyncio.to_thread(taken, port) for name, port in ports.items()}
        assert sum(share.values()) >= 10_000
        assert min(share.values()) >= 2_000, f"the load was not split: {share}"

        # Phase 2: kill -9 fog-a mid-stream; fog-b drains fog-a's session and takes its share.
        progress = [0]
        publisher = asyncio.create_task(publish_events(mqtt_settings, 10_000, 20_000, progress=progress))
        deadline = time.monotonic() + 60
        while await tail.poll(50) < 12_000 and time.monotonic() < deadline:
            pass
        bridges["fog-a"].kill()
        assert progress[0] < 20_000, "the kill must land mid-stream"
        await asyncio.wait_for(publisher, 120)
        want = {f"e-{i}" for i in range(20_000)}
        await tail.until(lambda r: want <= set(ids_of(r)), timeout=120)
        missing = want - set(ids_of(tail.records))
        assert not missing, f"{len(missing)} events lost without fog-a, e.g. {sorted(missing)[:5]}"
        assert "draining its MQTT session" in bridges["fog-b"].log_path.read_text()

        # Phase 3: fog-a comes back, takes its session back, and both carry on.
        mark = log_size(bridges["fog-a"])
        bridges["fog-a"].start()
        await asyncio.to_thread(wait_for_log, bridges["fog-b"], "released the MQTT session of fog-a", 30)
        await asyncio.to_thread(wait_for_log, bridges["fog-a"], "running", 30, mark)
        await publish_events(mqtt_settings, 20_000, 24_000)
        want = {f"e-{i}" for i in range(24_000)}
        await tail.until(lambda r: want <= set(ids_of(r)), timeout=90)
        ids = ids_of(tail.records)
        after_a = await asyncio.to_thread(taken, ports["fog-a"])
    assert want <= set(ids)
    # A restarted process counts from zero: this is its share of the last 4,000.
    assert after_a >= 500, "the restarted bridge took no share"
    dups = sum(c - 1 for c in Counter(ids).values())
    # Redelivered: what fog-a had in Kafka but not acknowledged, plus handovers in flight.
    assert dups <= 3 * RECEIVE_MAXIMUM, f"{dups} duplicates"
    print(f"split {share}; duplicates {dups}")
