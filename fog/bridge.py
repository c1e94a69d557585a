"""The fog bridge process: ingest (MQTT -> Kafka) and command delivery (Kafka -> MQTT) on one producer.

:class:`FogBridge` is what ``reflexarc fog run fog.yaml`` runs, and what tests
and ``reflexarc up`` start in-process. It creates the core Kafka topics,
starts a durable producer (``acks=all``), opens the disk buffer, seeds the
dedupe window with what survived a restart (the buffer's rows, the data
topic's tail), starts command delivery, then ingest, and stops in the
reverse order so that everything taken is acknowledged or left for the
broker to redeliver (or in the disk buffer, for the next start).

Every batch Kafka acknowledges goes through :meth:`FogBridge._on_sent`: its
events are confirmed (dedupe window, receipts) and its buffer rows deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from reflexarc.aio import cancel_and_wait
from reflexarc.fog.buffer import DiskBuffer
from reflexarc.fog.commands import CommandDelivery
from reflexarc.fog.config import FogConfig
from reflexarc.fog.dedupe import DedupeWindow
from reflexarc.fog.ingest import Ingest
from reflexarc.fog.landed import PartitionReader
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import KafkaSender, Record
from reflexarc.fog.spill import Spill
from reflexarc.fog.tail import recent_keys
from reflexarc.fog.takeover import Takeover
from reflexarc.kafka import ensure_topics, make_producer
from reflexarc.metrics import serve_metrics
from reflexarc.process import notify_ready

log = logging.getLogger(__name__)

#: with the disk buffer, wait this long for Kafka at start before taking MQTT traffic into the buffer
KAFKA_START_WAIT_S = 3.0


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
        d = config.ingest.dedupe
        # One window for the bridge and the sessions it takes over.
        self.dedupe = DedupeWindow(d.window_size, d.window_s) if d.enabled else None
        self.receipts = Receipts(config.ingest.receipts, config.topics(), self.metrics, self.dedupe)
        self.buffer: DiskBuffer | None = None
        self.spill: Spill | None = None
        # Set once Kafka answers (at start, or later when the bridge started with the buffer engaged).
        self._kafka_ready = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._reader: PartitionReader | None = None

    async def start(self) -> None:
        """Create topics, connect everything, begin forwarding in both directions.

        With the disk buffer, a Kafka that does not answer within
        ``KAFKA_START_WAIT_S`` does not hold the bridge back: ingest starts
        with the buffer engaged (MQTT traffic goes to disk and is
        acknowledged), and Kafka, the dedupe window's seed from the data
        topic and command delivery are started in the background.
        """
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics_port = serve_metrics(cfg.metrics.port, cfg.metrics.host)
        s = cfg.ingest
        self.producer = self._make_producer()
        self.sender = KafkaSender(self.producer, self.metrics, s.max_in_flight, s.retry_backoff_ms / 1000.0)
        self.sender.on_sent = self._on_sent
        self.sender.landed = self._reader = PartitionReader(cfg.kafka, max(5.0, s.request_timeout_ms / 1000.0))
        try:
            if cfg.commands.enabled:
                self.commands = CommandDelivery(cfg, self.sender, self.metrics)
            buffered = s.enabled and s.buffer.enabled
            if buffered:
                b = s.buffer
                self.buffer = DiskBuffer(cfg.buffer_path(), max_events=b.max_events, max_bytes=b.max_bytes, sync=b.sync)
                await self.buffer.open()
                self.spill = Spill(
                    self.sender, self.buffer, b, self.metrics, self.dedupe, self.receipts, ready=self._kafka_ready
                )
                if self.dedupe is not None and self.buffer.depth:
                    n = self.dedupe.seed(await self.buffer.recent_keys(s.dedupe.window_size), confirmed=False)
                    log.info("dedupe window: %d event ids of the disk buffer", n)
                # Take MQTT traffic from the first moment, into the buffer until Kafka answers: a broker at its
                # default limits drops what queues for an absent bridge. Redeliveries of what Kafka already has
                # are recognised when the buffer drains (the dedupe window is seeded from the data topic first).
                self.spill.start(buffered=True)
            else:
                if cfg.create_topics:
                    await ensure_topics(cfg.kafka, cfg.topics().kafka_core())
                await self._start_producer()
                self.sender.start()
                await self._kafka_started()
            on_ack = self.commands.on_ack if self.commands is not None else None
            if s.enabled:
                self.ingest = Ingest(
                    cfg,
                    self.sender,
                    self.metrics,
                    on_command_ack=on_ack,
                    dedupe=self.dedupe,
                    outlet=self.spill,
                    receipts=self.receipts,
                )
                await self.ingest.start()
            kafka_up = True
            if buffered:
                kafka_up = await self._connect_kafka(KAFKA_START_WAIT_S)
                if kafka_up:
                    await self._kafka_started()
                else:
                    self._background.append(asyncio.create_task(self._connect_later(), name="fog-kafka-connect"))
            if s.enabled and cfg.share_group() and s.peers:
                self.takeover = Takeover(
                    cfg, self.sender, self.metrics, self.dedupe, on_ack, outlet=self.spill, receipts=self.receipts
                )
                await self.takeover.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "fog bridge %s running: MQTT %s:%d (v%s%s) <-> Kafka %s%s",
            s.client_id,
            cfg.mqtt.host,
            cfg.mqtt.port,
            cfg.mqtt.protocol,
            f", shared group {cfg.share_group()}" if cfg.share_group() else "",
            cfg.kafka.bootstrap_servers,
            "" if kafka_up else " (not reachable yet: taking traffic into the disk buffer)",
        )
        notify_ready("fog subscribed")

    def _make_producer(self) -> AIOKafkaProducer:
        s = self.config.ingest
        return make_producer(
            self.config.kafka,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_bytes,
            request_timeout_ms=s.request_timeout_ms,
            client_id=s.client_id,
        )

    async def _connect_kafka(self, timeout: float) -> bool:
        """Create the topics and start the producer within ``timeout`` s; False (and a fresh producer) if not."""
        cfg = self.config
        assert self.producer is not None and self.sender is not None
        try:
            async with asyncio.timeout(timeout):
                if cfg.create_topics:
                    await ensure_topics(cfg.kafka, cfg.topics().kafka_core())
                await self.producer.start()
        except (TimeoutError, KafkaError, OSError, RuntimeError) as exc:
            log.warning(
                "Kafka at %s is not answering (%s): MQTT traffic goes to the disk buffer until it does",
                cfg.kafka.bootstrap_servers,
                str(exc) or type(exc).__name__,
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), 5)
            # A producer whose start failed half way is not started again: a new one for the next attempt.
            self.producer = self._make_producer()
            self.sender.producer = self.producer
            return False
        self.sender.start()
        return True

    async def _connect_later(self) -> None:
        """Keep trying Kafka; once it answers, seed the dedupe window, start commands and the drain."""
        while not await self._connect_kafka(max(10.0, self.config.ingest.request_timeout_ms / 1000.0)):
            await asyncio.sleep(1.0)
        log.warning("Kafka at %s answers: sending the disk buffer", self.config.kafka.bootstrap_servers)
        await self._kafka_started()

    async def _kafka_started(self) -> None:
        """Kafka is up: seed the dedupe window with the data topic's tail, release the drain, start command delivery."""
        d = self.config.ingest.dedupe
        if self.config.ingest.enabled and self.dedupe is not None and d.seed_from_kafka:
            keys = await recent_keys(
                self.config.kafka,
                self.config.topics().kafka_data,
                max_records=d.window_size,
                max_age_s=d.window_s,
                timeout_s=d.seed_timeout_s,
            )
            self.dedupe.seed(keys, confirmed=True)
        # The drain may start now; commands join their consumer group meanwhile (seconds on small brokers).
        self._kafka_ready.set()
        if self.commands is not None:
            await self.commands.start()

    def _on_sent(self, recs: list[Record]) -> None:
        """Kafka acknowledged a batch: confirm its events (dedupe, receipts) and delete its buffer rows."""
        self.receipts.confirmed(recs)
        if self.spill is not None:
            self.spill.sent(recs)

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
        for part in (self.ingest, self.commands, self.takeover, self.receipts):
            if part is not None:
                out.extend(part._tasks)
        out.extend(t for t in self._background if not t.done())
        if self.spill is not None:
            out.extend(self.spill.tasks)
        if self.buffer is not None:
            out.extend(self.buffer.tasks)
        return out

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop ingest (sessions of peers first), the drain, then commands, flush Kafka, close the buffer."""
        await cancel_and_wait(self._background)
        if self.takeover is not None:
            await self.takeover.stop()
        if self.ingest is not None:
            await self.ingest.stop(timeout)
        if self.spill is not None:
            # No more rows handed to Kafka; what is on its way is acknowledged below (rows deleted) or kept.
            await self.spill.stop()
        if self.commands is not None:
            await self.commands.stop()
        if self.sender is not None:
            await self.sender.wait_idle(timeout)
            await self.sender.close()
        if self.buffer is not None:
            await self.buffer.close()
        if self._reader is not None:
            await self._reader.close()
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
            while True:
                done, _ = await asyncio.wait([stopper, *self.tasks()], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopper and not t.cancelled() and t.exception() is not None:
                        failed = t.exception()
                        log.error("fog bridge task %s failed: %r", t.get_name(), failed)
                # The background Kafka connection ends when it is done; then watch what it started.
                if stopper in done or failed is not None or not all(t in self._background for t in done):
                    break
        finally:
            stopper.cancel()
            await self.stop()
        if failed is not None:
            raise RuntimeError(f"fog bridge stopped after a failure: {failed!r}") from failed
