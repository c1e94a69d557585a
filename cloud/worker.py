"""The faust runtime of the trigger engine: Kafka in, table state, task requests and commands out.

Two agents:

* ``data``: instrument events from ``{ns}.data``. For each event the pure
  :class:`~reflexarc.cloud.engine.TriggerEngine` reads the state of the
  triggers it concerns from a faust table (changelog-backed), decides, and the
  agent first sends the resulting task requests and signed commands and waits
  for the broker's acks (``acks=all``), *then* stores the new state. Offsets
  are committed by faust only after the changelog records written so far are
  acked, and no fetched event is dropped unprocessed (faust alone guarantees
  neither: see :mod:`reflexarc.cloud.transport`). A crash anywhere
  therefore either replays the event (same decisions, same ids: the site
  deduplicates) or finds its state already stored (the engine skips it).
* ``results``: task results from ``{ns}.results``; ``on_result`` turns them
  into signed commands on ``{ns}.commands``.

Whatever cannot be read or evaluated becomes a dead letter on
``{ns}.deadletter`` and the worker carries on.

Tansu (and other small brokers) report wrong end offsets for multi-record
batches, which would make faust stop table recovery early; the faust producer
(used only for the changelog here) therefore sends one record per batch.
Requests and commands go through a separate aiokafka producer.

Latency: faust's consumer would wait up to 1.5 s per fetch, which on Tansu
(it polls, see :mod:`reflexarc.cloud.transport`) delays every record the worker
reads by 0-750 ms; the worker sets ``worker.fetch_wait`` (50 ms) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reflexarc.aio import run_service, unless_stopped
from reflexarc.cloud import metrics as m
from reflexarc.cloud.engine import SEP, Outcome, TriggerEngine
from reflexarc.cloud.validate import CompiledConfig, load_triggers
from reflexarc.config import ConfigError, KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError
from reflexarc.events import Command, TaskResult
from reflexarc.kafka import ensure_topics, make_producer, partition_count, send_event
from reflexarc.process import notify_ready
from reflexarc.topics import Topics

log = logging.getLogger(__name__)

STATE_TABLE = "trigger-state"


class SigningKeyMissing(RuntimeError):
    """Commands would go out unsigned; the text says how to configure the key."""


def load_key(cfg: CompiledConfig) -> Any:
    """The Ed25519 key commands are signed with: ``signing_key_file`` or ``$RX_SIGNING_KEY``."""
    from reflexarc.signing import load_signing_key, signing_key_from_env

    if cfg.file.signing_key_file:
        path = Path(cfg.file.signing_key_file)
        if not path.is_absolute():
            path = cfg.path.parent / path
        return load_signing_key(path)
    return signing_key_from_env()


def needs_key(cfg: CompiledConfig) -> bool:
    """Whether any trigger can send a command (which must be signed)."""
    return any(
        a.command is not None for t in cfg.triggers for a in t.actions
    ) or any(t.on_result is not None for t in cfg.triggers)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    if raw is None:
        return []
    items: Iterable[Any] = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in items]


class TriggerWorker:
    """One trigger-engine process: a faust app plus a producer for what it decides."""

    def __init__(self, config: CompiledConfig, kafka: KafkaSettings | None = None) -> None:
        self.config = config
        self.kafka = kafka or config.file.kafka
        self.topics = Topics(config.file.pipeline.namespace)
        self.engine = TriggerEngine(config)
        self.key: Any = None
        self.producer: Any = None
        self.app: Any = None
        self.table: Any = None
        self.partitions = self.kafka.partitions
        self._data_dir: Path | None = None
        self._tmp_dir: str | None = None
        self.ready = asyncio.Event()
        self.processed = 0

    # ---- set-up -------------------------------------------------------------------
    def _check_key(self, cfg: CompiledConfig) -> Any:
        key = load_key(cfg)
        if key is None and needs_key(cfg):
            raise SigningKeyMissing(
                "triggers send commands, which must be signed: set 'signing_key_file' in "
                f"{cfg.path} or RX_SIGNING_KEY to an Ed25519 private key (PEM); "
                "create one with 'reflexarc keys generate'"
            )
        return key

    async def _prepare_topics(self, cfg: CompiledConfig) -> None:
        await ensure_topics(
            self.kafka, [*self.topics.kafka_core(), *(self.topics.kafka_tasks(s) for s in cfg.task_sites())]
        )

    def _build_app(self) -> Any:
        import faust

        from reflexarc.cloud import transport

        w = self.config.file.worker
        app_id = w.app_id or f"{self.topics.namespace}-triggers"
        if w.data_dir:
            self._data_dir = Path(w.data_dir)
        else:
            self._tmp_dir = tempfile.mkdtemp(prefix="reflexarc-triggers-")
            self._data_dir = Path(self._tmp_dir)
        app = faust.App(
            app_id,
            broker=[f"kafka://{h.strip()}" for h in self.kafka.bootstrap_servers.split(",")],
            store="memory://",
            autodiscover=False,
            datadir=str(self._data_dir),
            # Never bind a web server (it would listen on 0.0.0.0:6066).
            web_enabled=False,
            topic_partitions=self.partitions,
            topic_replication_factor=self.kafka.replication_factor,
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=w.session_timeout,
            broker_heartbeat_interval=min(1.0, w.session_timeout / 4),
            broker_commit_interval=w.commit_interval,
            producer_acks=-1,
            # One record per changelog batch: see the module docstring.
            producer_max_batch_size=1 if w.single_record_batches else 256 * 1024,
            producer_linger=0.0,
            stream_wait_empty=True,
            # The same TLS/SASL as every other client of this cluster.
            broker_credentials=transport.credentials(self.kafka),
        )
        # faust hard-codes a 1.5 s fetch wait, which Tansu turns into 0-750 ms of added
        # latency per hop, and its flush before a commit can return before the changelog
        # is durable: see reflexarc.cloud.transport.
        transport.install(app, w.fetch_wait)
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        data_topic = app.topic(self.topics.kafka_data, partitions=self.partitions, **raw)
        results_topic = app.topic(self.topics.kafka_results, **raw)
        self.table = app.Table(
            STATE_TABLE,
            default=None,
            partitions=self.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
        )

        async def data_agent(stream: Any) -> None:
            async for event in stream.events():
                await self.on_data(event.message)

        async def results_agent(stream: Any) -> None:
            async for event in stream.events():
                await self.on_result(event.message)

        app.agent(data_topic, name="data")(data_agent)
        app.agent(results_topic, name="results")(results_agent)
        return app

    # ---- per record ---------------------------------------------------------------
    async def _deadletter(self, msg: Any, stage: str, error: str) -> None:
        origin = f"{msg.topic}/{msg.partition}/{msg.offset}"
        dl = DeadLetter(error=error, stage=stage, origin=origin, payload=msg.value or b"")
        key, value, headers = dl.to_kafka()
        fut = await self.producer.send(self.topics.kafka_deadletter, value=value, key=key, headers=headers)
        await fut
        m.DEADLETTERS.labels(stage).inc()
        log.warning("dead letter (%s) %s: %s", stage, origin, error)

    async def _send_all(self, outcome: Outcome) -> None:
        futs = []
        for firing in outcome.firings:
            m.FIRINGS.labels(firing.trigger).inc()
            for req in firing.tasks:
                futs.append(await send_event(
                    self.producer, self.topics.kafka_tasks(req.site), req.to_envelope(), key=req.task_id.encode()
                ))
                m.TASKS.labels(req.site).inc()
            for cmd in firing.commands:
                futs.append(await self._send_command(cmd))
        # Everything decided must be durably in Kafka before the state moves on.
        if futs:
            await asyncio.gather(*futs)

    async def _send_command(self, cmd: Command) -> Any:
        from reflexarc.signing import sign_envelope

        env = cmd.to_envelope()
        if self.key is not None:
            env = sign_envelope(env, self.key)
        m.COMMANDS.inc()
        return await send_event(self.producer, self.topics.kafka_commands, env, key=Topics.device_key(cmd.site, cmd.device))

    async def on_data(self, msg: Any) -> None:
        """Evaluate one instrument event (a faust message from the data topic)."""
        self.processed += 1
        m.EVENTS.inc()
        try:
            env = Envelope.from_kafka(msg.value, _headers(msg.headers), msg.key)
            engine = self.engine
            engine.check_event(env)
        except EnvelopeError as exc:
            await self._deadletter(msg, "triggers.data", str(exc))
            return
        # One table entry per device holds the state of every trigger for it, so an
        # event costs at most one changelog record whatever the number of triggers.
        device_key = f"{env.site}/{env.device}"
        bundle: dict[str, Any] = self.table.get(device_key) or {}
        outcome = engine.process(env, bundle, position=msg.offset)
        await self._send_all(outcome)
        if outcome.states:
            live = engine.trigger_names
            fresh = {k: v for k, v in bundle.items() if k.split(SEP, 1)[0] in live}
            fresh.update(outcome.states)
            self.table[device_key] = fresh
        if outcome.late:
            m.LATE.inc(outcome.late)
        if outcome.skipped:
            m.REPLAYED.inc(outcome.skipped)
        for f in outcome.failures:
            await self._deadletter(msg, f"triggers.eval.{f.trigger}", f.message)

    async def on_result(self, msg: Any) -> None:
        """Map one task result through its trigger's ``on_result`` to signed commands."""
        try:
            env = Envelope.from_kafka(msg.value, _headers(msg.headers), msg.key)
            result = TaskResult.from_envelope(env)
        except EnvelopeError as exc:
            await self._deadletter(msg, "triggers.results", str(exc))
            return
        m.RESULTS.labels(result.status).inc()
        commands, failure = self.engine.on_result(result)
        futs = [await self._send_command(c) for c in commands]
        if futs:
            await asyncio.gather(*futs)
        if failure is not None:
            await self._deadletter(msg, "triggers.on_result", failure.message)

    # ---- reload -------------------------------------------------------------------
    async def reload_once(self) -> bool:
        """Re-read the file if it changed; apply it if valid. Returns True when applied."""
        path = self.config.path
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError as exc:
            log.error("cannot read %s (%s): keeping the running triggers", path, exc.strerror)
            return False
        if hashlib.sha256(text.encode()).hexdigest() == self.config.text_hash:
            return False
        try:
            new = await asyncio.to_thread(load_triggers, path)
            key = self._check_key(new) if needs_key(new) else self.key
        except (ConfigError, SigningKeyMissing, ValueError) as exc:
            m.RELOADS.labels("rejected").inc()
            log.error("new %s rejected, the running triggers stay in force:\n%s", path, exc)
            # Do not complain again until the file changes once more.
            self.config.text_hash = hashlib.sha256(text.encode()).hexdigest()
            return False
        if new.file.pipeline.namespace != self.config.file.pipeline.namespace:
            log.error("namespace changes need a restart; keeping the running triggers")
            m.RELOADS.labels("rejected").inc()
            return False
        await self._prepare_topics(new)
        old_names = {t.name: t.fingerprint for t in self.config.triggers}
        self.config = new
        self.key = key
        self.engine = TriggerEngine(new)
        m.ACTIVE.set(len(new.triggers))
        m.RELOADS.labels("applied").inc()
        kept = [t.name for t in new.triggers if old_names.get(t.name) == t.fingerprint]
        log.info("reloaded %s: %d triggers (state kept for %s)", path, len(new.triggers), ", ".join(kept) or "none")
        return True

    async def _watch(self, stop: asyncio.Event) -> None:
        interval = self.config.file.worker.reload_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self.reload_once()
            except Exception:  # a reload must never take the worker down
                log.exception("reload of %s failed; keeping the running triggers", self.config.path)

    # ---- run ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""
        self.key = self._check_key(self.config)
        await self._prepare_topics(self.config)
        self.partitions = await partition_count(self.kafka, self.topics.kafka_data)
        # No linger: each event's sends are awaited before the next event is read, so
        # there is never a second event's record to batch with, only latency to add.
        self.producer = make_producer(self.kafka, linger_ms=0)
        await self.producer.start()
        watcher: asyncio.Task[None] | None = None
        try:
            self.app = self._build_app()
            # The changelog is created here, explicitly, with the data topic's partition count
            # (faust's own declaration is then a no-op).
            await ensure_topics(self.kafka, [self.table.changelog_topic.get_topic_name()], self.partitions)
            # faust's start waits until the group is joined and the tables recovered, which is
            # for ever if Kafka went away meanwhile: a stop request must still end it.
            if not await unless_stopped(self.app.start(), stop):
                log.warning("stop requested while starting (group join or table recovery unfinished): not starting")
                return
            m.ACTIVE.set(len(self.config.triggers))
            log.info(
                "trigger engine up: %d triggers on %s (%d partitions), group %s",
                len(self.config.triggers), self.topics.kafka_data, self.partitions, self.app.conf.id,
            )
            self.ready.set()
            notify_ready("triggers running")
            if self.config.file.worker.reload:
                watcher = asyncio.create_task(self._watch(stop))
            if await unless_stopped(self._crashed(), stop):
                raise RuntimeError(f"faust app crashed: {self.app._crash_reason!r}")
        finally:
            stop.set()
            if watcher is not None:
                watcher.cancel()
            if self.app is not None:
                try:
                    await asyncio.wait_for(self.app.stop(), 30)
                except TimeoutError:
                    log.error("faust app did not stop within 30 s")
            await self.producer.stop()
            if self._tmp_dir:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)

    async def _crashed(self) -> None:
        while not self.app.crashed:
            await asyncio.sleep(0.5)


def run_file(path: str | Path) -> None:
    """Load a triggers file and run the worker until SIGTERM/SIGINT (the CLI's ``cloud run``)."""
    from reflexarc.metrics import serve_metrics

    cfg = load_triggers(path)
    serve_metrics(cfg.file.pipeline.metrics_port)

    run_service(TriggerWorker(cfg).run)
