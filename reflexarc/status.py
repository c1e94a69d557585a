"""``reflexarc status``: one snapshot of a running pipeline, from what it already publishes.

Nothing here joins a consumer group or commits: the report is read from

* Kafka: consumer groups (listed and described) and their committed offsets
  against each partition's end -> lag per group, topic and partition; the
  commands, acks and dead-letter topics over the last hour -> commands
  pending, delivered, rejected and expired, dead letters per stage, and the
  loop's latency (the triggering event's time -> the actuator's ack);
* MQTT: the retained status topic of every device -> online or offline.

A site's backlog is what its group has not taken from its task topic yet;
with it, what the site itself announces on ``{ns}.sites`` (:mod:`reflexarc.sites`):
live, stale or stopped, tasks queued and running, free slots.

Some Kafka-protocol brokers (Tansu) answer ``ListOffsets`` for the latest
offset with the first offset of the last batch + 1: the true end is found by
reading that last batch (one fetch per partition), which is exact on every
broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError, EventType
from reflexarc.events import Command, CommandAck, CommandStatus
from reflexarc.kafka import make_admin, make_consumer, read_to_end
from reflexarc.mqtt import MqttClient, MqttError
from reflexarc.observer import percentile
from reflexarc.sites import site_views, statuses_of
from reflexarc.topics import MqttKind, TopicError, Topics

log = logging.getLogger(__name__)

#: How far back commands and dead letters are counted.
WINDOW_S = 3600.0
#: How far back the loop's latency percentiles look.
LATENCY_WINDOW_S = 600.0
#: At most this many records are read per topic for one report (the newest window is what counts).
MAX_RECORDS = 200_000


@dataclass(frozen=True)
class StatusSources:
    """Where a pipeline lives: its brokers and namespace."""

    kafka: KafkaSettings
    mqtt: MqttSettings
    namespace: str

    @property
    def topics(self) -> Topics:
        """The topic helper of the namespace."""
        return Topics(self.namespace)


def sources_of(pipeline: Path | None) -> StatusSources:
    """Brokers from ``pipeline.yaml``'s ``brokers:`` section, else from the ``RX_*`` environment.

    A pipeline ``reflexarc up`` runs on embedded brokers prints their ``RX_*`` variables at start.
    """
    kafka, mqtt = KafkaSettings.from_env(), MqttSettings.from_env()
    namespace = os.environ.get("RX_NAMESPACE", "rx")
    if pipeline is not None:
        from reflexarc.supervisor import load_pipeline

        cfg = load_pipeline(pipeline)
        namespace = cfg.namespace
        if cfg.brokers is not None:
            kafka = cfg.brokers.kafka or kafka
            mqtt = cfg.brokers.mqtt or mqtt
    return StatusSources(kafka, mqtt, namespace)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# ---- Kafka ---------------------------------------------------------------------------------------
async def true_ends(consumer: AIOKafkaConsumer, tps: list[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, exact even where ``end_offsets`` is not.

    ``consumer`` has no group; its assignment is replaced.
    """
    if not tps:
        return {}
    ends = await consumer.end_offsets(tps)
    begins = await consumer.beginning_offsets(tps)
    result = {tp: int(ends[tp]) for tp in tps}
    todo = {tp for tp in tps if ends[tp] > begins[tp]}
    if not todo:
        return result
    consumer.assign(list(todo))
    for tp in todo:
        consumer.seek(tp, max(begins[tp], ends[tp] - 1))
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        batch = await consumer.getmany(*todo, timeout_ms=200)
        for tp, records in batch.items():
            if records:
                # The fetch returned the partition's last batch whole: its last record is the end
                # (a record written since only makes the figure a moment old).
                result[tp] = max(result[tp], records[-1].offset + 1)
                todo.discard(tp)
    return result


async def _read_window(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    ends: dict[TopicPartition, int],
    since_ms: int,
    timeout: float,
) -> list[Any]:
    """Records of ``tps`` with a timestamp at or after ``since_ms``, up to the ends found before."""
    tps = [tp for tp in tps if ends.get(tp, 0) > 0]
    if not tps:
        return []
    consumer.assign(tps)
    begins = await consumer.beginning_offsets(tps)
    try:
        found: dict[TopicPartition, Any] = await consumer.offsets_for_times({tp: since_ms for tp in tps})
    except KafkaError as exc:  # a broker without timestamp lookup: read the partitions and filter
        log.debug("offsets_for_times: %s", exc)
        found = {tp: "unknown" for tp in tps}
    todo: dict[TopicPartition, int] = {}
    for tp in tps:
        hit = found.get(tp)
        if hit is None:
            continue  # no record that recent
        # Tansu answers a time past its last record with timestamp -1 (and an early offset): read and filter.
        start = hit.offset if hit != "unknown" and hit.timestamp >= 0 else begins[tp]
        # Never start past the end, nor before what the partition still holds.
        start = max(begins[tp], min(start, ends[tp]))
        if start < ends[tp]:
            consumer.seek(tp, start)
            todo[tp] = ends[tp]
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline and len(out) < MAX_RECORDS:
        batch = await consumer.getmany(*todo, timeout_ms=200, max_records=5000)
        for tp, records in batch.items():
            end = todo.get(tp)
            if end is None:
                continue
            for rec in records:
                if rec.offset >= end:
                    break
                if rec.timestamp >= since_ms:
                    out.append(rec)
            if records and records[-1].offset + 1 >= end:
                del todo[tp]
    return out


async def _committed(kafka: KafkaSettings, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Committed offsets of ``group`` (read without joining it: nothing changes for its members)."""
    consumer = make_consumer(kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return {tp: int(o) for tp, o in zip(tps, offsets, strict=True) if o is not None and o >= 0}


async def _groups(kafka: KafkaSettings) -> list[str]:
    """Names of the cluster's consumer groups.

    Not described: Tansu 0.6 answers DescribeGroups for a group with members in a form aiokafka
    cannot decode (and drops the connection), so membership is not part of the report.
    """
    admin = make_admin(kafka)
    await admin.start()
    try:
        listed = await admin.list_consumer_groups()
        return sorted({g[0] for g in listed if not g[1] or g[1] == "consumer"})
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def kafka_report(
    kafka: KafkaSettings, topics: Topics, window_s: float, latency_window_s: float, timeout: float
) -> dict[str, Any]:
    """The Kafka half of the report: broker, lag, sites, commands, dead letters, loop latency."""
    t0 = time.monotonic()
    reader = make_consumer(kafka, group_id=None, enable_auto_commit=False, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(reader.start(), timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await reader.stop()
        return {"broker": {"reachable": False, "bootstrap": kafka.bootstrap_servers, "error": f"{exc!r}"}}
    try:
        names = sorted(t for t in await reader.topics() if t.startswith(f"{topics.namespace}."))
        tps = [TopicPartition(t, p) for t in names for p in sorted(reader.partitions_for_topic(t) or ())]
        ends = await true_ends(reader, tps, timeout)
        begins = await reader.beginning_offsets(tps) if tps else {}
        groups = await _groups(kafka)
        committed = dict(zip(groups, await asyncio.gather(*(_committed(kafka, g, tps) for g in groups)), strict=True))
        lag: list[dict[str, Any]] = []
        site_backlog: dict[str, dict[str, Any]] = {}
        consumed_topics = {tp.topic for offs in committed.values() for tp in offs}
        for group, offs in committed.items():
            for topic in sorted({tp.topic for tp in offs}):
                for tp in (tp for tp in tps if tp.topic == topic):
                    # A partition the group never committed on: everything it holds is still to read.
                    pos = offs.get(tp, int(begins.get(tp, 0)))
                    n = max(0, ends[tp] - pos)
                    lag.append(
                        {
                            "group": group,
                            "topic": topic,
                            "partition": tp.partition,
                            "committed": offs.get(tp),
                            "end": ends[tp],
                            "lag": n,
                        }
                    )
        for topic in names:
            site = topics.parse_kafka_tasks(topic)
            if site is None:
                continue
            rows = [r for r in lag if r["topic"] == topic]
            if rows:
                by_group = Tally[str]()
                for r in rows:
                    by_group[r["group"]] += r["lag"]
                backlog = max(by_group.values())
                readers = sorted(by_group)
            else:  # no group ever committed here: every request waits
                backlog = sum(ends[tp] - int(begins.get(tp, 0)) for tp in tps if tp.topic == topic)
                readers = []
            site_backlog[site] = {"topic": topic, "backlog": backlog, "groups": readers}
        if topics.kafka_sites in names:
            for view in site_views(statuses_of(await read_to_end(kafka, topics.kafka_sites, timeout))):
                st = view.status
                entry = site_backlog.setdefault(
                    st.site, {"topic": topics.kafka_tasks(st.site), "backlog": 0, "groups": []}
                )
                entry.update(
                    state=view.state,
                    age_s=round(view.age_s, 1),
                    queued=st.queued,
                    running=st.running,
                    slots=st.slots,
                    free_slots=st.free_slots,
                )
        now = time.time()
        since_ms = int((now - window_s) * 1000)
        window_topics = [topics.kafka_commands, topics.kafka_acks, topics.kafka_deadletter]
        remaining = max(1.0, timeout - (time.monotonic() - t0))
        records = await _read_window(reader, [tp for tp in tps if tp.topic in window_topics], ends, since_ms, remaining)
        report = {
            "broker": {"reachable": True, "bootstrap": kafka.bootstrap_servers, "topics": len(names)},
            "groups": groups,
            "lag": lag,
            "unread_topics": sorted(set(names) - consumed_topics),
            "sites": site_backlog,
        }
        report.update(_window_figures(records, topics, now, window_s, latency_window_s))
        return report
    except (KafkaError, OSError, TimeoutError) as exc:
        # Lost while reading (a broker restarting): this report says so; --watch tries again.
        return {"broker": {"reachable": False, "bootstrap": kafka.bootstrap_servers, "error": f"{exc!r}"}}
    finally:
        with contextlib.suppress(Exception):
            await reader.stop()


def _window_figures(
    records: list[Any], topics: Topics, now: float, window_s: float, latency_window_s: float
) -> dict[str, Any]:
    """Commands, dead letters and loop latency from the window's records."""
    commands: dict[str, Command] = {}
    acks: dict[str, CommandAck] = {}
    statuses: dict[str, set[str]] = {}
    dead = Tally[str]()
    for rec in records:
        if rec.topic == topics.kafka_deadletter:
            dead[DeadLetter.from_kafka(rec.value, rec.headers).stage or "?"] += 1
            continue
        try:
            env = Envelope.from_kafka(rec.value, rec.headers, rec.key)
            if env.type == EventType.COMMAND:
                cmd = Command.from_envelope(env)
                commands.setdefault(cmd.command_id, cmd)
            elif env.type == EventType.COMMAND_ACK:
                ack = CommandAck.from_envelope(env)
                acks.setdefault(ack.command_id, ack)
            elif env.type == EventType.COMMAND_STATUS:
                st = CommandStatus.from_envelope(env)
                statuses.setdefault(st.command_id, set()).add(st.status)
        except (EnvelopeError, ValueError) as exc:
            log.debug("status skipped a record on %s: %s", rec.topic, exc)
    counts = Tally[str]()
    latencies: list[float] = []
    for cid in commands:
        answer, seen = acks.get(cid), statuses.get(cid, set())
        if (answer is not None and answer.ok) or "acked" in seen:
            counts["delivered"] += 1
        elif "expired" in seen:
            counts["expired"] += 1
        elif (answer is not None and not answer.ok) or seen & {"rejected", "failed"}:
            counts["rejected"] += 1
        else:
            counts["pending"] += 1
    for cid, answer in acks.items():
        command = commands.get(cid)
        if command is None or not answer.ok or command.cause is None or command.cause.time is None:
            continue
        if answer.at.timestamp() >= now - latency_window_s:
            latencies.append((answer.at - command.cause.time).total_seconds())
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "commands": {
            "window_s": window_s,
            "issued": len(commands),
            **{k: counts[k] for k in ("pending", "delivered", "rejected", "expired")},
        },
        "dead_letters": {"window_s": window_s, "total": sum(dead.values()), "by_stage": dict(sorted(dead.items()))},
        "loop": {
            "window_s": latency_window_s,
            "loops": len(latencies),
            "p50_s": None if p50 is None else round(p50, 4),
            "p99_s": None if p99 is None else round(p99, 4),
        },
    }


# ---- MQTT ----------------------------------------------------------------------------------------
async def mqtt_report(mqtt: MqttSettings, topics: Topics, timeout: float) -> dict[str, Any]:
    """Whether the broker answers, and every device's retained status."""
    run = uuid.uuid4().hex[:12]
    try:
        client = MqttClient(mqtt, f"rx-status-{run}")
        await client.connect(timeout=timeout)
    except Exception as exc:
        return {"broker": {"reachable": False, "address": f"{mqtt.host}:{mqtt.port}", "error": f"{exc!r}"}}
    devices: dict[str, dict[str, Any]] = {}
    try:
        probe = topics.mqtt_probe(f"status-{run}")
        await client.subscribe([(topics.mqtt_status_filter(), 1), (probe, 1)], timeout=timeout)
        # The broker sends the retained statuses when it grants the subscription; a message we
        # publish afterwards comes after them: its arrival says every retained status is in.
        await client.publish(probe, b"", 1)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(client.messages.get(), left)
            except TimeoutError:
                break
            if msg.topic == probe:
                break
            entry = _device_status(topics, msg.topic, msg.payload)
            if entry is not None:
                devices[f"{entry['site']}/{entry['device']}"] = entry
    except (MqttError, TimeoutError) as exc:
        return {"broker": {"reachable": False, "address": f"{mqtt.host}:{mqtt.port}", "error": f"{exc!r}"}}
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
    listed = sorted(devices.values(), key=lambda d: (d["site"], d["device"]))
    return {
        "broker": {"reachable": True, "address": f"{mqtt.host}:{mqtt.port}"},
        "devices": listed,
        "online": sum(1 for d in listed if d["state"] == "online"),
        "offline": sum(1 for d in listed if d["state"] != "online"),
    }


def _device_status(topics: Topics, topic: str, payload: bytes) -> dict[str, Any] | None:
    """One retained status message as a report row; None for a cleared or foreign one."""
    if not payload:
        return None
    try:
        mt = topics.parse_mqtt(topic)
    except TopicError:
        return None
    if mt.kind is not MqttKind.STATUS:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {"state": payload.decode(errors="replace")[:40]}
    if not isinstance(doc, dict):
        doc = {"state": str(doc)[:40]}
    state = str(doc.get("state", "unknown"))
    return {
        "site": mt.site,
        "device": mt.device,
        "state": state,
        # An online status says since when; an offline one why (the last will: "connection lost").
        "since": doc.get("since"),
        "reason": doc.get("reason"),
        "kind": "device" if "device" in doc else "bridge",
    }


# ---- both ----------------------------------------------------------------------------------------
async def collect(
    src: StatusSources, window_s: float = WINDOW_S, latency_window_s: float = LATENCY_WINDOW_S, timeout: float = 10.0
) -> dict[str, Any]:
    """One report of the pipeline (JSON-ready): brokers, lag, devices, sites, commands, dead letters, loop."""
    k, m = await asyncio.gather(
        kafka_report(src.kafka, src.topics, window_s, latency_window_s, timeout),
        mqtt_report(src.mqtt, src.topics, timeout),
    )
    return {
        "at": _iso(time.time()),
        "namespace": src.namespace,
        "brokers": {"kafka": k.pop("broker"), "mqtt": m.pop("broker")},
        **k,
        **m,
    }


def healthy(report: dict[str, Any]) -> bool:
    """Both brokers answered (the exit code of ``reflexarc status``)."""
    return all(b.get("reachable") for b in report["brokers"].values())
