"""``fleet.yaml``: which edge agents run where, with which configuration.

A fleet file names Docker endpoints, a shared base (``defaults``), layers per
label (``labels``) and the devices. Each device's settings are the base, then
each of its labels' layers in the order the device lists them, then its own
overrides: ``agent`` (the agent.yaml content) is merged key by key (mappings
merge, anything else is replaced), ``env``/``secrets`` merge by name,
``resources`` field by field, ``image``/``passthrough`` are replaced.

Secrets are never values in this file: a secret names the deployer's
environment variable or a file it is read from, and reaches the container as
an environment variable when the container is created.

See ``docs/deploy.md`` for the format.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from reflexarc.config import ConfigError, MqttSettings, Name, StrictModel, load_yaml
from reflexarc.deploy.merge import deep_merge

# What the deployer manages inside the container: the agent must keep its
# state on the volume (so a replaced container keeps the spool) and read the
# configuration the deployer put there.
STATE_DIR = "/var/lib/reflexarc/agent"
CONFIG_DIR = "/etc/reflexarc"
CONFIG_PATH = f"{CONFIG_DIR}/agent.yaml"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MEMORY = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_PASSTHROUGH = re.compile(r"^/[^:]+(:/[^:]+)?(:[rwm]{1,3})?$")


class TlsEndpoint(StrictModel):
    """Client TLS for a ``tcp://`` Docker endpoint (files on the deployer's machine)."""

    ca_file: str | None = Field(None, description="CA that signed the engine's certificate")
    cert_file: str | None = Field(None, description="client certificate")
    key_file: str | None = Field(None, description="client private key")
    verify: bool = Field(True, description="verify the engine's certificate (keep it on)")

    @model_validator(mode="after")
    def _pair(self) -> TlsEndpoint:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (client certificate and its key)")
        return self


class Endpoint(StrictModel):
    """How to reach one Docker engine."""

    url: str = Field(description="unix:///var/run/docker.sock, tcp://HOST:2376 (with tls) or ssh://USER@HOST")
    tls: TlsEndpoint | None = None
    timeout_s: float = Field(10.0, gt=0, description="connect/API timeout; a slower engine counts as unreachable")
    allow_insecure_tcp: bool = Field(False, description="allow tcp:// without TLS (never on a real network)")

    @model_validator(mode="after")
    def _scheme(self) -> Endpoint:
        scheme = self.url.partition("://")[0]
        if scheme not in ("unix", "tcp", "ssh", "http", "https"):
            raise ValueError(f"endpoint url {self.url!r}: use unix://PATH, tcp://HOST:PORT or ssh://USER@HOST")
        if scheme in ("tcp", "http") and self.tls is None and not self.allow_insecure_tcp:
            raise ValueError(
                f"endpoint {self.url!r} has no tls: a plain-TCP Docker API gives root on that host to anyone "
                "who can reach it; add tls (ca_file, cert_file, key_file) or set allow_insecure_tcp: true"
            )
        if scheme in ("unix", "ssh") and self.tls is not None:
            raise ValueError(f"tls applies to tcp:// endpoints, not {scheme}://")
        return self


class SecretRef(StrictModel):
    """Where the deployer reads a secret: an environment variable or a file (exactly one)."""

    env: str | None = Field(None, description="the deployer's environment variable holding the value")
    file: str | None = Field(None, description="a file holding the value (trailing newline stripped)")

    @model_validator(mode="after")
    def _one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret names exactly one source: env: VAR or file: PATH")
        return self


class Resources(StrictModel):
    """Resource limits of the agent container."""

    cpus: float | None = Field(None, gt=0, description="CPU cores, e.g. 0.5")
    memory: str | None = Field(None, description="memory limit: bytes or with k/m/g, e.g. 256m")
    pids: int | None = Field(None, ge=16, description="process count limit")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and not _MEMORY.match(v):
            raise ValueError("use a number of bytes with an optional k, m or g suffix, e.g. 256m")
        return v

    def memory_bytes(self) -> int | None:
        """The memory limit in bytes."""
        if self.memory is None:
            return None
        m = _MEMORY.match(self.memory)
        assert m is not None
        return int(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


class Layer(StrictModel):
    """Settings that the base, a label or a device contribute."""

    image: str | None = Field(None, description="agent image (default: the fleet's image)")
    agent: dict[str, Any] = Field(default_factory=dict, description="agent.yaml content, merged key by key")
    env: dict[str, str] = Field(default_factory=dict, description="plain (non-secret) environment variables")
    secrets: dict[str, SecretRef] = Field(default_factory=dict, description="environment variables from secrets")
    passthrough: list[str] | None = Field(
        None, description="host devices for the container: /dev/ttyUSB0 or /dev/video0:/dev/camera:rw"
    )
    resources: Resources | None = None

    @field_validator("env", "secrets")
    @classmethod
    def _env_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return v

    @field_validator("passthrough")
    @classmethod
    def _devices(cls, v: list[str] | None) -> list[str] | None:
        for item in v or []:
            if not _PASSTHROUGH.match(item):
                raise ValueError(
                    f"{item!r}: use HOST_PATH[:CONTAINER_PATH][:PERMISSIONS], e.g. /dev/ttyUSB0:/dev/ttyUSB0:rw"
                )
        return v


class Device(Layer):
    """One edge device: where its engine is, its labels, its own overrides."""

    endpoint: str = Field(description="name of an entry in endpoints, or an endpoint URL (unix://...)")
    labels: list[str] = Field(default_factory=list, description="labels whose layers apply, in this order")


class HealthSettings(StrictModel):
    """How the deployer decides that a newly started agent is healthy."""

    check: Literal["status_topic", "container", "running"] = Field(
        "status_topic",
        description="status_topic: the agent's retained MQTT status says online after it started; "
        "container: the agent's status file says connected (a Docker health check, no broker access "
        "needed); running: the container keeps running for settle_s",
    )
    timeout_s: float = Field(60.0, gt=0, description="how long a new agent has to become healthy")
    settle_s: float = Field(2.0, ge=0, description="for check: running, how long it must stay up")
    mqtt: MqttSettings | None = Field(
        None, description="how the deployer reaches the broker (default: the agent's own mqtt settings)"
    )


class RolloutPolicy(StrictModel):
    """How ``apply`` rolls changes out."""

    batch_size: int = Field(1, ge=1, description="devices replaced at once")
    on_failure: Literal["stop", "continue"] = Field(
        "stop", description="after a device is rolled back: stop the rollout, or continue with the others"
    )
    stop_timeout_s: float = Field(15.0, ge=0, description="grace for the old agent to flush and say offline")
    health: HealthSettings = Field(default_factory=HealthSettings)


class FleetFile(StrictModel):
    """The whole ``fleet.yaml``."""

    fleet: Name = Field(description="fleet name: containers are labelled with it, several fleets may share an engine")
    image: str | None = Field(None, description="agent image of every device unless a layer names another")
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    defaults: Layer = Field(default_factory=Layer)
    labels: dict[str, Layer] = Field(default_factory=dict)
    devices: dict[Name, Device] = Field(min_length=1)
    base_dir: str = Field(".", exclude=True, description="directory relative paths start from")

    @model_validator(mode="after")
    def _references(self) -> FleetFile:
        problems = []
        for name, dev in self.devices.items():
            if "://" not in dev.endpoint and dev.endpoint not in self.endpoints:
                problems.append(
                    f"device {name}: endpoint {dev.endpoint!r} is neither a name in endpoints "
                    f"({', '.join(sorted(self.endpoints)) or 'none defined'}) nor a URL"
                )
            for label in dev.labels:
                if label not in self.labels:
                    problems.append(f"device {name}: label {label!r} has no entry in labels")
            if not (dev.image or any(self.labels[x].image for x in dev.labels if x in self.labels)
                    or self.defaults.image or self.image):  # fmt: skip
                problems.append(f"device {name}: no image (set image: at the top of the file)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DeviceSpec(StrictModel):
    """What one device should run: every layer merged, before secrets are read."""

    fleet: str
    name: str
    endpoint_name: str
    endpoint: Endpoint
    labels: list[str]
    image: str
    agent: dict[str, Any]
    env: dict[str, str]
    secrets: dict[str, SecretRef]
    passthrough: list[str]
    resources: Resources
    site: str
    device: str
    namespace: str


def _merge_layers(fleet: FleetFile, layers: list[Layer]) -> dict[str, Any]:
    """Fold layers (base first) into one set of settings."""
    out: dict[str, Any] = {
        "image": fleet.image,
        "agent": {},
        "env": {},
        "secrets": {},
        "passthrough": [],
        "resources": {},
    }
    for layer in layers:
        if layer.image:
            out["image"] = layer.image
        out["agent"] = deep_merge(out["agent"], layer.agent)
        out["env"] = {**out["env"], **layer.env}
        out["secrets"] = {**out["secrets"], **layer.secrets}
        if layer.passthrough is not None:
            out["passthrough"] = list(layer.passthrough)
        if layer.resources is not None:
            out["resources"] = {**out["resources"], **layer.resources.model_dump(exclude_none=True)}
    return out


def _resolve_path(base_dir: str, path: str) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else Path(base_dir) / p)


def device_specs(fleet: FleetFile, source: str = "fleet.yaml") -> list[DeviceSpec]:
    """Merge base, label and device layers of every device; validate each agent config.

    Raises :class:`ConfigError` naming the device and the agent.yaml field for
    any agent configuration the edge agent would refuse, so nothing bad is sent
    to a device.
    """
    from reflexarc.config import Problem
    from reflexarc.deploy.agentconfig import render_agent_config

    specs: list[DeviceSpec] = []
    problems: list[Problem] = []
    for name, dev in fleet.devices.items():
        merged = _merge_layers(fleet, [fleet.defaults, *(fleet.labels[x] for x in dev.labels), dev])
        agent = dict(merged["agent"])
        agent.setdefault("device", name)
        if "state_dir" in agent and agent["state_dir"] != STATE_DIR:
            problems.append(
                Problem(source, None, None, f"devices.{name}.agent.state_dir",
                        f"the deployer keeps agent state on a volume at {STATE_DIR}; remove state_dir")
            )  # fmt: skip
            continue
        agent["state_dir"] = STATE_DIR
        try:
            cfg = render_agent_config(agent, f"{source} (device {name})")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if "://" in dev.endpoint:
            endpoint, endpoint_name = Endpoint(url=dev.endpoint), dev.endpoint
        else:
            endpoint, endpoint_name = fleet.endpoints[dev.endpoint], dev.endpoint
        if endpoint.tls is not None:
            tls = endpoint.tls.model_copy(
                update={
                    k: _resolve_path(fleet.base_dir, v)
                    for k in ("ca_file", "cert_file", "key_file")
                    if (v := getattr(endpoint.tls, k))
                }
            )
            endpoint = endpoint.model_copy(update={"tls": tls})
        secrets = {
            k: (v.model_copy(update={"file": _resolve_path(fleet.base_dir, v.file)}) if v.file else v)
            for k, v in merged["secrets"].items()
        }
        specs.append(
            DeviceSpec(
                fleet=fleet.fleet,
                name=name,
                endpoint_name=endpoint_name,
                endpoint=endpoint,
                labels=list(dev.labels),
                image=merged["image"],
                agent=agent,
                env=merged["env"],
                secrets=secrets,
                passthrough=merged["passthrough"],
                resources=Resources(**merged["resources"]),
                site=cfg.site,
                device=cfg.device,
                namespace=cfg.namespace,
            )
        )
    if problems:
        raise ConfigError(problems)
    return specs


def load_fleet(path: str | os.PathLike[str]) -> FleetFile:
    """Read and validate ``fleet.yaml``; errors name the file, the line and the field."""
    fleet = load_yaml(path, FleetFile)
    fleet.base_dir = str(Path(path).parent.absolute())
    return fleet
