"""Helpers of the fog's outage and crash tests: devices that are not ours (plain paho), metrics, Kafka read-back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from fog_helpers import bridge_process, fog_config, scrape, wait_for_log
from paho.mqtt.enums import CallbackAPIVersion

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.process import ManagedProcess, free_port
from reflexarc.topics import Topics

T = Topics()


@dataclass
class _Device:
    name: str
    sent: int = 0
    acked: int = 0
    thread: threading.Thread | None = None
    infos: list[paho.MQTTMessageInfo] = field(default_factory=list)


class PahoDevices:
    """Devices that are not ours: plain paho-mqtt (MQTT 3.1.1), QoS 1, a bare JSON object with an ``id`` and a
    ``seq``, each device in its own thread at ``rate_hz / len(devices)``, until :meth:`stop`.

    Event ``seq`` of device ``d`` has id ``{d}-{seq:06d}``; ``pad`` bytes make each payload about that big.
    """

    def __init__(
        self,
        host: str,
        port: int,
        names: list[str],
        rate_hz: float,
        site: str = "plant",
        stream: str = "temp",
        pad: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.site, self.stream = site, stream
        self.interval = len(names) / rate_hz
        self.pad = "x" * pad
        self.devices = [_Device(n) for n in names]
        self._stop = threading.Event()
        self.errors: list[str] = []

    def start(self) -> None:
        """Connect every device and start publishing."""
        for d in self.devices:
            d.thread = threading.Thread(target=self._run, args=(d,), name=f"device-{d.name}", daemon=True)
            d.thread.start()

    def _run(self, d: _Device) -> None:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"foreign-{d.name}", protocol=paho.MQTTv311)
        c.max_inflight_messages_set(200)
        try:
            c.connect(self.host, self.port)
            c.loop_start()
            topic = T.mqtt_data(self.site, d.name, self.stream)
            t0 = time.monotonic()
            while not self._stop.is_set():
                # Paced by the clock (not by the broker): a device samples at its rate whatever happens downstream.
                delay = t0 + d.sent * self.interval - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                body = {"id": f"{d.name}-{d.sent:06d}", "seq": d.sent, "value": 20.0 + d.sent % 7, "pad": self.pad}
                d.infos.append(c.publish(topic, json.dumps(body), qos=1))
                d.sent += 1
            for info in d.infos:
                info.wait_for_publish(60)
            d.acked = sum(1 for i in d.infos if i.is_published())
        except Exception as exc:  # surfaced by stop()
            self.errors.append(f"{d.name}: {exc!r}")
        finally:
            c.loop_stop()
            c.disconnect()

    def halt(self) -> None:
        """Stop publishing (no checks: for clean-ups)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop publishing and wait until the broker acknowledged every event (PUBACK)."""
        self._stop.set()
        for d in self.devices:
            if d.thread is not None:
                d.thread.join(90)
        assert not self.errors, self.errors
        for d in self.devices:
            assert d.acked == d.sent, f"{d.name}: the broker acknowledged {d.acked} of {d.sent}"

    @property
    def sent(self) -> int:
        """Events published so far (all devices)."""
        return sum(d.sent for d in self.devices)

    def expected_ids(self) -> set[str]:
        """The ids of every event published."""
        return {f"{d.name}-{i:06d}" for d in self.devices for i in range(d.sent)}


async def start_fog(
    tmp: Path, name: str, mqtt: MqttSettings, kafka: KafkaSettings, procs: list[ManagedProcess], **ingest: Any
) -> tuple[ManagedProcess, int]:
    """A fog bridge process with its disk buffer in ``tmp``, Kafka's production request timeout (30 s), commands
    off and metrics on a free port (returned); ``ingest`` adds settings. Returns once it logged ``running``."""
    port = free_port()
    cfg = fog_config(
        mqtt,
        kafka,
        metrics_port=port,
        ingest={"client_id": name, "request_timeout_ms": 30_000, "buffer": {"path": str(tmp / "buffer.db")}, **ingest},
        commands={"enabled": False},
    )
    bridge = bridge_process(tmp, name, cfg)
    procs.append(bridge)
    bridge.start()
    await asyncio.to_thread(wait_for_log, bridge, "running")
    return bridge, port


def read_back(records: list[Any]) -> tuple[list[str], dict[str, list[int]]]:
    """Ids in read order, and each device's ``seq`` in Kafka order (a device's records share a partition)."""
    ids: list[str] = []
    seqs: dict[str, list[int]] = defaultdict(list)
    for r in records:
        h = dict(r.headers)
        eid = h["ce_id"].decode()
        ids.append(eid)
        device = r.key.decode().split("/", 1)[1]
        seqs[device].append(json.loads(r.value)["seq"])
    return ids, seqs


def duplicates(ids: list[str]) -> int:
    """Records beyond the first of each id."""
    return sum(c - 1 for c in Counter(ids).values())


def order_broken(seqs: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """Per device, the first place where a later event came before an earlier one (first occurrences only)."""
    bad: dict[str, tuple[int, int]] = {}
    for device, s in seqs.items():
        seen: set[int] = set()
        last = -1
        for x in s:
            if x in seen:
                continue
            seen.add(x)
            if x < last:
                bad[device] = (last, x)
                break
            last = x
    return bad


async def wait_records(tail: Any, n: int, bridge: ManagedProcess, timeout: float = 60.0) -> None:
    """Poll the data topic until it holds ``n`` records (raise with the bridge's log if it does not)."""
    deadline = time.monotonic() + timeout
    while await tail.poll(100) < n and time.monotonic() < deadline:
        pass
    assert len(tail.records) >= n, "events do not reach Kafka:\n" + bridge.log_tail()


async def read_all(tail: Any, want: set[str], port: int, timeout: float = 120.0) -> list[Any]:
    """Poll the data topic until every id of ``want`` is there, then read the rest (:func:`read_rest`)."""
    seen = set(read_back(tail.records)[0])
    deadline = time.monotonic() + timeout
    while not want <= seen and time.monotonic() < deadline:
        n = len(tail.records)
        await tail.poll(200)
        seen.update(read_back(tail.records[n:])[0])
    await read_rest(tail, port)
    return list(tail.records)


async def read_rest(tail: Any, port: int, timeout: float = 60.0) -> None:
    """Once every expected id is in: wait until the fog holds nothing (no Kafka record in flight, an empty
    buffer, every MQTT message acknowledged), then read what is left, so late duplicates are counted too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = await asyncio.to_thread(scrape, port)
        if not (m.get("rx_fog_kafka_inflight") or m.get("rx_fog_buffer_depth") or m.get("rx_fog_mqtt_unacked")):
            break
        await tail.poll(200)
    quiet = 0
    while quiet < 2:  # two polls in a row that bring nothing new
        n = len(tail.records)
        await tail.poll(300)
        quiet = quiet + 1 if len(tail.records) == n else 0
