"""`reflexarc results subscribe` prints task results as JSON lines, from any Kafka cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskResult
from reflexarc.kafka import ensure_topics, make_producer, send_event
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration


async def publish_results(settings: KafkaSettings, results: list[TaskResult]) -> None:
    await ensure_topics(settings, [Topics().kafka_results])
    producer = make_producer(settings)
    await producer.start()
    try:
        for r in results:
            await (await send_event(producer, Topics().kafka_results, r.to_envelope(), key=r.task_id.encode()))
    finally:
        await producer.stop()


@pytest.mark.timeout(120)
def test_results_subscribe_prints_json_lines_filtered_by_app(kafka_settings: KafkaSettings) -> None:
    results = [
        TaskResult(task_id="t1", app="find_peak", site="local", status="done", result={"position": 1.5}),
        TaskResult(task_id="t2", app="denoise", site="local", status="failed", error="boom"),
        TaskResult(task_id="t3", app="find_peak", site="local", status="done", result={"position": -2.0}),
    ]
    asyncio.run(publish_results(kafka_settings, results))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reflexarc",
            "results",
            "subscribe",
            "--bootstrap",
            kafka_settings.bootstrap_servers,
            "--from-beginning",
            "--app",
            "find_peak",
            "--count",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    # Results are keyed by task id, so they come from several partitions in no global order.
    assert sorted((d["task_id"], d["status"], d["result"]["position"]) for d in lines) == [
        ("t1", "done", 1.5),
        ("t3", "done", -2.0),
    ]
