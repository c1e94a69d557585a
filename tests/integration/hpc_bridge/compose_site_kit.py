"""Shared pieces of the composed-machine site tests (not a test module: no ``test_`` prefix)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reflexarc.hpc_bridge.compose import Composer, hash_token
from reflexarc.testing.tiers import TierProcess

TOKEN = "site-agent-compose-token"
AGENT_USER = "site-agent"
APPS = "reflexarc.hpc_bridge.examples.apps"


def write_pools(path: Path, node: str = "node1", gpus: int = 4, nodes: int = 2, gres_type: str | None = None) -> Path:
    """An inventory with ``nodes`` compute nodes and ``gpus`` A100s; the agent's token digest."""
    cpu: dict[str, Any] = {"id": "n", "kind": "cpu", "cores": 8, "memory_gb": 16}
    if nodes == 1:
        cpu["node"] = node
    else:
        cpu["count"] = nodes
    gpu: dict[str, Any] = {"id": "gpu", "kind": "gpu", "model": "A100", "count": gpus}
    if gres_type:
        gpu["gres_type"] = gres_type
    path.write_text(
        yaml.safe_dump(
            {
                "racks": {"r1": {"devices": [cpu, gpu]}},
                "tokens": [{"user": AGENT_USER, "sha256": hash_token(TOKEN)}],
            }
        )
    )
    return path


def site_doc(tmp: Path, bootstrap: str, site: str = "gpusite", **compose: Any) -> dict[str, Any]:
    """A site offering no GPU, with the ``devices`` app and a ``compose:`` section."""
    return {
        "site": site,
        "namespace": "rx",
        "kafka": {"bootstrap_servers": bootstrap},
        "state_dir": str(tmp / "state"),
        "engine": {"kind": "local", "local": {"max_workers": 2}},
        "resources": {"cpus": 2, "gpus": 0},
        "apps": {"devices": {"function": f"{APPS}:devices", "retries": 1}},
        "compose": {"pools": str(tmp / "pools.yaml"), "database": str(tmp / "compose.db"), **compose},
    }


class SiteProcess(TierProcess):
    """``python -m reflexarc site run site.yaml`` as a child process, with the compose token."""

    def __init__(self, site_yaml: Path, log: Path) -> None:
        super().__init__("site", site_yaml, log, env={"RX_COMPOSE_TOKEN": TOKEN})


def open_composer(tmp: Path) -> Composer:
    """A composer on the site's database (to look at machines, pools and the audit log)."""
    return Composer(tmp / "compose.db")


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``check`` with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.1)
