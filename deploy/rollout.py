"""``apply``: make every device run what the fleet file says, in batches, with health checks and rollback.

Replacing a device's agent (never two agents on one spool at once)::

    create rx-F-D-next (not started; agent.yaml put in)   old agent still runs
    stop rx-F-D (SIGTERM: it flushes and says offline)
    rename rx-F-D -> rx-F-D-previous, rx-F-D-next -> rx-F-D
    start rx-F-D, wait until healthy
      healthy:   remove rx-F-D-previous
      unhealthy: remove the new one, rename rx-F-D-previous back, start it (rollback)

The state volume (spool) is mounted by whichever of the two runs. If the
deployer itself dies half-way, the names on the engine say where it stopped
and the next ``plan``/``apply`` recovers the device (``recover``) before
doing anything else, so a device is always on its old or its new agent.

Devices of a batch are rolled concurrently; after a batch with a rollback
the rollout stops or continues per ``rollout.on_failure``. Unreachable
devices are reported and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reflexarc.deploy.containers import DeviceContainers, container_name, create_agent, fleet_containers
from reflexarc.deploy.health import StatusWatcher, agent_mqtt, log_tail, wait_healthy
from reflexarc.deploy.planner import Action, DevicePlan, Plan

log = logging.getLogger("reflexarc.deploy.rollout")


class Result(StrEnum):
    """How a device came out of ``apply``."""

    CREATED = "created"
    REPLACED = "replaced"
    RECOVERED = "recovered"
    UNCHANGED = "unchanged"
    REMOVED = "removed"
    ROLLED_BACK = "rolled back"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNREACHABLE = "unreachable"
    ERROR = "error"


FAILURES = (Result.ROLLED_BACK, Result.FAILED)


@dataclass
class Outcome:
    """What happened to one device."""

    device: str
    endpoint: str
    result: Result
    detail: str = ""
    seconds: float = 0.0
    container_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "device": self.device,
            "endpoint": self.endpoint,
            "result": self.result.value,
            "detail": self.detail,
            "seconds": round(self.seconds, 2),
            "container_id": self.container_id,
        }


class DeployError(RuntimeError):
    """The rollout could not start (nothing was changed); the message says why and what to do."""


Progress = Callable[[str, str], None]


def _restore_previous(client: Any, fleet: str, device: str) -> str:
    """Put the previous agent back under its name and start it (blocking). Returns what was done."""
    slot = fleet_containers(client, fleet).get(device, DeviceContainers())
    done = []
    if slot.next is not None:
        slot.next.remove(force=True, v=True)
        done.append("removed the unstarted new agent")
    if slot.previous is not None:
        if slot.current is not None:
            slot.current.remove(force=True, v=True)
            done.append("removed the unconfirmed new agent")
        slot.previous.rename(container_name(fleet, device))
        slot.previous.start()
        done.append("restarted the previous agent")
    return "; ".join(done) or "nothing to recover"


class Rollout:
    """One ``apply`` run over a plan."""

    def __init__(self, plan: Plan, progress: Progress | None = None) -> None:
        """Prepare; ``run()`` does the work."""
        self.plan = plan
        self.policy = plan.fleet.rollout
        self.progress = progress or (lambda _device, _text: None)
        self._watchers: dict[str, StatusWatcher] = {}

    # ---- health --------------------------------------------------------------
    async def _start_watchers(self, devices: list[DevicePlan]) -> None:
        """Connect to every broker the health checks need, before any device is touched."""
        if self.policy.health.check != "status_topic":
            return
        for dp in devices:
            if dp.spec is None:
                continue
            settings = agent_mqtt(dp.spec, self.policy.health)
            key = json.dumps([settings.model_dump(mode="json"), dp.spec.namespace], sort_keys=True)
            if key in self._watchers:
                continue
            watcher = StatusWatcher(settings, dp.spec.namespace)
            try:
                await watcher.start()
            except Exception as exc:
                raise DeployError(
                    f"the health check reads agent status from MQTT {settings.host}:{settings.port}, "
                    f"which this machine cannot reach ({exc}); nothing was changed. Set rollout.health.mqtt "
                    "to how this machine reaches the broker, or use rollout.health.check: container"
                ) from None
            self._watchers[key] = watcher

    def _watcher(self, dp: DevicePlan) -> StatusWatcher | None:
        if self.policy.health.check != "status_topic" or dp.spec is None:
            return None
        settings = agent_mqtt(dp.spec, self.policy.health)
        return self._watchers[json.dumps([settings.model_dump(mode="json"), dp.spec.namespace], sort_keys=True)]

    async def _stop_watchers(self) -> None:
        for w in self._watchers.values():
            await w.stop()
        self._watchers.clear()

    # ---- one device ------------------------------------------------------------
    async def _roll(self, dp: DevicePlan) -> Outcome:
        """Create or replace one device's agent; roll back if the new one is not healthy."""
        assert dp.spec is not None and dp.image_id is not None and dp.desired_hash is not None
        spec, fleet = dp.spec, self.plan.fleet
        client = self.plan.clients[dp.endpoint]
        name = container_name(fleet.fleet, spec.name)
        t0 = time.monotonic()
        recovered = ""
        if dp.action is Action.RECOVER:
            self.progress(spec.name, "recovering an interrupted rollout")
            recovered = await asyncio.to_thread(_restore_previous, client, fleet.fleet, spec.name)
        slot = await asyncio.to_thread(fleet_containers, client, fleet.fleet)
        old = slot.get(spec.name, DeviceContainers()).current
        if (
            old is not None
            and old.labels.get("io.reflexarc.config-hash") == dp.desired_hash
            and old.status == "running"
        ):
            return Outcome(spec.name, dp.endpoint, Result.RECOVERED if recovered else Result.UNCHANGED,
                           recovered, time.monotonic() - t0, old.id)  # fmt: skip
        self.progress(spec.name, "creating the new agent")
        new = await asyncio.to_thread(
            create_agent,
            client,
            spec,
            dp.image_id,
            dp.secrets,
            dp.desired_hash,
            self.policy.health,
            container_name(fleet.fleet, spec.name, "next"),
        )
        swapped = False
        try:
            if old is not None:
                self.progress(spec.name, "stopping the old agent")
                await asyncio.to_thread(old.stop, timeout=int(self.policy.stop_timeout_s))
                await asyncio.to_thread(old.rename, container_name(fleet.fleet, spec.name, "previous"))
            await asyncio.to_thread(new.rename, name)
            swapped = True
            self.progress(spec.name, "starting the new agent")
            await asyncio.to_thread(new.start)
            self.progress(spec.name, f"waiting for health ({self.policy.health.check})")
            ok, why = await wait_healthy(new, spec, self.policy.health, self._watcher(dp))
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            if old is not None:
                await asyncio.to_thread(old.remove, v=True)
            result = Result.REPLACED if old is not None else Result.CREATED
            return Outcome(spec.name, dp.endpoint, result, why, time.monotonic() - t0, new.id)
        # Not healthy: keep the evidence in the report, then put the old agent back.
        tail = await asyncio.to_thread(log_tail, new, 8)
        self.progress(spec.name, f"unhealthy ({why}); rolling back")
        with contextlib.suppress(Exception):
            await asyncio.to_thread(new.remove, force=True, v=True)
        if old is None:
            return Outcome(spec.name, dp.endpoint, Result.FAILED, f"{why}; new agent removed\n{tail}",
                           time.monotonic() - t0)  # fmt: skip
        try:
            if swapped:
                await asyncio.to_thread(old.rename, name)
            await asyncio.to_thread(old.start)
            old_ok, old_why = await wait_healthy(
                old, spec, self.policy.health.model_copy(update={"check": "running"}), None
            )
        except Exception as exc:
            return Outcome(spec.name, dp.endpoint, Result.FAILED,
                           f"{why}; rollback failed: {exc}: run apply again to recover", time.monotonic() - t0)  # fmt: skip
        back = "previous agent running again" if old_ok else f"previous agent restarted but {old_why}"
        return Outcome(
            spec.name, dp.endpoint, Result.ROLLED_BACK, f"{why}; {back}\n{tail}", time.monotonic() - t0, old.id
        )

    async def _remove(self, dp: DevicePlan) -> Outcome:
        """Stop and remove the agent of a device that left the fleet file (its state volume is kept)."""
        client = self.plan.clients[dp.endpoint]
        t0 = time.monotonic()
        self.progress(dp.device, "removing")
        n = await asyncio.to_thread(remove_device, client, self.plan.fleet.fleet, dp.device, self.policy.stop_timeout_s)
        return Outcome(dp.device, dp.endpoint, Result.REMOVED, f"{n} container(s); state volume kept",
                       time.monotonic() - t0)  # fmt: skip

    async def _one(self, dp: DevicePlan) -> Outcome:
        try:
            if dp.action is Action.REMOVE:
                out = await self._remove(dp)
            else:
                out = await self._roll(dp)
        except Exception as exc:
            # The engine failed under us (e.g. it went away): report it; the next apply recovers.
            log.exception("device %s failed", dp.device)
            out = Outcome(dp.device, dp.endpoint, Result.FAILED, f"{type(exc).__name__}: {exc}")
        self.progress(dp.device, out.result.value)
        return out

    # ---- the fleet ----------------------------------------------------------------
    async def run(self) -> list[Outcome]:
        """Apply the plan; one outcome per device, in plan order."""
        outcomes: dict[str, Outcome] = {}
        for dp in self.plan.devices:
            if dp.action is Action.UNCHANGED:
                outcomes[dp.device] = Outcome(dp.device, dp.endpoint, Result.UNCHANGED, dp.reason,
                                              container_id=dp.container_id)  # fmt: skip
            elif dp.action is Action.UNREACHABLE:
                outcomes[dp.device] = Outcome(dp.device, dp.endpoint, Result.UNREACHABLE, dp.reason)
            elif dp.action is Action.ERROR:
                outcomes[dp.device] = Outcome(dp.device, dp.endpoint, Result.ERROR, dp.reason)
        rolls = [d for d in self.plan.devices if d.action in (Action.CREATE, Action.REPLACE, Action.RECOVER)]
        removes = [d for d in self.plan.devices if d.action is Action.REMOVE]
        await self._start_watchers(rolls)
        stopped_by: str | None = None
        try:
            size = self.policy.batch_size
            for i in range(0, len(rolls), size):
                batch = rolls[i : i + size]
                if stopped_by is not None:
                    for dp in batch:
                        outcomes[dp.device] = Outcome(dp.device, dp.endpoint, Result.SKIPPED,
                                                      f"rollout stopped after {stopped_by} failed")  # fmt: skip
                    continue
                for out in await asyncio.gather(*(self._one(dp) for dp in batch)):
                    outcomes[out.device] = out
                    if out.result in FAILURES and self.policy.on_failure == "stop" and stopped_by is None:
                        stopped_by = out.device
            for dp in removes:
                if stopped_by is not None:
                    outcomes[dp.device] = Outcome(dp.device, dp.endpoint, Result.SKIPPED,
                                                  f"rollout stopped after {stopped_by} failed")  # fmt: skip
                else:
                    outcomes[dp.device] = await self._one(dp)
        finally:
            await self._stop_watchers()
        return [outcomes[d.device] for d in self.plan.devices if d.device in outcomes]


def remove_device(client: Any, fleet: str, device: str, stop_timeout_s: float) -> int:
    """Stop and remove every container of one device (blocking); the state volume stays. Returns the count."""
    slot = fleet_containers(client, fleet).get(device, DeviceContainers())
    n = 0
    for c in [slot.current, slot.previous, slot.next, *slot.extra]:
        if c is None:
            continue
        with contextlib.suppress(Exception):
            c.stop(timeout=int(stop_timeout_s))
        c.remove(force=True, v=True)
        n += 1
    return n


async def apply_plan(plan: Plan, progress: Progress | None = None) -> list[Outcome]:
    """Apply ``plan`` (see :class:`Rollout`)."""
    return await Rollout(plan, progress).run()
