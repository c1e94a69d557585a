"""Helpers for the fog bridge's integration tests: config, Kafka readers, MQTT publishers, bridge processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.fog.config import FogConfig
from reflexarc.process import ManagedProcess

# Re-exported: the fog tests import the Kafka readers from here.
from reflexarc.testing.kafka import KafkaTail as KafkaTail
from reflexarc.testing.kafka import ids_of as ids_of
from reflexarc.testing.kafka import read_topic as read_topic


def fog_config(mqtt: MqttSettings, kafka: KafkaSettings, **overrides: Any) -> FogConfig:
    """A FogConfig for the test brokers; ``overrides`` are top-level fog.yaml sections."""
    data: dict[str, Any] = {
        "mqtt": mqtt.model_dump(exclude_none=True),
        "kafka": kafka.model_dump(exclude_none=True),
        # Unique ids: metrics are per process, labelled by client id.
        "ingest": {
            "client_id": f"fog-test-{uuid.uuid4().hex[:8]}",
            "request_timeout_ms": 5000,
            "retry_backoff_ms": 200,
        },
        "commands": {"session_timeout_ms": 6000},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return FogConfig.model_validate(data)


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


def event_payload(
    i: int, site: str = "s1", devices: int = 10, size: int = 200, stream: str = "temp"
) -> tuple[str, bytes, list[tuple[str, str]], str]:
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


def scrape(port: int) -> dict[str, float]:
    """The fog metrics of one bridge, by name (labels other than bridge ignored, summed)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rx_fog_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
