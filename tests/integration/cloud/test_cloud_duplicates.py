"""The trigger worker on a real Tansu fires exactly once per window when every event reaches Kafka twice.

A fog bridge that restarts (SIGKILL) forgets which ids it forwarded, and MQTT
redelivers what it had not acknowledged: the same events land in the data
topic again, at new offsets. The worker must send exactly the task requests of
the pure engine run over the events delivered once: same ids, same arguments,
none extra.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from cloud_harness import SITE_YAML, TOPICS, WorkerProcess, engine_tasks, event, header, prepare, produce, read_all

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.events import TaskRequest
from reflexarc.kafka import event_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TRIGGERS = """
triggers:
  - name: count3
    on: bl1/+/counts
    window: {type: tumbling, events: 3, emit: close, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}
    when: "true"
    then: [{task: {app: fit, args: {n: agg.n, s: agg.s}}}]
  - name: sum2s
    on: bl1/+/counts
    window: {type: tumbling, size: 2s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}
    when: agg.s >= 20
    cooldown: 1s
    then: [{task: {app: fit, args: {n: agg.n, s: agg.s}}}]
  - name: slide
    on: bl1/+/counts
    window: {type: sliding, events: 5, aggregates: {m: {op: max, of: event.data.v}}}
    when: agg.m >= 9
    then: [{task: {app: fit, args: {m: agg.m, count: window.count}}}]
"""

DEVICES = ["d0", "d1", "d2", "d3"]
PER_DEVICE = 45
CHUNK = 7


def once() -> list[Envelope]:
    """45 events per device, 0.3 s apart, interleaved across devices."""
    return [
        event(f"{dev}-{i}", 0.3 * i, {"v": (i * 7 + len(dev)) % 11}, dev) for i in range(PER_DEVICE) for dev in DEVICES
    ]


def redelivered(events: list[Envelope]) -> list[Envelope]:
    """Each chunk of events, then the same chunk again: what a restarting fog puts in Kafka."""
    out: list[Envelope] = []
    for k in range(0, len(events), CHUNK):
        out += events[k : k + CHUNK] * 2
    return out


def _key(t: TaskRequest) -> tuple[str, str]:
    return t.task_id, json.dumps(t.args, sort_keys=True)


async def test_every_event_twice_fires_exactly_as_every_event_once(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers, extra="pipeline: {metrics_port: 0}\n") + TRIGGERS)
    events = once()

    tasks = engine_tasks(path, events)
    expected = Counter(_key(t) for t in tasks.values())
    per_trigger = Counter(t.trigger for t in tasks.values())
    # Every trigger fires several times on every device: a shifted window would show.
    assert min(per_trigger[t] for t in ("count3", "sum2s", "slide")) >= 4 * len(DEVICES), per_trigger

    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    await worker.start()
    try:
        await produce(kafka_settings, redelivered(events))
        records = await read_all(
            kafka_settings, [TOPICS.kafka_tasks("local")], lambda rs: len(rs) >= len(expected), timeout=90, settle=2.0
        )
        # Every copy was counted as one (each copy follows its original within a few events).
        metrics = _metrics(worker.text())
    finally:
        rc = worker.stop()
    assert rc == 0, worker.text()[-3000:]
    got = Counter(_key(TaskRequest.from_envelope(event_of(r))) for r in records)
    missed = expected - got
    extra = got - expected
    print(
        f"{len(events)} events sent twice: {len(expected)} expected tasks, {sum(got.values())} sent, "
        f"{len(missed)} missed, {len(extra)} extra"
    )
    assert not missed, sorted(missed)[:5]
    assert not extra, sorted(extra)[:5]
    assert metrics.get("rx_triggers_duplicates_total") == len(events), metrics
    assert metrics.get("rx_triggers_id_conflicts_total") == 0.0, metrics


def _metrics(log: str) -> dict[str, float]:
    """The worker's Prometheus counters (its endpoint's port is in its log)."""
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log)
    assert match, log[-2000:]
    text = urllib.request.urlopen(match.group(1), timeout=5).read().decode()
    return {name: float(value) for name, value in re.findall(r"^(rx_triggers_\w+) ([0-9.e+-]+)$", text, re.M)}
