"""The epics source end to end: a real caproto IOC -> edge agent -> Mosquitto -> fog bridge -> Tansu, counted.

The IOC runs in its own process on a private Channel Access port, loopback
only (``ca_env``); it logs every ramp update it posts with its timestamp, so
what reaches Kafka is compared with what the IOC really did.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.brokers import KafkaBroker, MqttBroker
from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.scenarios.epics.ioc import IocProcess, caput
from reflexarc.testing.kafka import KafkaTail
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
T = Topics()


def write_configs(d: Path, mqtt: MqttBroker, kafka: KafkaBroker, ioc: IocProcess) -> tuple[Path, Path]:
    """fog.yaml and agent.yaml: the agent monitors the IOC's ramp (not on connect) and motor readback."""
    broker = {"host": mqtt.host, "port": mqtt.port, "protocol": "5"}
    fog = {
        "mqtt": broker,
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
        "ingest": {"client_id": "fog-epics", "request_timeout_ms": 5000, "retry_backoff_ms": 200},
        "commands": {"enabled": False},
    }
    agent = {
        "site": "bl1",
        "device": "ioc1",
        "state_dir": str(d / "state"),
        "mqtt": broker,
        "publish": {"reconnect_min_s": 0.2, "reconnect_max_s": 2},
        "sources": [
            {
                "type": "epics",
                "stream": "ramp",
                "pvs": [
                    {"pv": ioc.pv("ramp"), "publish_on_connect": False},
                    {"pv": ioc.pv("mtr.RBV"), "stream": "motor"},
                ],
            }
        ],
    }
    (d / "fog.yaml").write_text(yaml.safe_dump(fog, sort_keys=False))
    (d / "agent.yaml").write_text(yaml.safe_dump(agent, sort_keys=False))
    return d / "fog.yaml", d / "agent.yaml"


def envelopes(records: list[Any]) -> list[Envelope]:
    """The Kafka records as envelopes, in partition order (one device: one partition)."""
    return [Envelope.from_kafka(r.value, r.headers) for r in records]


def by_stream(envs: list[Envelope], stream: str) -> list[Envelope]:
    """The envelopes of one stream."""
    return [e for e in envs if e.subject == stream]


def statuses(envs: list[Envelope], pv: str) -> list[str]:
    """The connection states published for one PV, in order."""
    return [e.data["state"] for e in by_stream(envs, "epics-status") if e.data["pv"] == pv]  # type: ignore[index]


def ioc_log(path: Path) -> list[dict[str, Any]]:
    """What the IOC posted: ``{"value", "ts_ns"}`` per ramp update."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def until(tail: KafkaTail, cond: Any, timeout: float, what: str) -> list[Envelope]:
    """Poll Kafka until ``cond(envelopes)`` holds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        await tail.poll(200)
        envs = envelopes(tail.records)
        if cond(envs):
            return envs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


async def test_pv_updates_reach_kafka_exactly_once_in_order_and_survive_an_ioc_restart(
    tmp_path: Path, mosquitto: MqttBroker, tansu: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "ramp.jsonl"
    ioc = IocProcess(tmp_path, log=str(log))
    for k, v in ioc.env.items():
        monkeypatch.setenv(k, v)
    fog_yaml, agent_yaml = write_configs(tmp_path, mosquitto, tansu, ioc)
    # caproto re-searches a lost PV with a backoff of up to 5 s; 1 s keeps the test short.
    ca = {**ioc.env, "CAPROTO_CLIENT_MAX_RETRY_SEARCHES_INTERVAL_SEC": "1"}
    fog = TierProcess("fog", fog_yaml, tmp_path / "fog.log")
    agent = TierProcess("edge", agent_yaml, tmp_path / "agent.log", env=ca)
    ramp, rbv = ioc.pv("ramp"), ioc.pv("mtr.RBV")
    try:
        ioc.start()
        await fog.start()
        await agent.start()
        async with KafkaTail(KafkaSettings(bootstrap_servers=tansu.bootstrap_servers), T.kafka_data) as tail:
            # Subscribed once the source says so (a status event), not after a guessed delay.
            await until(tail, lambda e: "connected" in statuses(e, ramp), 30, "the ramp PV to connect")

            # 500 updates at 100 Hz.
            await caput(ioc.pv("ramp:go"), 500)
            envs = await until(tail, lambda e: len(by_stream(e, "ramp")) >= 500, 60, "500 ramp updates")
            posted = ioc_log(log)
            assert len(posted) == 500
            got = by_stream(envs, "ramp")
            assert len(got) == 500 and len({e.id for e in got}) == 500, "each update exactly once"
            assert [e.data["value"] for e in got] == [p["value"] for p in posted], "in order"  # type: ignore[index]
            assert [e.data["ts_ns"] for e in got] == [p["ts_ns"] for p in posted], "the IOC's timestamps"  # type: ignore[index]
            assert all(
                e.time is not None and abs(e.time.timestamp() - p["ts_ns"] / 1e9) < 1e-5
                for e, p in zip(got, posted, strict=True)
            ), "event time is the IOC's time"
            first = got[0].data
            assert first["units"] == "n" and first["precision"] == 0  # type: ignore[index]
            # The ramp's alarm starts at 400: status and severity travel with each update.
            alarms = [(e.data["status"], e.data["severity"]) for e in got]  # type: ignore[index]
            assert alarms == [("NO_ALARM", "NO_ALARM")] * 399 + [("HIGH", "MINOR_ALARM")] * 101
            motor = by_stream(envs, "motor")
            assert motor and motor[0].data["units"] == "mm", "publish_on_connect: the readback's value on connect"  # type: ignore[index]

            # The IOC is stopped for 5 s and restarted on the same port.
            await asyncio.to_thread(ioc.stop)
            await until(tail, lambda e: statuses(e, ramp)[-1:] == ["disconnected"], 30, "a disconnect status")
            await asyncio.sleep(5)  # the outage itself
            await asyncio.to_thread(ioc.start)
            await until(tail, lambda e: statuses(e, ramp)[-1:] == ["connected"], 30, "a reconnect status")
            assert statuses(envelopes(tail.records), ramp) == ["connected", "disconnected", "connected"]
            assert len(by_stream(envelopes(tail.records), "ramp")) == 500, "publish_on_connect: false"

            # Updates resume: the restarted IOC's ramp counts from 1 again, with new timestamps.
            await caput(ioc.pv("ramp:go"), 50)
            envs = await until(tail, lambda e: len(by_stream(e, "ramp")) >= 550, 30, "updates after the restart")
            posted = ioc_log(log)
            got = by_stream(envs, "ramp")
            assert len(posted) == 550 and len(got) == 550 and len({e.id for e in got}) == 550
            assert [e.data["ts_ns"] for e in got] == [p["ts_ns"] for p in posted]  # type: ignore[index]
            assert [e.data["value"] for e in got[500:]] == [float(i) for i in range(1, 51)]  # type: ignore[index]
            # The readback's value came again with the reconnection (publish_on_connect: true).
            assert len(by_stream(envs, "motor")) >= 2 and statuses(envs, rbv)[-1] == "connected"
    finally:
        agent.stop()
        fog.stop()
        ioc.close()
