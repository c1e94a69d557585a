"""HPC bridge: the site agent, apps, jobs, engines, packed environments and composable resources.

``from reflexarc.hpc_bridge import app, implement`` declares apps;
``from reflexarc.hpc_bridge import compose`` is the notebook API for composed
machines (``compose.compose(gpus=2)``, ``compose.pools()``, ``compose.free(id)``).
See ``docs/hpc_bridge.md`` and ``docs/compose.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflexarc.hpc_bridge import compose as compose

__all__ = ["app", "compose", "implement"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the CLI (or worker.py on a compute node) stays cheap.
    if name in ("app", "implement"):
        from reflexarc.hpc_bridge import apps

        return getattr(apps, name)
    if name == "compose":
        return importlib.import_module("reflexarc.hpc_bridge.compose")
    raise AttributeError(f"module 'reflexarc.hpc_bridge' has no attribute {name!r}")
