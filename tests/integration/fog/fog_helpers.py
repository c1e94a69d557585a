"""Helpers for the fog bridge's integration tests: config, Kafka readers, MQTT publishers, bridge processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiokafka import TopicPartition

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.fog.config import FogConfig
from reflexarc.kafka import make_consumer
from reflexarc.process import ManagedProcess


def fog_config(mqtt: MqttSettings, kafka: KafkaSettings, **overrides: Any) -> FogConfig:
    """A FogConfig for the test brokers; ``overrides`` are top-level fog.yaml sections."""
    data: dict[str, Any] = {
        "mqtt": mqtt.model_dump(exclude_none=True),
        "kafka": kafka.model_dump(exclude_none=True),
        # Unique ids: metrics are per process, labelled by client id.
        "ingest": {"client_id": f"fog-test-{uuid.uuid4().hex[:8]}", "request_timeout_ms": 5000, "retry_backoff_ms": 200},
        "commands": {"session_timeout_ms": 6000},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return FogConfig.model_validate(data)


class KafkaTail:
    """Reads a topic from the beginning, incrementally: ``await tail.poll()`` adds what arrived."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.records: list[Any] = []
        self._c = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")

    async def __aenter__(self) -> KafkaTail:
        await self._c.start()
        deadline = time.monotonic() + 30
        parts: set[int] | None = None
        while not parts:
            await self._c.topics()
            parts = self._c.partitions_for_topic(self.topic)
            if not parts:
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {self.topic} does not exist")
                await asyncio.sleep(0.2)
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._c.assign(tps)
        await self._c.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._c.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Read what is there now; return the number of records read so far."""
        batch = await self._c.getmany(timeout_ms=timeout_ms, max_records=20_000)
        for recs in batch.values():
            self.records.extend(recs)
        return len(self.records)

    async def until(self, cond: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
        """Poll until ``cond(records)`` holds or the timeout passes; return the records."""
        deadline = time.monotonic() + timeout
        while not cond(self.records) and time.monotonic() < deadline:
            await self.poll()
        return self.records


async def read_topic(
    kafka: KafkaSettings,
    topic: str,
    until: Callable[[list[Any]], bool],
    timeout: float = 60.0,
) -> list[Any]:
    """Every record of ``topic`` from the beginning, read until ``until(records)`` or the timeout."""
    async with KafkaTail(kafka, topic) as tail:
        await tail.poll()
        return await tail.until(until, timeout)


def write_config(path: Path, cfg: FogConfig) -> Path:
    """fog.yaml for a bridge subprocess."""
    data = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    path.write_text(yaml.safe_dump(data))
    return path


def bridge_process(tmp: Path, name: str, cfg: FogConfig) -> ManagedProcess:
    """A fog bridge as its own process (``reflexarc fog run``), for kill -9 tests."""
    conf = write_config(tmp / f"{name}.yaml", cfg)
    argv = [sys.executable, "-c", "from reflexarc.fog.cli import app; app()", "run", str(conf)]
    env = {**os.environ, "RX_LOG_LEVEL": "INFO"}
    return ManagedProcess(name, argv, tmp / f"{name}.log", env=env)


def event_payload(i: int, site: str = "s1", devices: int = 10, size: int = 200, stream: str = "temp") -> tuple[str, bytes, list[tuple[str, str]], str]:
    """Topic and MQTT 5 binary encoding of test event ``i`` (id ``e-{i}``, data padded to ~``size`` bytes)."""
    from reflexarc.envelope import Envelope, EventType
    from reflexarc.topics import Topics

    device = f"d{i % devices}"
    data = {"seq": i, "value": float(i), "pad": "x" * max(0, size - 40)}
    env = Envelope.for_device(EventType.DATA, site, device, data, subject=stream, id=f"e-{i}")
    payload, props, ctype = env.to_mqtt(binary=True)
    return Topics().mqtt_data(site, device, stream), payload, props, ctype


async def publish_events(
    mqtt: MqttSettings,
    start: int,
    stop: int,
    client_id: str = "load-pub",
    size: int = 200,
    progress: list[int] | None = None,
) -> None:
    """Publish events ``start..stop-1`` QoS 1 with a window of unacknowledged publishes; all PUBACKed at return."""
    from reflexarc.mqtt import MqttClient

    async with MqttClient(mqtt, client_id, max_inflight=500) as pub:
        futs = []
        for i in range(start, stop):
            topic, payload, props, ctype = event_payload(i, size=size)
            futs.append(await pub.publish_start(topic, payload, 1, False, props, ctype))
            if progress is not None:
                progress[0] = i + 1
            if len(futs) >= 2000:
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)


def ids_of(records: list[Any]) -> list[str]:
    """CloudEvents ids of Kafka records (binary mode), in read order."""
    return [dict(r.headers)["ce_id"].decode() for r in records]


def log_size(proc: ManagedProcess) -> int:
    """Current length of a process's log: pass it as ``since`` to wait for a restart's own lines."""
    try:
        return proc.log_path.stat().st_size
    except OSError:
        return 0


def wait_for_log(proc: ManagedProcess, text: str, timeout: float = 30.0, since: int = 0) -> None:
    """Wait until the process logged ``text`` after byte ``since``; raise with the log tail if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise AssertionError(f"{proc.name} exited:\n{proc.log_tail(40)}")
        try:
            with open(proc.log_path, "rb") as f:
                f.seek(since)
                if text.encode() in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{proc.name} did not log {text!r} within {timeout}s:\n{proc.log_tail(40)}")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
