"""The site's heartbeat: what it offers, what waits and what it can still take, on ``{ns}.sites``.

Every ``presence.interval_s`` seconds the agent publishes a
:class:`~reflexarc.events.SiteStatus` keyed by its site to the compacted
sites topic (the newest record per site is what readers see), and a last one
with ``state: stopped`` when it stops cleanly. Routers and ``reflexarc sites``
judge a site live by the age of its newest heartbeat
(:mod:`reflexarc.sites`). A heartbeat Kafka does not take is only logged: the
next one says the same, newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any, Literal

from reflexarc.events import SiteApp, SiteStatus
from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.engines.base import Engine
from reflexarc.hpc_bridge.service import nap
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.kafka import ensure_topics, send_event
from reflexarc.topics import Topics

log = logging.getLogger(__name__)


def app_catalogue(apps: dict[str, AppSpec]) -> dict[str, SiteApp]:
    """What the site offers, per app: resources and a fingerprint of the app's definition."""
    return {
        name: SiteApp(
            cpus=spec.cpus,
            gpus=spec.gpus,
            gpu_model=spec.gpu_model,
            memory_gb=spec.memory_gb,
            fingerprint=hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16],
        )
        for name, spec in sorted(apps.items())
    }


class Presence:
    """Publishes the site's status every interval, and once more when it stops."""

    def __init__(
        self, cfg: SiteConfig, apps: dict[str, AppSpec], engine: Engine, jobs: AsyncJobStore, producer: Any
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.namespace)
        self.engine = engine
        self.jobs = jobs
        self.producer = producer
        self.interval_s = cfg.presence.interval_s
        self.catalogue = app_catalogue(apps)
        self._stop = asyncio.Event()
        self.published = 0

    async def status(self, state: Literal["running", "stopped"] = "running") -> SiteStatus:
        """The site as it stands now."""
        queued = await self.jobs.backlog()
        running = len(await self.jobs.in_flight())
        slots = self.engine.capacity
        res = self.cfg.resources
        return SiteStatus(
            site=self.cfg.site,
            state=state,
            interval_s=self.interval_s,
            engine=self.engine.name,
            queued=queued,
            running=running,
            slots=slots,
            free_slots=max(0, slots - running),
            cpus=res.cpus,
            gpus=res.gpus,
            apps=self.catalogue,
        )

    async def publish(self, state: Literal["running", "stopped"] = "running") -> bool:
        """Send one status and wait for Kafka to take it; False (logged) if it did not."""
        try:
            status = await self.status(state)
            ack = await send_event(
                self.producer, self.topics.kafka_sites, status.to_envelope(), key=self.cfg.site.encode()
            )
            await ack
        except Exception as exc:  # the next heartbeat says the same, newer
            log.warning("site %s: heartbeat not published: %s", self.cfg.site, exc)
            return False
        self.published += 1
        return True

    async def run(self) -> None:
        """Heartbeat until :meth:`stop`; then say the site stopped."""
        try:
            await ensure_topics(self.cfg.kafka, [self.topics.kafka_sites])
        except RuntimeError as exc:  # Kafka away: the heartbeats below say so, and the agent goes on
            log.warning("site %s: %s", self.cfg.site, exc)
        while not self._stop.is_set():
            await self.publish()
            await nap(self._stop, self.interval_s)

    def stop(self) -> None:
        """End the loop after the heartbeat in flight."""
        self._stop.set()

    async def last_word(self, timeout: float = 5.0) -> None:
        """Tell readers the site stopped (best effort: a killed agent turns stale by age instead)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.publish("stopped")
