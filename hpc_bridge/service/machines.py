"""Composed machines in the agent: opened at start, handed to tasks that need more, expired when idle.

With ``compose:`` in site.yaml, a task needing more than the site's
``resources`` runs on a machine composed for it (see
:mod:`reflexarc.hpc_bridge.machines` for the pool's rules). This service
opens the composer with the agent's identity and takes over the machines a
previous agent process left (:meth:`ComposedMachines.open`), frees machines
idle for ``idle_timeout_s`` (:meth:`ComposedMachines.run`, its loop), and
at a clean stop frees the idle ones (:meth:`ComposedMachines.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.compose.drivers import DriverError
from reflexarc.hpc_bridge.compose.model import Machine
from reflexarc.hpc_bridge.compose.placement import PlacementError
from reflexarc.hpc_bridge.engines import Engine, EngineError, Execution
from reflexarc.hpc_bridge.machines import MachinePool, MachinesError, Note, exceeds, task_needs
from reflexarc.hpc_bridge.site_config import ComposeSettings, SiteConfig
from reflexarc.hpc_bridge.store import JobView
from reflexarc.hpc_bridge.worker import RunSpec

log = logging.getLogger(__name__)


class CompositionFailed(RuntimeError):
    """No machine could be composed for a task (nothing fits): the job fails with the composer's reason."""


class ComposedMachines:
    """The site's composed machines (one service loop: :meth:`run`, expiring idle machines)."""

    def __init__(self, cfg: SiteConfig, settings: ComposeSettings, composer: Any, pool: MachinePool) -> None:
        self.cfg = cfg
        self.settings = settings
        self.composer = composer
        self.pool = pool

    @classmethod
    async def open(cls, cfg: SiteConfig) -> ComposedMachines | None:
        """Open the composer of ``compose:`` (None without it) and take over machines a previous run left.

        Raises :class:`MachinesError` with what to fix (a missing token, a bad pools file).
        """
        c = cfg.compose
        if c is None:
            return None
        from reflexarc.hpc_bridge.compose.composer import Composer
        from reflexarc.hpc_bridge.compose.drivers import Driver, InventoryDriver, SlurmDriver

        driver: Driver = InventoryDriver()
        if c.driver == "slurm":
            driver = SlurmDriver(
                env={**os.environ, **c.slurm.env},
                partition=c.slurm.partition,
                account=c.slurm.account,
                start_timeout_s=c.slurm.start_timeout_s,
            )

        def open_composer() -> tuple[Any, Any]:
            try:
                composer = Composer(cfg.compose_database, cfg.compose_pools_path, driver)
            except ValueError as exc:
                raise MachinesError(f"compose.pools: {exc}") from None
            try:
                identity = composer.identity_from_env(c.token_env)
            except PermissionError as exc:
                composer.close()
                raise MachinesError(
                    f"compose: {exc} (the site agent composes machines as the user whose token is in "
                    f"${c.token_env}; its sha256 must be under 'tokens' in {cfg.compose_pools_path})"
                ) from None
            return composer, identity

        composer, identity = await asyncio.to_thread(open_composer)
        pool = MachinePool(
            composer, identity, cfg.site, idle_timeout_s=c.idle_timeout_s, max_machines=c.max_machines, rack=c.rack
        )
        try:
            adopted = await pool.adopt()
            if c.driver == "slurm":
                from reflexarc.hpc_bridge.engines.allocation import cancel_task_steps

                # Steps whose srun died with the previous agent would run on beside the re-run.
                for m in adopted:
                    if m.realisation.get("job_id"):
                        await asyncio.to_thread(cancel_task_steps, str(m.realisation["job_id"]), c.slurm.env)
        except BaseException:
            await asyncio.to_thread(composer.close)
            raise
        log.info(
            "site %s: composing machines as %s with the %s driver (at most %d, freed after %gs idle)",
            cfg.site,
            identity.user,
            c.driver,
            c.max_machines,
            c.idle_timeout_s,
        )
        return cls(cfg, c, composer, pool)

    async def run(self) -> None:
        """Free machines idle for ``idle_timeout_s`` (checked at least every second), until cancelled."""
        interval = min(1.0, max(0.1, self.settings.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            await self.pool.reap()

    async def close(self) -> None:
        """Free idle machines if ``free_on_stop``; close the composer."""
        with contextlib.suppress(Exception):
            await self.pool.close(free_idle=self.settings.free_on_stop)
        await asyncio.to_thread(self.composer.close)

    # ---- for the runner ---------------------------------------------------------------------------
    async def machine_for(self, job: JobView, app: AppSpec, note: Note) -> Machine | None:
        """A composed machine if the task needs more than the site offers (``None``: run it here).

        ``note`` records why the task waits (``note(text)``); the text is completed with what it needs.
        """
        need = task_needs(job.request.resources, app)
        why = exceeds(need, self.cfg.resources)
        if why is None:
            return None

        async def waiting(text: str) -> None:
            await note(f"{text}; the task {why}")

        try:
            return await self.pool.acquire(job.task_id, need, waiting)
        except PlacementError as exc:
            raise CompositionFailed(f"the task {why}, and no machine can be composed for it: {exc}") from None
        except DriverError as exc:
            raise EngineError(f"composing a machine for the task failed: {exc}") from None

    def rebind(self, job: JobView) -> Machine | None:
        """The machine a task re-attached after a restart runs on (marked busy again), if any."""
        if job.machine and self.pool.bind(job.task_id, job.machine):
            return self.pool.machine_of(job.task_id)
        return None

    async def release(self, task_id: str) -> None:
        """The task is over: its machine may serve another task (or expire)."""
        await self.pool.release(task_id)

    async def submit(self, spec: RunSpec, machine: Machine, engine: Engine) -> Execution:
        """Start the attempt on ``machine``: inside its Slurm allocation, or on the engine with its devices."""
        if machine.driver == "slurm":
            from reflexarc.hpc_bridge.engines.allocation import run_in_allocation

            job_id = machine.realisation.get("job_id")
            if not job_id:
                raise EngineError(f"machine {machine.id} has no Slurm job id in its realisation")
            execution = await run_in_allocation(spec, str(job_id), self.settings.slurm.env, machine.id)
        else:
            execution = await engine.submit(spec)
        execution.machine = machine.id
        return execution
