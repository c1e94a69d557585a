"""Nothing lost on a facility's own broker: reflexarc edge agents, a fog bridge and Kafka, counted.

The broker is a real Mosquitto at its packaged queue limits (1000 queued
messages per session, 20 in flight) and without persistence, as a facility
runs it: it PUBACKs a device's event and may drop it later, when the fog's
session queue overflows or when the broker itself restarts. The edge agents
(``delivery: pipeline``, the default) free an event only on the fog's receipt,
sent after Kafka acknowledged it, so every event the sources produced must
reach Kafka whatever the broker dropped. Each agent's simulated source
produces a known set of ids, so loss is counted exactly. (Per-device order
is not asserted here: an event the broker dropped is re-sent after later
ones got through. The fog keeps order for what it receives; see the fog's
Kafka-outage test.)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.brokers import KafkaBroker, MqttBroker
from reflexarc.config import KafkaSettings
from reflexarc.events import stable_id
from reflexarc.testing.kafka import KafkaTail, ids_of
from reflexarc.testing.poll import poll_until
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
T = Topics()
SITE = "bl1"
STREAM = "counts"


def _mqtt(broker: MqttBroker) -> dict[str, Any]:
    return {"host": broker.host, "port": broker.port, "protocol": "5"}


def write_fog(d: Path, mqtt: MqttBroker, kafka: KafkaBroker) -> Path:
    """fog.yaml: defaults (receipts and the disk buffer on), commands off."""
    doc = {
        "mqtt": _mqtt(mqtt),
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
        "ingest": {"client_id": "fog-1", "request_timeout_ms": 5000, "retry_backoff_ms": 200},
        "commands": {"enabled": False},
    }
    path = d / "fog.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_agent(d: Path, device: str, mqtt: MqttBroker, rate_hz: float, count: int) -> Path:
    """agent.yaml of one device whose simulated source produces ``count`` events at ``rate_hz``."""
    doc = {
        "site": SITE,
        "device": device,
        "state_dir": str(d / f"{device}-state"),
        "mqtt": _mqtt(mqtt),
        "publish": {"reconnect_min_s": 0.2, "reconnect_max_s": 2},
        "sources": [{"type": "simulated", "stream": STREAM, "rate_hz": rate_hz, "count": count}],
    }
    path = d / f"{device}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expected_ids(devices: list[str], count: int) -> set[str]:
    """The ids the simulated sources give their events (stable: site, device, stream, n)."""
    return {stable_id(SITE, dev, STREAM, str(n)) for dev in devices for n in range(count)}


def spool_status(d: Path, device: str) -> dict[str, Any]:
    """The agent's status.json (written every second)."""
    try:
        return json.loads((d / f"{device}-state" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


async def wait_all_in_kafka(tail: KafkaTail, want: set[str], timeout: float) -> list[str]:
    """Poll the data topic until every wanted id is there (or the timeout); return every id read."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    done = 0
    while time.monotonic() < deadline:
        await tail.poll(200)
        seen.update(ids_of(tail.records[done:]))
        done = len(tail.records)
        if want <= seen:
            break
    return ids_of(tail.records)


async def run_outage(
    tmp_path: Path,
    mqtt: MqttBroker,
    kafka: KafkaBroker,
    *,
    count: int,
    rate_hz: float,
    outage: Any,
    before: int,
) -> tuple[set[str], list[str], list[Any]]:
    """Start fog + two agents, call ``outage(fog)`` once ``before`` events are in Kafka, count the rest."""
    devices = ["det1", "det2"]
    fog = TierProcess("fog", write_fog(tmp_path, mqtt, kafka), tmp_path / "fog.log")
    agents = [
        TierProcess("edge", write_agent(tmp_path, dev, mqtt, rate_hz, count), tmp_path / f"{dev}.log")
        for dev in devices
    ]
    try:
        await fog.start()
        for a in agents:
            await a.start()
        want = expected_ids(devices, count)
        async with KafkaTail(KafkaSettings(bootstrap_servers=kafka.bootstrap_servers), T.kafka_data) as tail:
            deadline = time.monotonic() + 60
            while await tail.poll(100) < before and time.monotonic() < deadline:
                pass
            assert len(tail.records) >= before, "events never reached Kafka:\n" + fog.text()[-3000:]
            await outage(fog)
            ids = await wait_all_in_kafka(tail, want, timeout=180)
            records = list(tail.records)
        # Every agent's spool ends empty: everything was confirmed, nothing is left to resend.
        for dev in devices:
            ok = await asyncio.to_thread(
                poll_until, lambda dev=dev: spool_status(tmp_path, dev).get("spool", {}).get("depth") == 0, 30
            )
            assert ok, f"{dev}: spool not empty: {spool_status(tmp_path, dev).get('spool')}"
        return want, ids, records
    finally:
        for a in agents:
            a.stop()
        fog.stop()


def report(want: set[str], ids: list[str], records: list[Any]) -> tuple[set[str], int]:
    """Missing ids and the number of duplicates in Kafka, printed for the log."""
    missing = want - set(ids)
    dups = sum(c - 1 for c in Counter(i for i in ids if i in want).values())
    print(f"{len(want)} produced, {len(set(ids) & want)} distinct in Kafka, {len(missing)} lost, {dups} duplicates")
    return missing, dups


async def test_fog_killed_for_30s_loses_nothing_on_a_default_broker(
    tmp_path: Path, mosquitto_defaults: MqttBroker, tansu: KafkaBroker
) -> None:
    """All fog bridges SIGKILLed for 30 s while 2 edge agents publish 500 events/s each: 0 lost."""
    rate, outage_s = 500.0, 30.0

    async def outage(fog: TierProcess) -> None:
        fog.kill()
        await asyncio.sleep(outage_s)  # the outage itself: the agents keep producing meanwhile
        await fog.start()

    # Enough events that the sources are still producing well after the fog is back.
    count = int(rate * (outage_s + 15))
    want, ids, records = await run_outage(
        tmp_path, mosquitto_defaults, tansu, count=count, rate_hz=rate, outage=outage, before=2000
    )
    missing, _ = report(want, ids, records)
    assert not missing, f"{len(missing)} of {len(want)} events lost, e.g. {sorted(missing)[:3]}"


async def test_broker_killed_and_restarted_without_persistence_loses_nothing(
    tmp_path: Path, mosquitto_defaults: MqttBroker, tansu: KafkaBroker
) -> None:
    """The broker SIGKILLed and restarted without persistence mid-stream: every session is gone: 0 lost."""
    rate = 500.0

    async def outage(_fog: TierProcess) -> None:
        mosquitto_defaults.process.kill()
        await asyncio.sleep(3.0)  # the outage itself
        await asyncio.to_thread(mosquitto_defaults.restart)

    count = int(rate * 20)
    want, ids, records = await run_outage(
        tmp_path, mosquitto_defaults, tansu, count=count, rate_hz=rate, outage=outage, before=2000
    )
    missing, _ = report(want, ids, records)
    assert not missing, f"{len(missing)} of {len(want)} events lost, e.g. {sorted(missing)[:3]}"


TRIGGERS = {
    "sites": ["site.yaml"],
    "worker": {"session_timeout": 6},
    "triggers": [
        {
            # A count window: every 3 events of a device, their count and sum.
            "name": "count3",
            "on": f"{SITE}/+/{STREAM}",
            "window": {
                "type": "tumbling",
                "events": 3,
                "emit": "close",
                "aggregates": {"n": {"op": "count"}, "s": {"op": "sum", "of": "double(event.data.value)"}},
            },
            "when": "agg.n == 3",
            "then": [{"task": {"app": "fit", "site": "local", "args": {"n": "agg.n", "s": "agg.s"}}}],
        },
        {
            # A sum window: the last 7 events of a device; fires whenever their sum is high.
            "name": "sum7",
            "on": f"{SITE}/+/{STREAM}",
            "window": {
                "type": "sliding",
                "events": 7,
                "aggregates": {"s": {"op": "sum", "of": "double(event.data.value)"}},
            },
            "when": "agg.s > 55.0",
            "then": [{"task": {"app": "fit", "site": "local", "args": {"s": "agg.s"}}}],
        },
    ],
}
SITE_YAML = {
    "site": "local",
    "engine": {"kind": "local", "local": {"max_workers": 1}},
    "apps": {"fit": {"function": "reflexarc.scenarios.beamline.analysis:find_peak"}},
}


def task_set(lines: list[dict[str, Any]]) -> dict[str, str]:
    """task id -> its arguments (canonical JSON), from dry-run lines or task requests."""
    return {t["task_id"]: json.dumps(t["args"], sort_keys=True) for t in lines}


async def read_tasks(kafka: KafkaSettings, want: int, timeout: float) -> list[dict[str, Any]]:
    """Every task request on rx.tasks.local (all records, duplicates included) once ``want`` distinct arrived."""
    async with KafkaTail(kafka, T.kafka_tasks("local")) as tail:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len({dict(r.headers)["ce_id"] for r in tail.records}) < want:
            await tail.poll(200)
        await tail.poll(1000)  # anything extra (a task from a shifted window) would show up now
        return [json.loads(r.value) for r in tail.records]


async def test_fog_killed_twice_triggers_fire_exactly_as_on_events_delivered_once(
    tmp_path: Path, mosquitto_defaults: MqttBroker, tansu: KafkaBroker
) -> None:
    """Redeliveries after fog crashes never shift a window: the worker's tasks equal the pure engine's."""
    n = 3000
    events = [{"stream": STREAM, "id": f"ev-{i:05d}", "data": {"value": float(i % 13), "seq": i}} for i in range(n)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    # Count windows do not read event times; the dry run wants one per event all the same.
    (tmp_path / "expected.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "site": SITE,
                    "device": "det1",
                    "stream": STREAM,
                    "id": e["id"],
                    "data": e["data"],
                    "time": f"2026-12-01T00:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
                }
            )
            + "\n"
            for i, e in enumerate(events)
        )
    )
    (tmp_path / "triggers.yaml").write_text(yaml.safe_dump(TRIGGERS, sort_keys=False))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(SITE_YAML, sort_keys=False))
    agent = {
        "site": SITE,
        "device": "det1",
        "state_dir": str(tmp_path / "det1-state"),
        "mqtt": _mqtt(mosquitto_defaults),
        "publish": {"reconnect_min_s": 0.2, "reconnect_max_s": 2},
        "sources": [{"type": "replay", "stream": STREAM, "path": "events.jsonl", "rate_hz": 300}],
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(agent, sort_keys=False))

    # The pure engine on the events, each delivered once.
    dry = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "reflexarc",
            "triggers",
            "test",
            str(tmp_path / "triggers.yaml"),
            "--events",
            str(tmp_path / "expected.jsonl"),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    firings = [json.loads(ln) for ln in dry.stdout.splitlines() if ln.startswith("{")]
    expected = task_set([t for f in firings for t in f["tasks"]])
    assert len(expected) > 500, (dry.returncode, dry.stdout[-2000:], dry.stderr[-2000:])

    kafka = KafkaSettings(bootstrap_servers=tansu.bootstrap_servers)
    env = {"RX_KAFKA_BOOTSTRAP": tansu.bootstrap_servers}
    fog = TierProcess("fog", write_fog(tmp_path, mosquitto_defaults, tansu), tmp_path / "fog.log")
    cloud = TierProcess("cloud", tmp_path / "triggers.yaml", tmp_path / "cloud.log", env=env)
    edge = TierProcess("edge", tmp_path / "agent.yaml", tmp_path / "edge.log")
    try:
        await fog.start()
        await cloud.start(timeout=120)
        await edge.start()
        async with KafkaTail(kafka, T.kafka_data) as tail:
            for third in (1, 2):
                while await tail.poll(50) < third * n // 3:
                    pass
                fog.kill()  # in-flight messages come again from the broker, and the agent re-sends
                await fog.start()
            want = {e["id"] for e in events}
            ids = await wait_all_in_kafka(tail, want, timeout=120)
        dups = sum(c - 1 for c in Counter(ids).values())
        print(f"{dups} duplicates reached Kafka")
        assert want <= set(ids), f"{len(want - set(ids))} events lost"
        got_all = await read_tasks(kafka, len(expected), timeout=120)
    finally:
        edge.stop()
        cloud.stop()
        fog.stop()
    got = task_set(got_all)
    assert set(got) == set(expected), (
        f"{len(set(got) - set(expected))} task ids the pure engine does not have, "
        f"{len(set(expected) - set(got))} missing"
    )
    assert got == expected, "the same task ids with other arguments"
    # A task id is sent once, or again with the same arguments (a redelivery after a crash): never two versions.
    assert all(json.dumps(t["args"], sort_keys=True) == expected[t["task_id"]] for t in got_all)
