"""Composable resources: compose machines from disaggregated device pools.

A machine (say 32 cores, 2 A100 GPUs and 1 TB of NVMe) is composed from
racks of pooled devices when work needs it and freed after. Placement keeps
every machine inside one fabric domain; the database guarantees a device is
never handed to two machines (across threads and processes); every change
is owner-checked and audited; drivers make the composition real (logically,
or as a Slurm allocation). See ``docs/compose.md``.
"""

from .api import (
    apply,
    audit,
    compose,
    configure,
    default_composer,
    export,
    free,
    list_machines,
    pools,
    show,
)
from .composer import Composer, load_compositions
from .drivers import Driver, DriverError, InventoryDriver, SlurmDriver
from .inventory import PoolsConfig, hash_token, load_pools, parse_pools
from .model import (
    ApplyResult,
    AuditEntry,
    CompositionsFile,
    CompositionSpec,
    Device,
    Identity,
    Machine,
    MachineList,
    MachineState,
    NamedComposition,
    PoolRow,
    PoolsView,
    machines_table,
    render_html,
    render_text,
)
from .placement import PlacementError, place

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
