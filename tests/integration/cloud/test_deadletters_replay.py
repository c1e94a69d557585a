"""``reflexarc deadletters``: a dead letter replayed after its cause is fixed is processed once (real Tansu).

A trigger reads ``event.data.value``; one device sends ``val`` instead, so its
event fails the trigger's evaluation and is dead-lettered with the record's
headers. The trigger file is fixed (the worker reloads it), the letter is
replayed through the CLI, and the worker makes exactly one task of it.
Replaying it again (by stage) gives the same task id, since the replay keeps
the CloudEvent id: the site, which deduplicates task ids, runs it once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from cloud_harness import SITE_YAML, TOPICS, WorkerProcess, event, header, prepare, produce, read_all

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.kafka import event_of
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BROKEN = """triggers:
  - name: thr
    on: bl1/+/counts
    when: event.data.value > 400
    then: [{task: {app: fit, args: {v: event.data.value}}}]
"""
FIXED = """triggers:
  - name: thr
    on: bl1/+/counts
    when: "(has(event.data.value) ? event.data.value : event.data.val) > 400"
    then: [{task: {app: fit, args: {v: "has(event.data.value) ? event.data.value : event.data.val"}}}]
"""


async def cli(bootstrap: str, *args: str) -> str:
    """``reflexarc deadletters ARGS`` as a separate process; its stdout (it must exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reflexarc",
        "deadletters",
        *args,
        "--bootstrap",
        bootstrap,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def tasks_of(records: list[object]) -> list[TaskRequest]:
    return [TaskRequest.from_envelope(event_of(r)) for r in records if r.topic == TOPICS.kafka_tasks("local")]


async def test_a_replayed_dead_letter_is_processed_once_after_its_cause_is_fixed(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    bootstrap = kafka_settings.bootstrap_servers
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(bootstrap) + BROKEN)
    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    await worker.start()
    try:
        await produce(kafka_settings, [event("ok", 0, {"value": 500}, "d1"), event("renamed", 1, {"val": 700}, "d2")])
        recs = await read_all(
            kafka_settings,
            [TOPICS.kafka_deadletter, TOPICS.kafka_tasks("local")],
            lambda rs: any(r.topic == TOPICS.kafka_deadletter for r in rs) and bool(tasks_of(rs)),
            timeout=60,
        )
        assert [(t.cause.device, t.args) for t in tasks_of(recs)] == [("d1", {"v": 500})]

        (letter,) = [json.loads(line) for line in (await cli(bootstrap, "list", "--json")).splitlines()]
        assert letter["stage"] == "triggers.eval.thr" and letter["replayable"], letter
        (shown,) = [json.loads(await cli(bootstrap, "show", letter["id"]))]
        headers = dict(shown["headers"])
        assert headers["ce_id"] == "erenamed" and headers["ce_device"] == "d2"  # the record as the fog wrote it
        assert shown["topic"] == TOPICS.kafka_data and shown["key"] == "bl1/d2"

        # Fix the cause: the worker reloads its trigger file.
        path.write_text(header(bootstrap) + FIXED)
        assert await asyncio.to_thread(poll_until, lambda: "reloaded" in worker.text(), 30), worker.text()[-2000:]

        replayed = await cli(bootstrap, "replay", letter["id"])
        assert replayed.startswith(f"replayed {letter['id']} (triggers.eval.thr) -> {TOPICS.kafka_data}/"), replayed
        # A later event of the same device (same key, same partition, processed in order) marks the end.
        await produce(kafka_settings, [event("after", 2, {"value": 900}, "d2")])
        recs = await read_all(
            kafka_settings,
            [TOPICS.kafka_deadletter, TOPICS.kafka_tasks("local")],
            lambda rs: any(t.args == {"v": 900} for t in tasks_of(rs)),
            timeout=60,
        )
        tasks = tasks_of(recs)
        assert sorted((t.cause.device, t.args["v"]) for t in tasks) == [("d1", 500), ("d2", 700), ("d2", 900)]
        (renamed,) = [t for t in tasks if t.args["v"] == 700]
        assert renamed.cause.event_ids == ["erenamed"]
        assert sum(r.topic == TOPICS.kafka_deadletter for r in recs) == 1  # nothing dead-lettered again

        # Replayed again: the same event id, so the same task id (the site takes a task id once).
        await cli(bootstrap, "replay", "--stage", "triggers.eval.*")
        await produce(kafka_settings, [event("after2", 3, {"value": 901}, "d2")])
        recs = await read_all(
            kafka_settings,
            [TOPICS.kafka_tasks("local")],
            lambda rs: any(t.args == {"v": 901} for t in tasks_of(rs)),
            timeout=60,
        )
        again = [t for t in tasks_of(recs) if t.args["v"] == 700]
        assert len(again) == 2 and {t.task_id for t in again} == {renamed.task_id}
    finally:
        rc = worker.stop()
    assert rc == 0, worker.text()[-3000:]
