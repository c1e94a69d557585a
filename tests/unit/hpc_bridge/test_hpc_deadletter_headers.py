"""A task request the site cannot take is dead-lettered with its original headers, key and value."""

from __future__ import annotations

from types import SimpleNamespace

from reflexarc.envelope import DeadLetter, Envelope, EventType
from reflexarc.hpc_bridge.service.intake import Intake


def test_a_site_dead_letter_keeps_the_records_headers() -> None:
    env = Envelope(type=EventType.TASK_REQUEST.value, source="/triggers/t1", data={"task_id": "t-1"}, id="t-1")
    key, _, headers = env.to_kafka(b"t-1")
    rec = SimpleNamespace(topic="rx.tasks.local", partition=1, offset=5, key=key, value=b"{not json", headers=headers)
    intake = Intake("local", {}, None, None, None, "rx.deadletter", 100, lambda: None)  # type: ignore[arg-type]  # read() uses none of them

    jobs, dead = intake.read([rec])

    assert jobs == []
    (dl,) = dead
    back = DeadLetter.from_kafka(*dl.to_kafka()[1:])
    assert back.stage == "site-intake" and back.origin == "rx.tasks.local/1/5"
    assert list(back.extra_headers) == list(headers)
    assert back.key == b"t-1" and back.payload == b"{not json" and back.topic == "rx.tasks.local"
