"""Kafka -> MQTT: deliver commands to devices, track their answers, report each command's fate.

* The commands topic is consumed in a consumer group (``commands.group_id``),
  so several bridges split it by partition (records are keyed ``site/device``,
  so one device's commands stay in order on one bridge).
* Each :class:`~reflexarc.events.Command` is published QoS 1 to its device's
  command topic (CloudEvents binary on MQTT 5, structured JSON on 3.1.1),
  re-published every ``retry_interval_s`` until the device answers
  (a :class:`~reflexarc.events.CommandAck` on its ack topic) or the deadline
  passes. A device deduplicates on the command id, so a re-publish is safe.
* The outcome is a :class:`~reflexarc.events.CommandStatus` on ``{ns}.acks``:
  ``delivered`` (device answered ok), ``rejected`` (device answered not ok,
  with its reason), ``expired`` (no answer by the deadline; a command without
  one is tracked for ``default_deadline_s``) or ``failed`` (the broker refused
  the publish, e.g. ACL).
* A Kafka offset is committed only when every command up to it has its
  status durably in Kafka; a bridge that crashes re-reads and re-delivers
  the commands it had not finished.
* Device answers reach the tracker twice over: directly from this bridge's
  ingest, and from ``{ns}.acks`` read without a group (every bridge sees every
  ack), because with shared subscriptions the answer may arrive at another bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from reflexarc.aio import cancel_and_wait
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError, EventType
from reflexarc.events import Command, CommandAck, CommandStatus
from reflexarc.fog.config import FogConfig
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.sender import KafkaSender
from reflexarc.kafka import event_of, make_consumer
from reflexarc.mqtt import MqttClient, MqttError

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Offset:
    offset: int
    done: bool = False


@dataclass(slots=True, eq=False)
class _Pending:
    cmd: Command
    env: Envelope
    tp: TopicPartition
    mark: _Offset
    deadline: float
    next_retry: float
    attempts: int = 0
    acked_by_broker: bool = False


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, owner: CommandDelivery) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.owner._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("fog commands: assigned %s", sorted(tp.partition for tp in assigned))


class CommandDelivery:
    """The Kafka -> MQTT half of a fog bridge."""

    def __init__(self, config: FogConfig, sender: KafkaSender, metrics: BridgeMetrics) -> None:
        self.config = config
        self.settings = config.commands
        self.topics = config.topics()
        self.sender = sender
        self.metrics = metrics
        self.client: MqttClient | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.ack_consumer: AIOKafkaConsumer | None = None
        self.pending: dict[str, _Pending] = {}
        self._marks: dict[TopicPartition, deque[_Offset]] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._finish_q: asyncio.Queue[tuple[_Pending, str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._tp_lock = asyncio.Lock()
        self._seen: dict[TopicPartition, int] = {}

    # ---- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Connect the MQTT publisher and both consumers, then start delivering."""
        s = self.settings
        client_id = s.client_id or f"{self.config.ingest.client_id}-cmd"[:64]
        # A persistent session: publishes not yet acknowledged by the broker are
        # re-sent by the client after a reconnect.
        self.client = MqttClient(
            self.config.mqtt,
            client_id,
            clean_start=False,
            session_expiry=self.config.ingest.session_expiry_s,
            max_inflight=1000,
        )
        await self.client.connect()
        await self._start_ack_consumer()
        self.consumer = make_consumer(
            self.config.kafka,
            group_id=s.group_id,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(300, s.session_timeout_ms // 10),
        )
        self.consumer.subscribe([self.topics.kafka_commands], listener=_Rebalance(self))
        await self.consumer.start()
        self._tasks = [
            asyncio.create_task(self._consume(), name="fog-commands"),
            asyncio.create_task(self._read_acks(), name="fog-command-acks"),
            asyncio.create_task(self._timer(), name="fog-command-timer"),
            asyncio.create_task(self._finisher(), name="fog-command-finisher"),
        ]

    async def _start_ack_consumer(self) -> None:
        # No group: every bridge reads every ack, from now on (acks for commands
        # it has not published yet cannot matter to it).
        c = make_consumer(self.config.kafka, group_id=None, auto_offset_reset="latest")
        await c.start()
        topic = self.topics.kafka_acks
        parts: set[int] | None = None
        for _ in range(50):
            await c.topics()
            parts = c.partitions_for_topic(topic)
            if parts:
                break
            await asyncio.sleep(0.2)
        if not parts:
            await c.stop()
            raise RuntimeError(f"Kafka topic {topic!r} has no partitions: is it created?")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_end(*tps)
        for tp in tps:
            await c.position(tp)
        self.ack_consumer = c

    async def stop(self) -> None:
        """Commit what is finished, stop consuming, disconnect."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
            with contextlib.suppress(Exception):
                await self.consumer.stop()
        if self.ack_consumer is not None:
            with contextlib.suppress(Exception):
                await self.ack_consumer.stop()
        if self.client is not None:
            await self.client.disconnect()

    # ---- consuming ------------------------------------------------------------
    async def _consume(self) -> None:
        assert self.consumer is not None
        c = self.consumer
        paused = False
        while True:
            full = len(self.pending) >= self.settings.max_pending
            if full != paused:
                # Keep polling while paused so the group does not evict us.
                (c.pause if full else c.resume)(*c.assignment())
                paused = full
            batch = await c.getmany(timeout_ms=200, max_records=200)
            async with self._tp_lock:
                for tp, records in batch.items():
                    for r in records:
                        await self._take(tp, r)
                await self._commit()

    async def _take(self, tp: TopicPartition, record: Any) -> None:
        mark = _Offset(record.offset)
        self._seen[tp] = record.offset
        self._marks.setdefault(tp, deque()).append(mark)
        try:
            env = event_of(record)
            cmd = Command.from_envelope(env)
        except EnvelopeError as exc:
            await self._dead(record, f"not a command: {exc}")
            mark.done = True
            return
        if cmd.command_id in self.pending or cmd.command_id in self._finished:
            # Already in hand (or answered): an earlier offset holds the commit back anyway.
            mark.done = True
            return
        now = time.time()
        deadline = cmd.deadline.timestamp() if cmd.deadline else now + self.settings.default_deadline_s
        p = _Pending(cmd, env, tp, mark, deadline, time.monotonic() + self.settings.retry_interval_s)
        self.pending[cmd.command_id] = p
        self.metrics.commands_pending.set(len(self.pending))
        if now >= deadline:
            self._finish(p, "expired", "the deadline had passed before the command could be delivered")
            return
        await self._publish(p)

    async def _publish(self, p: _Pending) -> None:
        assert self.client is not None
        cmd = p.cmd
        payload, props, ctype = p.env.to_mqtt(binary=self.client.v5)
        p.attempts += 1
        self.metrics.command_publishes.inc()
        topic = self.topics.mqtt_cmd(cmd.site, cmd.device)
        try:
            fut = await self.client.publish_start(topic, payload, 1, False, props, ctype)
            # Wait for the broker, but not past the deadline nor the next retry.
            wait = max(0.1, min(self.settings.retry_interval_s, p.deadline - time.time()))
            await asyncio.wait_for(fut, wait)
            p.acked_by_broker = True
        except TimeoutError:
            log.warning("no PUBACK for command %s within %.1fs; will retry", cmd.command_id, wait)
        except MqttError as exc:
            self._finish(p, "failed", f"the MQTT broker refused the command: {exc}")

    async def _dead(self, record: Any, reason: str) -> None:
        self.metrics.deadlettered("command").inc()
        dl = DeadLetter.of_record(record, "command", reason)
        key, value, headers = dl.to_kafka()
        await self.sender.send_and_wait(self.topics.kafka_deadletter, key, value, headers)

    # ---- answers and deadlines ------------------------------------------------
    def on_ack(self, ack: CommandAck) -> None:
        """A device answered (from ingest or from the acks topic)."""
        p = self.pending.get(ack.command_id)
        if p is None or (p.cmd.site, p.cmd.device) != (ack.site, ack.device):
            return
        if ack.ok:
            self._finish(p, "delivered", "the device acknowledged")
        else:
            self._finish(p, "rejected", ack.reason or "the device refused the command")

    def _finish(self, p: _Pending, status: str, reason: str) -> None:
        if self.pending.get(p.cmd.command_id) is not p:
            return
        del self.pending[p.cmd.command_id]
        self.metrics.commands_pending.set(len(self.pending))
        self._finished[p.cmd.command_id] = status
        if len(self._finished) > 100_000:
            self._finished.popitem(last=False)
        self._finish_q.put_nowait((p, status, reason))

    async def _finisher(self) -> None:
        while True:
            p, status, reason = await self._finish_q.get()
            cmd = p.cmd
            st = CommandStatus(
                command_id=cmd.command_id,
                site=cmd.site,
                device=cmd.device,
                status=status,  # type: ignore[arg-type]  # one of CommandStatus's literals
                reason=reason,
                attempts=p.attempts,
            )
            key, value, headers = st.to_envelope().to_kafka()
            await self.sender.send_and_wait(self.topics.kafka_acks, key, value, headers)
            self.metrics.command(status).inc()
            log.info("command %s for %s/%s: %s (%s)", cmd.command_id, cmd.site, cmd.device, status, reason)
            p.mark.done = True

    async def _timer(self) -> None:
        last_commit = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            now, mono = time.time(), time.monotonic()
            for p in list(self.pending.values()):
                if now >= p.deadline:
                    self._finish(
                        p, "expired", f"no answer from the device after {p.attempts} publish(es) by the deadline"
                    )
                elif mono >= p.next_retry:
                    p.next_retry = mono + self.settings.retry_interval_s
                    await self._publish(p)
            if mono - last_commit >= 1.0:
                last_commit = mono
                async with self._tp_lock:
                    await self._commit()
                self._update_lag()

    async def _read_acks(self) -> None:
        assert self.ack_consumer is not None
        while True:
            batch = await self.ack_consumer.getmany(timeout_ms=500, max_records=500)
            for records in batch.values():
                for r in records:
                    try:
                        env = event_of(r)
                        if env.type != EventType.COMMAND_ACK.value:
                            continue
                        self.on_ack(CommandAck.from_envelope(env))
                    except EnvelopeError:
                        continue

    # ---- offsets --------------------------------------------------------------
    async def _commit(self) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for tp, marks in self._marks.items():
            last = None
            while marks and marks[0].done:
                last = marks.popleft().offset
            if last is not None:
                offsets[tp] = last + 1
        if offsets:
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                # Not fatal: the commands are re-read and re-delivered (devices dedupe).
                log.warning("could not commit command offsets %s: %s", offsets, exc)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        # Commit what is finished, then let the new owner take the rest over.
        with contextlib.suppress(Exception):
            await self._commit()
        for cid, p in list(self.pending.items()):
            if p.tp in revoked:
                del self.pending[cid]
        for tp in revoked:
            self._marks.pop(tp, None)
        self.metrics.commands_pending.set(len(self.pending))

    def _update_lag(self) -> None:
        c = self.consumer
        if c is None:
            return
        lag = 0
        for tp in c.assignment():
            high = c.highwater(tp)
            seen = self._seen.get(tp)
            if high is not None and seen is not None:
                lag += max(0, high - seen - 1)
        self.metrics.commands_lag.set(lag)
