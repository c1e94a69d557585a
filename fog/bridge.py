"""The fog bridge process: ingest (MQTT -> Kafka) and command delivery (Kafka -> MQTT) on one producer.

:class:`FogBridge` is what ``reflexarc fog run fog.yaml`` runs, and what tests
and ``reflexarc up`` start in-process. It creates the core Kafka topics,
starts a durable producer (``acks=all``), command delivery, then ingest, and
stops in the reverse order so that everything taken is acknowledged or left
for the broker to redeliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from reflexarc.fog.commands import CommandDelivery
from reflexarc.fog.config import FogConfig
from reflexarc.fog.ingest import Ingest
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.sender import KafkaSender
from reflexarc.fog.takeover import Takeover
from reflexarc.kafka import ensure_topics, make_producer
from reflexarc.metrics import serve_metrics
from reflexarc.process import notify_ready

log = logging.getLogger(__name__)


class FogBridge:
    """One fog bridge: start it, run it until told to stop, stop it cleanly."""

    def __init__(self, config: FogConfig) -> None:
        self.config = config
        self.metrics = BridgeMetrics(config.ingest.client_id)
        self.producer: AIOKafkaProducer | None = None
        self.sender: KafkaSender | None = None
        self.ingest: Ingest | None = None
        self.commands: CommandDelivery | None = None
        self.takeover: Takeover | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        """Create topics, connect everything, begin forwarding in both directions."""
        cfg = self.config
        topics = cfg.topics()
        if cfg.metrics_port is not None:
            self.metrics_port = serve_metrics(cfg.metrics_port)
        if cfg.create_topics:
            await ensure_topics(cfg.kafka, topics.kafka_core())
        s = cfg.ingest
        self.producer = make_producer(
            cfg.kafka,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_bytes,
            request_timeout_ms=s.request_timeout_ms,
            client_id=s.client_id,
        )
        await self._start_producer()
        self.sender = KafkaSender(
            self.producer, self.metrics, s.max_in_flight, s.retry_backoff_ms / 1000.0
        )
        self.sender.start()
        try:
            if cfg.commands.enabled:
                self.commands = CommandDelivery(cfg, self.sender, self.metrics)
                await self.commands.start()
            if s.enabled:
                on_ack = self.commands.on_ack if self.commands is not None else None
                self.ingest = Ingest(cfg, self.sender, self.metrics, on_command_ack=on_ack)
                await self.ingest.start()
                if cfg.share_group() and s.peers:
                    self.takeover = Takeover(cfg, self.sender, self.metrics, self.ingest.dedupe, on_ack)
                    await self.takeover.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "fog bridge %s running: MQTT %s:%d (v%s%s) <-> Kafka %s",
            s.client_id, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.protocol,
            f", shared group {cfg.share_group()}" if cfg.share_group() else "",
            cfg.kafka.bootstrap_servers,
        )
        notify_ready("fog subscribed")

    async def _start_producer(self, timeout: float = 30.0) -> None:
        assert self.producer is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self.producer.start()
                return
            except (KafkaError, OSError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(
                        f"cannot reach Kafka at {self.config.kafka.bootstrap_servers}: {exc} "
                        "(check kafka.bootstrap_servers or RX_KAFKA_BOOTSTRAP)"
                    ) from exc
                await asyncio.sleep(0.5)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The long-running tasks; one ending means the bridge is broken."""
        out: list[asyncio.Task[None]] = []
        for part in (self.ingest, self.commands, self.takeover):
            if part is not None:
                out.extend(part._tasks)
        return out

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop ingest (sessions of peers first), then commands, flush Kafka, disconnect."""
        if self.takeover is not None:
            await self.takeover.stop()
        if self.ingest is not None:
            await self.ingest.stop(timeout)
        if self.commands is not None:
            await self.commands.stop()
        if self.sender is not None:
            await self.sender.wait_idle(timeout)
            await self.sender.close()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        log.info("fog bridge %s stopped", self.config.ingest.client_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (SIGTERM) or a part of the bridge fails."""
        await self.start()
        stopper = asyncio.create_task(stop.wait())
        failed: BaseException | None = None
        try:
            done, _ = await asyncio.wait([stopper, *self.tasks()], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and not t.cancelled() and t.exception() is not None:
                    failed = t.exception()
                    log.error("fog bridge task %s failed: %r", t.get_name(), failed)
        finally:
            stopper.cancel()
            await self.stop()
        if failed is not None:
            raise RuntimeError(f"fog bridge stopped after a failure: {failed!r}") from failed
