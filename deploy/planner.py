"""``plan``: compare what each device should run with what its engine runs.

Per device: ``create`` (no agent yet), ``replace`` (config hash differs),
``unchanged``, ``remove`` (an agent of this fleet whose device left the
fleet file), ``recover`` (a rollout was interrupted: a previous or half-made
container is still there), ``unreachable`` (the endpoint did not answer) or
``error`` (e.g. the image is not on the engine, a secret is missing). Every
endpoint is contacted once, concurrently, in threads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reflexarc.deploy.containers import DeviceContainers, config_hash, fleet_containers
from reflexarc.deploy.endpoints import Unreachable, connect
from reflexarc.deploy.fleet import DeviceSpec, Endpoint, FleetFile, device_specs
from reflexarc.deploy.secrets import SecretError, read_secrets


class Action(StrEnum):
    """What ``apply`` will do to a device."""

    CREATE = "create"
    REPLACE = "replace"
    UNCHANGED = "unchanged"
    REMOVE = "remove"
    RECOVER = "recover"
    UNREACHABLE = "unreachable"
    ERROR = "error"


CHANGES = (Action.CREATE, Action.REPLACE, Action.REMOVE, Action.RECOVER)


@dataclass
class DevicePlan:
    """The plan for one device."""

    device: str
    endpoint: str
    action: Action
    reason: str = ""
    spec: DeviceSpec | None = None
    current_hash: str | None = None
    desired_hash: str | None = None
    image_id: str | None = None
    container_id: str | None = None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no secrets)."""
        return {
            "device": self.device,
            "endpoint": self.endpoint,
            "action": self.action.value,
            "reason": self.reason,
            "current_hash": self.current_hash,
            "desired_hash": self.desired_hash,
            "container_id": self.container_id,
        }


@dataclass
class Plan:
    """The plan for a fleet, plus the open engine connections ``apply`` reuses."""

    fleet: FleetFile
    devices: list[DevicePlan]
    clients: dict[str, Any] = field(default_factory=dict, repr=False)

    def changes(self) -> list[DevicePlan]:
        """Devices ``apply`` would touch."""
        return [d for d in self.devices if d.action in CHANGES]

    def close(self) -> None:
        """Close every engine connection."""
        for client in self.clients.values():
            client.close()
        self.clients.clear()


def _interrupted(slot: DeviceContainers) -> str | None:
    """Why a device's containers show an interrupted rollout, or None."""
    if slot.next is not None:
        return "a new agent was created but never started"
    if slot.previous is not None and slot.current is None:
        return "the old agent is stopped and no new one exists"
    if slot.previous is not None:
        return "the previous agent was kept: the new one was never confirmed healthy"
    return None


def _plan_device(client: Any, spec: DeviceSpec, slot: DeviceContainers, fleet: FleetFile) -> DevicePlan:
    """The plan for one reachable device (blocking)."""
    from docker.errors import ImageNotFound

    dp = DevicePlan(spec.name, spec.endpoint_name, Action.UNCHANGED, spec=spec)
    if slot.current is not None:
        dp.current_hash = slot.hash
        dp.container_id = slot.current.id
    try:
        dp.secrets = read_secrets(spec.secrets)
    except SecretError as exc:
        dp.action, dp.reason = Action.ERROR, str(exc)
        return dp
    try:
        dp.image_id = client.images.get(spec.image).id
    except ImageNotFound:
        dp.action = Action.ERROR
        dp.reason = (
            f"image {spec.image} is not on {spec.endpoint_name}: build it there "
            "(reflexarc deploy image build --endpoint ...) or docker save | docker load it"
        )
        return dp
    dp.desired_hash = config_hash(spec, dp.image_id, dp.secrets, fleet.rollout.health)
    interrupted = _interrupted(slot)
    if interrupted:
        dp.action, dp.reason = Action.RECOVER, interrupted
    elif slot.current is None:
        dp.action, dp.reason = Action.CREATE, "no agent on this endpoint"
    elif dp.current_hash != dp.desired_hash:
        dp.action, dp.reason = Action.REPLACE, f"config {dp.current_hash} -> {dp.desired_hash}"
    elif slot.current.status != "running":
        dp.action, dp.reason = Action.REPLACE, f"agent is {slot.current.status}"
    else:
        dp.reason = f"config {dp.current_hash}"
    return dp


def _plan_endpoint(
    fleet: FleetFile, name: str, endpoint: Endpoint, specs: list[DeviceSpec]
) -> tuple[Any, list[DevicePlan]]:
    """Connect to one endpoint and plan its devices (blocking)."""
    try:
        client = connect(endpoint)
    except Unreachable as exc:
        return None, [DevicePlan(s.name, name, Action.UNREACHABLE, f"endpoint down: {exc}", spec=s) for s in specs]
    try:
        found = fleet_containers(client, fleet.fleet)
        plans = [_plan_device(client, s, found.get(s.name, DeviceContainers()), fleet) for s in specs]
        wanted = {s.name for s in specs}
        for device, slot in sorted(found.items()):
            if device in wanted:
                continue
            # Only devices that left the fleet file; a device that moved to another
            # endpoint shows here as remove and there as create.
            c = slot.current or slot.previous or slot.next
            plans.append(
                DevicePlan(
                    device,
                    name,
                    Action.REMOVE,
                    "not in the fleet file (on this endpoint)",
                    current_hash=slot.hash,
                    container_id=c.id if c is not None else None,
                )
            )
    except Exception as exc:  # an engine that fails mid-way is as good as unreachable for this run
        client.close()
        return None, [DevicePlan(s.name, name, Action.UNREACHABLE, f"endpoint failed: {exc}", spec=s) for s in specs]
    return client, plans


async def make_plan(fleet: FleetFile, only: list[str] | None = None, source: str = "fleet.yaml") -> Plan:
    """The plan for ``fleet`` (optionally only the devices named in ``only``)."""
    specs = device_specs(fleet, source)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"not in the fleet file: {', '.join(unknown)}")
        specs = [s for s in specs if s.name in only]
    by_endpoint: dict[str, list[DeviceSpec]] = {}
    for s in specs:
        by_endpoint.setdefault(s.endpoint_name, []).append(s)
    results = await asyncio.gather(
        *(
            asyncio.to_thread(_plan_endpoint, fleet, name, group[0].endpoint, group)
            for name, group in by_endpoint.items()
        )
    )
    plan = Plan(fleet, [])
    for name, (client, plans) in zip(by_endpoint, results, strict=True):
        if client is not None:
            plan.clients[name] = client
        plan.devices.extend(p for p in plans if not only or p.device in only)
    order = {s.name: i for i, s in enumerate(specs)}
    plan.devices.sort(key=lambda d: (order.get(d.device, len(order)), d.device))
    return plan
