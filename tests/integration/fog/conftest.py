"""Fixtures of the fog bridge's integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reflexarc.process import ManagedProcess


@pytest.fixture
def procs() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts; stopped by PID afterwards whatever happens."""
    started: list[ManagedProcess] = []
    yield started
    for p in started:
        p.stop(grace=5)
