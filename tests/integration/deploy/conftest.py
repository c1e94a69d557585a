"""Fixtures for deploy integration tests: one real dockerd and one agent image per session."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from reflexarc.testing.docker import DockerEngine, base_image

AGENT_TAG = "rx-test/edge-agent:dev"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private dockerd (host networking, no bridge) for the whole session, stopped afterwards."""
    with DockerEngine() as engine:
        yield engine


@pytest.fixture(scope="session")
def agent_image(docker_engine: DockerEngine) -> str:
    """The edge agent image, built once by ``reflexarc deploy image build`` on a locally imported base."""
    from typer.testing import CliRunner

    from reflexarc.deploy.cli import app

    base = base_image(docker_engine.client)
    t0 = time.monotonic()
    res = CliRunner().invoke(
        app, ["image", "build", "--base", base, "--tag", AGENT_TAG, "--endpoint", docker_engine.base_url]
    )
    assert res.exit_code == 0, res.output
    print(f"\nagent image built in {time.monotonic() - t0:.1f} s: {res.output.strip()}")
    docker_engine.client.images.get(AGENT_TAG)
    return AGENT_TAG
