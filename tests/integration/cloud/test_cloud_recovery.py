"""The trigger engine survives kill -9 and reloads its file, without losing or doubling decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from cloud_harness import TOPICS, WorkerProcess, engine_tasks, event, header, prepare, produce, read_all

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.events import TaskRequest
from reflexarc.kafka import event_of
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SITE = "site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n"
CHANGELOG = "rx-triggers-trigger-state-changelog"

RESTART_TRIGGERS = """
triggers:
  - name: every50
    on: bl1/+/frames
    window: {type: tumbling, events: 50, emit: close, aggregates: {n: {op: count}}}
    when: agg.n == 50
    then: [{task: {app: fit, args: {first: window.first_time}}}]
  - name: busy
    on: bl1/+/frames
    window: {type: tumbling, size: 5s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}
    when: agg.n >= 10
    cooldown: 7s
    then: [{task: {app: fit, args: {s: agg.s}}}]
"""

DEVICES = [f"d{i}" for i in range(6)]
PER_DEVICE = 400


def restart_events() -> list[Envelope]:
    """400 frames per device, 0.1 s apart, interleaved across devices."""
    return [event(f"{dev}-{i}", 0.1 * i, {"v": i % 7}, dev, "frames") for i in range(PER_DEVICE) for dev in DEVICES]


def _tasks(records: list[Any]) -> list[TaskRequest]:
    return [TaskRequest.from_envelope(event_of(r)) for r in records]


def _where(tasks: Iterable[TaskRequest]) -> str:
    """``trigger@last-event-id`` of each task, sorted: which firing it is."""
    return " ".join(sorted({f"{t.trigger}@{t.cause.event_ids[-1] if t.cause else '?'}" for t in tasks}))


async def test_kill_9_in_the_middle_of_windows_fires_exactly_as_without(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    (tmp_path / "site.yaml").write_text(SITE)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers) + RESTART_TRIGGERS)
    events = restart_events()

    # What the trigger decides without any kill: the pure engine over the same events.
    expected_tasks = engine_tasks(path, events)
    expected = set(expected_tasks)
    # Per device: 8 windows of 50 frames; 'busy' fires at 0.9 s, then once its 7 s cooldown
    # is over and a window holds 10 frames: 8.0, 15.9, 22.9, 29.9, 36.9 s.
    assert len(expected) == len(DEVICES) * (PER_DEVICE // 50 + 6)

    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    tasks_topic = [TOPICS.kafka_tasks("local")]
    # Phase 1: 55 % of the frames, so every device stops in the middle of windows.
    cut = int(len(events) * 0.55)
    await produce(kafka_settings, events[:cut])
    await worker.start()
    try:
        # Kill while it is busy with phase 1: as soon as the first tasks are out.
        await read_all(kafka_settings, tasks_topic, lambda rs: len(rs) >= 3, timeout=90)
        worker.kill()
        first_run = _tasks(await read_all(kafka_settings, tasks_topic, lambda rs: False, timeout=1.0))
        assert 3 <= len({t.task_id for t in first_run}) < len(expected)

        # Restart; it recovers its windows from the changelog. Kill it again in the middle of phase 2.
        await worker.start()
        await produce(kafka_settings, events[cut:])
        n_before = len(first_run)
        await read_all(kafka_settings, tasks_topic, lambda rs: len(rs) >= n_before + 5, timeout=90)
        worker.kill()

        await worker.start()
        records = await read_all(
            kafka_settings, tasks_topic, lambda rs: len({r.key for r in rs}) >= len(expected), timeout=120, settle=3.0
        )
    finally:
        rc = worker.stop()
    assert rc == 0
    got = _tasks(records)
    ids = [t.task_id for t in got]
    missed = expected - set(ids)
    extra = set(ids) - expected
    print(
        f"restart test: {len(expected)} expected tasks, {len(set(ids))} distinct sent, "
        f"{len(ids) - len(set(ids))} redelivered duplicates (same id), {len(missed)} missed, {len(extra)} extra"
    )
    if missed or extra:
        # Which trigger on which device fired at which event: where the state went wrong.
        print("missed:", _where(expected_tasks[i] for i in missed))
        print("extra: ", _where(t for t in got if t.task_id in extra))
        print("first run:", _where(first_run))
    assert not missed, f"missed {len(missed)} firings"
    assert not extra, f"{len(extra)} tasks that a run without kill would not start"
    # Same id, same request: a redelivery is the same task, never a second one.
    by_id: dict[str, TaskRequest] = {}
    for t in got:
        assert by_id.setdefault(t.task_id, t).args == t.args


async def test_hot_reload_keeps_state_and_rejects_invalid_files(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    (tmp_path / "site.yaml").write_text(SITE)
    path = tmp_path / "triggers.yaml"
    head = header(kafka_settings.bootstrap_servers)
    trig_a = """
  - name: three
    on: bl1/+/a
    window: {type: tumbling, events: 3, emit: close}
    when: "true"
    then: [{task: {app: fit}}]
"""
    trig_b = """
  - name: hot
    on: bl1/+/b
    when: event.data.v > 10
    then: [{task: {app: fit, args: {v: event.data.v}}}]
"""
    path.write_text(head + "triggers:" + trig_a)
    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    await worker.start()
    tasks_topic = [TOPICS.kafka_tasks("local")]
    try:
        await produce(kafka_settings, [event("a1", 0, {}, "d1", "a"), event("a2", 1, {}, "d1", "a")])
        # Both events applied to the window (stored in the changelog: d1's state with a pane of 2) before the reload.
        await read_all(
            kafka_settings,
            [CHANGELOG],
            lambda rs: any(r.key == b"bl1/d1" and b'"n":2' in (r.value or b"") for r in rs),
            timeout=60,
        )

        path.write_text(head + "triggers:" + trig_a + trig_b)
        assert await asyncio.to_thread(poll_until, lambda: "reloaded" in worker.text(), 30), worker.text()[-2000:]
        await produce(
            kafka_settings,
            [event("b1", 2, {"v": 11}, "d2", "b"), event("b0", 2, {"v": 10}, "d2", "b"), event("a3", 3, {}, "d1", "a")],
        )
        recs = await read_all(kafka_settings, tasks_topic, lambda rs: len(rs) >= 2, timeout=60, settle=1.0)
        got = {(t.trigger, tuple(t.cause.event_ids)) for t in _tasks(recs)}
        # 'three' kept its window across the reload: a1..a3 complete it.
        assert got == {("hot", ("eb1",)), ("three", ("ea1", "ea3"))}

        # An invalid file is rejected; the running triggers stay in force.
        path.write_text(head + "triggers:" + trig_a + trig_b.replace("event.data.v > 10", "event.data.v >"))
        assert await asyncio.to_thread(poll_until, lambda: "rejected" in worker.text(), 30), worker.text()[-2000:]
        assert "invalid CEL" in worker.text()
        await produce(kafka_settings, [event("b2", 5, {"v": 12}, "d2", "b")])
        recs = await read_all(kafka_settings, tasks_topic, lambda rs: len(rs) >= 3, timeout=60, settle=1.0)
        assert ("hot", ("eb2",)) in {(t.trigger, tuple(t.cause.event_ids)) for t in _tasks(recs)}
        assert len(recs) == 3
    finally:
        rc = worker.stop()
    assert rc == 0
