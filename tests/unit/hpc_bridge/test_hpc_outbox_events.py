"""The events the site agent stores and publishes are byte for byte what the CloudEvents SDK writes.

``Envelope.to_json`` (the outbox's rows) and ``Envelope.to_kafka`` (what is
published) write plain events without the SDK; anything unusual still goes
through it. Both ways must give the same bytes, or the same refusal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from reflexarc.envelope import _FORMAT, Envelope, ce_kafka
from reflexarc.events import Cause, Command, JobState, TaskRequest, TaskResult

CAUSE = Cause(
    event_ids=["e1", "e2"],
    site="bl1",
    device="det1",
    stream="counts",
    time=datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
)

PLAIN = [
    JobState(task_id="t1", site="hpc", state="running", previous="queued", reason='ünïcode ✓ "quoted"', seq=2),
    JobState(task_id="t1", site="hpc", state="done", previous="running", reason="completed", seq=3, machine="m-1"),
    TaskResult(
        task_id="t1",
        app="fit",
        site="hpc",
        status="done",
        result={"x": [1, 2.5, None, {"y": "z"}]},
        cause=CAUSE,
        trigger="peak",
        started_at=CAUSE.time,
    ),
    TaskResult(task_id="t2", app="fit", site="hpc", status="failed", error="boom", attempts=3),
    TaskRequest(task_id="t3", app="fit", site="hpc", args={"k": 1}, cause=CAUSE),
    Command(command_id="c1", site="bl1", device="det1", actuator="motor", args={"to": 1.5}),
]


def sdk(env: Envelope, key: bytes | None) -> tuple[Any, Any]:
    """What the SDK writes: structured JSON, and the Kafka record with the envelope's key rule."""

    def run(fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # the same refusal is what the fast path must give
            return ("refused", type(exc).__name__)

    def kafka() -> Any:
        msg = ce_kafka.to_binary(env.to_cloudevent(), _FORMAT, key_mapper=lambda _e: None)
        k = key if key is not None else (f"{env.site}/{env.device}".encode() if env.site and env.device else None)
        if env.data is None:
            # The Kafka binding: an event without data is a null value, with no content type (the SDK writes b"").
            return k, None, [h for h in msg.headers.items() if h[0] != "content-type"]
        return k, msg.value, list(msg.headers.items())

    return run(lambda: _FORMAT.write(env.to_cloudevent())), run(kafka)


def ours(env: Envelope, key: bytes | None) -> tuple[Any, Any]:
    def run(fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            return ("refused", type(exc).__name__)

    return run(env.to_json), run(lambda: env.to_kafka(key))


@pytest.mark.parametrize("payload", PLAIN, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("key", [None, b"t1"])
def test_plain_events_are_written_as_the_sdk_writes_them(payload: Any, key: bytes | None) -> None:
    env = payload.to_envelope()
    assert env._plain()  # these take the fast path...
    assert ours(env, key) == sdk(env, key)  # ...and give the same bytes
    assert Envelope.from_json(env.to_json()) == env


UNUSUAL = [
    Envelope(type="t", source="/s", data={"v": 1}, time=datetime(2030, 1, 1)),  # naive time: the SDK refuses
    Envelope(type="t", source="/s", data={"v": datetime(2030, 1, 1, tzinfo=UTC)}),  # the SDK's encoder writes it
    Envelope(type="t", source="/s", data=b"\x00bytes"),
    Envelope(type="t", source="/s", data=None),
    Envelope(type="t", source="/s", data={"v": 1}, extensions={"Bad": "x"}),
    Envelope(type="t", source="/s", data={"v": 1}, extensions={"id": "x"}),
    Envelope(type="t", source="/s", data={"v": 1}, subject=""),
    Envelope(type="t", source="/s", data={"v": 1}, time=datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))),
    Envelope.for_device("io.reflexarc.data", "s1", "d1", {"v": 1.5}, subject="temp"),
]


@pytest.mark.parametrize("env", UNUSUAL, ids=range(len(UNUSUAL)))
def test_unusual_events_give_what_the_sdk_gives(env: Envelope) -> None:
    assert ours(env, None) == sdk(env, None)
