"""Execution engines behind one interface: ``local``, ``dask`` (+ jobqueue pilots), ``parsl`` pilots, ``batch``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker

if TYPE_CHECKING:
    from reflexarc.hpc_bridge.site_config import EngineSettings


def make_engine(settings: EngineSettings, workdir_root: str, site: str | None = None) -> Engine:
    """The engine ``settings.kind`` names (heavy libraries are imported only for the one used).

    ``site`` labels the pilot engines' metrics and status (default: the state folder's name).
    """
    if settings.kind == "local":
        from reflexarc.hpc_bridge.engines.local import LocalEngine

        return LocalEngine(settings.local.max_workers)
    if settings.kind == "parsl":
        from reflexarc.hpc_bridge.engines.parsl_engine import ParslBackend
        from reflexarc.hpc_bridge.engines.pilot import PilotEngine

        return PilotEngine(ParslBackend, settings.parsl, workdir_root, "engine.parsl", site)
    if settings.kind == "dask" and settings.dask.cluster == "jobqueue":
        from reflexarc.hpc_bridge.engines.jobqueue import DaskJobqueueBackend
        from reflexarc.hpc_bridge.engines.pilot import PilotEngine

        assert settings.dask.jobqueue is not None
        return PilotEngine(DaskJobqueueBackend, settings.dask.jobqueue, workdir_root, "engine.dask.jobqueue", site)
    if settings.kind == "dask":
        from reflexarc.hpc_bridge.engines.dask_engine import DaskEngine

        return DaskEngine(settings.dask)
    from reflexarc.hpc_bridge.engines.batch import BatchEngine

    return BatchEngine(settings.batch, workdir_root)


__all__ = ["Engine", "EngineError", "Execution", "make_engine", "outcome_from_worker"]
