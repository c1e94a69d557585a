"""The figures of ``reflexarc status`` from records and retained messages (no broker: the parts' logic)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from reflexarc.envelope import DeadLetter, utcnow
from reflexarc.events import Cause, Command, CommandAck, CommandStatus
from reflexarc.status import _device_status, _window_figures
from reflexarc.statusview import render
from reflexarc.topics import Topics

T = Topics()


def rec(topic: str, kv: tuple[bytes | None, bytes, list[tuple[str, bytes]]]) -> Any:
    """A consumer record as aiokafka gives it (the fields status reads)."""
    key, value, headers = kv
    return SimpleNamespace(topic=topic, key=key, value=value, headers=headers)


def test_commands_are_classified_once_each_and_latency_comes_from_acks() -> None:
    now = utcnow()
    cause = Cause(event_ids=["e"], time=now - timedelta(seconds=2))
    cmds = [Command(command_id=f"c{i}", site="s", device="d", actuator="m", cause=cause) for i in range(5)]
    records = [rec(T.kafka_commands, c.to_envelope().to_kafka()) for c in cmds]
    records.append(rec(T.kafka_commands, cmds[0].to_envelope().to_kafka()))  # a redelivered copy counts once
    acks = [
        CommandAck(command_id="c0", site="s", device="d", actuator="m", ok=True, at=now - timedelta(seconds=1)),
        CommandAck(command_id="c1", site="s", device="d", actuator="m", ok=True, at=now),
        CommandAck(command_id="c2", site="s", device="d", actuator="m", ok=False, reason="invalid_args"),
    ]
    records += [rec(T.kafka_acks, a.to_envelope().to_kafka()) for a in acks]
    records.append(
        rec(
            T.kafka_acks,
            CommandStatus(command_id="c3", site="s", device="d", status="expired").to_envelope().to_kafka(),
        )
    )
    dead = [
        DeadLetter("bad", "parse", "rx/s/d/data/x", b"\xff"),
        DeadLetter("bad", "parse", "o", b"1"),
        DeadLetter("no", "triggers.data", "o", b"2"),
    ]
    records += [rec(T.kafka_deadletter, dl.to_kafka()) for dl in dead]
    fig = _window_figures(records, T, now.timestamp(), 3600, 600)
    assert fig["commands"] == {"window_s": 3600, "issued": 5, "pending": 1, "delivered": 2, "rejected": 1, "expired": 1}
    assert fig["dead_letters"]["by_stage"] == {"parse": 2, "triggers.data": 1}
    assert fig["loop"]["loops"] == 2
    assert fig["loop"]["p50_s"] == 1.0 and fig["loop"]["p99_s"] == 2.0


def test_retained_statuses() -> None:
    online = _device_status(T, T.mqtt_status("bl1", "det1"), b'{"state": "online", "device": "det1", "since": "t"}')
    assert online == {
        "site": "bl1",
        "device": "det1",
        "state": "online",
        "since": "t",
        "reason": None,
        "kind": "device",
    }
    will = _device_status(
        T, T.mqtt_status("bl1", "det1"), b'{"state": "offline", "device": "det1", "reason": "connection lost"}'
    )
    assert will is not None and will["state"] == "offline" and will["reason"] == "connection lost"
    assert _device_status(T, T.mqtt_status("bl1", "det1"), b"") is None  # a cleared status
    assert _device_status(T, "other/ns/x/status", b"{}") is None
    assert _device_status(T, T.mqtt_status("g", "fog-1"), b'{"state": "online"}')["kind"] == "bridge"  # type: ignore[index]


def test_the_view_renders_every_tier() -> None:
    report = {
        "at": "now",
        "namespace": "rx",
        "brokers": {"kafka": {"reachable": True, "bootstrap": "k:1"}, "mqtt": {"reachable": False, "error": "x"}},
        "lag": [
            {"group": "rx-site-local", "topic": "rx.tasks.local", "partition": 0, "committed": 1, "end": 4, "lag": 3}
        ],
        "sites": {"local": {"topic": "rx.tasks.local", "backlog": 3, "groups": ["rx-site-local"]}},
        "devices": [
            {"site": "bl1", "device": "det1", "state": "offline", "since": None, "reason": "shutdown", "kind": "device"}
        ],
        "online": 0,
        "offline": 1,
        "commands": {"issued": 1, "pending": 1},
        "dead_letters": {"total": 2, "by_stage": {"parse": 2}},
        "loop": {"window_s": 600, "loops": 0, "p50_s": None, "p99_s": None},
    }
    console = Console(width=120, record=True)
    console.print(render(report))
    text = console.export_text()
    for part in ("unreachable", "bl1/det1", "shutdown", "rx.tasks.local", "parse 2", "local", "1 offline"):
        assert part in text, part
