"""`reflexarc data ls|gc` on a real SeaweedFS store and real Tansu: orphans found, referenced objects kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta

from reflexarc.brokers import KafkaBroker
from reflexarc.config import KafkaSettings
from reflexarc.datagc import list_objects, parse_duration, plan_gc
from reflexarc.envelope import Envelope
from reflexarc.events import EventType
from reflexarc.kafka import ensure_topics, make_producer, send_event
from reflexarc.objectstore import put_bytes
from reflexarc.s3store import S3Store
from reflexarc.topics import Topics


def _cli(*args: str, kafka: KafkaBroker) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "reflexarc", "data", *args],
        env={**os.environ, "RX_KAFKA_BOOTSTRAP": kafka.bootstrap_servers},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_gc_removes_orphans_only_and_dry_run_removes_nothing(s3_env: S3Store, tansu: KafkaBroker) -> None:
    root = f"{s3_env.url}/gc-test"
    kept = put_bytes(f"{root}/det/kept.npy", b"k" * 100)
    orphan = put_bytes(f"{root}/det/orphan.npy", b"o" * 200)  # as after a crash between upload and spool

    async def publish() -> None:
        t = Topics()
        settings = KafkaSettings(bootstrap_servers=tansu.bootstrap_servers)
        await ensure_topics(settings, [t.kafka_data])
        producer = make_producer(settings)
        await producer.start()
        try:
            env = Envelope.for_device(
                EventType.DATA, "bl1", "det1", {"seq": 1, "ref": kept.to_data()}, subject="frames"
            )
            await (await send_event(producer, t.kafka_data, env))
        finally:
            await producer.stop()

    asyncio.run(publish())
    listing = _cli("ls", root, "--kafka", kafka=tansu)
    assert f"{kept.url}  referenced" in listing and f"{orphan.url}  orphan" in listing
    dry = _cli("gc", root, "--grace", "0s", "--dry-run", kafka=tansu)
    assert f"would remove {orphan.url} (orphan, 200 bytes)" in dry and kept.url not in dry
    assert {o.url for o in list_objects(root)} == {kept.url, orphan.url}
    _cli("gc", root, "--grace", "0s", kafka=tansu)
    assert {o.url for o in list_objects(root)} == {kept.url}


def test_retention_expires_even_referenced_objects(s3_env: S3Store) -> None:
    ref = put_bytes(f"{s3_env.url}/gc-age/a.bin", b"a")
    objs = list_objects(f"{s3_env.url}/gc-age")
    assert [o.url for o in objs] == [ref.url]
    now = objs[0].modified + timedelta(days=8)
    plan = plan_gc(objs, {ref.url}, parse_duration("7d"), parse_duration("10m"), now)
    assert [(r.obj.url, r.reason) for r in plan] == [(ref.url, "expired")]
    assert plan_gc(objs, {ref.url}, parse_duration("7d"), parse_duration("10m"), objs[0].modified) == []
