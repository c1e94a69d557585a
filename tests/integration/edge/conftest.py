"""Fixtures for edge-agent integration tests: a counting subscriber, signing keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from edge_helpers import Collector

from reflexarc.config import MqttSettings
from reflexarc.mqtt import MqttClient
from reflexarc.signing import generate_keypair


@pytest.fixture
async def collect() -> AsyncIterator[Callable[..., Any]]:
    """``await collect(settings, "rx/#")`` -> a running :class:`Collector` (persistent session)."""
    made: list[Collector] = []

    async def make(settings: MqttSettings, topic_filter: str = "rx/#", client_id: str = "test-collector") -> Collector:
        client = MqttClient(settings, client_id, clean_start=False, session_expiry=600, queue_size=0)
        await client.connect()
        await client.subscribe([(topic_filter, 1)])
        c = Collector(client)
        c.task = asyncio.create_task(c._pump())
        made.append(c)
        return c

    yield make
    for c in made:
        if c.task:
            c.task.cancel()
        await c.client.disconnect()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline signing key pair (private, public)."""
    return generate_keypair(tmp_path / "keys")
