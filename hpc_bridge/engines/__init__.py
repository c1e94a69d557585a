"""Execution engines behind one interface: ``local``, ``dask`` and ``batch`` (PSI/J)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker

if TYPE_CHECKING:
    from reflexarc.hpc_bridge.site_config import EngineSettings


def make_engine(settings: EngineSettings, workdir_root: str) -> Engine:
    """The engine ``settings.kind`` names (heavy libraries are imported only for the one used)."""
    if settings.kind == "local":
        from reflexarc.hpc_bridge.engines.local import LocalEngine

        return LocalEngine(settings.local.max_workers)
    if settings.kind == "dask":
        from reflexarc.hpc_bridge.engines.dask_engine import DaskEngine

        return DaskEngine(settings.dask)
    from reflexarc.hpc_bridge.engines.batch import BatchEngine

    return BatchEngine(settings.batch, workdir_root)


__all__ = ["Engine", "EngineError", "Execution", "make_engine", "outcome_from_worker"]
