"""The trigger worker: Kafka in, batches through the pure engine, task requests and commands out.

One aiokafka consumer in the group ``worker.app_id`` reads ``{ns}.data`` and
``{ns}.results``; several workers in one group split the partitions. The
worker takes what has arrived, up to ``worker.max_batch`` records, and for
each batch:

1. evaluates every record: instrument events through the pure
   :class:`~reflexarc.cloud.engine.TriggerEngine`, against the state of their
   device (in memory, see :mod:`reflexarc.cloud.state`); task results through
   their trigger's ``on_result``;
2. sends all the task requests, signed commands and dead letters the batch
   decided, and waits once for the broker's acks (``acks=all``);
3. then writes the state of each device the batch changed, one changelog
   record per device, and waits for those acks;
4. only then counts the batch's offsets as committable; they are committed
   every ``worker.commit_interval``, when partitions are revoked and at stop.

So a committed offset never passes an event whose requests are not acked or
whose state is not durable. After a crash (even ``kill -9``) the events after
the last commit are read again: those whose state was already stored are
skipped (each state records the offset of the last event applied to it), the
others are decided again, identically (the engine is deterministic on event
time) and with the same ids (the site runs a task id once). A copy of an
event that reached Kafka twice at different offsets is recognised by its id.

A worker that is given a partition first reads its changelog (recovery up to
a marker record, correct on brokers with wrong end offsets such as Tansu),
then its events from the committed offset. A partition taken away is
committed and dropped at the revocation, after the batch in progress.

faust-streaming was used before; it is not any more: its agents cost ~100 us
of machinery per event, its tables write one changelog record per update (so
no state write per batch), and its table recovery trusts end offsets (so on
Tansu every changelog record needed a batch of its own, about a thousand
events a second at most). The loop here is the few things the trigger engine
needs of a stream processor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from reflexarc.aio import run_service
from reflexarc.cloud import metrics as m
from reflexarc.cloud.engine import CONFLICT_MESSAGE, SEP, TriggerEngine, event_context
from reflexarc.cloud.state import StateStore, changelog_topic
from reflexarc.cloud.validate import CompiledConfig, load_triggers
from reflexarc.config import ConfigError, KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError, kafka_event_fields
from reflexarc.events import Command, TaskResult
from reflexarc.kafka import ensure_topics, make_consumer, make_producer, partition_count
from reflexarc.process import notify_ready
from reflexarc.topics import Topics

log = logging.getLogger(__name__)

# (topic, key, value, headers, partition or None): what a batch sends before its state is written.
_Out = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


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
    return any(a.command is not None for t in cfg.triggers for a in t.actions) or any(
        t.on_result is not None for t in cfg.triggers
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's callbacks around a group rebalance, handed to the worker."""

    def __init__(self, worker: TriggerWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker._assigned(set(assigned))


class TriggerWorker:
    """One trigger-engine process: a consumer in the group, the engine, a producer, the state store."""

    def __init__(self, config: CompiledConfig, kafka: KafkaSettings | None = None) -> None:
        self.config = config
        self.kafka = kafka or config.file.kafka
        self.topics = Topics(config.file.pipeline.namespace)
        self.engine = TriggerEngine(config)
        w = config.file.worker
        self.group = w.app_id or f"{self.topics.namespace}-triggers"
        self.changelog = changelog_topic(self.group)
        self.key: Any = None
        self.producer: Any = None
        self.consumer: Any = None
        self.store: StateStore | None = None
        self.ready = asyncio.Event()
        # Set once the group gave this worker its partitions (possibly none) and their state is recovered.
        self.joined = asyncio.Event()
        self.processed = 0
        # Offsets (next to read) of batches whose requests are acked and state durable.
        self._committable: dict[TopicPartition, int] = {}
        # Held while a batch is processed: a revocation waits for the batch in progress.
        self._batch_lock = asyncio.Lock()
        self._next_commit = 0.0
        # State of partitions revoked by the rebalance under way (see _assigned).
        self._parked: dict[int, Any] = {}
        # What went wrong in a rebalance callback (aiokafka only logs their errors): the loop raises it.
        self._fatal: BaseException | None = None

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

    # ---- rebalances ---------------------------------------------------------------
    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions go: finish the batch in progress, commit what is durable, forget their state."""
        async with self._batch_lock:
            offsets = {tp: o for tp, o in self._committable.items() if tp in revoked}
            if offsets:
                try:
                    await self.consumer.commit(offsets)
                except KafkaError as exc:
                    # The next owner reads these events again: same decisions, same ids.
                    log.warning("commit before giving up partitions failed (%s): they will be re-read", exc)
            for tp in revoked:
                self._committable.pop(tp, None)
            assert self.store is not None
            gone = [tp.partition for tp in revoked if tp.topic == self.topics.kafka_data]
            self._parked = {p: self.store.partitions[p] for p in gone if p in self.store}
            self.store.drop(gone)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions come: recover their state before any of their events is evaluated.

        A rebalance revokes every partition and then assigns them; one that
        comes straight back had no other owner in between, so its state in
        memory (durable, its offsets committed at the revocation) is kept
        instead of being read again from the changelog.
        """
        assert self.store is not None
        try:
            data = [tp.partition for tp in assigned if tp.topic == self.topics.kafka_data]
            for p in data:
                if p in self._parked:
                    self.store.partitions[p] = self._parked[p]
            self._parked = {}
            await self.store.recover(data, fetch_wait_ms=10)
        except BaseException as exc:
            self._fatal = exc
            raise
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)) or "nothing")
        self.joined.set()

    # ---- one batch ----------------------------------------------------------------
    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Evaluate a batch, send what it decided, store its state, then mark its offsets committable."""
        assert self.store is not None
        engine = self.engine
        store = self.store
        data_topic = self.topics.kafka_data
        assigned = self.consumer.assignment()
        out: list[_Out] = []
        dirty: dict[int, dict[str, Any]] = {}
        done: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            if not records or tp not in assigned:
                continue  # revoked meanwhile: its next owner reads these records
            if tp.topic == data_topic:
                if tp.partition not in store:
                    # Fetched while its state is still being recovered: read them again afterwards.
                    self.consumer.seek(tp, records[0].offset)
                    continue
                self._on_data(engine, records, store.devices(tp.partition), dirty.setdefault(tp.partition, {}), out)
            else:
                for rec in records:
                    self._on_result(engine, rec, out)
            done[tp] = records[-1].offset + 1
        # 1. Every request, command and dead letter durably in Kafka ...
        if out:
            send = self.producer.send
            await asyncio.gather(
                *[
                    await send(topic, key=key, value=value, headers=headers, partition=part)
                    for topic, key, value, headers, part in out
                ]
            )
        # 2. ... before the state that records these events as applied ...
        writes = []
        live = engine.trigger_names
        for partition, devices in dirty.items():
            for device, bundle in devices.items():
                if any(k.split(SEP, 1)[0] not in live for k in bundle):
                    # States of triggers removed by a reload go with the next write.
                    for k in [k for k in bundle if k.split(SEP, 1)[0] not in live]:
                        del bundle[k]
                writes.append(await store.write(partition, device, bundle))
        if writes:
            await asyncio.gather(*writes)
        # 3. ... before the offsets that skip these events.
        self._committable.update(done)

    @m.EVALUATION.time()
    def _on_data(
        self, engine: TriggerEngine, records: list[Any], devices: dict[str, Any], dirty: dict[str, Any], out: list[_Out]
    ) -> None:
        """Instrument events of one partition, in offset order, against their devices' state."""
        events = len(records)
        late = skipped = duplicates = 0
        event_of, evaluate = engine.event_of, engine.evaluate  # per event: looked up once
        for rec in records:
            try:
                # The kernel's fast reading of a record as reflexarc writes it; any other through the SDK.
                fields = kafka_event_fields(rec.value, rec.headers)
                if fields is not None:
                    ctx = event_of(fields)
                else:
                    env = Envelope.from_kafka(rec.value, rec.headers, rec.key)
                    engine.check_event(env)
                    ctx = event_context(env)
            except EnvelopeError as exc:
                self._deadletter(rec, "triggers.data", str(exc), out)
                continue
            device = f"{ctx['site']}/{ctx['device']}"
            bundle = devices.get(device)
            outcome = evaluate(ctx, {} if bundle is None else bundle, rec.offset)
            if outcome.states:
                if bundle is None:
                    bundle = devices[device] = {}
                bundle.update(outcome.states)
                dirty[device] = bundle
            if outcome.firings:
                for firing in outcome.firings:
                    m.FIRINGS.labels(firing.trigger).inc()
                    for req in firing.tasks:
                        self._queue(self.topics.kafka_tasks(req.site), req.to_envelope(), req.task_id.encode(), out)
                        m.TASKS.labels(req.site).inc()
                    for cmd in firing.commands:
                        self._queue_command(cmd, out)
            late += outcome.late
            skipped += outcome.skipped
            if outcome.duplicate:
                duplicates += 1
            if outcome.conflict:
                m.ID_CONFLICTS.inc()
                self._deadletter(rec, "triggers.id_conflict", CONFLICT_MESSAGE.format(id=ctx["id"]), out)
            for f in outcome.failures:
                self._deadletter(rec, f"triggers.eval.{f.trigger}", f.message, out)
        self.processed += events
        m.EVENTS.inc(events)
        if late:
            m.LATE.inc(late)
        if skipped:
            m.REPLAYED.inc(skipped)
        if duplicates:
            m.DUPLICATES.inc(duplicates)

    def _on_result(self, engine: TriggerEngine, rec: Any, out: list[_Out]) -> None:
        """One task result through its trigger's ``on_result``: signed commands."""
        try:
            env = Envelope.from_kafka(rec.value, rec.headers, rec.key)
            result = TaskResult.from_envelope(env)
        except EnvelopeError as exc:
            self._deadletter(rec, "triggers.results", str(exc), out)
            return
        m.RESULTS.labels(result.status).inc()
        commands, failure = engine.on_result(result)
        for cmd in commands:
            self._queue_command(cmd, out)
        if failure is not None:
            self._deadletter(rec, "triggers.on_result", failure.message, out)

    @staticmethod
    def _queue(topic: str, env: Envelope, key: bytes | None, out: list[_Out]) -> None:
        k, value, headers = env.to_kafka(key)
        out.append((topic, k, value, headers, None))

    def _queue_command(self, cmd: Command, out: list[_Out]) -> None:
        from reflexarc.signing import sign_envelope

        env = cmd.to_envelope()
        if self.key is not None:
            env = sign_envelope(env, self.key)
        m.COMMANDS.inc()
        self._queue(self.topics.kafka_commands, env, Topics.device_key(cmd.site, cmd.device), out)

    def _deadletter(self, rec: Any, stage: str, error: str, out: list[_Out]) -> None:
        dl = DeadLetter.of_record(rec, stage, error)
        origin = dl.origin
        key, value, headers = dl.to_kafka()
        out.append((self.topics.kafka_deadletter, key, value, headers, None))
        m.DEADLETTERS.labels(stage).inc()
        log.warning("dead letter (%s) %s: %s", stage, origin, error)

    # ---- the loop -------------------------------------------------------------------
    async def _commit(self) -> None:
        if not self._committable:
            return
        offsets = dict(self._committable)
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance is under way; the revocation commits what is durable, or the next owner re-reads.
            log.info("commit deferred (%s)", exc)
            return
        for tp, o in offsets.items():
            if self._committable.get(tp) == o:
                del self._committable[tp]

    async def _loop(self, stop: asyncio.Event) -> None:
        w = self.config.file.worker
        loop = asyncio.get_running_loop()
        self._next_commit = loop.time() + w.commit_interval
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise RuntimeError(f"taking partitions failed: {self._fatal!r}") from self._fatal
                # getmany() ignores its timeout while a rebalance is under way, which is for ever if
                # the broker went away meanwhile: a stop request must still end the loop.
                get = asyncio.ensure_future(self.consumer.getmany(timeout_ms=100, max_records=w.max_batch))
                await asyncio.wait([get, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return  # stopping: nothing fetched is lost (its offsets are not committed)
                await self._after_fetch(get.result(), loop)
        finally:
            stopping.cancel()

    async def _after_fetch(self, batch: dict[TopicPartition, list[Any]], loop: asyncio.AbstractEventLoop) -> None:
        """Process what one fetch returned; commit when the interval is over."""
        if batch:
            async with self._batch_lock:
                await self._process(batch)
        if loop.time() >= self._next_commit:
            async with self._batch_lock:
                await self._commit()
            self._next_commit = loop.time() + self.config.file.worker.commit_interval

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
        # Swapped between batches: a batch runs with one engine throughout.
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
        w = self.config.file.worker
        self.key = self._check_key(self.config)
        await self._prepare_topics(self.config)
        partitions = await partition_count(self.kafka, self.topics.kafka_data)
        # The changelog is co-partitioned with the data topic: partition p holds the state of p's devices.
        await ensure_topics(self.kafka, [self.changelog], partitions)
        changelog_parts = await partition_count(self.kafka, self.changelog)
        if changelog_parts != partitions:
            raise RuntimeError(
                f"{self.changelog} has {changelog_parts} partitions but {self.topics.kafka_data} "
                f"has {partitions}: they must match (state of partition p is in partition p)"
            )
        # No linger: a batch's records are all sent at once and then awaited, so they batch anyway.
        self.producer = make_producer(self.kafka, linger_ms=0)
        await self.producer.start()
        self.store = StateStore(self.kafka, self.changelog, self.producer)
        self.consumer = make_consumer(
            self.kafka,
            group_id=self.group,
            fetch_max_wait_ms=max(1, round(w.fetch_wait * 1000)),
            session_timeout_ms=round(w.session_timeout * 1000),
            heartbeat_interval_ms=round(min(1.0, w.session_timeout / 4) * 1000),
        )
        loop_task: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            await self.consumer.start()
            self.consumer.subscribe([self.topics.kafka_data, self.topics.kafka_results], listener=_Rebalance(self))
            loop_task = asyncio.create_task(self._loop(stop))
            # Joining the group (and recovering state) is for ever if Kafka went away meanwhile:
            # a stop request must still end it.
            joined = asyncio.ensure_future(self.joined.wait())
            await asyncio.wait([joined, loop_task], return_when=asyncio.FIRST_COMPLETED)
            if loop_task.done():
                joined.cancel()
                loop_task.result()  # raises what ended the loop
            if not self.joined.is_set():
                log.warning("stop requested while starting (group join or state recovery unfinished): not starting")
                return
            m.ACTIVE.set(len(self.config.triggers))
            log.info(
                "trigger engine up: %d triggers on %s (%d partitions), group %s",
                len(self.config.triggers),
                self.topics.kafka_data,
                partitions,
                self.group,
            )
            self.ready.set()
            notify_ready("triggers running")
            if w.reload:
                watcher = asyncio.create_task(self._watch(stop))
            await loop_task  # ends at the next batch boundary once stop is set; raises if the loop failed
        finally:
            stop.set()
            if watcher is not None:
                watcher.cancel()
            if loop_task is not None and not loop_task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(loop_task, 30)
            with contextlib.suppress(KafkaError, asyncio.CancelledError):
                async with self._batch_lock:
                    await self._commit()
            # Leaving the group and flushing need the broker: bounded, so that a stop always ends.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), 10)


def run_file(path: str | Path) -> None:
    """Load a triggers file and run the worker until SIGTERM/SIGINT (the CLI's ``cloud run``)."""
    from reflexarc.metrics import serve_metrics

    cfg = load_triggers(path)
    serve_metrics(cfg.file.pipeline.metrics.port, cfg.file.pipeline.metrics.host)

    run_service(TriggerWorker(cfg).run)
