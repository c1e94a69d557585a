"""Clients reach a secured cluster with the tiers' settings, and start where they are told.

The cluster is real Tansu behind a real TLS listener (reflexarc.testing.tlskafka):
a client that does not verify the certificate against the CA file, or does not
speak TLS at all, gets nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from reflexarc.config import KafkaSettings, TlsSettings
from reflexarc.events import TaskResult
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.kafka import ensure_topics, make_producer, send_event
from reflexarc.testing.tlskafka import TlsKafka, start_tls_kafka
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration

NS = "sec"


@pytest.fixture
def tls_kafka(tmp_path: Path) -> Iterator[TlsKafka]:
    """Tansu reachable only through TLS."""
    k = start_tls_kafka(tmp_path / "tls-kafka")
    yield k
    k.stop()


def tls_settings(k: TlsKafka) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=k.bootstrap_servers, security_protocol="SSL", tls=TlsSettings(ca_file=str(k.ca_file))
    )


def result(task_id: str) -> TaskResult:
    return TaskResult(task_id=task_id, app="find_peak", site="hpc", status="done", result={"position": 1.0})


async def publish(settings: KafkaSettings, results: list[TaskResult]) -> None:
    topic = Topics(NS).kafka_results
    # One partition: records come back in the order written, so a wrong start position shows.
    await ensure_topics(settings, [topic, Topics(NS).kafka_jobs], partitions=1)
    producer = make_producer(settings)
    await producer.start()
    try:
        for r in results:
            await (await send_event(producer, topic, r.to_envelope(), key=r.task_id.encode()))
    finally:
        await producer.stop()


def subscribe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexarc", "results", "subscribe", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.timeout(120)
def test_subscribe_with_a_config_file_reaches_a_tls_listener_and_starts_at_a_time(
    tls_kafka: TlsKafka, tmp_path: Path
) -> None:
    settings = tls_settings(tls_kafka)
    asyncio.run(publish(settings, [result("old-1"), result("old-2")]))
    time.sleep(0.05)  # record timestamps are milliseconds: keep "since" strictly after the old records
    since = datetime.now(UTC)
    time.sleep(0.05)
    asyncio.run(publish(settings, [result("new-1")]))

    config = tmp_path / "kafka.yaml"
    config.write_text(yaml.safe_dump({"namespace": NS, "kafka": settings.model_dump(mode="json", exclude_none=True)}))
    proc = subscribe("--config", str(config), "--from", since.isoformat(), "--count", "1")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["task_id"] for x in proc.stdout.splitlines()] == ["new-1"]

    # From the beginning, through the RX_* variables alone (what a tier's environment holds).
    env = {
        "RX_KAFKA_BOOTSTRAP": tls_kafka.bootstrap_servers,
        "RX_KAFKA_SECURITY_PROTOCOL": "SSL",
        "RX_KAFKA_CA_FILE": str(tls_kafka.ca_file),
        "RX_NAMESPACE": NS,
    }
    proc = subscribe("--from", "beginning", "--count", "3", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(x)["task_id"] for x in proc.stdout.splitlines()) == ["new-1", "old-1", "old-2"]


@pytest.mark.timeout(120)
def test_plaintext_client_on_the_tls_listener_fails_in_one_line(tls_kafka: TlsKafka) -> None:
    started = time.monotonic()
    proc = subscribe("--bootstrap", tls_kafka.bootstrap_servers, "--namespace", NS)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")], proc.stderr
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
def test_site_client_from_the_environment_starts_now(tls_kafka: TlsKafka, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", tls_kafka.bootstrap_servers)
    monkeypatch.setenv("RX_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("RX_KAFKA_CA_FILE", str(tls_kafka.ca_file))
    monkeypatch.setenv("RX_NAMESPACE", NS)
    settings = tls_settings(tls_kafka)

    async def main() -> tuple[set[str], set[str]]:
        await publish(settings, [result("before-1"), result("before-2")])
        async with SiteClient(start="now") as now_client, SiteClient() as all_client:
            assert now_client.topics.namespace == NS and now_client.settings.security_protocol == "SSL"
            await publish(settings, [result("after-1")])
            # Results alone (no job states are published here), so poll the clients' result maps.
            deadline = asyncio.get_running_loop().time() + 30
            while len(all_client.results) < 3 or "after-1" not in now_client.results:
                assert asyncio.get_running_loop().time() < deadline, (now_client.results, all_client.results)
                await asyncio.sleep(0.05)
            return set(now_client.results), set(all_client.results)

    seen_now, seen_all = asyncio.run(main())
    assert seen_now == {"after-1"}
    assert seen_all == {"before-1", "before-2", "after-1"}
