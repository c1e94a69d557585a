"""4 MiB detector frames by reference, end to end: edge -> S3 + MQTT -> fog -> Kafka -> trigger -> site.

Real Mosquitto and Tansu (the supervisor's embedded brokers), a real SeaweedFS
S3 gateway, the four tier processes. The edge agent uploads each frame as an
.npy and spools an event carrying its reference; the trigger reads the
reference's metadata in CEL without downloading; the site stages each frame in
(checksum-verified) and computes statistics. Every frame's checksum must match
what the site read, and each frame must be read by exactly one task. Each
result (with a row profile, above the site's inline limit) goes back to the
store by reference, and ``on_result`` turns its metadata into a command that
reaches the edge's actuator.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.envelope import Envelope
from reflexarc.events import EventType, TaskRequest, TaskResult
from reflexarc.kafka import make_consumer
from reflexarc.objectstore import ObjectRef, read_bytes
from reflexarc.s3store import S3Store
from reflexarc.supervisor import PipelineConfig, Supervisor
from reflexarc.testing.poll import poll_until
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N_FRAMES = 24
RATE_HZ = 8  # 3 s of 4 MiB frames
SITE, DEVICE = "bl1", "det1"


def write_scenario(d: Path, claims_url: str, results_url: str) -> None:
    """Configs of the four tiers: frames by reference, a trigger on the reference, a staging app."""
    agent = {
        "site": SITE,
        "device": DEVICE,
        "sources": [
            {
                "type": "frames",
                "stream": "frames",
                "shape": [1024, 1024],
                "dtype": "uint32",
                "rate_hz": RATE_HZ,
                "count": N_FRAMES,
                "seed": 3,
            }
        ],
        "claim_check": {"url": claims_url, "threshold_bytes": 65536},
        "actuators": [
            {
                "name": "motor",
                "schema": {"type": "object", "properties": {"position": {"type": "number"}}, "required": ["position"]},
                "handler": {"python": "reflexarc.scenarios.beamline.motor:move"},
            }
        ],
    }
    fog = {"streams": [{"match": "frames", "schema": {"type": "object", "required": ["ref", "sha256"]}}]}
    triggers = {
        "sites": ["site.yaml"],
        "triggers": [
            {
                "name": "every_frame",
                "on": f"{SITE}/+/frames",
                # Metadata of the reference, read without downloading anything.
                "when": "event.data.ref.size > 4000000 && event.data.ref.shape[0] == 1024",
                "then": [
                    {
                        "task": {
                            "app": "frame_stats",
                            "site": "local",
                            "args": {"frame": "event.data.ref", "seq": "event.data.seq", "profile": "true"},
                        }
                    }
                ],
                # The result went by reference: its metadata (no download) becomes the command.
                "on_result": {
                    "commands": [
                        {"actuator": "motor", "args": {"position": "double(result.result.ref.size) / 10000.0"}}
                    ]
                },
            }
        ],
    }
    site = {
        "site": "local",
        "engine": {"kind": "local", "local": {"max_workers": 2}},
        # The row profile (~19 KB of JSON) is above this: results go to the store by reference.
        "results": {"inline_max_bytes": 16384, "store": results_url},
        "apps": {
            "frame_stats": {
                "function": "reflexarc.hpc_bridge.examples.frames:frame_stats",
                "refs": {"frame": {"stage": "download"}},
            }
        },
    }
    for name, doc in {"agent.yaml": agent, "fog.yaml": fog, "triggers.yaml": triggers, "site.yaml": site}.items():
        (d / name).write_text(yaml.safe_dump(doc, sort_keys=False))


def moves(log: Path) -> list[float]:
    """Positions the motor actuator executed."""
    if not log.exists():
        return []
    return [json.loads(line)["position"] for line in log.read_text().splitlines() if line.strip()]


async def read_all(sup: Supervisor, idle_s: float = 3.0) -> list[Envelope]:
    """Every record of the core topics and the site's task topic, from the start, until ``idle_s`` of silence."""
    t = Topics()
    consumer = make_consumer(sup.kafka_settings(), *t.kafka_core(), t.kafka_tasks("local"), group_id=None)
    await consumer.start()
    out: list[Envelope] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    quiet_since = time.monotonic()
                    out.append(Envelope.from_kafka(rec.value, rec.headers))
    finally:
        await consumer.stop()
    return out


async def results_seen(sup: Supervisor, want: int, timeout: float) -> None:
    """Wait until ``want`` distinct task results are on the results topic."""
    consumer = make_consumer(sup.kafka_settings(), Topics().kafka_results, group_id=None)
    await consumer.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + timeout
        while len(seen) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    seen.add(TaskResult.from_envelope(Envelope.from_kafka(rec.value, rec.headers)).task_id)
    finally:
        await consumer.stop()


def test_frames_by_reference_reach_the_site_each_read_once_with_matching_checksums(
    tmp_path: Path, s3_env: S3Store
) -> None:
    s3_store = s3_env  # the test reads the objects too: the keys are in its environment
    scenario = tmp_path / "scenario"
    scenario.mkdir()
    claims = f"{s3_store.url}/loop-{tmp_path.name}"
    write_scenario(scenario, claims, f"{s3_store.url}/results-{tmp_path.name}")
    motor_log = tmp_path / "motor.jsonl"
    cfg = PipelineConfig.model_validate(
        {
            "name": "frames-loop",
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
        extra_env={**s3_store.env(), "RX_MOTOR_LOG": str(motor_log)},
    )

    async def run() -> list[Envelope]:
        stop = asyncio.Event()
        supervising = asyncio.create_task(sup.run(stop))
        try:
            await results_seen(sup, N_FRAMES, 75)
            await asyncio.to_thread(poll_until, lambda: len(moves(motor_log)) >= N_FRAMES, 30)
        finally:
            stop.set()
            await asyncio.gather(supervising, return_exceptions=True)
        return await read_all(sup)

    try:
        sup.start()
        envelopes = asyncio.run(run())
    finally:
        logs = {c.spec.name: c.process.log_tail(30) for c in sup.children}
        sup.stop()
    context = "\n".join(f"--- {n}\n{t}" for n, t in logs.items())

    events: dict[str, dict[str, Any]] = {}
    requests: list[TaskRequest] = []
    results: list[TaskResult] = []
    for env in envelopes:
        if env.type == EventType.DATA:
            assert isinstance(env.data, dict)
            events[env.id] = env.data
        elif env.type == EventType.TASK_REQUEST:
            requests.append(TaskRequest.from_envelope(env))
        elif env.type == EventType.TASK_RESULT:
            results.append(TaskResult.from_envelope(env))
    assert len(events) == N_FRAMES, context
    for data in events.values():
        ref = data["ref"]
        assert ref["url"].startswith(claims) and ref["dtype"] == "uint32" and ref["shape"] == [1024, 1024]
        assert ref["size"] > 4 * 1024 * 1024 and len(ref["sha256"]) == 64
    # One task per frame, and each frame is read by exactly one task (no task ran twice).
    tasks = {r.task_id: r for r in requests}
    frame_of = {tid: (r.cause.event_ids if r.cause else []) for tid, r in tasks.items()}
    assert Counter(e for ids in frame_of.values() for e in ids) == Counter(events.keys()), context
    assert all(len(ids) == 1 for ids in frame_of.values())
    done = Counter(r.task_id for r in results)
    assert set(done) == set(tasks) and set(done.values()) == {1}, (done, context)
    for res in results:
        assert res.status == "done" and res.result is not None, (res.error, context)
        frame = events[frame_of[res.task_id][0]]
        # What the site read is the frame the edge produced: raw sha256 and array metadata.
        assert res.result["sha256"] == frame["sha256"], context
        assert res.result["shape"] == [1024, 1024] and res.result["dtype"] == "uint32"
        assert "/stage-in/frame/" in res.result["path"]
        # The large result went by reference (its profile not inline), with the metadata on_result used.
        assert res.result_ref == res.result["ref"]["url"] and "profile" not in res.result
        profile = json.loads(read_bytes(ObjectRef.from_data(res.result["ref"])))["profile"]
        assert len(profile) == 1024
    # Each result's command reached the actuator, once, with the position made from the reference's size.
    assert sorted(moves(motor_log)) == sorted(r.result["ref"]["size"] / 10000.0 for r in results), context  # type: ignore[index]
