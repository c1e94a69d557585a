"""Deploy three edge agents to a real dockerd, roll a label's change, roll back a bad config.

Real parts: a private dockerd (Debian docker.io, host networking), the agent
image built by ``reflexarc deploy image build`` on a debootstrap'd base, real
Mosquitto on the host counting what every agent publishes, and the CLI as a
user runs it (``plan``/``apply``/``status`` with ``--json``).
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from deploy_helpers import Counter, by_device, cli, write_fleet

from reflexarc.brokers import MqttBroker
from reflexarc.deploy.containers import LABEL_HASH, container_name, volume_name
from reflexarc.process import free_port
from reflexarc.testing.docker import DockerEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET_VAR = "DEPLOY_TEST_TOKEN_SOURCE"


def fleet_doc(engine: DockerEngine, image: str, broker: MqttBroker, dead_socket: Path) -> dict[str, Any]:
    """Three devices on the engine (two detectors, one monitor) and one on an endpoint nobody serves."""
    return {
        "fleet": "lab",
        "image": image,
        "endpoints": {"hutch": {"url": engine.base_url}, "far": {"url": f"unix://{dead_socket}", "timeout_s": 2}},
        "rollout": {
            "batch_size": 1,
            "on_failure": "stop",
            "stop_timeout_s": 5,
            # How the deployer reaches the broker to watch status topics (the agents' own mqtt may be wrong).
            "health": {
                "check": "status_topic",
                "timeout_s": 12,
                "mqtt": {"host": broker.host, "port": broker.port, "protocol": "5"},
            },
        },
        "defaults": {
            "agent": {
                "site": "bl1",
                "mqtt": {"host": broker.host, "port": broker.port, "protocol": "5"},
                "publish": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "connect_timeout_s": 3},
                "sources": [{"type": "simulated", "stream": "temp", "rate_hz": 40, "count": 20, "seed": 1}],
            },
            "resources": {"memory": "256m", "pids": 256, "cpus": 0.5},
            "secrets": {"RX_TEST_TOKEN": {"env": SECRET_VAR}},
        },
        "labels": {
            "detector": {"agent": {"spool": {"max_events": 10000}}},
            "monitor": {"env": {"RX_ROLE": "monitor"}},
        },
        "devices": {
            "det1": {"endpoint": "hutch", "labels": ["detector"], "passthrough": ["/dev/null:/dev/instrument:rw"]},
            "det2": {"endpoint": "hutch", "labels": ["detector"]},
            "mon1": {"endpoint": "hutch", "labels": ["monitor"]},
            "far1": {"endpoint": "far", "labels": ["monitor"]},
        },
    }


def agent_status(engine: DockerEngine, device: str) -> dict[str, Any] | None:
    """The agent's status.json, read from its state volume through the Docker API."""
    c = engine.client.containers.get(container_name("lab", device))
    try:
        bits, _ = c.get_archive("/var/lib/reflexarc/agent/status.json")
    except docker.errors.NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(bits))) as tar:
        member = tar.extractfile("status.json")
        return json.loads(member.read()) if member else None


def ids(engine: DockerEngine, *devices: str) -> dict[str, str]:
    """Current container id per device."""
    return {d: engine.client.containers.get(container_name("lab", d)).id for d in devices}


def test_deploy_roll_label_change_and_roll_back_bad_config(
    docker_engine: DockerEngine,
    agent_image: str,
    mosquitto: MqttBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The acceptance path of issue 7, start to end, on one engine."""
    monkeypatch.setenv(SECRET_VAR, "s3cret-token")
    counter = Counter(mosquitto.host, mosquitto.port)
    try:
        doc = fleet_doc(docker_engine, agent_image, mosquitto, tmp_path / "nobody.sock")
        fleet = write_fleet(tmp_path / "fleet.yaml", doc)

        # 1. First plan: three creates, the dead endpoint reported unreachable.
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "action") == {
            "det1": "create", "det2": "create", "mon1": "create", "far1": "unreachable"
        }  # fmt: skip
        assert code == 3

        # 2. Apply: three agents run and publish to Mosquitto on the host; far1 is skipped, not fatal.
        code, out = cli("apply", str(fleet))
        assert by_device(out, "result") == {
            "det1": "created", "det2": "created", "mon1": "created", "far1": "unreachable"
        }, out  # fmt: skip
        assert code == 3
        for dev in ("det1", "det2", "mon1"):
            counter.wait(lambda d=dev: counter.count(d, "temp") == 20, what=f"20 events from {dev}")
        first = ids(docker_engine, "det1", "det2", "mon1")

        # The container is what the fleet file says: secret as env (not in agent.yaml), device, limits, volume.
        c = docker_engine.client.containers.get(container_name("lab", "det1"))
        assert "RX_TEST_TOKEN=s3cret-token" in c.attrs["Config"]["Env"]
        bits, _ = c.get_archive("/etc/reflexarc/agent.yaml")
        assert b"s3cret" not in b"".join(bits)
        host = c.attrs["HostConfig"]
        assert host["Devices"] == [
            {"PathOnHost": "/dev/null", "PathInContainer": "/dev/instrument", "CgroupPermissions": "rw"}
        ]
        assert host["Memory"] == 256 << 20 and host["PidsLimit"] == 256 and host["NetworkMode"] == "host"
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert any(m["Name"] == volume_name("lab", "det1") for m in c.attrs["Mounts"])

        # 3. Unchanged fleet: nothing to do (the unreachable device is still reported).
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "action") == {
            "det1": "unchanged", "det2": "unchanged", "mon1": "unchanged", "far1": "unreachable"
        }  # fmt: skip

        # 4. Change one label's config: plan shows exactly those devices; apply rolls them, mon1 untouched.
        changed = copy.deepcopy(doc)
        changed["labels"]["detector"]["agent"]["sources"] = [
            *doc["defaults"]["agent"]["sources"],
            {"type": "simulated", "stream": "pressure", "rate_hz": 40, "count": 10, "seed": 2},
        ]
        write_fleet(fleet, changed)
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "action") == {
            "det1": "replace", "det2": "replace", "mon1": "unchanged", "far1": "unreachable"
        }  # fmt: skip
        code, out = cli("apply", str(fleet))
        assert by_device(out, "result") == {
            "det1": "replaced", "det2": "replaced", "mon1": "unchanged", "far1": "unreachable"
        }, out  # fmt: skip
        second = ids(docker_engine, "det1", "det2", "mon1")
        assert second["mon1"] == first["mon1"]
        assert second["det1"] != first["det1"] and second["det2"] != first["det2"]
        for dev in ("det1", "det2"):
            counter.wait(lambda d=dev: counter.count(d, "pressure") == 10, what=f"new stream from {dev}")

        # The spool lives on the volume: the new agent resumed the old stream's checkpoint (20 of 20 done)
        # instead of starting over. Once both finite sources are done it has read only the 10 new events;
        # on a fresh spool it would have read the 20 'temp' events again.
        def finished(dev: str) -> dict[str, Any] | None:
            st = agent_status(docker_engine, dev)
            return st if st and st["sources"] and not any(x["running"] for x in st["sources"]) else None

        counter.wait(lambda: finished("det1") is not None, what="det1's sources to finish")
        assert finished("det1")["events"]["read"] == 10
        assert counter.count("det1", "temp") == 20
        with counter.lock:
            assert counter.status["det1"]["state"] == "online"
        # Only one agent per device exists: old containers are gone, no '-previous' left behind.
        names = sorted(c.name for c in docker_engine.client.containers.list(all=True))
        assert names == [container_name("lab", d) for d in ("det1", "det2", "mon1")]

        # 5. A bad config (the agent never reaches its broker): det1 is rolled back, the rollout stops.
        bad = copy.deepcopy(changed)
        bad["labels"]["detector"]["agent"]["mqtt"] = {"port": free_port()}
        write_fleet(fleet, bad)
        code, out = cli("apply", str(fleet))
        results = by_device(out, "result")
        assert results == {"det1": "rolled back", "det2": "skipped", "mon1": "unchanged", "far1": "unreachable"}, out
        assert code == 1
        detail = by_device(out, "detail")
        assert "not healthy" in detail["det1"] and "previous agent running again" in detail["det1"]
        assert "stopped after det1" in detail["det2"]
        # Never without an agent: det1 runs its previous container (same id, old hash), det2 was not touched.
        after = ids(docker_engine, "det1", "det2", "mon1")
        assert after == second
        c = docker_engine.client.containers.get(container_name("lab", "det1"))
        assert c.status == "running"
        code, plan = cli("plan", str(fleet))
        assert by_device(plan, "current_hash")["det1"] == c.labels[LABEL_HASH]
        assert by_device(plan, "action")["det1"] == "replace"

        # 6. Policy continue, and a config that makes the agent exit at once (its password variable is
        #    unset in the container): both detectors are tried and rolled back; the monitor stays as it is.
        bad["rollout"]["on_failure"] = "continue"
        bad["labels"]["detector"]["agent"]["mqtt"] = {"username": "det", "password_env": "RX_UNSET_PASSWORD"}
        write_fleet(fleet, bad)
        code, out = cli("apply", str(fleet))
        assert by_device(out, "result") == {
            "det1": "rolled back", "det2": "rolled back", "mon1": "unchanged", "far1": "unreachable"
        }, out  # fmt: skip
        assert ids(docker_engine, "det1", "det2", "mon1") == second
        assert "agent exited" in by_device(out, "detail")["det2"]

        # status: every reachable agent running and on the (last good) config.
        code, st = cli("status", str(fleet))
        rows = {r["device"]: r for r in st["devices"]}
        assert {d: rows[d]["state"] for d in ("det1", "det2", "mon1")} == dict.fromkeys(
            ("det1", "det2", "mon1"), "running"
        )
        assert rows["far1"]["state"] == "unknown" and "endpoint down" in rows["far1"]["detail"]
        assert rows["det1"]["config"] == "outdated" and rows["mon1"]["config"] == "current"
    finally:
        counter.close()
        for c in docker_engine.client.containers.list(all=True):
            c.remove(force=True, v=True)
