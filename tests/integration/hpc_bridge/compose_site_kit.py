"""Shared pieces of the composed-machine site tests (not a test module: no ``test_`` prefix)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reflexarc.hpc_bridge.compose import Composer, hash_token
from reflexarc.process import ManagedProcess

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
    path.write_text(yaml.safe_dump({
        "racks": {"r1": {"devices": [cpu, gpu]}},
        "tokens": [{"user": AGENT_USER, "sha256": hash_token(TOKEN)}],
    }))
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


class SiteProcess:
    """``python -m reflexarc site run site.yaml`` as a child process, with the compose token."""

    def __init__(self, site_yaml: Path, log: Path) -> None:
        env = {**os.environ, "RX_COMPOSE_TOKEN": TOKEN, "RX_LOG_LEVEL": "INFO"}
        self.log = log
        self.proc = ManagedProcess("site", [sys.executable, "-m", "reflexarc", "site", "run", str(site_yaml)],
                                   log, env=env)

    def text(self) -> str:
        """The agent's log so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, timeout: float = 60.0) -> None:
        """Start and wait until it consumes its task topic."""
        before = self.text().count("taking tasks from")
        self.proc.start()
        await asyncio.to_thread(self.proc.wait_ready, lambda: self.text().count("taking tasks from") > before,
                                timeout)


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
