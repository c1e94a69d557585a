"""Helpers for deploy integration tests: a counting MQTT subscriber, fleet files, CLI calls."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from reflexarc.deploy.cli import app
from reflexarc.envelope import Envelope
from reflexarc.topics import MqttKind, Topics


class Counter:
    """Subscribes to every data and status topic of namespace ``rx``; counts distinct event ids per device/stream."""

    def __init__(self, host: str, port: int) -> None:
        """Connect and subscribe (paho's own network thread)."""
        self.topics = Topics()
        self.ids: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.status: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="deploy-test-counter", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe([("rx/+/+/data/+", 1), ("rx/+/+/status", 1)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parsed = self.topics.parse_mqtt(msg.topic)
        with self.lock:
            if parsed.kind is MqttKind.STATUS:
                self.status[parsed.device] = json.loads(msg.payload)
                return
            props = getattr(msg.properties, "UserProperty", None) or []
            ctype = getattr(msg.properties, "ContentType", None)
            env = Envelope.from_mqtt(msg.payload, props, ctype, parsed)
            self.ids[(parsed.device, parsed.stream or "")].add(env.id)

    def count(self, device: str, stream: str) -> int:
        """Distinct events seen from ``device`` on ``stream``."""
        with self.lock:
            return len(self.ids[(device, stream)])

    def wait(self, pred: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
        """Wait until ``pred()`` holds (deadline, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        with self.lock:
            seen = {f"{d}/{s}": len(v) for (d, s), v in self.ids.items()}
        raise AssertionError(f"timed out waiting for {what}; seen {seen}, status {self.status}")

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def write_fleet(path: Path, doc: dict[str, Any]) -> Path:
    """Write a fleet file."""
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    """Run ``reflexarc deploy ARGS --json``; (exit code, parsed JSON output)."""
    res = CliRunner().invoke(app, [*args, "--json"], env=env)
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"deploy {' '.join(args)} exited {res.exit_code}: {res.output}") from None
    return res.exit_code, data


def by_device(data: dict[str, Any], key: str) -> dict[str, str]:
    """{device: data[key]} from a plan/apply JSON document."""
    return {d["device"]: d[key] for d in data["devices"]}
