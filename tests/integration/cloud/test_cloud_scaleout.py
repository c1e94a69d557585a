"""Two trigger workers in one group split the partitions; one dies (SIGKILL) mid-window while events flow.

The survivor takes the dead worker's partitions and their window state (read
from the changelog up to a marker) and fires exactly as one worker would have:
the set of task ids sent equals the pure engine's on the same events, none
missed, none extra; a request sent twice (the events after the dead worker's
last commit are read again) carries the same id and the same arguments.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from cloud_harness import SITE_YAML, TOPICS, WorkerProcess, engine_tasks, event, header, prepare, produce, read_all

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.events import TaskRequest
from reflexarc.kafka import event_of, partition_count
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TRIGGERS = """
triggers:
  - name: every20
    on: bl1/+/frames
    window: {type: tumbling, events: 20, emit: close, aggregates: {s: {op: sum, of: event.data.v}}}
    when: "true"
    then: [{task: {app: fit, args: {s: agg.s}}}]
  - name: busy
    on: bl1/+/frames
    window: {type: tumbling, size: 4s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}
    when: agg.n >= 15
    cooldown: 5s
    then: [{task: {app: fit, args: {n: agg.n, s: agg.s}}}]
  - name: high
    on: bl1/+/frames
    window: {type: sliding, size: 2s, aggregates: {m: {op: mean, of: double(event.data.v)}}}
    when: agg.m > 5.2
    cooldown: 3s
    then: [{task: {app: fit, args: {m: agg.m}}}]
"""

DEVICES = [f"d{i}" for i in range(12)]
PER_DEVICE = 240
CHUNK = 120  # events per send while they flow


def events() -> list[Envelope]:
    """240 frames per device, 0.1 s apart, interleaved across 12 devices (all 4 partitions)."""
    return [
        event(f"{dev}-{i}", 0.1 * i, {"v": (i * 5 + int(dev[1:])) % 9}, dev, "frames")
        for i in range(PER_DEVICE)
        for dev in DEVICES
    ]


def _assigned_data_partitions(log: str) -> set[int]:
    """The data partitions of a worker's last assignment (from its log)."""
    lines = [ln for ln in log.splitlines() if " assigned " in ln]
    return {int(p) for p in re.findall(r"rx\.data/(\d+)", lines[-1])} if lines else set()


async def test_two_workers_one_killed_mid_window_fire_exactly_as_one(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers) + TRIGGERS)
    evs = events()

    expected = engine_tasks(path, evs)
    fired = {t.trigger for t in expected.values()}
    assert fired == {"every20", "busy", "high"} and len(expected) > 3 * len(DEVICES), len(expected)

    await prepare(kafka_settings)
    assert await partition_count(kafka_settings, TOPICS.kafka_data) == 4
    a = WorkerProcess(path, tmp_path / "a.log")
    b = WorkerProcess(path, tmp_path / "b.log")
    tasks_topic = [TOPICS.kafka_tasks("local")]
    try:
        await a.start()
        await b.start()
        # The group has rebalanced: each worker holds two of the four data partitions.
        assert await asyncio.to_thread(
            poll_until,
            lambda: len(_assigned_data_partitions(a.text())) == 2 == len(_assigned_data_partitions(b.text())),
            30,
        ), (a.text()[-1500:], b.text()[-1500:])
        assert _assigned_data_partitions(a.text()) | _assigned_data_partitions(b.text()) == {0, 1, 2, 3}

        async def flow() -> None:
            for k in range(0, len(evs), CHUNK):
                await produce(kafka_settings, evs[k : k + CHUNK])
                await asyncio.sleep(0.05)  # events keep arriving: the kill lands while they flow

        producer = asyncio.create_task(flow())
        # Kill as soon as both are firing, in the middle of windows (a third of the tasks out).
        await read_all(kafka_settings, tasks_topic, lambda rs: len(rs) >= len(expected) // 3, timeout=60)
        assert not producer.done(), "events stopped flowing before the kill: make CHUNK smaller"
        b.kill()
        await producer
        records = await read_all(
            kafka_settings, tasks_topic, lambda rs: len({r.key for r in rs}) >= len(expected), timeout=120, settle=3.0
        )
        # The survivor took all four partitions.
        assert _assigned_data_partitions(a.text()) == {0, 1, 2, 3}, a.text()[-2000:]
    finally:
        rc = a.stop()
        b.stop()
    assert rc == 0, a.text()[-3000:]
    got = [TaskRequest.from_envelope(event_of(r)) for r in records]
    ids = [t.task_id for t in got]
    missed = set(expected) - set(ids)
    extra = set(ids) - set(expected)
    print(
        f"scale-out: {len(expected)} expected tasks, {len(set(ids))} distinct sent, "
        f"{len(ids) - len(set(ids))} redelivered duplicates, {len(missed)} missed, {len(extra)} extra"
    )
    assert not missed, sorted(f"{expected[i].trigger}@{expected[i].cause.event_ids}" for i in missed)[:10]
    assert not extra, sorted(f"{t.trigger}@{t.cause.event_ids if t.cause else '?'}" for t in got if t.task_id in extra)[
        :10
    ]
    for t in got:  # a redelivered request is the same request
        assert json.dumps(t.args, sort_keys=True) == json.dumps(expected[t.task_id].args, sort_keys=True)
