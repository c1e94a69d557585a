"""Composable resources: compose machines from disaggregated device pools.

A machine (say 32 cores, 2 A100 GPUs and 1 TB of NVMe) is composed from
racks of pooled devices when work needs it and freed after. Placement keeps
every machine inside one fabric domain; the database guarantees a device is
never handed to two machines (across threads and processes); every change
is owner-checked and audited; drivers make the composition real (logically,
or as a Slurm allocation). See ``docs/compose.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports resolve on first use, so that importing the package (the CLI does,
# in every process) does not load SQLAlchemy and the composer.
_EXPORTS: dict[str, str] = {
    "ApplyResult": "model",
    "AuditEntry": "model",
    "Composer": "composer",
    "CompositionSpec": "model",
    "CompositionsFile": "model",
    "Device": "model",
    "Driver": "drivers",
    "DriverError": "drivers",
    "Identity": "model",
    "InventoryDriver": "drivers",
    "Machine": "model",
    "MachineList": "model",
    "MachineState": "model",
    "NamedComposition": "model",
    "PlacementError": "placement",
    "PoolRow": "model",
    "PoolsConfig": "inventory",
    "PoolsView": "model",
    "SlurmDriver": "drivers",
    "apply": "api",
    "audit": "api",
    "compose": "api",
    "configure": "api",
    "default_composer": "api",
    "export": "api",
    "free": "api",
    "hash_token": "inventory",
    "list_machines": "api",
    "load_compositions": "composer",
    "load_pools": "inventory",
    "machines_table": "model",
    "parse_pools": "inventory",
    "place": "placement",
    "pools": "api",
    "render_html": "model",
    "render_text": "model",
    "show": "api",
}


def __getattr__(name: str) -> Any:
    """Import an export's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ApplyResult",
    "AuditEntry",
    "Composer",
    "CompositionSpec",
    "CompositionsFile",
    "Device",
    "Driver",
    "DriverError",
    "Identity",
    "InventoryDriver",
    "Machine",
    "MachineList",
    "MachineState",
    "NamedComposition",
    "PlacementError",
    "PoolRow",
    "PoolsConfig",
    "PoolsView",
    "SlurmDriver",
    "apply",
    "audit",
    "compose",
    "configure",
    "default_composer",
    "export",
    "free",
    "hash_token",
    "list_machines",
    "load_compositions",
    "load_pools",
    "machines_table",
    "parse_pools",
    "place",
    "pools",
    "render_html",
    "render_text",
    "show",
]
