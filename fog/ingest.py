"""MQTT -> Kafka: take device traffic, validate, dedupe, shape, and acknowledge only what Kafka holds.

One :class:`Ingest` owns a persistent MQTT 5 session (``clean_start=False``
with a session expiry) subscribed, optionally through a shared subscription
so several bridges split the load, to every device's data and ack topics.
Messages are acknowledged by hand, in arrival order, after everything they
became is acknowledged by Kafka (``acks=all``): see :mod:`reflexarc.fog.sender`.

Routing by topic kind:

* ``data``: size limit -> parse (binary, structured or bare JSON) ->
  validation of the stream -> dedupe -> shaping -> ``{ns}.data``.
* ``ack``: parse -> must be a :class:`~reflexarc.events.CommandAck` ->
  dedupe -> ``{ns}.acks`` (and the local command tracker is told at once).
* Anything that fails goes to ``{ns}.deadletter`` as a
  :class:`~reflexarc.envelope.DeadLetter` (original bytes, reason, stage,
  origin topic), and the messages around it flow on.

Records go to the ingest's outlet: the Kafka sender, or the disk-buffer
switch in front of it (:mod:`reflexarc.fog.spill`). Each record carries the
events it confirms once Kafka has it (:attr:`Record.receipts`): the dedupe
window then marks them confirmed and the device gets a receipt
(:mod:`reflexarc.fog.receipts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from reflexarc.aio import cancel_and_wait
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError
from reflexarc.events import CommandAck
from reflexarc.fog.config import FogConfig, StreamSettings
from reflexarc.fog.dedupe import DedupeWindow, dedupe_key
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import AckQueue, Confirm, KafkaSender, Outlet, Record, Ticket
from reflexarc.fog.shaping import Shaper, make_shaper
from reflexarc.fog.validation import Validator, build_validator
from reflexarc.mqtt import MqttClient, MqttMessage, Will
from reflexarc.topics import MqttKind, MqttTopic, TopicError

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(slots=True)
class _Stream:
    """What applies to one stream name (resolved once, then cached)."""

    validator: Validator | None
    shaper: Shaper
    max_bytes: int
    passthrough: bool = False


class Ingest:
    """The MQTT -> Kafka half of a fog bridge."""

    def __init__(
        self,
        config: FogConfig,
        sender: KafkaSender,
        metrics: BridgeMetrics,
        on_command_ack: Callable[[CommandAck], None] | None = None,
        *,
        client_id: str | None = None,
        takeover: bool = False,
        dedupe: DedupeWindow | None = None,
        outlet: Outlet | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        self.config = config
        self.settings = config.ingest
        self.topics = config.topics()
        self.sender = sender
        # Where records go: the sender, or the disk-buffer switch in front of it.
        self.out: Outlet = outlet if outlet is not None else sender
        # Shared by the bridge's ingests (takeovers too); published on the bridge's own connection.
        self.receipts = receipts
        self.metrics = metrics
        self.on_command_ack = on_command_ack
        self.client_id = client_id or self.settings.client_id
        # A takeover drains a dead peer's session: it neither subscribes nor announces itself.
        self.takeover = takeover
        self.client: MqttClient | None = None
        self.acks: AckQueue | None = None
        d = self.settings.dedupe
        self.dedupe = dedupe if dedupe is not None else (DedupeWindow(d.window_size, d.window_s) if d.enabled else None)
        self._streams: dict[str, _Stream] = {}
        self._shapers: list[Shaper] = []
        self._by_entry: dict[int, tuple[Validator | None, Shaper]] = {}
        self._default: tuple[Validator | None, Shaper] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.taken = 0

    def presence_topic(self) -> str | None:
        """Retained online/offline topic of this bridge, when peers watch it (shared group with peers)."""
        group = self.config.share_group()
        if self.takeover or group is None or not self.settings.peers:
            return None
        return self.topics.mqtt_status(group, self.client_id)

    # ---- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Connect, build validators and shapers, subscribe, start taking messages."""
        s = self.settings
        presence = self.presence_topic()
        self.client = MqttClient(
            self.config.mqtt,
            self.client_id,
            clean_start=False,
            session_expiry=s.session_expiry_s,
            manual_ack=True,
            receive_maximum=s.receive_maximum,
            # If we die, the broker tells our peers, and one of them drains our session.
            will=Will(presence, OFFLINE) if presence else None,
        )
        self.acks = AckQueue(self.client.ack, None if self.takeover else self.metrics)
        if not self.takeover:
            acks = self.acks
            # Read at scrape time: no gauge update per message.
            self.metrics.mqtt_unacked.set_function(lambda: len(acks))
        self._build_streams()
        await self.client.connect()
        if not self.takeover:
            group = self.config.share_group()
            filters = self.topics.mqtt_ingest_filters(s.sites, s.devices)
            if group:
                filters = [self.topics.mqtt_shared(group, f) for f in filters]
            await self.client.subscribe([(f, 1) for f in filters])
            log.info("fog ingest %s subscribed to %s", self.client_id, filters)
        if presence:
            await self.client.publish(presence, ONLINE, 1, retain=True)
        if self.receipts is not None and not self.takeover:
            self.receipts.start(self.client)
        self._tasks.append(asyncio.create_task(self._intake(), name=f"fog-intake-{self.client_id}"))
        interval = min((i for sh in self._shapers if (i := sh.tick_interval()) is not None), default=None)
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._ticker(interval), name="fog-shaping-tick"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, close shaping windows, wait for Kafka, acknowledge, disconnect.

        Whatever is not durable by ``timeout`` stays unacknowledged: the
        broker redelivers it when the bridge comes back.
        """
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        self.metrics.flush()
        deadline = time.monotonic() + timeout
        for sh in self._shapers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sh.flush_all(), max(0.1, deadline - time.monotonic()))
        if self.acks is not None:
            await self.acks.wait_empty(max(0.1, deadline - time.monotonic()))
        if self.receipts is not None and not self.takeover:
            await self.receipts.stop()
        if self.client is not None:
            presence = self.presence_topic()
            if presence and self.client.connected.is_set():
                # Our session keeps receiving our share of the traffic: hand it to a peer.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.publish(presence, OFFLINE, 1, retain=True), 5)
            await self.client.disconnect()

    def _build_streams(self) -> None:
        def on_drop() -> None:
            self.metrics.downsampled.inc()

        for entry in self.config.streams:
            shaper = make_shaper(entry.shape, self._emit, self._acks(), on_drop)
            self._shapers.append(shaper)
            self._by_entry[id(entry)] = (build_validator(entry), shaper)
        default = StreamSettings()
        shaper = make_shaper(default.shape, self._emit, self._acks(), on_drop)
        self._shapers.append(shaper)
        self._default = (None, shaper)

    def _acks(self) -> AckQueue:
        assert self.acks is not None, "ingest not started"
        return self.acks

    def _stream(self, name: str) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            entry = self.config.stream(name)
            assert self._default is not None
            validator, shaper = self._by_entry[id(entry)] if entry is not None else self._default
            limit = self.settings.max_payload_bytes
            if entry is not None and entry.max_payload_bytes is not None:
                limit = entry.max_payload_bytes
            # Bounded: stream names come from devices; past 10k distinct names stop caching.
            st = _Stream(validator, shaper, limit, type(shaper) is Shaper)
            if len(self._streams) < 10_000:
                self._streams[name] = st
        return st

    # ---- the hot path ---------------------------------------------------------
    async def _intake(self) -> None:
        assert self.client is not None and self.acks is not None
        queue = self.client.messages
        acks = self.acks
        while True:
            msg = await queue.get()
            ticket = acks.new(msg)
            self.taken += 1
            try:
                # Most messages need nothing awaited: no coroutine per message.
                pending = self._take(msg, ticket)
                if pending is not None:
                    await pending
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug must not lose the message nor stop the pipeline: dead-letter it.
                log.exception("unexpected error handling a message on %s", msg.topic)
                await self._dead(msg, ticket, "internal", f"internal error in the fog bridge: {exc!r}")
            acks.release(ticket)

    def _take(self, msg: MqttMessage, ticket: Ticket) -> Coroutine[Any, Any, None] | None:
        """Route one message; returns what is left to await (None: done already).

        A valid new event of a forwarded stream is queued for Kafka at once
        when Kafka has room, which is the common case; a dead letter, a
        shaper, a command ack or a send that must wait for room comes back
        as a coroutine for :meth:`_intake` to await.
        """
        try:
            mt = self.topics.parse_mqtt(msg.topic)
        except TopicError as exc:
            self.metrics.in_other.inc()
            return self._dead(msg, ticket, "topic", str(exc))
        if mt.kind is MqttKind.DATA:
            return self._take_data(msg, ticket, mt)
        if mt.kind is MqttKind.ACK:
            return self._take_ack(msg, ticket, mt)
        self.metrics.in_other.inc()
        return self._dead(msg, ticket, "topic", f"the fog bridge does not take {mt.kind.value!r} topics")

    def _take_data(self, msg: MqttMessage, ticket: Ticket, mt: MqttTopic) -> Coroutine[Any, Any, None] | None:
        self.metrics.in_data_total += 1
        assert mt.stream is not None
        st = self._stream(mt.stream)
        size = len(msg.payload)
        if size > st.max_bytes:
            ticket.receipt = _receipt_of_properties(msg, mt)
            return self._dead(
                msg,
                ticket,
                "size",
                f"payload of {size} bytes exceeds the limit of {st.max_bytes} bytes for stream "
                f"{mt.stream!r} (raise max_payload_bytes in fog.yaml, or send large data by reference)",
            )
        try:
            # One parse: the Kafka record is built alongside, from the original bytes.
            event = Envelope.transcode_mqtt(msg.payload, msg.user_properties, msg.content_type, mt)
        except EnvelopeError as exc:
            return self._dead(msg, ticket, "parse", str(exc))
        if st.validator is not None:
            reason = st.validator(event.data)
            if reason is not None:
                # Taken, as a dead letter: once that is in Kafka the device may stop re-sending the event.
                ticket.receipt = (mt.site, mt.device, event.id, None)
                return self._dead(msg, ticket, "validate", f"stream {mt.stream!r}: {reason}")
        entry = self._new(mt, event.source, event.id)
        if entry is None:
            return None
        if not st.passthrough:
            ticket.receipt = entry
            return self._shape(st.shaper, (mt.site, mt.device, mt.stream), event.envelope, ticket)
        # Forward the record already built (what Shaper.add + _emit would do).
        rkey, value, headers = event.record
        ticket.holds += 1
        rec = Record(self.topics.kafka_data, rkey, value, headers, (ticket,), (entry,))
        out = self.out
        return None if out.try_send(rec) else out.send(rec)

    async def _shape(self, shaper: Shaper, key: tuple[str, str, str], env: Envelope, ticket: Ticket) -> None:
        if not await shaper.add(key, env, ticket) and ticket.receipt is not None and self.receipts is not None:
            # Dropped on purpose (downsampling): consumed, so the device must stop re-sending it.
            self.receipts.consumed(ticket.receipt)

    async def _take_ack(self, msg: MqttMessage, ticket: Ticket, mt: MqttTopic) -> None:
        self.metrics.in_ack.inc()
        size = len(msg.payload)
        if size > self.settings.max_payload_bytes:
            await self._dead(
                msg, ticket, "size", f"ack payload of {size} bytes exceeds {self.settings.max_payload_bytes} bytes"
            )
            return
        try:
            env = Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type, mt)
            ack = CommandAck.from_envelope(env)
        except EnvelopeError as exc:
            await self._dead(msg, ticket, "parse", f"not a command ack: {exc}")
            return
        if ack.site != mt.site or ack.device != mt.device:
            await self._dead(
                msg, ticket, "validate", f"ack names {ack.site}/{ack.device} but came from {mt.site}/{mt.device}"
            )
            return
        entry = self._new(mt, env.source, env.id)
        if entry is None:
            return
        ticket.receipt = entry
        await self._emit(env, [ticket], self.topics.kafka_acks, hold=True)
        if self.on_command_ack is not None:
            self.on_command_ack(ack)

    def _new(self, mt: MqttTopic, source: str, event_id: str) -> Confirm | None:
        """The event's receipt entry, or None for a duplicate: dropped, counted, and receipted again at once
        if Kafka has the original (if the original is still on its way, its own receipt follows)."""
        dedupe = self.dedupe
        if dedupe is None:
            return (mt.site, mt.device, event_id, None)
        key = dedupe_key(source, event_id)
        if not dedupe.seen(key):
            return (mt.site, mt.device, event_id, key)
        self.metrics.duplicates.inc()
        if self.receipts is not None and dedupe.confirmed(key):
            self.receipts.again((mt.site, mt.device, event_id, key))
        return None

    async def _emit(self, env: Envelope, tickets: list[Ticket], topic: str | None = None, hold: bool = False) -> None:
        """Send one event to Kafka; ``tickets`` are released when Kafka has it."""
        if hold:
            for t in tickets:
                self._acks().hold(t)
        key, value, headers = env.to_kafka()
        receipts = [t.receipt for t in tickets if t.receipt is not None]
        await self.out.send(Record(topic or self.topics.kafka_data, key, value, headers, tickets, receipts))

    async def _dead(self, msg: MqttMessage, ticket: Ticket, stage: str, reason: str) -> None:
        """Send the original bytes and the reason to the dead-letter topic."""
        self.metrics.deadlettered(stage).inc()
        log.debug("dead letter from %s (%s): %s", msg.topic, stage, reason)
        payload = msg.payload
        extra: list[tuple[str, bytes]] = [("rx-size", str(len(payload)).encode())]
        cap = self.settings.deadletter_max_bytes
        if len(payload) > cap:
            # Kafka refuses records above ~1 MiB: keep the head and say so.
            payload = payload[:cap]
            extra.append(("rx-truncated", b"true"))
        if msg.content_type:
            extra.append(("rx-content-type", msg.content_type.encode()))
        for prop, text in msg.user_properties:
            extra.append((f"rx-mqtt-{prop}", text.encode()))
        dl = DeadLetter(error=reason, stage=stage, origin=msg.topic, payload=payload, extra_headers=tuple(extra))
        key, value, headers = dl.to_kafka()
        self._acks().hold(ticket)
        receipts = (ticket.receipt,) if ticket.receipt is not None else ()
        await self.out.send(Record(self.topics.kafka_deadletter, key, value, headers, [ticket], receipts))

    async def _ticker(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sh in self._shapers:
                await sh.tick(now)


def _receipt_of_properties(msg: MqttMessage, mt: MqttTopic) -> Confirm | None:
    """The event an unread MQTT 5 binary-mode message names in its ``id`` property (for a size dead letter)."""
    for name, value in msg.user_properties:
        if name == "id":
            return (mt.site, mt.device, value, None)
    return None
