"""The trigger engine's faust consumer long-polls for ``worker.fetch_wait``, not faust's fixed 1.5 s."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from reflexarc.cloud import fetchwait
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
    fetchwait.install(app, 0.02)
    consumer = await _worker_consumer(app)
    try:
        assert consumer._fetch_max_wait_ms == 20
    finally:
        await consumer.stop()


async def test_faust_alone_waits_1_5_s_which_is_what_the_transport_replaces() -> None:
    # Guards the premise: if faust ever makes this configurable, fetchwait can go.
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
        fetchwait.install(app, 0.05)


async def test_set_fetch_wait_refuses_a_started_or_foreign_consumer() -> None:
    with pytest.raises(RuntimeError, match="aiokafka version"):
        fetchwait.set_fetch_wait(object(), 50)

    class Started:
        _fetch_max_wait_ms = 500
        _fetcher = object()

    with pytest.raises(RuntimeError, match="before the consumer starts"):
        fetchwait.set_fetch_wait(Started(), 50)


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
