"""``status``: what each device of a fleet runs now, and whether it matches the fleet file."""

from __future__ import annotations

import asyncio
from typing import Any

from reflexarc.deploy.containers import DeviceContainers, container_name, fleet_containers
from reflexarc.deploy.planner import Action, Plan


def _container_info(c: Any) -> dict[str, Any]:
    """State of one agent container (blocking)."""
    c.reload()
    state = c.attrs.get("State", {})
    return {
        "container": c.name,
        "id": c.short_id,
        "state": state.get("Status"),
        "health": (state.get("Health") or {}).get("Status"),
        "started_at": state.get("StartedAt"),
        "restarts": c.attrs.get("RestartCount", 0),
        "image": c.labels.get("io.reflexarc.image"),
    }


def _endpoint_status(client: Any, fleet: str, devices: list[str]) -> dict[str, dict[str, Any]]:
    found = fleet_containers(client, fleet)
    out = {}
    for device in devices:
        slot = found.get(device, DeviceContainers())
        out[device] = _container_info(slot.current) if slot.current is not None else {"state": "absent"}
    return out


async def fleet_status(plan: Plan) -> list[dict[str, Any]]:
    """One row per device: plan action (is it current?) plus its container's state."""
    by_endpoint: dict[str, list[str]] = {}
    for dp in plan.devices:
        if dp.endpoint in plan.clients:
            by_endpoint.setdefault(dp.endpoint, []).append(dp.device)
    results = await asyncio.gather(
        *(
            asyncio.to_thread(_endpoint_status, plan.clients[ep], plan.fleet.fleet, devices)
            for ep, devices in by_endpoint.items()
        )
    )
    info: dict[tuple[str, str], dict[str, Any]] = {}
    for ep, res in zip(by_endpoint, results, strict=True):
        for device, row in res.items():
            info[(ep, device)] = row
    rows = []
    for dp in plan.devices:
        row = {
            "device": dp.device,
            "endpoint": dp.endpoint,
            "config": {
                Action.UNCHANGED: "current",
                Action.REPLACE: "outdated",
                Action.CREATE: "not deployed",
                Action.REMOVE: "not in fleet file",
                Action.RECOVER: "interrupted rollout",
            }.get(dp.action, dp.action.value),
            "detail": dp.reason if dp.action in (Action.UNREACHABLE, Action.ERROR, Action.RECOVER) else "",
            "container": container_name(plan.fleet.fleet, dp.device),
            "state": "unknown" if dp.action is Action.UNREACHABLE else "absent",
        }
        row.update(info.get((dp.endpoint, dp.device), {}))
        rows.append(row)
    return rows
