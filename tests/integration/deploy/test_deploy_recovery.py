"""The deployer is SIGKILLed mid-rollout; the next apply recovers. Docker health checks, logs, remove, a stopped engine.

Real dockerd, real Mosquitto, the deployer CLI in a subprocess (so it can be
killed -9 at the worst moment: old agent stopped, new one not yet confirmed).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import by_device, cli, write_fleet
from typer.testing import CliRunner

from reflexarc.brokers import MqttBroker
from reflexarc.deploy.cli import app
from reflexarc.deploy.containers import container_name, volume_name
from reflexarc.process import free_port
from reflexarc.testing.docker import DockerEngine
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def fleet_doc(engine: DockerEngine, image: str, broker: MqttBroker, down: DockerEngine) -> dict[str, Any]:
    """One device on the live engine (Docker health check), one on an engine that has been stopped."""
    return {
        "fleet": "rec",
        "image": image,
        "endpoints": {"live": {"url": engine.base_url}, "down": {"url": down.base_url, "timeout_s": 2}},
        "rollout": {"stop_timeout_s": 5, "health": {"check": "container", "timeout_s": 30}},
        "defaults": {
            "agent": {
                "site": "bl2",
                "metrics_port": 0,  # any free port on the device: the agent logs where
                "mqtt": {"host": broker.host, "port": broker.port, "protocol": "5"},
                "publish": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                "sources": [{"type": "simulated", "stream": "temp", "rate_hz": 5}],
            }
        },
        "devices": {"dev1": {"endpoint": "live"}, "dev9": {"endpoint": "down"}},
    }


def wait_for(pred: Any, timeout: float, what: str) -> None:
    """Poll ``pred`` until true or the deadline."""
    if not poll_until(pred, timeout, interval=0.2):
        raise AssertionError(f"timed out waiting for {what}")


def test_deploy_recovers_after_deployer_killed(
    docker_engine: DockerEngine, agent_image: str, mosquitto: MqttBroker, tmp_path: Path
) -> None:
    """SIGKILL the deployer while a bad agent is on trial; the device keeps an agent and apply restores the old one."""
    down = DockerEngine(Path(f"/tmp/rx-down-{os.getpid()}"))
    down.start()
    down.stop()  # a stopped dockerd: its socket path is dead
    client = docker_engine.client
    name = container_name("rec", "dev1")
    try:
        good = fleet_doc(docker_engine, agent_image, mosquitto, down)
        fleet = write_fleet(tmp_path / "fleet.yaml", good)
        code, out = cli("apply", str(fleet))
        assert by_device(out, "result") == {"dev1": "created", "dev9": "unreachable"}, out
        assert "endpoint down" in by_device(out, "detail")["dev9"]
        original = client.containers.get(name)
        assert original.attrs["State"]["Health"]["Status"] == "healthy"

        # A bad config goes out from a deployer process that is then killed -9 during the health wait.
        bad = copy.deepcopy(good)
        bad["defaults"]["agent"]["mqtt"]["port"] = free_port()
        write_fleet(fleet, bad)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from reflexarc.deploy.cli import app; app()", "apply", str(fleet), "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: (
                    any(c.name == container_name("rec", "dev1", "previous") for c in client.containers.list(all=True))
                    and client.containers.get(name).status == "running"
                ),
                60,
                "the new agent on trial",
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        # The device is not without an agent: the new one runs, the old one waits stopped under -previous.
        assert client.containers.get(name).id != original.id
        assert client.containers.get(container_name("rec", "dev1", "previous")).id == original.id

        write_fleet(fleet, good)
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "action") == {"dev1": "recover", "dev9": "unreachable"}
        code, out = cli("apply", str(fleet))
        assert by_device(out, "result")["dev1"] == "recovered", out
        back = client.containers.get(name)
        assert back.id == original.id and back.status == "running"
        assert [c.name for c in client.containers.list(all=True, filters={"label": "io.reflexarc.fleet=rec"})] == [name]
        wait_for(lambda: client.containers.get(name).attrs["State"].get("Health", {}).get("Status") == "healthy",
                 30, "the restored agent healthy")  # fmt: skip
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "action") == {"dev1": "unchanged", "dev9": "unreachable"}
        assert code == 3  # some device unreachable

        # logs and remove (the state volume, holding the spool, survives unless purged).
        res = CliRunner().invoke(app, ["logs", str(fleet), "dev1", "--tail", "50"])
        assert res.exit_code == 0 and "metrics on http://127.0.0.1:" in res.stdout, res.output
        res = CliRunner().invoke(app, ["remove", str(fleet), "--device", "dev1"])
        assert res.exit_code == 0 and "removed 1 container" in res.stdout, res.output
        assert not client.containers.list(all=True, filters={"label": "io.reflexarc.fleet=rec"})
        assert client.volumes.get(volume_name("rec", "dev1"))
        res = CliRunner().invoke(app, ["remove", str(fleet), "--device", "dev1", "--purge-state"])
        assert "state volume deleted" in res.stdout, res.output
        assert volume_name("rec", "dev1") not in [v.name for v in client.volumes.list()]
    finally:
        down.stop()
        import shutil

        shutil.rmtree(down.workdir, ignore_errors=True)
        for c in client.containers.list(all=True, filters={"label": "io.reflexarc.fleet=rec"}):
            c.remove(force=True, v=True)
