"""Acceptance: a fog killed (SIGKILL) twice mid-stream writes no event twice.

MQTT redelivers what the dead fog had not acknowledged, including messages whose records Kafka already had:
the restarted fog's dedupe window starts with the ids of the data topic's tail, so those are dropped (and
receipted), not written again. Before, 2 duplicates in 20,000 were measured across two kills.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fog_helpers import KafkaTail, ids_of, log_size, publish_events, scrape, wait_for_log
from outage_helpers import duplicates, read_rest, start_fog

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
T = Topics()
N = 20_000


async def test_fog_killed_twice_mid_stream_writes_nothing_twice(
    tmp_path: Path, mqtt_settings: MqttSettings, kafka_settings: KafkaSettings, procs: list[ManagedProcess]
) -> None:
    bridge, port = await start_fog(tmp_path, "fog-dedupe", mqtt_settings, kafka_settings, procs)

    publisher = asyncio.create_task(publish_events(mqtt_settings, 0, N))
    redelivered = 0.0
    kills: list[int] = []
    async with KafkaTail(kafka_settings, T.kafka_data) as tail:
        for fraction in (0.25, 0.6):
            deadline = time.monotonic() + 60
            while await tail.poll(50) < N * fraction and time.monotonic() < deadline:
                pass
            if kills:  # this fog's count of redeliveries dies with it: keep it
                redelivered += scrape(port)["rx_fog_duplicates_total"]
            bridge.kill()  # mid-stream: sent to Kafka, not yet acknowledged in MQTT
            kills.append(len(tail.records))
            mark = log_size(bridge)
            bridge.start()
            await asyncio.to_thread(wait_for_log, bridge, "running", 30, mark)
            await asyncio.to_thread(wait_for_log, bridge, "read the tail of rx.data", 30, mark)
        await asyncio.wait_for(publisher, 120)
        want = {f"e-{i}" for i in range(N)}
        await tail.until(lambda r: want <= set(ids_of(r)), timeout=120)
        await read_rest(tail, port)
        records = list(tail.records)
        redelivered += scrape(port)["rx_fog_duplicates_total"]

    ids = ids_of(records)
    missing = want - set(ids)
    dups = duplicates(ids)
    print(
        f"killed with {kills} events in Kafka; {len(missing)} lost, {dups} duplicates; the restarted fogs dropped "
        f"{redelivered:.0f} redeliveries"
    )
    assert all(0 < k < N for k in kills), "each kill must land mid-stream"
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    assert dups == 0, f"{dups} events written twice"
    assert redelivered > 0, "no redelivery reached a restarted fog: the kills did not test deduplication"
