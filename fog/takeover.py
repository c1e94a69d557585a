"""Session takeover: a live bridge drains the MQTT session of a dead peer of its share group.

Why: Mosquitto (2.0) keeps routing a shared subscription's share to a member
whose persistent session is offline, and holds the messages that member had
not acknowledged, until the member comes back or the session expires (and
then they are gone). So when a bridge dies, its share of the traffic would
wait for it — or be lost if it never returns.

How: every bridge of a group announces itself with a retained ``online`` on
its presence topic (``{ns}/{share_group}/{client_id}/status``) and sets a
retained ``offline`` last will there (and publishes ``offline`` itself on a
clean stop). Each bridge watches its ``ingest.peers``. When a peer is
``offline``, the next live bridge after it in the sorted ring of members
connects **with the peer's client id** and ``clean_start=False``: the broker
hands over the peer's session — its unacknowledged messages and its share of
new traffic — and this bridge forwards them through the same pipeline
(validation, dedupe, shaping, ack after Kafka). When the peer comes back it
takes its session back (the broker disconnects the takeover connection) and
announces ``online``; the takeover then stops and does not reconnect.
Messages in flight at a handover are redelivered, never lost: at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from reflexarc.aio import cancel_and_wait
from reflexarc.events import CommandAck
from reflexarc.fog.config import FogConfig
from reflexarc.fog.dedupe import DedupeWindow
from reflexarc.fog.ingest import OFFLINE, ONLINE, Ingest
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import KafkaSender, Outlet
from reflexarc.mqtt import MqttClient, MqttError

log = logging.getLogger(__name__)

#: after a takeover connection was closed, wait this long before trying again
RETRY_S = 3.0


class Takeover:
    """Watches the peers' presence and drains the sessions of the dead ones this bridge succeeds."""

    def __init__(
        self,
        config: FogConfig,
        sender: KafkaSender,
        metrics: BridgeMetrics,
        dedupe: DedupeWindow | None,
        on_command_ack: Callable[[CommandAck], None] | None = None,
        outlet: Outlet | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        self.config = config
        self.me = config.ingest.client_id
        self.members = sorted(set(config.ingest.peers) | {self.me})
        self.sender = sender
        self.metrics = metrics
        self.dedupe = dedupe
        self.on_command_ack = on_command_ack
        # The bridge's own outlet (disk buffer) and receipts serve the sessions taken over too.
        self.outlet = outlet
        self.receipts = receipts
        self.status: dict[str, bytes] = {}
        self.active: dict[str, Ingest] = {}
        self._closed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._client: MqttClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _topic(self, member: str) -> str:
        group = self.config.share_group()
        assert group is not None, "takeover needs a shared subscription group"
        return self.config.topics().mqtt_status(group, member)

    async def start(self) -> None:
        """Watch the peers' presence topics and start the evaluation loop."""
        self._client = MqttClient(self.config.mqtt, f"{self.me}-presence"[:64])
        await self._client.connect()
        peers = [m for m in self.members if m != self.me]
        await self._client.subscribe([(self._topic(m), 1) for m in peers])
        self._tasks = [
            asyncio.create_task(self._watch(), name="fog-presence"),
            asyncio.create_task(self._loop(), name="fog-takeover"),
        ]

    async def stop(self) -> None:
        """Stop watching and hand back every session this bridge holds."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for peer in list(self.active):
            await self._release(peer)
        if self._client is not None:
            await self._client.disconnect()

    def successor(self, dead: str) -> str:
        """The first live member after ``dead`` in the sorted ring (this bridge counts as live)."""
        ring = self.members
        i = ring.index(dead)
        for k in range(1, len(ring)):
            cand = ring[(i + k) % len(ring)]
            if cand == self.me or self.status.get(cand) == ONLINE:
                return cand
        return self.me

    async def _watch(self) -> None:
        assert self._client is not None
        by_topic = {self._topic(m): m for m in self.members}
        while True:
            msg = await self._client.messages.get()
            member = by_topic.get(msg.topic)
            if member is not None:
                self.status[member] = msg.payload
                self._wake.set()

    async def _loop(self) -> None:
        while True:
            # Poll faster while holding sessions, to notice being disconnected (peer back).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25 if self.active else 2.0)
            self._wake.clear()
            now = time.monotonic()
            for peer in self.members:
                if peer == self.me:
                    continue
                mine = self.status.get(peer) == OFFLINE and self.successor(peer) == self.me
                held = self.active.get(peer)
                if held is not None:
                    kicked = held.client is not None and held.client.disconnects > 0
                    if kicked or not mine:
                        await self._release(peer)
                elif mine and now - self._closed_at.get(peer, 0.0) >= RETRY_S:
                    await self._take(peer)

    async def _take(self, peer: str) -> None:
        ing = Ingest(
            self.config,
            self.sender,
            self.metrics,
            self.on_command_ack,
            client_id=peer,
            takeover=True,
            dedupe=self.dedupe,
            outlet=self.outlet,
            receipts=self.receipts,
        )
        try:
            await ing.start()
        except (MqttError, OSError) as exc:
            log.warning("could not take over the session of %s: %s", peer, exc)
            self._closed_at[peer] = time.monotonic()
            with contextlib.suppress(Exception):
                await ing.stop(1.0)
            return
        self.active[peer] = ing
        log.warning("peer %s is offline: draining its MQTT session", peer)

    async def _release(self, peer: str) -> None:
        ing = self.active.pop(peer)
        self._closed_at[peer] = time.monotonic()
        await ing.stop(5.0)
        log.warning("released the MQTT session of %s (took %d messages)", peer, ing.taken)
