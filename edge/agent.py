"""The edge agent: sources -> spool -> MQTT, and MQTT commands -> actuators -> acks.

With ``delivery: pipeline`` (the default) a spooled event is freed by the
fog's receipt (Kafka holds it), received on the device's receipt topic; with
``delivery: broker`` by the broker's PUBACK.

One asyncio process. Sources start at once and write to the spool even while
the broker is unreachable (store-and-forward from the first second); the
connection is retried with backoff and jitter until it succeeds. A wrong
password or a refused client id is a configuration error and stops the agent
with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

from reflexarc.edge.actuators import CommandProcessor
from reflexarc.edge.claimcheck import ClaimCheck
from reflexarc.edge.config import AgentConfig
from reflexarc.edge.inbox import Inbox
from reflexarc.edge.link import EdgeMqttClient
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.publisher import Publisher
from reflexarc.edge.receipts import Unconfirmed
from reflexarc.edge.sources import Reading, Source, SourceContext, source_class
from reflexarc.edge.spool import AsyncSpool, SpoolItem
from reflexarc.edge.status import write_status
from reflexarc.envelope import Envelope, EventType
from reflexarc.events import stable_id
from reflexarc.mqtt import MqttError, Will
from reflexarc.process import notify_ready
from reflexarc.signing import load_verify_keys, verify_keys_from_env

log = logging.getLogger(__name__)

# CONNACK refusals no retry can fix (bad credentials, banned, not authorized).
_FATAL_CONNECT = ("bad user name or password", "not authorized", "banned", "client identifier")
# Receive Maximum slots beyond commands.receive_maximum, so receipts flow while commands run.
_RECEIPT_SLOTS = 16


class AgentError(RuntimeError):
    """The agent cannot run as configured; the text says what to fix."""


class EdgeAgent:
    """One device's agent. ``await start()``, then ``await stop()`` (or use :meth:`run`)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.topics = cfg.topics()
        self.metrics = EdgeMetrics()
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self.spool: AsyncSpool | None = None
        self.client: EdgeMqttClient | None = None
        self.publisher: Publisher | None = None
        self.unconfirmed: Unconfirmed | None = None
        self.commands: CommandProcessor | None = None
        self.inbox: Inbox | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._inbox_task: asyncio.Task[None] | None = None
        self.claim_check = ClaimCheck(cfg.claim_url(), cfg.claim_check.threshold_bytes, cfg.claim_check.store)
        self.sources: list[Source] = []
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = datetime.now(UTC)
        self.read = 0
        self.spooled = 0
        self.fatal: BaseException | None = None
        self._stopped = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Open the spool, start sources, connect (in the background), subscribe to commands."""
        cfg = self.cfg
        keys = load_verify_keys(cfg.resolve(k) for k in cfg.commands.verify_keys) + verify_keys_from_env()
        if cfg.actuators and cfg.commands.require_signed and not keys:
            raise AgentError(
                "actuators are configured and commands.require_signed is on, but no verify key is "
                "given: list public key files in commands.verify_keys or set RX_VERIFY_KEYS"
            )
        # Fail on a missing password variable now, not on the first reconnect.
        cfg.mqtt.password()
        self.spool = AsyncSpool(
            cfg.spool_path(),
            max_events=cfg.spool.max_events,
            max_bytes=cfg.spool.max_bytes,
            policy=cfg.spool.policy,
            sync=cfg.spool.sync,
            batch=cfg.spool.batch,
        )
        await self.spool.open()
        self.spool.on_commit.append(self._committed)
        spool = self.spool
        self.metrics.sources_blocked.set_function(lambda: spool.waiting)
        self.metrics.spool_full.set_function(lambda: 1 if spool.full else 0)
        self.metrics.spool_depth.set_function(lambda: spool.depth)
        if cfg.metrics_port is not None:
            self._metrics_server, self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics.host)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)
        status = json.dumps(
            {"state": "offline", "site": cfg.site, "device": cfg.device, "reason": "connection lost"}
        ).encode()
        pipeline = cfg.delivery == "pipeline"
        if pipeline:
            p = cfg.publish
            self.unconfirmed = Unconfirmed(p.unconfirmed_max, p.confirm_timeout_s, p.confirm_timeout_max_s)
        self.client = EdgeMqttClient(
            cfg.mqtt,
            cfg.client_id(),
            clean_start=False,
            session_expiry=cfg.publish.session_expiry_s,
            manual_ack=True,
            max_inflight=cfg.publish.inflight,
            receive_maximum=cfg.commands.receive_maximum + (_RECEIPT_SLOTS if pipeline else 0),
            will=Will(self.topics.mqtt_status(cfg.site, cfg.device), status, 1, True),
            reconnect_min_s=cfg.publish.reconnect_min_s,
            reconnect_max_s=cfg.publish.reconnect_max_s,
            jitter=cfg.publish.reconnect_jitter,
        )
        self.publisher = Publisher(
            self.spool,
            self.client,
            self.metrics,
            self.topics.mqtt_device_prefix(cfg.site, cfg.device),
            cfg.publish.inflight,
            self.unconfirmed,
            self.topics.mqtt_receipt(cfg.site, cfg.device),
        )
        publisher = self.publisher
        self.metrics.inflight.set_function(lambda: publisher.inflight)
        unconfirmed = self.unconfirmed
        if unconfirmed is not None:
            self.metrics.unconfirmed.set_function(lambda: len(unconfirmed))
            self.metrics.unconfirmed_oldest.set_function(lambda: unconfirmed.oldest_age() or 0.0)
        if cfg.actuators:
            self.commands = CommandProcessor(cfg, self.client, self.spool, self.metrics, keys)
        self.inbox = Inbox(
            self.client,
            self.topics,
            cfg.site,
            cfg.device,
            self.metrics,
            self.commands,
            self.publisher if pipeline else None,
        )
        for spec in cfg.sources:
            await self._start_source(spec)
        self._tasks.append(asyncio.create_task(self._connect_and_serve(), name="edge-link"))
        self._tasks.append(asyncio.create_task(self._status_loop(), name="edge-status"))

    async def _start_source(self, spec: Any) -> None:
        assert self.spool is not None and self.spool.spool is not None
        cls = source_class(spec.type)
        ctx = SourceContext(
            self.cfg.site,
            self.cfg.device,
            None,
            self.claim_check,
            base_dir=self.cfg.resolve("."),
            reject=self._reject,
            flush=self.spool.flush,
            log=logging.getLogger(f"reflexarc.edge.source.{spec.type}"),
            registry=self.metrics.registry,
        )
        source = cls(spec, ctx)
        ctx.checkpoint = await self.spool.call(self.spool.spool.checkpoint, source.checkpoint_key)
        self.sources.append(source)
        key = source.checkpoint_key
        task = asyncio.create_task(self._run_source(source), name=f"source-{key}")
        self._source_tasks[key] = task

    async def _run_source(self, source: Source) -> None:
        key = source.checkpoint_key
        backoff = 1.0
        while True:
            try:
                await source.run(lambda r: self.emit(r, key))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A failing source must not stop the agent: log, wait, restart it from its checkpoint.
                log.exception("source %s failed: %s; restarting in %.0f s", key, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                assert self.spool is not None and self.spool.spool is not None
                source.ctx.checkpoint = await self.spool.call(self.spool.spool.checkpoint, key)

    async def emit(self, reading: Reading, checkpoint_key: str | None = None) -> None:
        """Turn a reading into an event and hand it to the spool (waits when the spool pushes back)."""
        assert self.spool is not None
        cfg = self.cfg
        event_id = reading.id or stable_id(cfg.site, cfg.device, reading.stream, os.urandom(8).hex())
        env = Envelope.for_device(
            EventType.DATA,
            cfg.site,
            cfg.device,
            reading.data,
            subject=reading.stream,
            id=event_id,
            time=reading.time,
        )
        payload, props, ctype = env.to_mqtt(binary=cfg.mqtt.protocol == "5")
        item = SpoolItem(
            reading.stream,
            event_id,
            self.topics.mqtt_data(cfg.site, cfg.device, reading.stream),
            payload,
            props or None,
            ctype,
        )
        self.read += 1
        self.metrics.events_read.labels(reading.stream).inc()
        before = self.spool.blocked_s
        await self.spool.submit(item, checkpoint_key if reading.checkpoint else None, reading.checkpoint)
        if self.spool.blocked_s != before:
            self.metrics.source_blocked.inc(self.spool.blocked_s - before)

    def _committed(self, accepted: int, dropped: int) -> None:
        assert self.spool is not None and self.spool.spool is not None
        self.spooled += accepted
        self.metrics.events_spooled.inc(accepted)
        if dropped:
            self.metrics.events_dropped.inc(dropped)
        self.metrics.spool_bytes.set(self.spool.spool.bytes)

    async def _reject(self, error: str, origin: str, payload: bytes) -> None:
        assert self.spool is not None and self.spool.spool is not None
        log.error("bad input (kept as a dead letter): %s", error)
        await self.spool.call(self.spool.spool.add_dead, error, origin, payload)
        self.metrics.events_dead.inc()

    async def _connect_and_serve(self) -> None:
        try:
            await self._connect_with_retry()
        except AgentError as exc:
            self.fatal = exc
            self._stopped.set()
            return
        assert self.client is not None and self.publisher is not None and self.inbox is not None
        filters = self.inbox.filters()
        if filters:
            # Receipts and commands, before the first publish: no receipt can come before we listen.
            await self.client.subscribe(filters)
            self._inbox_task = asyncio.create_task(self.inbox.run(), name="edge-inbox")
        self._publisher_task = asyncio.create_task(self.publisher.run(), name="edge-publisher")
        notify_ready("edge connected")
        await self._online_loop()

    async def _connect_with_retry(self) -> None:
        assert self.client is not None
        p = self.cfg.publish
        delay = p.reconnect_min_s
        while True:
            try:
                await self.client.connect(timeout=p.connect_timeout_s)
                return
            except MqttError as exc:
                text = str(exc)
                if any(s in text.lower() for s in _FATAL_CONNECT):
                    m = self.cfg.mqtt
                    who = (
                        f"user {m.username!r} with the password from ${m.password_env}"
                        if m.username
                        else "no username" + (" (client certificate)" if m.tls else "")
                    )
                    raise AgentError(
                        f"{text}; connected as {who}: fix the credentials or the broker's ACL "
                        "(the agent stops: retrying cannot help)"
                    ) from None
                wait = delay + random.uniform(0, p.reconnect_jitter * delay)
                log.warning("%s; retrying in %.1f s (events are spooled meanwhile)", text, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, p.reconnect_max_s)

    async def _online_loop(self) -> None:
        """Publish the retained 'online' status after every (re)connect; count lost connections."""
        assert self.client is not None
        topic = self.topics.mqtt_status(self.cfg.site, self.cfg.device)
        while True:
            await self.client.connected.wait()
            self.metrics.connected.set(1)
            online = {
                "state": "online",
                "site": self.cfg.site,
                "device": self.cfg.device,
                "client_id": self.cfg.client_id(),
                "pid": os.getpid(),
                "since": datetime.now(UTC).isoformat(),
            }
            with contextlib.suppress(MqttError):
                await self.client.publish_start(topic, json.dumps(online).encode(), 1, retain=True)
            while self.client.connected.is_set():
                await asyncio.sleep(0.2)
            self.metrics.connected.set(0)
            self.metrics.reconnects.inc()
            log.warning("lost the broker connection; events are spooled until it is back")

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(write_status, self.cfg.status_path(), self.status())
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        """A snapshot of the agent's state (also written to ``status.json`` every second)."""
        spool = self.spool
        inner = spool.spool if spool else None
        return {
            "pid": os.getpid(),
            "site": self.cfg.site,
            "device": self.cfg.device,
            "client_id": self.cfg.client_id(),
            "broker": f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
            "protocol": self.cfg.mqtt.protocol,
            "connected": bool(self.client and self.client.connected.is_set()),
            "started_at": self.started_at.isoformat(),
            "updated_at": time.time(),
            "metrics_port": self.metrics_port,
            "spool": {
                "path": str(self.cfg.spool_path()),
                "depth": spool.depth if spool else 0,
                "bytes": inner.bytes if inner else 0,
                "buffered": spool.buffered if spool else 0,
                "full": bool(spool and spool.full),
                "policy": self.cfg.spool.policy,
                "max_events": self.cfg.spool.max_events,
                "dropped": spool.dropped if spool else 0,
            },
            "delivery": self.cfg.delivery,
            "events": {
                "read": self.read,
                "spooled": self.spooled,
                "published": self.publisher.published if self.publisher else 0,
                "inflight": self.publisher.inflight if self.publisher else 0,
                **self._receipt_status(),
            },
            "sources": [{"key": k, "running": not t.done()} for k, t in self._source_tasks.items()],
            "last_command": self.commands.last if self.commands else None,
        }

    def _receipt_status(self) -> dict[str, Any]:
        u = self.unconfirmed
        if u is None:
            return {}
        age = u.oldest_age()
        return {
            "unconfirmed": len(u),
            "oldest_unconfirmed_s": round(age, 3) if age is not None else None,
            "resent": self.publisher.resent if self.publisher else 0,
            "confirmed": u.confirmed,
            "receipt_ids_unknown": u.unknown,
        }

    async def wait(self) -> None:
        """Until :meth:`stop` or a fatal error; re-raises the fatal error."""
        await self._stopped.wait()
        if self.fatal is not None:
            raise self.fatal

    async def sources_done(self) -> None:
        """Until every finite source (replay, count) has finished."""
        await asyncio.gather(*self._source_tasks.values(), return_exceptions=True)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop sources, commit what they produced, let in-flight publishes land, say offline."""
        for t in self._source_tasks.values():
            t.cancel()
        await asyncio.gather(*self._source_tasks.values(), return_exceptions=True)
        if self.spool is not None:
            await self.spool.flush(timeout=grace)
        if self.inbox is not None:
            self.inbox.take_commands = False  # receipts still come in until the publisher settled
        if self.commands is not None:
            await self.commands.drain(grace)
        if self.publisher is not None:
            self.publisher.stopping = True
        # The connection task first (it starts the publisher and the inbox), then the publisher:
        # nothing new goes out. The inbox runs on while the publisher settles (receipts still free rows).
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._publisher_task is not None:
            self._publisher_task.cancel()
            await asyncio.gather(self._publisher_task, return_exceptions=True)
        if self.publisher is not None and self.client is not None and self.client.connected.is_set():
            await self.publisher.settle(grace)
        if self._inbox_task is not None:
            self._inbox_task.cancel()
            await asyncio.gather(self._inbox_task, return_exceptions=True)
        if self.client is not None:
            if self.client.connected.is_set():
                offline = json.dumps(
                    {"state": "offline", "site": self.cfg.site, "device": self.cfg.device, "reason": "shutdown"}
                ).encode()
                with contextlib.suppress(MqttError, TimeoutError):
                    await asyncio.wait_for(
                        self.client.publish(
                            self.topics.mqtt_status(self.cfg.site, self.cfg.device), offline, 1, retain=True
                        ),
                        grace,
                    )
            await self.client.disconnect()
        with contextlib.suppress(Exception):
            write_status(self.cfg.status_path(), {**self.status(), "pid": None, "stopped": True})
        if self.spool is not None:
            await self.spool.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._stopped.set()


async def run_agent(cfg: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run an agent until ``stop`` is set (or a fatal error), then shut down cleanly."""
    agent = EdgeAgent(cfg)
    await agent.start()
    stop = stop or asyncio.Event()
    waiter = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(agent._stopped.wait())
    await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    failed.cancel()
    fatal = agent.fatal
    await agent.stop()
    if fatal is not None:
        raise fatal
