"""Is a newly started agent healthy? Its retained MQTT status, its Docker health check, or just running.

* ``status_topic``: the agent publishes a retained ``{"state": "online",
  "since": ...}`` on ``topics.mqtt_status(site, device)`` after it connected.
  Healthy when that message says online *since this container started* (an
  older retained "online" of the previous agent does not count).
* ``container``: the Docker health check the deployer attached reads the
  agent's status file (connected and fresh); healthy when Docker says so.
  Needs no broker access from the deployer's machine.
* ``running``: the container stays up for ``settle_s``.

In every mode a container that exits or restarts is unhealthy at once, with
its exit code and last log lines as the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from datetime import datetime
from typing import Any

from reflexarc.config import MqttSettings
from reflexarc.deploy.fleet import DeviceSpec, HealthSettings
from reflexarc.topics import Topics

log = logging.getLogger("reflexarc.deploy.health")


def parse_docker_time(text: str) -> float:
    """A Docker RFC 3339 timestamp (nanoseconds, Z) as a POSIX time."""
    head, _, frac = text.rstrip("Z").partition(".")
    frac = (frac.split("+")[0].split("-")[0] + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{frac}+00:00").timestamp()


def log_tail(container: Any, lines: int = 15) -> str:
    """The last log lines of a container, for reports (blocking)."""
    try:
        return str(container.logs(tail=lines).decode(errors="replace").strip())
    except Exception as exc:  # the container may be gone; the report must still be written
        return f"(no logs: {exc})"


class StatusWatcher:
    """One MQTT connection per broker that follows the retained status topics of the agents being rolled."""

    def __init__(self, settings: MqttSettings, namespace: str) -> None:
        """Describe the watcher; ``start()`` connects."""
        self.settings = settings
        self.topics = Topics(namespace)
        self.latest: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Condition()
        self._client: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Connect to the broker (raises ``MqttError``/``TimeoutError`` if the deployer cannot reach it)."""
        from reflexarc.mqtt import MqttClient

        self._client = MqttClient(self.settings, f"rx-deploy-{os.getpid()}-{os.urandom(3).hex()}")
        await asyncio.wait_for(self._client.connect(timeout=timeout), timeout + 1)
        self._reader = asyncio.create_task(self._read(), name="deploy-status-reader")

    async def watch(self, site: str, device: str) -> str:
        """Subscribe to one agent's status topic; return the topic."""
        topic = self.topics.mqtt_status(site, device)
        await self._client.subscribe([(topic, 1)])
        return topic

    async def _read(self) -> None:
        while True:
            msg = await self._client.messages.get()
            try:
                status = json.loads(msg.payload)
            except ValueError:
                log.warning("ignoring a status message that is not JSON on %s", msg.topic)
                continue
            if isinstance(status, dict):
                async with self._changed:
                    self.latest[msg.topic] = status
                    self._changed.notify_all()

    async def wait_online(self, topic: str, since: float, timeout: float) -> bool:
        """True once ``topic`` says online since ``since`` (POSIX time, the device's clock)."""

        def fresh() -> bool:
            st = self.latest.get(topic)
            if not st or st.get("state") != "online":
                return False
            try:
                # Docker and the agent stamp with the same (device) clock; allow for rounding.
                return datetime.fromisoformat(str(st.get("since"))).timestamp() >= since - 1.0
            except ValueError:
                return False

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(fresh), timeout)
            return fresh()

    async def stop(self) -> None:
        """Disconnect."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.disconnect()


def agent_mqtt(spec: DeviceSpec, health: HealthSettings) -> MqttSettings:
    """The broker settings the deployer uses to watch ``spec``'s agent."""
    if health.mqtt is not None:
        return health.mqtt
    return MqttSettings.model_validate(spec.agent.get("mqtt") or MqttSettings.from_env().model_dump())


async def wait_healthy(
    container: Any, spec: DeviceSpec, health: HealthSettings, watcher: StatusWatcher | None
) -> tuple[bool, str]:
    """Wait until the started ``container`` is healthy; (ok, reason). Blocking Docker calls run in threads."""
    deadline = time.monotonic() + health.timeout_s
    await asyncio.to_thread(container.reload)
    started = parse_docker_time(container.attrs["State"]["StartedAt"])
    topic = await watcher.watch(spec.site, spec.device) if watcher is not None else None
    running_since = time.monotonic()
    while True:
        await asyncio.to_thread(container.reload)
        state = container.attrs["State"]
        if state.get("Status") in ("exited", "dead") or container.attrs.get("RestartCount", 0) > 0:
            tail = await asyncio.to_thread(log_tail, container)
            return False, f"agent exited (code {state.get('ExitCode')}): {tail.splitlines()[-1] if tail else ''}"
        if health.check == "container":
            h = (state.get("Health") or {}).get("Status")
            if h == "healthy":
                return True, "docker health check passed"
            if h == "unhealthy":
                return False, "docker health check failed (the agent is not connected to its broker)"
        elif health.check == "running":
            if time.monotonic() - running_since >= health.settle_s:
                return True, f"running for {health.settle_s:g} s"
        else:
            assert watcher is not None and topic is not None
            if await watcher.wait_online(topic, started, timeout=0.5):
                return True, f"online on {topic}"
        if time.monotonic() >= deadline:
            what = {
                "status_topic": f"no 'online' status on {topic}",
                "container": "docker health check not passing",
                "running": "not running",
            }[health.check]
            return False, f"not healthy after {health.timeout_s:g} s: {what}"
        if health.check != "status_topic":
            await asyncio.sleep(0.5)
