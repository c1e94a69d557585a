"""The trigger engine as a process on a real Kafka-protocol broker (Tansu).

One worker evaluates a file with every construct; for each construct one
device's events must fire and another's, just across the boundary, must not.
Results come back as signed commands; bad input becomes dead letters; SIGTERM
ends the process cleanly.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cloud_harness import (
    SITE_YAML,
    TOPICS,
    WorkerProcess,
    event,
    header,
    prepare,
    produce,
    produce_raw,
    read_all,
)

from reflexarc.cloud.engine import TriggerEngine
from reflexarc.cloud.validate import load_triggers
from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope
from reflexarc.events import Command, TaskRequest, TaskResult, stable_id
from reflexarc.kafka import event_of
from reflexarc.signing import generate_keypair, load_verify_keys, verify_envelope
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TRIGGERS = """
triggers:
  - name: thr
    on: bl1/+/counts
    filter: event.data.q >= 0.5
    when: event.data.value > 400
    then: [{task: {app: fit, args: {v: event.data.value}}}]
    on_result:
      when: result.result.peak > 0.0
      commands: [{actuator: motor, args: {position: result.result.peak}}]
  - name: cool
    on: bl1/+/pulse
    when: event.data.value > 0
    cooldown: 10s
    then: [{task: {app: fit}}]
  - name: tumble
    on: bl1/+/frames
    window: {type: tumbling, events: 3, emit: close}
    when: "true"
    then: [{task: {app: fit}}]
  - name: hop
    on: bl1/+/rate
    window:
      type: hopping
      size: 10s
      hop: 2s
      aggregates: {mean: {op: mean, of: double(event.data.value)}, n: {op: count}}
    when: agg.n >= 3 && agg.mean > 300.0
    cooldown: 1h
    then: [{task: {app: fit, args: {mean: agg.mean}}}]
  - name: drop
    on: bl1/+/intensity
    window: {type: sliding, size: 5s, aggregates: {peak: {op: max, of: double(event.data.i)}}}
    when: agg.peak < 10.0 && window.span >= 5.0
    cooldown: 1h
    then: [{command: {actuator: shutter, args: {position: "'closed'"}}}]
  - name: heat
    on: bl1/+/temperature
    window: {type: sliding, size: 60s, aggregates: {slope: {op: rate, of: double(event.data.k)}}}
    when: window.count >= 2 && agg.slope * 60.0 > 2.0
    cooldown: 1h
    then: [{task: {app: fit}}]
"""


def construct_events() -> list[Envelope]:
    """For each construct: device '<c>-yes' must fire once, '<c>-no' (at the boundary) never."""
    evs: list[Envelope] = []
    n = iter(range(10_000))
    # threshold + filter: 401 fires; 400 and a filtered-out 900 do not.
    evs += [
        event(next(n), 0, {"value": 401, "q": 0.5}, "thr-yes"),
        event(next(n), 0, {"value": 400, "q": 1.0}, "thr-no"),
        event(next(n), 1, {"value": 900, "q": 0.49}, "thr-no"),
    ]
    # cooldown 10 s: fires at 0 and 10 (two tasks) on yes; 0 and 9.999 (one task) on no.
    evs += [event(next(n), s, {"value": 1}, "cool-yes", "pulse") for s in (0, 10)]
    evs += [event(next(n), s, {"value": 1}, "cool-no", "pulse") for s in (0, 9.999)]
    # tumbling 3 events, emit on close: 3 fire, 2 do not.
    evs += [event(next(n), s, {}, "tumble-yes", "frames") for s in (0, 1, 2)]
    evs += [event(next(n), s, {}, "tumble-no", "frames") for s in (0, 1)]
    # hopping mean > 300 in any 10 s window.
    # Windows from 4 s on hold 300, 300, last: mean 301 fires, 300 does not.
    for dev, last in (("hop-yes", 303), ("hop-no", 300)):
        evs += [
            event(next(n), s, {"value": v}, dev, "rate") for s, v in ((0, 0), (3, 0), (8, 300), (11, 300), (13, last))
        ]
    # sliding 5 s drop: 5.0 s low fires, 4.9 s does not.
    for dev, last in (("drop-yes", 6.0), ("drop-no", 5.9)):
        evs += [
            event(next(n), s, {"i": v}, dev, "intensity")
            for s, v in ((0, 100), (1, 5), (2, 5), (3, 5), (4, 5), (last, 5))
        ]
    # rate: 2.5 K/min fires, 2.0 K/min does not.
    for dev, rise in (("heat-yes", 2.5), ("heat-no", 2.0)):
        evs += [event(next(n), 30.0 * i, {"k": 300.0 + rise * i / 2}, dev, "temperature") for i in range(3)]
    return evs


EXPECTED_TASKS = {
    ("thr", "thr-yes"): 1,
    ("cool", "cool-yes"): 2,
    ("cool", "cool-no"): 1,
    ("tumble", "tumble-yes"): 1,
    ("hop", "hop-yes"): 1,
    ("heat", "heat-yes"): 1,
}
EXPECTED_COMMANDS = {("drop", "drop-yes"): 1}


def _count(items: list[Any]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for it in items:
        k = (it.trigger, it.cause.device)
        out[k] = out.get(k, 0) + 1
    return out


async def test_worker_fires_each_construct_exactly_at_its_boundary(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    key_file, pub_file = generate_keypair(tmp_path / "keys")
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers, key_file, "pipeline: {metrics_port: 0}\n") + TRIGGERS)
    events = construct_events()

    # The pure engine over the same events predicts the same decisions (same code as the worker).
    engine = TriggerEngine(load_triggers(path))
    store: dict[str, Any] = {}
    predicted = []
    for pos, e in enumerate(events):
        out = engine.process(e, store, position=pos)
        store.update(out.states)
        predicted += out.firings
    assert _count([t for f in predicted for t in f.tasks]) == EXPECTED_TASKS
    assert _count([c for f in predicted for c in f.commands]) == EXPECTED_COMMANDS

    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    await worker.start()
    try:
        # Nothing but loopback: the metrics endpoint, and no faust web server.
        listening = worker.listening()
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening

        await produce(kafka_settings, events)
        n_tasks = sum(EXPECTED_TASKS.values())
        recs = await read_all(
            kafka_settings,
            [TOPICS.kafka_tasks("local"), TOPICS.kafka_commands],
            lambda rs: len(rs) >= n_tasks + 1,
            timeout=90,
            settle=2.0,
        )
        tasks = [TaskRequest.from_envelope(event_of(r)) for r in recs if r.topic == TOPICS.kafka_tasks("local")]
        cmds = [event_of(r) for r in recs if r.topic == TOPICS.kafka_commands]
        assert _count(tasks) == EXPECTED_TASKS, worker.text()[-3000:]
        assert {t.task_id for t in tasks} == {t.task_id for f in predicted for t in f.tasks}
        (thr,) = [t for t in tasks if t.trigger == "thr"]
        assert thr.task_id == stable_id("thr", thr.cause.event_ids[0]) and thr.args == {"v": 401}
        keys = load_verify_keys([pub_file])
        (drop_env,) = cmds
        verify_envelope(drop_env, keys)
        drop = Command.from_envelope(drop_env)
        assert (drop.trigger, drop.device, drop.actuator, drop.args) == (
            "drop",
            "drop-yes",
            "shutter",
            {"position": "closed"},
        )

        # Results -> signed commands; a result at the boundary (peak 0.0) gives none.
        for task_id, peak in ((thr.task_id, 2.5), ("other-task", 0.0)):
            res = TaskResult(
                task_id=task_id,
                app="fit",
                site="local",
                status="done",
                result={"peak": peak},
                trigger="thr",
                cause=thr.cause,
            )
            k, v, h = res.to_envelope().to_kafka()
            await produce_raw(kafka_settings, TOPICS.kafka_results, v, h, k)
        # Bad input of every kind: dead letters, and the worker carries on.
        gone = TaskResult(task_id="t-gone", app="fit", site="local", status="done", trigger="removed-trigger")
        k, v, h = gone.to_envelope().to_kafka()
        await produce_raw(kafka_settings, TOPICS.kafka_results, v, h, k)
        await produce_raw(kafka_settings, TOPICS.kafka_data, b"\x00not an event")
        await produce(kafka_settings, [event("no-value", 50, {"q": 1.0}, "thr-yes")])
        await produce(kafka_settings, [event("after", 60, {"value": 1000, "q": 1.0}, "thr-after")])

        recs = await read_all(
            kafka_settings,
            [TOPICS.kafka_commands, TOPICS.kafka_deadletter, TOPICS.kafka_tasks("local")],
            lambda rs: (
                sum(r.topic == TOPICS.kafka_deadletter for r in rs) >= 3
                and sum(r.topic == TOPICS.kafka_commands for r in rs) >= 2
                and any(r.topic != TOPICS.kafka_commands and b"thr-after" in (r.value or b"") for r in rs)
            ),
            timeout=60,
            settle=1.5,
        )
        motor_envs = [event_of(r) for r in recs if r.topic == TOPICS.kafka_commands]
        motor = [Command.from_envelope(e) for e in motor_envs if e.subject == "motor"]
        assert len(motor) == 1, worker.text()[-3000:]
        assert motor[0].command_id == stable_id(thr.task_id, "0") and motor[0].args == {"position": 2.5}
        assert (motor[0].site, motor[0].device, motor[0].task_id) == ("bl1", "thr-yes", thr.task_id)
        assert motor[0].deadline is not None and motor[0].deadline > drop_env.time - timedelta(seconds=1)
        for e in motor_envs:
            verify_envelope(e, keys)
        dls = [DeadLetter.from_kafka(r.value, r.headers) for r in recs if r.topic == TOPICS.kafka_deadletter]
        stages = sorted(d.stage for d in dls)
        assert stages == ["triggers.data", "triggers.eval.thr", "triggers.on_result"], [str(d) for d in dls]
        by_stage = {d.stage: d for d in dls}
        assert "removed-trigger" in by_stage["triggers.on_result"].error
        assert by_stage["triggers.data"].payload == b"\x00not an event"
        assert "value" in by_stage["triggers.eval.thr"].error
        assert json.loads(by_stage["triggers.eval.thr"].payload)["q"] == 1.0
        after = [TaskRequest.from_envelope(event_of(r)) for r in recs if r.topic == TOPICS.kafka_tasks("local")]
        assert any(t.cause.device == "thr-after" for t in after)
    finally:
        rc = worker.stop()
    assert rc == 0, worker.text()[-3000:]
    assert "Traceback" not in worker.text()


async def test_worker_refuses_to_send_unsigned_commands(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(header(kafka_settings.bootstrap_servers) + TRIGGERS)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.proc.start()
    assert worker.proc.proc is not None
    rc = worker.proc.proc.wait(60)
    assert rc == 2 and "must be signed" in worker.text() and "RX_SIGNING_KEY" in worker.text()


async def test_sigterm_while_kafka_vanished_during_start_up_ends_the_worker(
    tmp_path: Path, tansu: Any, kafka_settings: KafkaSettings
) -> None:
    """A worker still joining its group when the broker dies must not linger after SIGTERM."""
    (tmp_path / "site.yaml").write_text(SITE_YAML)
    path = tmp_path / "triggers.yaml"
    path.write_text(
        header(kafka_settings.bootstrap_servers) + "triggers:\n"
        "  - {name: t, on: bl1/+/counts, when: 'true', then: [{task: {app: fit}}]}\n"
    )
    await prepare(kafka_settings)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.proc.start()
    log = tmp_path / "worker.log"
    # The group join is under way (it takes seconds on Tansu) when the broker goes.
    # (the changelog is created right before faust's start, which joins the group)
    assert poll_until(lambda: "trigger-state-changelog" in log.read_text(errors="replace"), 30), log.read_text()
    tansu.process.kill()
    t0 = time.monotonic()
    rc = worker.stop(grace=90)
    took = time.monotonic() - t0
    assert not (tmp_path / "worker.ready").exists()
    assert rc is not None and rc != -9, f"the worker had to be killed:\n{worker.proc.log_tail()}"
    assert took < 45, f"took {took:.0f} s to stop"
