"""The worker's two hops are fast on a real Tansu: event -> task request, task result -> command.

With faust's fixed 1.5 s fetch wait, Tansu (which polls a multi-partition fetch
at 0, 750, 1125, ... ms) held each record 0-750 ms before the worker saw it: this
test then measured medians of ~520 ms (data hop) and ~560 ms (result hop). With
``worker.fetch_wait`` (10 ms by default; Tansu answers a fetch after a median of about a fifth of
the wait) both medians are a few ms.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest
from cloud_harness import SITE_YAML, TOPICS, WorkerProcess, event, header, prepare

from reflexarc.config import KafkaSettings
from reflexarc.events import Command, TaskRequest, TaskResult
from reflexarc.kafka import event_of, make_consumer, make_producer, send_event
from reflexarc.signing import generate_keypair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TRIGGERS = """
triggers:
  - name: thr
    on: bl1/+/counts
    when: event.data.value > 400
    then: [{task: {app: fit, args: {v: event.data.value}}}]
    on_result:
      when: result.result.peak > 0.0
      commands: [{actuator: motor, args: {position: result.result.peak}}]
"""

SAMPLES = 12
# Generous for a loaded 2-core machine; the 1.5 s fetch wait gives medians of 500 ms and more.
MEDIAN_LIMIT = 0.2


async def test_event_to_task_and_result_to_command_each_take_tens_of_ms(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    key_file, _ = generate_keypair(tmp_path)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers, key_file) + TRIGGERS)
    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    # Our own reader waits at most 5 ms per fetch so that it adds almost nothing.
    reader = make_consumer(
        kafka_settings,
        TOPICS.kafka_tasks("local"),
        TOPICS.kafka_commands,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=5,
    )
    producer = make_producer(kafka_settings, linger_ms=0)
    data_hop: list[float] = []
    result_hop: list[float] = []
    try:
        await worker.start()
        await reader.start()
        await producer.start()
        await reader.getmany(timeout_ms=500)  # settles the reader's "latest" positions first

        async def next_record(topic: str) -> object:
            while True:
                rec = await asyncio.wait_for(reader.getone(), 30)
                if rec.topic == topic:
                    return rec

        for i in range(SAMPLES + 1):
            # Spread the sends over the broker's poll cycle rather than in step with it.
            await asyncio.sleep(0.05 + 0.37 * (i % 4) / 3)
            t0 = time.perf_counter()
            await (
                await send_event(producer, TOPICS.kafka_data, event(f"lat{i}", i, {"value": 500 + i}, f"dev{i % 5}"))
            )
            rec = await next_record(TOPICS.kafka_tasks("local"))
            t_task = time.perf_counter() - t0
            task = TaskRequest.from_envelope(event_of(rec))
            assert task.args == {"v": 500 + i}

            await asyncio.sleep(0.05 + 0.29 * ((i + 2) % 4) / 3)
            result = TaskResult(
                task_id=task.task_id,
                app="fit",
                site="local",
                status="done",
                result={"peak": 1.0 + i},
                trigger="thr",
                cause=task.cause,
            )
            k, v, h = result.to_envelope().to_kafka()
            t0 = time.perf_counter()
            await (await producer.send(TOPICS.kafka_results, value=v, key=k, headers=h))
            rec = await next_record(TOPICS.kafka_commands)
            t_cmd = time.perf_counter() - t0
            cmd = Command.from_envelope(event_of(rec))
            assert (cmd.task_id, cmd.args) == (task.task_id, {"position": 1.0 + i})
            if i:  # the first loop also pays for metadata look-ups and connections
                data_hop.append(t_task)
                result_hop.append(t_cmd)
    finally:
        await producer.stop()
        await reader.stop()
        rc = worker.stop()
    assert rc == 0, worker.text()[-3000:]
    ms = {name: sorted(round(x * 1e3) for x in xs) for name, xs in (("data", data_hop), ("result", result_hop))}
    print(f"event -> task request, ms: {ms['data']}\ntask result -> command, ms: {ms['result']}")
    assert statistics.median(data_hop) < MEDIAN_LIMIT, ms
    assert statistics.median(result_hop) < MEDIAN_LIMIT, ms
