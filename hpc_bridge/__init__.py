"""HPC bridge: the site agent, apps, jobs, engines and packed environments.

``from reflexarc.hpc_bridge import app, implement`` declares apps; see
``docs/hpc_bridge.md`` for ``site.yaml`` and ``reflexarc site|jobs|env``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "implement"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the CLI (or worker.py on a compute node) stays cheap.
    if name in __all__:
        from reflexarc.hpc_bridge import apps

        return getattr(apps, name)
    raise AttributeError(f"module 'reflexarc.hpc_bridge' has no attribute {name!r}")
