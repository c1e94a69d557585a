"""Probe an MQTT broker for a bounded session queue: does it keep what an offline session is owed?

A fog bridge holds a persistent MQTT session. While the bridge is down, or
while it waits for Kafka and stops acknowledging, the broker queues device
events in that session. Every common broker bounds that queue by default
(Mosquitto ``max_queued_messages 1000``, EMQX ``max_mqueue_len 1000``, HiveMQ
``max-queue-size 1000``) and, past the bound, drops QoS 1 messages it has
already acknowledged to the publisher. Nothing reports it. This module
measures the bound on the real broker, with the fog's own connection
settings (host, port, protocol, TLS, credentials):

1. a probe client connects with a persistent session (MQTT 5: clean start,
   a session expiry and a small Receive Maximum; 3.1.1: clean session off),
   subscribes QoS 1 to a topic of its own (``Topics.mqtt_probe``) and leaves;
2. a second client publishes N numbered QoS 1 messages there and waits for
   every PUBACK;
3. the probe comes back to its session and counts the distinct messages the
   broker kept for it (until all N arrived, or nothing more came for a
   moment);
4. the probe session is removed (clean start, session expiry 0), so the
   check leaves nothing on the broker.

The verdict is "bounded" when the broker kept fewer than it acknowledged.
The probe is offline, so what it measures is the queue of an offline session
(Mosquitto's ``max_queued_messages`` exactly; brokers that count in-flight
messages separately add at most Receive Maximum on top for a connected one).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from reflexarc.config import ConfigError, MqttSettings
from reflexarc.mqtt import MqttClient, MqttError
from reflexarc.topics import TopicError, Topics

if TYPE_CHECKING:
    from reflexarc.supervisor import BrokerSpec

#: Messages published to the offline probe session by default: above the common bounds (1000).
DEFAULT_MESSAGES = 3000
#: Size of each probe message by default (about a small instrument event).
DEFAULT_PAYLOAD_BYTES = 200
#: Seconds the whole probe may take by default.
DEFAULT_TIMEOUT_S = 60.0
#: Seconds without a new message after which the probe counts what it got.
DEFAULT_SETTLE_S = 1.0
# A small window, as a slow consumer has: brokers that count in-flight messages apart
# from the queue (EMQX, Mosquitto online) then add little on top of the queue bound.
_RECEIVE_MAXIMUM = 20
# Publishes in flight at once: well inside paho's 65,535 packet ids.
_PUBLISH_WINDOW = 500
_CONNECT_TIMEOUT_S = 15.0
# How many settle periods the first backlog message may take to come.
_FIRST_WAIT = 3
_CLEANUP_TIMEOUT_S = 10.0
# Probe sessions expire this long after the probe's deadline even if it could not remove them.
_EXPIRY_MARGIN_S = 60

#: What to set, per broker, so that a session's queue is not bounded below the backlog it must hold.
BROKER_SETTINGS: dict[str, str] = {
    "Mosquitto": "max_queued_messages 0 (and max_queued_bytes 0, the default) in mosquitto.conf; "
    "max_inflight_messages 0 (or a few thousand for MQTT 3.1.1 bridges)",
    "EMQX": "mqtt.max_mqueue_len = infinity (EMQX 5; 0 also means unbounded), "
    "zone.external.max_mqueue_len = 0 on EMQX 4",
    "HiveMQ": "<mqtt><queued-messages><max-queue-size> in config.xml, far above events/s x the longest fog "
    "outage (it has no unbounded value; <strategy> discard drops the newest, discard-oldest the oldest)",
}

Status = Literal["ok", "problem", "error", "skipped"]


class ProbeError(RuntimeError):
    """The probe could not run (broker unreachable, refused, too slow); the text says what to check."""


@dataclass(frozen=True, slots=True)
class QueueProbe:
    """What one probe measured."""

    broker: str
    protocol: str
    namespace: str
    #: The probe's MQTT client id (its session is removed at the end).
    client_id: str
    published: int
    #: Publishes the broker refused in its PUBACK (MQTT 5 reason >= 0x80): the publisher knows of those.
    refused: int
    #: Distinct probe messages the broker delivered when the probe came back.
    kept: int
    #: Whether the broker resumed the probe's session at all (MQTT CONNACK session present).
    session_kept: bool
    kept_first: int | None
    kept_last: int | None
    duplicates: int
    seconds: float
    session_removed: bool
    cleanup_error: str | None = None

    @property
    def accepted(self) -> int:
        """Publishes the broker acknowledged as taken."""
        return self.published - self.refused

    @property
    def bounded(self) -> bool:
        """True when the broker kept fewer messages than it acknowledged (silent loss)."""
        return self.kept < self.accepted

    @property
    def dropped(self) -> Literal["newest", "oldest", "some"] | None:
        """Which messages the broker dropped, judged from the numbers it kept."""
        if not self.bounded or self.kept == 0 or self.kept_first is None or self.kept_last is None:
            return None
        contiguous = self.kept_last - self.kept_first + 1 == self.kept
        if contiguous and self.kept_first == 0:
            return "newest"
        if contiguous and self.kept_last == self.published - 1:
            return "oldest"
        return "some"


@dataclass(slots=True)
class CheckReport:
    """The outcome of one check, as ``reflexarc fog check --broker`` and ``reflexarc doctor`` print it.

    ``status`` is ``ok`` (exit 0), ``problem`` (exit 1: a guarantee does not
    hold as configured), ``error`` (exit 2: the check could not run) or
    ``skipped`` (exit 0: nothing to check).
    """

    check: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 ok or skipped, 1 a problem found, 2 the check could not run."""
        return {"ok": 0, "skipped": 0, "problem": 1, "error": 2}[self.status]

    def text(self) -> str:
        """The summary line, then the details."""
        return "\n".join([self.summary, *self.details])

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict for scripts."""
        return {
            "check": self.check,
            "status": self.status,
            "exit_code": self.exit_code,
            "summary": self.summary,
            **self.data,
        }


def _payload(run: str, seq: int, size: int) -> bytes:
    head = f"{run}:{seq:08d}:".encode()
    return head + b"." * max(0, size - len(head))


def _sequence(payload: bytes, run: str) -> int | None:
    """The number of a probe message of this run, or None for anything else."""
    parts = payload.split(b":", 2)
    if len(parts) < 3 or parts[0] != run.encode():
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


def _where(settings: MqttSettings) -> str:
    return f"{settings.host}:{settings.port}"


async def probe_queue(
    settings: MqttSettings,
    topics: Topics,
    *,
    messages: int = DEFAULT_MESSAGES,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    settle_s: float = DEFAULT_SETTLE_S,
) -> QueueProbe:
    """Measure how many QoS 1 messages the broker keeps for an offline persistent session.

    Raises :class:`ProbeError` when the probe cannot run. The probe session is
    removed afterwards in every case the broker can still be reached.
    """
    if messages < 1:
        raise ProbeError(f"messages must be at least 1, not {messages}")
    run = uuid.uuid4().hex[:12]
    client_id = f"rx-probe-{run}"
    try:
        topic = topics.mqtt_probe(run)
    except TopicError as exc:
        raise ProbeError(str(exc)) from None
    expiry = int(timeout_s) + _EXPIRY_MARGIN_S
    started = time.monotonic()
    created: list[bool] = []  # non-empty once the probe session exists on the broker: remove it at the end
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await _subscribe_and_leave(settings, client_id, topic, expiry, created)
                refused, reasons = await _publish(settings, f"{client_id}-pub", topic, run, messages, payload_bytes)
                if reasons and refused == messages and any("authori" in r.lower() for r in reasons):
                    raise ProbeError(
                        f"the broker at {_where(settings)} refused every probe publish ({reasons[0]}): let this "
                        f"user publish and subscribe {topics.namespace}/_probe/# in its ACL"
                    )
                session_kept, seen, dups = await _collect(settings, client_id, run, messages, expiry, settle_s)
        except TimeoutError:
            raise ProbeError(
                f"the broker check of {_where(settings)} did not finish within {timeout_s:g} s: "
                "is the broker overloaded or the link slow? (--timeout gives it longer)"
            ) from None
        except (MqttError, OSError) as exc:
            raise ProbeError(_explain(settings, exc)) from None
        except ConfigError as exc:
            raise ProbeError(str(exc).replace("\n", "; ")) from None
    except BaseException:
        if created:
            await _remove_session(settings, client_id)
        raise
    removed, cleanup_error = True, None
    if created:
        cleanup_error = await _remove_session(settings, client_id)
        removed = cleanup_error is None
    return QueueProbe(
        broker=_where(settings),
        protocol=settings.protocol,
        namespace=topics.namespace,
        client_id=client_id,
        published=messages,
        refused=refused,
        kept=len(seen),
        session_kept=session_kept,
        kept_first=min(seen) if seen else None,
        kept_last=max(seen) if seen else None,
        duplicates=dups,
        seconds=round(time.monotonic() - started, 3),
        session_removed=removed,
        cleanup_error=cleanup_error,
    )


def _explain(settings: MqttSettings, exc: BaseException) -> str:
    """One line that says what failed and what to check."""
    text = str(exc).replace("\n", "; ")
    if isinstance(exc, MqttError) and text.startswith("cannot reach"):
        return (
            f"{text}. Check the address (mqtt.host and mqtt.port in fog.yaml, brokers.mqtt in pipeline.yaml, or "
            "RX_MQTT_HOST / RX_MQTT_PORT), that the broker runs, and mqtt.tls if it listens with TLS"
        )
    if isinstance(exc, OSError) and not isinstance(exc, MqttError):
        # Reading TLS files fails before any connection is tried.
        return f"cannot set up the MQTT connection to {_where(settings)}: {text} (check mqtt.tls)"
    return text


async def _subscribe_and_leave(
    settings: MqttSettings, client_id: str, topic: str, expiry: int, created: list[bool]
) -> None:
    """Create the probe's persistent session with its QoS 1 subscription, then go offline."""
    # MQTT 5 keeps a clean-start session for its expiry interval; 3.1.1 has only "clean session",
    # which would discard the session at disconnect, so there it is off (the client id is new anyway).
    sub = MqttClient(
        settings,
        client_id,
        clean_start=settings.protocol == "5",
        session_expiry=expiry,
        receive_maximum=_RECEIVE_MAXIMUM,
    )
    await sub.connect(_CONNECT_TIMEOUT_S)
    created.append(True)
    try:
        await sub.subscribe([(topic, 1)])
    finally:
        # A clean DISCONNECT keeps the session (its expiry is not 0) and sends no will.
        await sub.disconnect()


async def _publish(
    settings: MqttSettings, client_id: str, topic: str, run: str, n: int, payload_bytes: int
) -> tuple[int, list[str]]:
    """Publish ``n`` numbered QoS 1 messages and wait for every PUBACK; return the refusals."""
    pub = MqttClient(settings, client_id, clean_start=True, session_expiry=0, max_inflight=_PUBLISH_WINDOW)
    await pub.connect(_CONNECT_TIMEOUT_S)
    try:
        futures = [await pub.publish_start(topic, _payload(run, i, payload_bytes), 1) for i in range(n)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await pub.disconnect()
    reasons = [str(o) for o in outcomes if isinstance(o, MqttError)]
    failed = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, MqttError)]
    if failed:
        raise failed[0]
    return len(reasons), reasons


async def _collect(
    settings: MqttSettings, client_id: str, run: str, n: int, expiry: int, settle_s: float
) -> tuple[bool, set[int], int]:
    """Resume the probe session and count the distinct probe messages the broker kept."""
    sub = MqttClient(settings, client_id, clean_start=False, session_expiry=expiry, receive_maximum=_RECEIVE_MAXIMUM)
    await sub.connect(_CONNECT_TIMEOUT_S)
    seen: set[int] = set()
    dups = 0
    try:
        session_kept = sub.session_present
        # The broker sends the backlog right after CONNACK. No end marker can be used: a full
        # queue would drop the marker too, so the backlog is over when nothing more comes. The
        # first message gets longer (a clustered broker may first fetch the session elsewhere).
        while len(seen) < n:
            try:
                msg = await asyncio.wait_for(sub.messages.get(), settle_s if seen else _FIRST_WAIT * settle_s)
            except TimeoutError:
                break
            seq = _sequence(msg.payload, run)
            if seq is None:
                continue
            if seq in seen:
                dups += 1
            seen.add(seq)
    finally:
        await sub.disconnect()
    return session_kept, seen, dups


async def _remove_session(settings: MqttSettings, client_id: str) -> str | None:
    """End the probe session on the broker (clean start, expiry 0); return why it failed, or None."""
    try:
        async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
            c = MqttClient(settings, client_id, clean_start=True, session_expiry=0)
            await c.connect(_CLEANUP_TIMEOUT_S)
            await c.disconnect()
    except (MqttError, OSError, ConfigError, TimeoutError) as exc:
        return str(exc).replace("\n", "; ") or type(exc).__name__
    return None


def report(probe: QueueProbe) -> CheckReport:
    """Turn a measurement into the verdict, what it means for reflexarc, and what to set."""
    where = f"the broker at {probe.broker} (MQTT {probe.protocol})"
    data: dict[str, Any] = {
        "broker": probe.broker,
        "protocol": probe.protocol,
        "bounded": probe.bounded,
        "bound": probe.kept if probe.bounded else None,
        "published": probe.published,
        "refused": probe.refused,
        "kept": probe.kept,
        "session_kept": probe.session_kept,
        "dropped": probe.dropped,
        "kept_first": probe.kept_first,
        "kept_last": probe.kept_last,
        "duplicates": probe.duplicates,
        "seconds": probe.seconds,
        "session_removed": probe.session_removed,
        "probe_client_id": probe.client_id,
        "broker_settings": BROKER_SETTINGS,
    }
    details: list[str] = []
    if probe.refused:
        details.append(
            f"It refused {probe.refused} of the {probe.published} publishes in its PUBACK: a publisher is told "
            "of those and keeps them."
        )
    if not probe.bounded:
        summary = (
            f"no bound found up to {probe.accepted}: {where} kept all {probe.accepted} queued QoS 1 messages "
            "for an offline session"
        )
        details += [
            f"A bound above {probe.accepted} would not show: --messages N probes further.",
            "An unbounded queue grows with the backlog: give the broker memory (and persistence) for "
            "events/s x the longest fog outage.",
        ]
        status: Status = "ok"
    else:
        summary = f"bounded: {where} kept {probe.kept} of {probe.accepted} queued QoS 1 messages for an offline session"
        if not probe.session_kept:
            details.append(
                "It did not keep the offline session at all: allow persistent sessions for the fog's client "
                "(session expiry limits; amqtt queues only for clients with a username), and let this user "
                f"publish and subscribe {probe.namespace}/_probe/# in the ACL."
            )
        elif probe.kept == 0:
            details.append(
                f"It kept the session but delivered none: check that the ACL lets this user publish and subscribe "
                f"{probe.namespace}/_probe/# (MQTT 3.1.1 brokers drop refused publishes silently)."
            )
        elif probe.dropped in ("newest", "oldest"):
            details.append(
                f"It kept #{probe.kept_first + 1 if probe.kept_first is not None else '?'}-"
                f"#{probe.kept_last + 1 if probe.kept_last is not None else '?'} and dropped the "
                f"{probe.dropped} {probe.accepted - probe.kept}, after acknowledging them to the publisher."
            )
        details += [
            "While a fog bridge is down, or waits for Kafka, its session fills like this one: past the bound the "
            "broker drops device events it has already acknowledged, and nobody is told.",
            "  - reflexarc edge agents with end-to-end receipts (delivery: pipeline): nothing is lost; an agent "
            "frees its spool only on the fog's receipt after Kafka acked, and resends what was not confirmed.",
            "  - devices without receipts (delivery: broker, other MQTT clients): what exceeds the bound is lost. "
            "The fog's disk buffer covers Kafka outages (the fog keeps draining the broker), not fog outages.",
            "Lift the bound (and size the broker for events/s x the longest fog outage):",
            *(f"  {name + ':':<10} {setting}" for name, setting in BROKER_SETTINGS.items()),
        ]
        status = "problem"
    if not probe.session_removed:
        details.append(
            f"warning: could not remove the probe session ({probe.cleanup_error}); "
            + ("it expires by itself." if probe.protocol == "5" else f"remove client {probe.client_id} by hand.")
        )
    details.append('Which guarantees hold with which settings: docs/fog.md, "Broker settings and guarantees".')
    return CheckReport("broker-queue", status, summary, details, data)


def error_report(settings: MqttSettings, exc: BaseException) -> CheckReport:
    """The report of a probe that could not run."""
    return CheckReport(
        "broker-queue",
        "error",
        f"cannot check the MQTT broker: {exc}",
        data={"broker": _where(settings), "protocol": settings.protocol, "bounded": None},
    )


def check_broker(
    settings: MqttSettings,
    namespace: str,
    *,
    messages: int = DEFAULT_MESSAGES,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CheckReport:
    """Run the probe (its own event loop) and return the report; never raises for broker trouble."""
    try:
        probe = asyncio.run(
            probe_queue(
                settings, Topics(namespace), messages=messages, payload_bytes=payload_bytes, timeout_s=timeout_s
            )
        )
    except ProbeError as exc:
        return error_report(settings, exc)
    return report(probe)


def doctor_check(brokers: BrokerSpec | None, namespace: str) -> CheckReport:
    """``reflexarc doctor``'s broker check; no MQTT broker in ``brokers`` means the pipeline starts its own."""
    if brokers is None or brokers.mqtt is None:
        return CheckReport(
            "broker-queue",
            "skipped",
            "skipped the MQTT broker check: the pipeline starts its own embedded broker, which reflexarc "
            "configures without a queue bound",
        )
    return check_broker(brokers.mqtt, namespace)
