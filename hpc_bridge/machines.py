"""Elastic composed machines for the site agent: compose when a task needs more, reuse, free when idle.

When a task needs more than the site's ``resources`` offer (say 2 GPUs on a
site with none), the agent asks the composer (``compose:`` in site.yaml) for
a machine, runs the task there and keeps the machine for the next task that
fits. A machine idle for ``idle_timeout_s`` is freed; a machine is never
freed while a task runs on it.

The decisions are pure functions (:func:`exceeds`, :func:`decide`,
:func:`expired`) so they can be tested without a composer;
:class:`MachinePool` applies them under one asyncio lock.

Machines the agent composes are named ``rx-<site>-<hash>-<random>`` and owned
by the agent's compose identity, so after a restart (even ``kill -9``) the
agent finds them in the composer database and reuses or frees them: nothing
is leaked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from reflexarc.events import Resources, stable_id
from reflexarc.hpc_bridge.apps import AppSpec, SiteResources
from reflexarc.hpc_bridge.compose.model import CompositionSpec, Identity, Machine, MachineState
from reflexarc.hpc_bridge.compose.placement import PlacementError, place

if TYPE_CHECKING:
    from reflexarc.hpc_bridge.compose.composer import Composer

log = logging.getLogger(__name__)


class MachinesError(RuntimeError):
    """The ``compose:`` section cannot be used (no token, unreadable pools file); the text says what to fix."""


# ---- pure decisions ------------------------------------------------------------------------------
def task_needs(requested: Resources, app: AppSpec) -> Resources:
    """What a task needs at least: the request's resources merged with the app's declaration.

    An app with several implementations needs only the fewest GPUs any of them asks
    for (the CPU version runs anywhere); the machine it gets then picks the best one.
    """
    gpus_options = [app.gpus, *(i.gpus for i in app.implementations)]
    app_gpus = min(gpus_options)
    memory = [m for m in (requested.memory_gb, app.memory_gb) if m]
    gpus = max(requested.gpus, app_gpus)
    return Resources(
        cpus=max(requested.cpus, app.cpus),
        gpus=gpus,
        gpu_model=requested.gpu_model or (app.gpu_model if gpus else None),
        memory_gb=max(memory) if memory else None,
        walltime_s=requested.walltime_s,
    )


def exceeds(need: Resources, offer: SiteResources) -> str | None:
    """Why ``need`` does not fit what the site offers one task, or ``None`` if it fits."""
    if need.gpus > offer.gpus:
        return f"needs {need.gpus} GPU(s), the site offers {offer.gpus}"
    if need.gpus and need.gpu_model and offer.gpu_model != need.gpu_model:
        return f"needs GPU model {need.gpu_model}, the site has {offer.gpu_model or 'none named'}"
    if need.cpus > offer.cpus:
        return f"needs {need.cpus} CPUs, the site offers {offer.cpus}"
    if need.memory_gb and offer.memory_gb and need.memory_gb > offer.memory_gb:
        return f"needs {need.memory_gb:g} GB memory, the site offers {offer.memory_gb:g}"
    return None


def spec_for(need: Resources, rack: str | None = None) -> CompositionSpec:
    """The composition spec of a machine for ``need`` (memory rounded up to whole GB)."""
    return CompositionSpec(
        cpus=need.cpus,
        gpus=need.gpus,
        gpu_model=need.gpu_model,
        memory_gb=math.ceil(need.memory_gb or 0),
        rack=rack,
    )


def gpus_of(machine: Machine) -> list[str]:
    """Ids of the machine's GPU devices."""
    return [d.id for d in machine.devices if d.kind == "gpu"]


def fits(machine: Machine, spec: CompositionSpec) -> bool:
    """Can a task needing ``spec`` run on ``machine``?"""
    gpus = [d for d in machine.devices if d.kind == "gpu"]
    if len(gpus) < spec.gpus or machine.spec.cpus < spec.cpus:
        return False
    if spec.gpus and spec.gpu_model and any(d.model != spec.gpu_model for d in gpus):
        return False
    return not (spec.memory_gb and machine.spec.memory_gb < spec.memory_gb)


def offer_of(machine: Machine) -> SiteResources:
    """What a composed machine offers one task (chooses the app's implementation there)."""
    gpus = [d for d in machine.devices if d.kind == "gpu"]
    models = {d.model for d in gpus}
    return SiteResources(
        cpus=machine.spec.cpus,
        gpus=len(gpus),
        gpu_model=models.pop() if len(models) == 1 else None,
        memory_gb=float(machine.spec.memory_gb) if machine.spec.memory_gb else None,
    )


def machine_environment(machine: Machine, set_cuda: bool) -> dict[str, str]:
    """Environment variables telling the task which machine and devices it got.

    ``set_cuda`` (logical compositions): ``CUDA_VISIBLE_DEVICES`` lists each GPU's
    ``labels.index`` if the pools file gives one, else its position in the machine
    (composed GPUs appear to the host as devices 0..n-1). A Slurm allocation sets
    ``CUDA_VISIBLE_DEVICES`` itself, so it is left alone there.
    """
    gpus = [d for d in machine.devices if d.kind == "gpu"]
    node = machine.node
    env = {
        "RX_MACHINE": machine.id,
        "RX_MACHINE_NAME": machine.name or machine.id,
        "RX_MACHINE_NODE": node.node_name if node else "",
        "RX_MACHINE_CPUS": str(machine.spec.cpus),
        "RX_MACHINE_GPUS": ",".join(d.id for d in gpus),
        "RX_MACHINE_GPU_MODEL": ",".join(sorted({d.model or "" for d in gpus})),
    }
    if set_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(d.labels.get("index", str(i)) for i, d in enumerate(gpus))
    return env


@dataclass
class Slot:
    """A composed machine this agent holds: the task on it (if any) and since when it is idle."""

    machine: Machine
    task: str | None = None
    idle_since: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What to do for a task that needs a machine."""

    action: Literal["reuse", "compose", "evict", "wait"]
    slot: Slot | None = None


def decide(spec: CompositionSpec, slots: list[Slot], reserved: int, max_machines: int) -> Decision:
    """Reuse an idle machine that fits, else compose one, else make room, else wait.

    ``reserved`` counts compositions under way (they count against
    ``max_machines``). Among fitting idle machines the smallest wins (big ones
    stay for big tasks); to make room the machine idle the longest is evicted.
    """
    idle = [s for s in slots if s.task is None]
    fitting = [s for s in idle if fits(s.machine, spec)]
    if fitting:
        best = min(fitting, key=lambda s: (len(gpus_of(s.machine)), s.machine.spec.cpus, s.idle_since))
        return Decision("reuse", best)
    if len(slots) + reserved < max_machines:
        return Decision("compose")
    if idle:
        return Decision("evict", min(idle, key=lambda s: s.idle_since))
    return Decision("wait")


def expired(slots: list[Slot], now: float, idle_timeout_s: float) -> list[Slot]:
    """Idle machines whose idle time reached the timeout (a busy machine never expires)."""
    return [s for s in slots if s.task is None and now - s.idle_since >= idle_timeout_s]


# ---- the pool --------------------------------------------------------------------------------------
Note = Callable[[str], Awaitable[None]]


class MachinePool:
    """The composed machines of one site agent, elastic between 0 and ``max_machines``."""

    def __init__(
        self,
        composer: Composer,
        identity: Identity,
        site: str,
        *,
        idle_timeout_s: float,
        max_machines: int,
        rack: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.composer = composer
        self.identity = identity
        self.site = site
        self.idle_timeout_s = idle_timeout_s
        self.max_machines = max_machines
        self.rack = rack
        self.clock = clock
        self._slots: dict[str, Slot] = {}
        self._reserved = 0
        self._cond = asyncio.Condition()
        #: Bumped (under the lock) on every change that may let a waiting task go on.
        self._generation = 0

    @property
    def prefix(self) -> str:
        """Name prefix of this site's machines (a hash keeps sites 'a' and 'a-b' apart)."""
        return f"rx-{self.site[:30]}-{stable_id('site', self.site)[:6]}-"

    @property
    def driver(self) -> str:
        """Name of the composer's driver (``inventory`` or ``slurm``)."""
        return self.composer.driver.name

    def slots(self) -> list[Slot]:
        """A snapshot of the machines held."""
        return list(self._slots.values())

    def machine_of(self, task_id: str) -> Machine | None:
        """The machine a task runs on, if any."""
        return next((s.machine for s in self._slots.values() if s.task == task_id), None)

    def _notify(self) -> None:
        """Wake waiting tasks (the caller holds the lock)."""
        self._generation += 1
        self._cond.notify_all()

    def _name(self) -> str:
        return f"{self.prefix}{uuid.uuid4().hex[:8]}"

    # -- restart --------------------------------------------------------------------------------
    async def adopt(self) -> list[Machine]:
        """Take over the machines a previous agent process of this site composed (after a restart).

        Composed ones become idle machines of this pool (reused, or freed after the
        idle timeout); ones a crash left half-composed or half-freed are freed.
        """
        ours = [
            m
            for m in await asyncio.to_thread(self.composer.list)
            if m.owner == self.identity.user and (m.name or "").startswith(self.prefix)
        ]
        adopted: list[Machine] = []
        for m in ours:
            if m.driver != self.driver:
                log.warning(
                    "machine %s was composed with the %s driver, this site now uses %s: free it with "
                    "`reflexarc compose free %s` and that driver",
                    m.id,
                    m.driver,
                    self.driver,
                    m.id,
                )
                continue
            if m.state is MachineState.COMPOSED:
                self._slots[m.id] = Slot(m, None, self.clock())
                adopted.append(m)
                continue
            log.info("machine %s was left %s by a crash; freeing it", m.id, m.state.value)
            try:
                await self.composer.afree(m.id, self.identity, force=True)
            except Exception as exc:
                log.warning("cannot free machine %s left %s: %s", m.id, m.state.value, exc)
        if adopted:
            log.info(
                "adopted %d composed machine(s) from before the restart: %s",
                len(adopted),
                ", ".join(m.id for m in adopted),
            )
        return adopted

    def bind(self, task_id: str, machine_id: str) -> bool:
        """Mark a known machine busy with a task re-attached after a restart."""
        slot = self._slots.get(machine_id)
        if slot is None or slot.task not in (None, task_id):
            return False
        slot.task = task_id
        return True

    # -- acquire / release ---------------------------------------------------------------------------
    async def acquire(self, task_id: str, need: Resources, note: Note | None = None) -> Machine:
        """A machine for ``task_id``: an idle one that fits, or a new composition.

        At ``max_machines`` an idle machine that does not fit is freed to make room
        (only if that lets the new one be placed); while the machines that would have
        to go are busy, it waits. Raises :class:`PlacementError` (the composer's
        message, audited) when the pools cannot make it even if this site freed all
        its machines.
        """
        spec = spec_for(need, self.rack)
        noted = False
        victim: Slot | None = None
        impossible: str | None = None  # why it cannot fit even if this site freed all its machines
        held: list[Slot] = []
        while True:
            async with self._cond:
                d = decide(spec, list(self._slots.values()), self._reserved, self.max_machines)
                if d.action == "reuse":
                    assert d.slot is not None
                    d.slot.task = task_id
                    log.info("task %s: reusing machine %s", task_id, d.slot.machine.id)
                    return d.slot.machine
                if d.action == "compose":
                    self._reserved += 1
                    break
                held, generation, under_way = list(self._slots.values()), self._generation, self._reserved
            # At the limit: is it worth freeing idle machines, or waiting for busy ones?
            if not under_way:
                impossible = await asyncio.to_thread(self._misfit_after_freeing, spec, held)
                if impossible is not None:
                    # Not even with every machine of this site freed: let the composer say why (audited).
                    # (While compositions are under way their devices are unknown: wait for them instead.)
                    async with self._cond:
                        self._reserved += 1
                    break
            if (
                d.action == "evict"
                and await asyncio.to_thread(self._misfit_after_freeing, spec, [s for s in held if s.task is None])
                is None
            ):
                assert d.slot is not None
                async with self._cond:
                    slot = self._slots.get(d.slot.machine.id)
                    if slot is None or slot.task is not None:
                        continue  # taken meanwhile: decide again
                    victim = self._slots.pop(slot.machine.id)
                    self._reserved += 1
                break
            if not noted:
                noted = True
                if note:
                    await note(
                        f"waiting for a composed machine: all {self.max_machines} (compose.max_machines) are busy"
                    )
            async with self._cond:
                if generation == self._generation:  # nothing changed since the decision
                    await self._cond.wait()
        try:
            if victim is not None:
                await self._free(victim, f"making room for task {task_id} ({spec.describe()})")
            if note:
                await note(f"composing a machine ({spec.describe()})")
            try:
                machine = await self._compose(spec)
            except PlacementError as exc:
                if impossible is not None and held:
                    # The composer speaks of what is busy now; say also that waiting would not help.
                    raise PlacementError(
                        f"{exc}; even if this site freed its {len(held)} machine(s): {impossible}"
                    ) from None
                raise
        except BaseException:
            async with self._cond:
                self._reserved -= 1
                self._notify()
            raise
        async with self._cond:
            self._reserved -= 1
            self._slots[machine.id] = Slot(machine, task_id)
            self._notify()  # waiting tasks decide again, now knowing this machine's devices
        log.info(
            "task %s: composed machine %s (%s): %s", task_id, machine.id, spec.describe(), ", ".join(machine.device_ids)
        )
        return machine

    async def _compose(self, spec: CompositionSpec) -> Machine:
        """Compose; if the pools are short, free this site's idle machines (oldest first) and try again.

        Idle machines are only given up when that makes the composition possible.
        """
        while True:
            try:
                return await self.composer.acompose(spec, self.identity, name=self._name())
            except PlacementError:
                async with self._cond:
                    idle = sorted((s for s in self._slots.values() if s.task is None), key=lambda s: s.idle_since)
                if not idle or await asyncio.to_thread(self._misfit_after_freeing, spec, idle) is not None:
                    raise
                async with self._cond:
                    victim = self._slots.pop(idle[0].machine.id, None)
                if victim is None or not await self._free(victim, f"its devices are needed for {spec.describe()}"):
                    raise

    def _misfit_after_freeing(self, spec: CompositionSpec, slots: list[Slot]) -> str | None:
        """Why ``spec`` would not place even on the free devices plus those of ``slots`` (None: it would).

        Blocking (a database read): call it in a thread.
        """
        with self.composer.store.read() as conn:
            free = self.composer.store.free_devices(conn)
        held = [d for s in slots for d in s.machine.devices]
        try:
            place(spec, [*free, *held])
        except PlacementError as exc:
            return str(exc)
        return None

    async def release(self, task_id: str) -> None:
        """The task is over: its machine becomes idle (and may be reused or expire)."""
        async with self._cond:
            for slot in self._slots.values():
                if slot.task == task_id:
                    slot.task = None
                    slot.idle_since = self.clock()
            self._notify()

    # -- freeing ---------------------------------------------------------------------------------------
    async def _free(self, slot: Slot, why: str) -> bool:
        try:
            await self.composer.afree(slot.machine.id, self.identity)
        except Exception as exc:
            # Keep it: it is retried at the next expiry (never forgotten, never leaked).
            log.warning("cannot free machine %s (%s): %s", slot.machine.id, why, exc)
            async with self._cond:
                slot.idle_since = self.clock()
                self._slots[slot.machine.id] = slot
                self._notify()
            return False
        log.info("freed machine %s: %s", slot.machine.id, why)
        async with self._cond:
            self._notify()
        return True

    async def reap(self) -> list[str]:
        """Free the machines idle for ``idle_timeout_s``; returns their ids."""
        async with self._cond:
            victims = expired(list(self._slots.values()), self.clock(), self.idle_timeout_s)
            for s in victims:
                del self._slots[s.machine.id]
        freed = []
        for s in victims:
            if await self._free(s, f"idle for {self.idle_timeout_s:g}s"):
                freed.append(s.machine.id)
        return freed

    async def close(self, free_idle: bool) -> None:
        """On a clean stop: free the idle machines (``free_idle``), keep busy ones for the next start."""
        if not free_idle:
            return
        async with self._cond:
            victims = [s for s in self._slots.values() if s.task is None]
            for s in victims:
                del self._slots[s.machine.id]
        for s in victims:
            await self._free(s, "the site agent stops")
