"""Helpers for edge-agent integration tests: a subscriber that counts, agent processes, checks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflexarc.envelope import Envelope
from reflexarc.mqtt import MqttClient
from reflexarc.process import ManagedProcess, port_open

EDGE_CLI = "from reflexarc.edge.cli import app; app()"


@dataclass
class Collector:
    """Subscribes to a filter and keeps every message, decoded, in arrival order."""

    client: MqttClient
    messages: list[tuple[str, Envelope | bytes]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        while True:
            m = await self.client.messages.get()
            try:
                body: Envelope | bytes = Envelope.from_mqtt(m.payload, m.user_properties, m.content_type)
            except ValueError:
                body = m.payload
            self.messages.append((m.topic, body))

    def events(self, topic_part: str = "/data/") -> list[Envelope]:
        """Envelopes received on topics containing ``topic_part``."""
        return [b for t, b in self.messages if topic_part in t and isinstance(b, Envelope)]

    async def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``pred()`` holds; fail with ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)


def write_yaml(path: Path, text: str) -> Path:
    """Write an agent.yaml and return its path."""
    path.write_text(text)
    return path


def replay_file(path: Path, n: int, streams: tuple[str, ...] = ("a", "b")) -> list[str]:
    """A JSONL file of ``n`` events spread over ``streams``; returns the ids in order."""
    ids = []
    with path.open("w") as fh:
        for i in range(n):
            stream = streams[i % len(streams)]
            eid = f"ev-{i:06d}"
            ids.append(eid)
            fh.write(json.dumps({"stream": stream, "id": eid, "data": {"i": i, "pad": "x" * 100}}) + "\n")
    return ids


def agent_process(config: Path, log: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    """The agent as a real child process (``reflexarc edge run``)."""
    return ManagedProcess(
        "edge-agent",
        [sys.executable, "-c", EDGE_CLI, "run", str(config)],
        log,
        env={**os.environ, **(env or {})},
        cwd=config.parent,
    )


def check_order_and_duplicates(events: list[Envelope], expected_ids: list[str]) -> int:
    """Assert every id arrived and first arrivals are in order per stream; return the duplicate count."""
    first: dict[str, int] = {}
    per_stream: dict[str, list[str]] = {}
    for e in events:
        if e.id not in first:
            first[e.id] = len(first)
            per_stream.setdefault(e.subject or "", []).append(e.id)
    missing = [i for i in expected_ids if i not in first]
    assert not missing, f"{len(missing)} events lost, first: {missing[:5]}"
    for stream, ids in per_stream.items():
        assert ids == sorted(ids), f"stream {stream} out of order"
    return len(events) - len(first)


__all__ = ["Collector", "agent_process", "check_order_and_duplicates", "port_open", "replay_file", "write_yaml"]


def record_move(position: float, speed: float = 1.0, hold_s: float = 0.0) -> dict[str, float]:
    """A test actuator handler: appends one JSON line per run to $RX_TEST_HANDLER_LOG."""
    with open(os.environ["RX_TEST_HANDLER_LOG"], "a") as fh:
        fh.write(json.dumps({"position": position, "pid": os.getpid()}) + "\n")
        fh.flush()
    if hold_s:
        time.sleep(hold_s)
    return {"position": float(position), "speed": speed}


def handler_runs(path: Path) -> list[dict[str, Any]]:
    """What :func:`record_move` recorded."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (labels ignored)."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise AssertionError(f"metric {name} not exposed")
    return total


def scrape(port: int) -> str:
    """GET the agent's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()
