"""The agent container of one device: its names, labels, config hash, creation and discovery.

Layout on an engine, per fleet and device::

    rx-FLEET-DEVICE            the agent (restart: unless-stopped)
    rx-FLEET-DEVICE-previous   the agent it replaced, stopped, until the new one is healthy
    rx-FLEET-DEVICE-next       a new agent created but not yet started
    rx-FLEET-DEVICE-state      named volume at /var/lib/reflexarc/agent: spool, status
                               (outlives every container, so a backlog survives a replace)

The agent.yaml goes into the container's own anonymous volume at
/etc/reflexarc (the root filesystem is read-only), so a rolled-back container
runs with exactly the configuration it had. The config hash in the labels
covers everything that makes a container what it is (image id, agent config,
environment, secrets, devices, limits): ``plan`` compares it to decide.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from reflexarc.deploy.agentconfig import agent_yaml
from reflexarc.deploy.fleet import CONFIG_DIR, CONFIG_PATH, STATE_DIR, DeviceSpec, HealthSettings

LABEL_FLEET = "io.reflexarc.fleet"
LABEL_DEVICE = "io.reflexarc.device"
LABEL_HASH = "io.reflexarc.config-hash"
LABEL_IMAGE = "io.reflexarc.image"
LABEL_SITE = "io.reflexarc.site"
LABEL_NAMESPACE = "io.reflexarc.namespace"
LABEL_AGENT_DEVICE = "io.reflexarc.agent-device"

# Bump when the container layout changes, so every device is replaced once.
LAYOUT_VERSION = "1"

# Docker health check for check: container. The agent rewrites status.json
# every second; connected and fresh means healthy. Plain python3 from the
# image's venv, no reflexarc import: it runs every second on small devices.
_HEALTH_SCRIPT = (
    "import json,sys,time\n"
    f"s=json.load(open('{STATE_DIR}/status.json'))\n"
    "sys.exit(0 if s.get('connected') and s.get('pid') and time.time()-float(s.get('updated_at',0))<5 else 1)"
)
AGENT_PYTHON = "/opt/reflexarc/bin/python"


def container_name(fleet: str, device: str, role: str = "") -> str:
    """Name of a device's agent container (``role``: '', 'previous' or 'next')."""
    return f"rx-{fleet}-{device}" + (f"-{role}" if role else "")


def volume_name(fleet: str, device: str) -> str:
    """Name of the device's state volume (spool, status)."""
    return f"rx-{fleet}-{device}-state"


def config_hash(spec: DeviceSpec, image_id: str, secrets: dict[str, str], health: HealthSettings) -> str:
    """A digest of everything that defines the device's container."""
    doc = {
        "layout": LAYOUT_VERSION,
        "image": spec.image,
        "image_id": image_id,
        "agent": spec.agent,
        "env": spec.env,
        # Values count (a changed password must replace the container), but only as a digest.
        "secrets": hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest(),
        "passthrough": spec.passthrough,
        "resources": spec.resources.model_dump(exclude_none=True),
        "healthcheck": health.check == "container",
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_tar(text: str) -> bytes:
    """A tar archive holding agent.yaml, read-only, for ``put_archive``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = text.encode()
        info = tarfile.TarInfo("agent.yaml")
        info.size = len(data)
        info.mode = 0o444
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def create_agent(
    client: Any,
    spec: DeviceSpec,
    image_id: str,
    secrets: dict[str, str],
    digest: str,
    health: HealthSettings,
    name: str,
) -> Any:
    """Create (not start) the agent container ``name`` for ``spec`` and put its agent.yaml in (blocking)."""
    from docker.types import Healthcheck, LogConfig, Mount

    client.volumes.create(
        volume_name(spec.fleet, spec.name), labels={LABEL_FLEET: spec.fleet, LABEL_DEVICE: spec.name}
    )  # idempotent: an existing volume (and its spool) is kept
    healthcheck = None
    if health.check == "container":
        healthcheck = Healthcheck(
            test=["CMD", AGENT_PYTHON, "-c", _HEALTH_SCRIPT],
            interval=1_000_000_000,
            timeout=3_000_000_000,
            retries=3,
            start_period=int(health.timeout_s * 1e9),
        )
    res = spec.resources
    container = client.containers.create(
        image_id,
        command=["run", CONFIG_PATH],
        name=name,
        labels={
            LABEL_FLEET: spec.fleet,
            LABEL_DEVICE: spec.name,
            LABEL_HASH: digest,
            LABEL_IMAGE: spec.image,
            LABEL_SITE: spec.site,
            LABEL_NAMESPACE: spec.namespace,
            LABEL_AGENT_DEVICE: spec.device,
        },
        environment={**spec.env, **secrets, "PYTHONUNBUFFERED": "1"},
        # Agents reach the broker and serve metrics on the device's own network.
        network_mode="host",
        mounts=[
            Mount(STATE_DIR, volume_name(spec.fleet, spec.name), type="volume"),
            Mount(CONFIG_DIR, None, type="volume"),  # anonymous: this container's own config
        ],
        tmpfs={"/tmp": "rw,size=64m"},
        devices=list(spec.passthrough),
        nano_cpus=int(res.cpus * 1e9) if res.cpus else None,
        mem_limit=res.memory_bytes(),
        pids_limit=res.pids,
        restart_policy={"Name": "unless-stopped"},
        # Least privilege: nothing but the volumes is writable, no capabilities, no setuid escalation.
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        init=True,  # reaps the processes argv actuators and line sources start
        healthcheck=healthcheck,
        stop_signal="SIGTERM",
        # Devices have small disks: bound the log.
        log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
        detach=True,
    )
    try:
        container.put_archive(CONFIG_DIR, _config_tar(agent_yaml(spec.agent)))
    except Exception:
        container.remove(force=True, v=True)
        raise
    return container


@dataclass
class DeviceContainers:
    """What an engine holds for one device of a fleet."""

    current: Any = None
    previous: Any = None
    next: Any = None
    extra: list[Any] = field(default_factory=list)

    @property
    def hash(self) -> str | None:
        """Config hash of the current agent."""
        return self.current.labels.get(LABEL_HASH) if self.current is not None else None


def fleet_containers(client: Any, fleet: str) -> dict[str, DeviceContainers]:
    """Every container of ``fleet`` on this engine, by device name (blocking)."""
    out: dict[str, DeviceContainers] = {}
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_FLEET}={fleet}"}):
        device = c.labels.get(LABEL_DEVICE)
        if not device:
            continue
        slot = out.setdefault(device, DeviceContainers())
        if c.name == container_name(fleet, device):
            slot.current = c
        elif c.name == container_name(fleet, device, "previous"):
            slot.previous = c
        elif c.name == container_name(fleet, device, "next"):
            slot.next = c
        else:
            slot.extra.append(c)
    return out
