"""An edge agent SIGKILLed during 4 MiB frame uploads to real S3: every frame arrives, each object intact."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

from reflexarc.brokers import MqttBroker
from reflexarc.config import MqttSettings
from reflexarc.datagc import list_objects, parse_duration, plan_gc, referenced_urls
from reflexarc.edge.claimcheck import read_array
from reflexarc.envelope import Envelope
from reflexarc.mqtt import MqttClient
from reflexarc.process import ManagedProcess
from reflexarc.s3store import S3Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N_FRAMES = 30


def _agent(cfg: Path, log: Path, store: S3Store) -> ManagedProcess:
    return ManagedProcess(
        "edge-agent",
        [sys.executable, "-m", "reflexarc", "edge", "run", str(cfg)],
        log,
        env={**os.environ, **store.env()},
        cwd=cfg.parent,
    ).start()


async def test_kill9_during_uploads_loses_no_frame(tmp_path: Path, mosquitto: MqttBroker, s3_env: S3Store) -> None:
    claims = f"{s3_env.url}/crash-{tmp_path.name}"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
site: bl1
device: det1
state_dir: state
delivery: broker  # no fog here: the PUBACK frees an event
mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, protocol: "5"}}
claim_check: {{url: "{claims}", threshold_bytes: 65536}}
sources:
  - {{type: frames, stream: frames, shape: [1024, 1024], dtype: uint32, rate_hz: 20, count: {N_FRAMES}, seed: 5}}
""")
    sink = MqttClient(
        MqttSettings(host="127.0.0.1", port=mosquitto.port),
        "crash-sink",
        clean_start=False,
        session_expiry=600,
        queue_size=0,
    )
    await sink.connect()
    await sink.subscribe([("rx/bl1/det1/data/#", 1)])
    events: list[Envelope] = []

    async def pump() -> None:
        while True:
            m = await sink.messages.get()
            events.append(Envelope.from_mqtt(m.payload, m.user_properties, m.content_type))

    pumping = asyncio.create_task(pump())

    async def until(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len({e.id for e in events}) < n:
            assert time.monotonic() < deadline, f"{len({e.id for e in events})} of {n} frames arrived"
            await asyncio.sleep(0.05)

    proc = _agent(cfg, tmp_path / "agent1.log", s3_env)
    try:
        await until(5, 60)
        proc.kill()  # SIGKILL: an upload is almost always in progress (each takes most of the frame period)
        at_kill = len({e.id for e in events})
        assert at_kill < N_FRAMES, "the kill came too late"
        proc = _agent(cfg, tmp_path / "agent2.log", s3_env)
        await until(N_FRAMES, 90)
    finally:
        proc.stop()
        pumping.cancel()
        await sink.disconnect()
    by_id = {e.id: e for e in events}
    seqs = sorted(e.data["seq"] for e in by_id.values())  # type: ignore[index]
    assert seqs == list(range(N_FRAMES)), seqs  # every frame the source produced, exactly once as an event
    for env in by_id.values():
        data = env.data
        assert isinstance(data, dict)
        array = await asyncio.to_thread(read_array, data["ref"])  # the object is complete (sha256 checked)
        assert hashlib.sha256(array.tobytes()).hexdigest() == data["sha256"]
    # A frame uploaded again after the restart overwrote the same object name: GC finds no orphan to remove.
    stored = list_objects(claims)
    refs = referenced_urls((e.data for e in by_id.values()), claims)
    assert {o.url for o in stored} == refs and len(refs) == N_FRAMES
    assert plan_gc(stored, refs, parse_duration("7d"), parse_duration("0s")) == []
    print(f"killed after {at_kill} frames; {len(events) - len(by_id)} QoS 1 duplicates")
