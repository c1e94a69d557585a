"""The trigger engine's faust transport: the fetch wait is ``worker.fetch_wait``, and a flush drains everything."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from faust.transport.producer import ProducerBuffer
from mode.utils.queues import FlowControlEvent, FlowControlQueue
from pydantic import ValidationError

from reflexarc.cloud import transport
from reflexarc.cloud.model import WorkerSettings
from reflexarc.cloud.validate import load_triggers
from reflexarc.cloud.worker import TriggerWorker
from reflexarc.config import KafkaSettings


def _app() -> Any:
    # Nothing connects: the broker address is never dialled by these tests.
    return faust.App("rx-unit", broker="kafka://127.0.0.1:9", web_enabled=False, autodiscover=False, store="memory://")


async def _worker_consumer(app: Any) -> AIOKafkaConsumer:
    """The aiokafka consumer faust's consumer thread would start for this app."""
    return app.consumer._thread._create_worker_consumer(app.transport)


async def test_installed_transport_builds_consumers_with_the_configured_wait() -> None:
    app = _app()
    transport.install(app, 0.02)
    consumer = await _worker_consumer(app)
    try:
        assert consumer._fetch_max_wait_ms == 20
    finally:
        await consumer.stop()


async def test_faust_alone_waits_1_5_s_which_is_what_the_transport_replaces() -> None:
    # Guards the premise: if faust ever makes this configurable, our consumer can go.
    app = _app()
    consumer = await _worker_consumer(app)
    try:
        assert consumer._fetch_max_wait_ms == 1500
    finally:
        await consumer.stop()


def test_install_once_the_default_transport_is_in_use_is_refused() -> None:
    app = _app()
    assert app.consumer is not None  # builds the consumer on faust's own transport
    with pytest.raises(RuntimeError, match="right after faust"):
        transport.install(app, 0.05)


async def test_set_fetch_wait_refuses_a_started_or_foreign_consumer() -> None:
    with pytest.raises(RuntimeError, match="aiokafka version"):
        transport.set_fetch_wait(object(), 50)

    class Started:
        _fetch_max_wait_ms = 500
        _fetcher = object()

    with pytest.raises(RuntimeError, match="before the consumer starts"):
        transport.set_fetch_wait(Started(), 50)


def test_fetch_wait_setting_defaults_parses_and_bounds() -> None:
    assert WorkerSettings().fetch_wait == 0.05
    assert WorkerSettings(fetch_wait="20ms").fetch_wait == pytest.approx(0.02)
    for bad in ("1ms", "10s", 0):
        with pytest.raises(ValidationError, match="fetch_wait"):
            WorkerSettings(fetch_wait=bad)


async def test_worker_app_uses_the_file_s_fetch_wait(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n")
    path = tmp_path / "triggers.yaml"
    path.write_text(
        "sites: [site.yaml]\n"
        "kafka: {bootstrap_servers: '127.0.0.1:9'}\n"
        "worker: {fetch_wait: 30ms}\n"
        "triggers:\n"
        "  - {name: t, on: bl1/+/counts, when: 'true', then: [{task: {app: fit}}]}\n"
    )
    worker = TriggerWorker(load_triggers(path), KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    app = worker._build_app()
    consumer = await _worker_consumer(app)
    try:
        assert consumer._fetch_max_wait_ms == 30
    finally:
        await consumer.stop()
        if worker._tmp_dir:
            shutil.rmtree(worker._tmp_dir, ignore_errors=True)


class _SlowChannel:
    """Stands in for a faust channel whose broker takes ``delay`` s to take each record."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.published: list[Any] = []

    async def publish_message(self, fut: Any, wait: bool = False) -> None:
        await asyncio.sleep(self.delay)
        self.published.append(fut)


def _record(channel: _SlowChannel) -> Any:
    return SimpleNamespace(message=SimpleNamespace(channel=channel))


async def _started(buffer: Any) -> Any:
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    await buffer.start()
    return buffer


async def test_faust_flush_returns_before_a_slow_record_is_handed_over() -> None:
    # The premise of DrainableBuffer: faust's flush gives up after 0.1 s without progress.
    channel = _SlowChannel(0.3)
    buffer = await _started(ProducerBuffer())
    try:
        for _ in range(3):
            buffer.put(_record(channel))
        await buffer.flush()
        assert len(channel.published) < 3
    finally:
        buffer.pending = asyncio.Queue()  # nothing left for faust's on_stop flush
        await buffer.stop()


async def test_drain_waits_for_every_record_put_before_it_and_no_later_one() -> None:
    channel = _SlowChannel(0.15)
    buffer = await _started(transport.DrainableBuffer())
    try:
        for _ in range(3):
            buffer.put(_record(channel))
        drain = asyncio.create_task(buffer.drain(poll=0.05))
        await asyncio.sleep(0.05)
        buffer.put(_record(channel))  # put while draining: not waited for
        await drain
        assert len(channel.published) == 3
        assert buffer.put_count == 4
        await buffer.drain()
        assert len(channel.published) == 4
    finally:
        await buffer.stop()


async def test_drain_of_a_stopped_buffer_with_records_left_raises() -> None:
    buffer = transport.DrainableBuffer()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    buffer.put(_record(_SlowChannel(0)))
    with pytest.raises(RuntimeError, match="not running"):
        await buffer.drain()


async def test_worker_app_produces_through_the_durable_producer(tmp_path: Path) -> None:
    app = _app()
    transport.install(app, 0.05)
    assert isinstance(app.producer, transport.DurableProducer)
    assert isinstance(app.producer.buffer, transport.DrainableBuffer)


async def test_resume_while_flowing_keeps_buffered_events_and_after_a_suspension_clears_them() -> None:
    flow = FlowControlEvent(initially_suspended=False)
    transport.keep_buffers_when_already_flowing(flow)
    queue: FlowControlQueue[str] = FlowControlQueue(maxsize=10, flow_control=flow, clear_on_resume=True)
    queue.put_nowait("delivered, not yet processed")
    flow.resume()  # faust's recovery does this again after seeking: the event must survive
    assert queue.qsize() == 1 and flow.is_active()
    flow.suspend()  # a rebalance: what is buffered predates it and is fetched again
    flow.resume()
    assert queue.qsize() == 0 and flow.is_active()


def test_plain_faust_flow_control_drops_buffered_events_on_any_resume() -> None:
    # The premise: if mode stops clearing on a resume of a running flow, the patch can go.
    flow = FlowControlEvent(initially_suspended=False)
    queue: FlowControlQueue[str] = FlowControlQueue(maxsize=10, flow_control=flow, clear_on_resume=True)
    queue.put_nowait("x")
    flow.resume()
    assert queue.qsize() == 0


def test_installed_app_keeps_buffers_on_resume() -> None:
    app = _app()
    transport.install(app, 0.05)
    queue: FlowControlQueue[str] = FlowControlQueue(maxsize=10, flow_control=app.flow_control, clear_on_resume=True)
    app.flow_control.resume()  # from faust's initial suspension: clears (nothing there)
    queue.put_nowait("x")
    app.flow_control.resume()
    assert queue.qsize() == 1


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key (what a cluster's CA file would hold)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kafka.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_file, key_file


def test_faust_gets_the_same_security_as_every_other_kafka_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from reflexarc.kafka import security_options

    ca, _key = _tls_files(tmp_path)
    monkeypatch.setenv("RX_TEST_KAFKA_PASSWORD", "s3cret")
    cases = [
        KafkaSettings(),
        KafkaSettings(security_protocol="SSL", tls={"ca_file": str(ca)}),
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", username="rx",
                      password_env="RX_TEST_KAFKA_PASSWORD"),
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", username="rx",
                      password_env="RX_TEST_KAFKA_PASSWORD", tls={"ca_file": str(ca)}),
    ]
    for settings in cases:
        ours = security_options(settings)
        faust_side = credentials_to_aiokafka_auth(transport.credentials(settings))
        assert faust_side["security_protocol"] == ours["security_protocol"]
        for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
            assert faust_side.get(key) == ours.get(key), (settings.security_protocol, key)
        assert (faust_side.get("ssl_context") is None) == (ours.get("ssl_context") is None)


def test_sasl_without_a_mechanism_is_refused_with_what_to_set() -> None:
    with pytest.raises(ValueError, match="needs sasl_mechanism"):
        transport.credentials(KafkaSettings(security_protocol="SASL_PLAINTEXT", username="rx"))


async def test_worker_app_carries_the_file_s_kafka_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_TEST_KAFKA_PASSWORD", "s3cret")
    (tmp_path / "site.yaml").write_text("site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n")
    path = tmp_path / "triggers.yaml"
    path.write_text(
        "sites: [site.yaml]\n"
        "kafka: {bootstrap_servers: '127.0.0.1:9', security_protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN,\n"
        "        username: rx, password_env: RX_TEST_KAFKA_PASSWORD}\n"
        "triggers:\n"
        "  - {name: t, on: bl1/+/counts, when: 'true', then: [{task: {app: fit}}]}\n"
    )
    cfg = load_triggers(path)
    worker = TriggerWorker(cfg)
    app = worker._build_app()
    try:
        creds = app.conf.broker_credentials
        assert creds.username == "rx" and creds.password == "s3cret" and creds.mechanism.value == "PLAIN"
    finally:
        if worker._tmp_dir:
            shutil.rmtree(worker._tmp_dir, ignore_errors=True)
