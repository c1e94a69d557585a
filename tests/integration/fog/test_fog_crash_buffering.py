"""Acceptance: a fog killed (SIGKILL) while its disk buffer holds a backlog, restarted while Kafka is still
frozen, then Kafka continues: nothing lost, nothing written twice, each device's order kept.

The broker runs at its packaged limits, so the restarted fog must take traffic again at once (into its buffer,
Kafka being away) and drain what the dead one left, first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from fog_helpers import KafkaTail, log_size, scrape, wait_for_log
from outage_helpers import PahoDevices, duplicates, order_broken, read_all, read_back, start_fog, wait_records

from reflexarc.brokers import KafkaBroker, MqttBroker
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess
from reflexarc.testing.poll import poll_until
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
T = Topics()
# Slow enough that what queues in the broker while the fog restarts stays under its 1,000-message bound.
RATE = 200.0
DEVICES = ["pump-1", "pump-2", "pump-3", "pump-4"]


async def test_fog_killed_mid_buffer_and_restarted_while_kafka_is_frozen_loses_nothing(
    tmp_path: Path, mosquitto_defaults: MqttBroker, tansu: KafkaBroker, procs: list[ManagedProcess]
) -> None:
    mqtt = MqttSettings(host=mosquitto_defaults.host, port=mosquitto_defaults.port, protocol="5")
    kafka = KafkaSettings(bootstrap_servers=tansu.bootstrap_servers)
    bridge, port = await start_fog(tmp_path, "fog-crash-buf", mqtt, kafka, procs)

    devices = PahoDevices(mosquitto_defaults.host, mosquitto_defaults.port, DEVICES, RATE)
    devices.start()
    try:
        async with KafkaTail(kafka, T.kafka_data) as tail:
            await wait_records(tail, 500, bridge)

            tansu.process.signal(signal.SIGSTOP)
            try:
                ok = await asyncio.to_thread(poll_until, lambda: scrape(port).get("rx_fog_buffer_depth", 0) >= 1500, 30)
                assert ok, "the buffer never held a backlog:\n" + bridge.log_tail()
                bridge.kill()  # SIGKILL, with ~1,500 records on disk and Kafka frozen
                held = devices.sent
                mark = log_size(bridge)
                bridge.start()
                await asyncio.to_thread(wait_for_log, bridge, "records from before: sending them first", 30, mark)
                await asyncio.to_thread(wait_for_log, bridge, "is not answering", 30, mark)
                # The new fog takes traffic although Kafka is still away: into its buffer, acknowledged.
                ok = await asyncio.to_thread(
                    poll_until, lambda: scrape(port).get("rx_fog_messages_in_total", 0) >= 400, 30
                )
                assert ok, "the restarted fog does not take traffic while Kafka is away:\n" + bridge.log_tail()
                depth_before_kafka = scrape(port)["rx_fog_buffer_depth"]
            finally:
                tansu.process.signal(signal.SIGCONT)
            await asyncio.to_thread(wait_for_log, bridge, "answers: sending the disk buffer", 60, mark)
            resumed = time.monotonic()
            while time.monotonic() - resumed < 3:
                await tail.poll(200)
            await asyncio.to_thread(devices.stop)
            want = devices.expected_ids()
            records = await read_all(tail, want, port)
        ok = await asyncio.to_thread(poll_until, lambda: scrape(port)["rx_fog_buffer_depth"] == 0, 30)
        after = scrape(port)
    finally:
        devices.halt()

    ids, seqs = read_back(records)
    missing = want - set(ids)
    dups = duplicates(ids)
    print(
        f"{len(want)} events ({held} when killed), {len(missing)} lost, {dups} duplicates; restarted fog: "
        f"{depth_before_kafka:.0f} records in its buffer before Kafka continued, "
        f"{after['rx_fog_duplicates_total']:.0f} redeliveries dropped, {after['rx_fog_buffer_drained_total']:.0f} "
        "drained"
    )
    assert not missing, f"{len(missing)} of {len(want)} events lost, e.g. {sorted(missing)[:5]}"
    assert dups == 0, f"{dups} duplicates in Kafka"
    assert not order_broken(seqs), f"per-device order broken: {order_broken(seqs)}"
    assert depth_before_kafka >= 1500, "the rows the dead fog left are in the new fog's buffer"
    assert ok and after["rx_fog_buffer_depth"] == 0 and after["rx_fog_mqtt_unacked"] == 0
