"""Acceptance: Kafka frozen for 60 s under 1,000 events/s from devices that are not ours, on a broker at its
packaged limits: every event reaches Kafka, in each device's order, and the fog's memory stays flat while its
disk buffer grows and drains.

The broker is a real Mosquitto with its packaged queue limits (1,000 queued messages per session): without the
disk buffer the fog stops acknowledging while Kafka is away (its requests wait ``request_timeout_ms`` = 30 s
each), the broker's queue for it overflows within seconds, and the broker drops events it already PUBACKed to
the devices, which cannot send them again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from fog_helpers import KafkaTail, log_size, rss_kib, scrape, wait_for_log
from outage_helpers import PahoDevices, duplicates, order_broken, read_all, read_back, start_fog, wait_records

from reflexarc.brokers import KafkaBroker, MqttBroker
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess
from reflexarc.testing.poll import poll_until
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
T = Topics()
RATE = 1000.0  # events/s, all devices together
DEVICES = ["thermo-1", "thermo-2", "thermo-3", "thermo-4"]
PAD = 800  # about 900-byte events: 60 s of outage is ~54 MB on disk


@pytest.mark.parametrize("outage_s", [60.0])  # the acceptance value
async def test_fog_buffers_a_60s_kafka_outage_for_foreign_devices_on_a_default_broker(
    tmp_path: Path,
    mosquitto_defaults: MqttBroker,
    tansu: KafkaBroker,
    procs: list[ManagedProcess],
    outage_s: float,
) -> None:
    mqtt = MqttSettings(host=mosquitto_defaults.host, port=mosquitto_defaults.port, protocol="5")
    kafka = KafkaSettings(bootstrap_servers=tansu.bootstrap_servers)
    # A dedupe window that fills within the outage, so the memory it takes is flat in its second half.
    bridge, port = await start_fog(tmp_path, "fog-outage", mqtt, kafka, procs, dedupe={"window_size": 20_000})
    assert bridge.pid is not None

    devices = PahoDevices(mosquitto_defaults.host, mosquitto_defaults.port, DEVICES, RATE, pad=PAD)
    devices.start()
    samples: list[tuple[float, dict[str, float], int]] = []  # (t since the freeze, metrics, RSS KiB)
    try:
        async with KafkaTail(kafka, T.kafka_data) as tail:
            await wait_records(tail, 3000, bridge)
            baseline = rss_kib(bridge.pid)

            mark = log_size(bridge)
            tansu.process.signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                while (t := time.monotonic() - frozen_at) < outage_s:
                    samples.append((t, await asyncio.to_thread(scrape, port), rss_kib(bridge.pid)))
                    await asyncio.sleep(0.5)
            finally:
                tansu.process.signal(signal.SIGCONT)
            await asyncio.to_thread(wait_for_log, bridge, "taking MQTT traffic into the disk buffer", 5, mark)
            # The devices go on while the buffer drains, then stop.
            resumed_at = time.monotonic()
            while time.monotonic() - resumed_at < 5:
                samples.append(
                    (time.monotonic() - frozen_at, await asyncio.to_thread(scrape, port), rss_kib(bridge.pid))
                )
                await asyncio.sleep(0.5)
            await asyncio.to_thread(devices.stop)
            want = devices.expected_ids()
            records = await read_all(tail, want, port)
        await asyncio.to_thread(poll_until, lambda: scrape(port)["rx_fog_buffer_engaged"] == 0, 30)
        after = await asyncio.to_thread(scrape, port)
    finally:
        devices.halt()

    ids, seqs = read_back(records)
    missing = want - set(ids)
    dups = duplicates(ids)
    outage = [s for s in samples if s[0] < outage_s]
    peak_depth = max(m["rx_fog_buffer_depth"] for _, m, _ in samples)
    peak_bytes = max(m["rx_fog_buffer_bytes"] for _, m, _ in samples)
    peak_rss = max(r for _, _, r in samples)
    peak_unacked = max(m["rx_fog_mqtt_unacked"] for _, m, _ in samples)
    half = [s for s in outage if s[0] >= outage_s / 2]
    rss_second_half = max(r for _, _, r in half) - half[0][2]
    bytes_second_half = half[-1][1]["rx_fog_buffer_bytes"] - half[0][1]["rx_fog_buffer_bytes"]
    print(
        f"{len(want)} events, {len(set(ids) & want)} distinct in Kafka, {len(missing)} lost, {dups} duplicates; "
        f"buffer peak {peak_depth:.0f} records / {peak_bytes / 1e6:.1f} MB, drained {after['rx_fog_buffer_drained_total']:.0f}; "
        f"RSS {baseline} -> peak {peak_rss} KiB (second half of the outage: +{rss_second_half} KiB while the "
        f"buffer grew by {bytes_second_half / 1e6:.1f} MB); peak unacked {peak_unacked:.0f}"
    )

    assert not missing, f"{len(missing)} of {len(want)} events lost, e.g. {sorted(missing)[:5]}"
    assert dups == 0, f"{dups} duplicates in Kafka"
    assert not order_broken(seqs), f"per-device order broken: {order_broken(seqs)}"
    # The buffer took the outage: it held most of what arrived meanwhile, and gave it all to Kafka.
    assert peak_depth >= 0.8 * RATE * outage_s, f"the buffer held only {peak_depth:.0f} records"
    assert after["rx_fog_buffer_depth"] == 0 and after["rx_fog_buffer_engaged"] == 0
    assert after["rx_fog_buffer_drained_total"] >= peak_depth
    assert after["rx_fog_mqtt_unacked"] == 0 and peak_unacked <= 1000  # the default Receive Maximum
    # Memory is flat while the buffer grows: what it holds is on disk, not in the process.
    assert bytes_second_half > 20e6
    assert rss_second_half < 10 * 1024, f"RSS grew {rss_second_half} KiB in the second half of the outage"
    assert peak_rss - baseline < 48 * 1024, f"RSS grew {(peak_rss - baseline) // 1024} MiB"
