"""The reflex loop, end to end on real brokers, counted.

Real Mosquitto and real Tansu (started by the supervisor as embedded brokers),
the four tier processes (`python -m reflexarc <tier> run FILE`), an exact set
of replayed instrument events, and garbage published into the middle of the
stream. Every expected trigger must fire exactly once, every task must run
once, and every resulting command must reach the actuator exactly once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from reflexarc.envelope import DeadLetter, Envelope
from reflexarc.events import TaskResult
from reflexarc.kafka import make_consumer
from reflexarc.mqtt import MqttClient
from reflexarc.observer import LoopObserver
from reflexarc.scenarios.beamline.analysis import find_peak
from reflexarc.supervisor import PipelineConfig, Supervisor
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration

N_EVENTS = 240
SPIKES = {17: 820.0, 60: 450.5, 61: 455.0, 133: 990.0, 200: 401.0, 239: 777.0}
BOUNDARY = {90: 400.0, 91: 399.9}  # at the threshold: must NOT fire (strictly greater than)
SITE, DEVICE = "bl1", "det1"


def write_scenario(d: Path) -> None:
    """Configs for the four tiers, with a replay source of known events."""
    with open(d / "events.jsonl", "w") as f:
        for i in range(N_EVENTS):
            value = SPIKES.get(i, BOUNDARY.get(i, 100.0 + (i % 7)))
            f.write(json.dumps({"stream": "counts", "id": f"ev-{i:04d}", "data": {"value": value, "seq": i}}) + "\n")
    agent = {
        "site": SITE,
        "device": DEVICE,
        "sources": [{"type": "replay", "stream": "counts", "path": "events.jsonl", "rate_hz": 80}],
        "actuators": [
            {
                "name": "motor",
                "schema": {
                    "type": "object",
                    "properties": {"position": {"type": "number"}},
                    "required": ["position"],
                    "additionalProperties": False,
                },
                "handler": {"python": "reflexarc.scenarios.beamline.motor:move"},
            }
        ],
    }
    fog = {"streams": [{"match": "counts", "schema": {"type": "object", "required": ["value"]}}]}
    triggers = {
        "sites": ["site.yaml"],
        "worker": {"session_timeout": 6},
        "triggers": [
            {
                "name": "spike",
                "on": f"{SITE}/+/counts",
                "when": "event.data.value > 400.0",
                "then": [
                    {
                        "task": {
                            "app": "find_peak",
                            "site": "local",
                            "args": {"value": "double(event.data.value)", "frame": "event.data.seq"},
                        }
                    }
                ],
                "on_result": {"commands": [{"actuator": "motor", "args": {"position": "result.result.position"}}]},
            }
        ],
    }
    site = {
        "site": "local",
        "engine": {"kind": "local", "local": {"max_workers": 2}},
        "apps": {"find_peak": {"function": "reflexarc.scenarios.beamline.analysis:find_peak"}},
    }
    for name, doc in {"agent.yaml": agent, "fog.yaml": fog, "triggers.yaml": triggers, "site.yaml": site}.items():
        (d / name).write_text(yaml.safe_dump(doc, sort_keys=False))


GARBAGE = [b"\xff\xfe\x00 not json", b'{"value": 12', b"[1, 2, 3]", b'{"seq": 5}']


async def publish_garbage(sup: Supervisor) -> None:
    """A misbehaving device: bytes that are not events, and an event the stream schema refuses."""
    client = MqttClient(sup.mqtt_settings(), "test-garbage")
    await client.connect()
    topic = Topics().mqtt_data(SITE, DEVICE, "counts")
    for payload in GARBAGE:
        await client.publish(topic, payload, qos=1)
    await client.disconnect()


async def count_results(sup: Supervisor) -> Counter[str]:
    """Every record on rx.results, not deduplicated: a task that ran twice shows up twice."""
    t = Topics()
    consumer = make_consumer(sup.kafka_settings(), t.kafka_results, group_id=None)
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    counts[TaskResult.from_envelope(Envelope.from_kafka(rec.value, rec.headers)).task_id] += 1
    finally:
        await consumer.stop()
    return counts


async def dead_letters(sup: Supervisor) -> list[DeadLetter]:
    """Everything on the dead-letter topic."""
    consumer = make_consumer(sup.kafka_settings(), Topics().kafka_deadletter, group_id=None)
    await consumer.start()
    out: list[DeadLetter] = []
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(DeadLetter.from_kafka(r.value, r.headers) for r in records)
    finally:
        await consumer.stop()
    return out


@pytest.mark.timeout(240)
def test_loop_closes_exactly_once_per_trigger_on_real_brokers(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario"
    scenario.mkdir()
    write_scenario(scenario)
    motor_log = tmp_path / "motor.jsonl"
    cfg = PipelineConfig.model_validate(
        {
            "name": "loop-test",
            "processes": [
                {"tier": "site", "config": "site.yaml"},
                {"tier": "cloud", "config": "triggers.yaml"},
                {"tier": "fog", "config": "fog.yaml"},
                {"tier": "edge", "config": "agent.yaml"},
            ],
        }
    )
    sup = Supervisor(
        cfg,
        base_dir=scenario,
        run_dir=tmp_path / "run",
        mqtt_flavour="mosquitto",
        extra_env={"RX_MOTOR_LOG": str(motor_log)},
    )

    async def scenario_run() -> tuple[LoopObserver, Counter[str], list[DeadLetter]]:
        observer = LoopObserver(sup.kafka_settings(), Topics(), ["local"])
        stop = asyncio.Event()
        tasks = [asyncio.create_task(observer.run(stop)), asyncio.create_task(sup.run(stop))]
        stats = observer.stats
        garbage_sent = False
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline:
                if not garbage_sent and stats.events >= N_EVENTS // 3:
                    await publish_garbage(sup)
                    garbage_sent = True
                if stats.events >= N_EVENTS and stats.delivered() >= len(SPIKES) and not stats.running():
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # anything extra (a double task, a second command) would show up now
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        return observer, await count_results(sup), await dead_letters(sup)

    try:
        sup.start()
        observer, result_counts, dlq = asyncio.run(scenario_run())
    finally:
        logs = {c.spec.name: c.process.log_tail(30) for c in sup.children}
        sup.stop()
    stats = observer.stats
    context = "\n".join(f"--- {n}\n{t}" for n, t in logs.items())

    # Every instrument event arrived, the garbage did not count as events.
    assert stats.events == N_EVENTS, context
    # Exactly the expected triggers fired, one task each, for exactly the spike events.
    fired_on = sorted(e for req in stats.tasks.values() for e in (req.cause.event_ids if req.cause else []))
    assert fired_on == sorted(f"ev-{i:04d}" for i in SPIKES), context
    assert len(stats.tasks) == len(SPIKES)
    # Each task ran once: one result record per task on Kafka, each done.
    assert set(result_counts) == set(stats.tasks), context
    assert all(n == 1 for n in result_counts.values()), result_counts
    assert stats.done() == len(SPIKES)
    # Each resulting command reached the actuator, once: acked ok, and the motor moved once per spike.
    assert stats.delivered() == len(SPIKES) and stats.rejected() == 0, context
    assert not stats.open_loops()
    moves = [json.loads(line)["position"] for line in motor_log.read_text().splitlines()]
    expected = sorted(find_peak(v, i)["position"] for i, v in SPIKES.items())
    assert sorted(moves) == expected
    # The garbage went to the dead-letter topic with reasons and its original bytes; the loop went on.
    assert sorted(d.payload for d in dlq) == sorted(GARBAGE), [(d.error, d.payload) for d in dlq]
    assert all(d.error and d.origin == Topics().mqtt_data(SITE, DEVICE, "counts") for d in dlq)
    reasons = " | ".join(d.error for d in dlq)
    assert "JSON" in reasons and "value" in reasons  # unparsable bytes, and the schema violation named


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexarc", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_invalid_yaml_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("site: bl1\ndevice: det1\nsources:\n  - type: simulated\n    stream: counts\n    rate_hz: -5\n")
    proc = run_cli("edge", "run", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{bad}:" in proc.stderr and "rate_hz" in proc.stderr, proc.stderr
    bad.write_text("site: bl1\ndevice: [unclosed\n")
    proc = run_cli("edge", "run", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr, proc.stderr


def test_trigger_naming_an_unknown_app_is_rejected(tmp_path: Path) -> None:
    write_scenario(tmp_path)
    doc = yaml.safe_load((tmp_path / "triggers.yaml").read_text())
    doc["triggers"][0]["then"][0]["task"]["app"] = "find_peek"
    (tmp_path / "triggers.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("triggers", "validate", str(tmp_path / "triggers.yaml"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "find_peek" in out and "find_peak" in out and "spike" in out, out
    # The same file is refused by the worker itself, before it touches Kafka.
    proc = run_cli("cloud", "run", str(tmp_path / "triggers.yaml"), cwd=tmp_path)
    assert proc.returncode != 0 and "find_peek" in proc.stdout + proc.stderr
