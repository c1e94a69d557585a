"""Module-level helpers for notebooks: one default composer, identity from the environment.

    >>> from reflexarc.hpc_bridge import compose as rc
    >>> rc.configure(db="compose.db", pools="pools.yaml")
    >>> m = rc.compose(cpus=32, gpus=2, gpu_model="A100", storage_gb=1000)
    >>> rc.free(m.id)

The identity comes from ``$RX_COMPOSE_TOKEN`` unless one is passed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from .composer import Composer
from .drivers import Driver
from .inventory import PoolsConfig
from .model import ApplyResult, AuditEntry, CompositionSpec, Identity, Machine, MachineList, PoolsView
from .settings import POOLS_ENV

_lock = threading.Lock()
_default: Composer | None = None


def configure(
    db: str | Path | None = None,
    pools: str | Path | PoolsConfig | None = None,
    driver: Driver | None = None,
) -> Composer:
    """Create (or replace) the default composer used by the helpers below."""
    global _default
    with _lock:
        if _default is not None:
            _default.close()
        _default = Composer(db, pools if pools is not None else os.environ.get(POOLS_ENV), driver)
        return _default


def default_composer() -> Composer:
    """The default composer, created from ``$RX_COMPOSE_DB``/``$RX_COMPOSE_POOLS`` on first use."""
    with _lock:
        current = _default
    return current if current is not None else configure()


def _who(identity: Identity | None) -> Identity:
    """The given identity, else the one of ``$RX_COMPOSE_TOKEN``."""
    return identity if identity is not None else default_composer().identity_from_env()


def compose(
    spec: CompositionSpec | dict[str, Any] | None = None,
    *,
    identity: Identity | None = None,
    name: str | None = None,
    **fields: Any,
) -> Machine:
    """Compose a machine: ``compose(cpus=32, gpus=2, gpu_model="A100")`` or ``compose(spec)``."""
    return default_composer().compose(spec if spec is not None else fields, _who(identity), name=name)


def free(key: str, *, identity: Identity | None = None) -> Machine:
    """Free a machine by id or name."""
    return default_composer().free(key, _who(identity))


def list_machines(*, all: bool = False) -> MachineList:
    """Live machines (every machine with ``all=True``); a notebook shows them as one table."""
    return MachineList(default_composer().list(all=all))


def show(key: str) -> Machine:
    """One machine by id or name."""
    return default_composer().show(key)


def pools() -> PoolsView:
    """Free/used devices per rack and kind."""
    return default_composer().pools()


def export(key: str) -> str:
    """The compositions YAML that recomposes a machine."""
    return default_composer().export(key)


def apply(file_or_text: str | Path, *, identity: Identity | None = None, prune: bool = False) -> list[ApplyResult]:
    """Make the named compositions of a file exist."""
    return default_composer().apply(file_or_text, _who(identity), prune=prune)


def audit(*, limit: int | None = None, machine_id: str | None = None) -> list[AuditEntry]:
    """The audit log, oldest first."""
    return default_composer().audit(limit=limit, machine_id=machine_id)
