"""The event envelope: CloudEvents 1.0 on every hop. The only module that knows the wire format.

Three encodings, all from one :class:`Envelope`:

* Kafka binary mode (the CloudEvents Kafka binding): attributes in ``ce_*``
  headers, ``content-type`` header, data in the record value, key
  ``site/device``. Built with the ``cloudevents`` SDK.
* MQTT 5 binary mode (the CloudEvents MQTT binding): attributes as user
  properties named after the attribute, the content type in the MQTT 5
  Content Type property, data in the payload.
* Structured JSON (``application/cloudevents+json``): the whole event in the
  payload, for MQTT 3.1.1 brokers and for peers that only read payloads.

Peers that are not ours may also publish a bare JSON object on a data topic
(``mosquitto_pub -t rx/site/dev/data/temp -m '{"value": 21.5}'``); the fog
bridge wraps it with :func:`from_mqtt`, taking site/device/stream from the topic.

Event data is a JSON object (``dict``) or raw bytes (``application/octet-stream``).
Ids are chosen by the producer and kept stable across retries, so every
consumer can deduplicate on ``id``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import orjson
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from reflexarc.topics import MqttKind, MqttTopic, TopicError, Topics, check_name

JSON = "application/json"
OCTETS = "application/octet-stream"
STRUCTURED = "application/cloudevents+json"
SPECVERSION = "1.0"

_FORMAT = JSONFormat()
_CORE_ATTRS = ("id", "source", "type", "specversion", "subject", "time", "datacontenttype")
# Extension names the fast writers leave to the SDK (attributes of their own, or reserved).
_NOT_EXTENSIONS = frozenset({*_CORE_ATTRS, "data", "dataschema", "partitionkey"})
# The SDK's rule for extension attribute names (cloudevents.core.v1.event), checked by the fast path.
_EXT_NAME = re.compile(r"[a-z0-9]+")
# Extension names already checked -> their Kafka header name; bounded (names come from devices).
_EXT_HEADERS: dict[str, str] = {}
# A UTC time exactly as _attr_text writes it (isoformat: no fraction when it is zero, else
# six digits; "Z"): such a text is forwarded as it came instead of being parsed and re-written.
_CANONICAL_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.(?!000000)\d{6})?Z", re.ASCII)

KafkaRecord = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

# A device event as reflexarc's edge sends it in MQTT 5 binary mode (Envelope.for_device ->
# to_mqtt): these user properties in this order, JSON data. Transcoded without an Envelope.
_EDGE_ATTRS = ["specversion", "id", "source", "type", "time", "subject", "site", "device"]
_EDGE_CTYPES = (JSON, None)
_SPECVERSION_HEADER = ("ce_specversion", SPECVERSION.encode())
_JSON_HEADER = ("content-type", JSON.encode())
_Header = tuple[str, bytes]
_DeviceHeaders = tuple[bytes, _Header, _Header, _Header, _Header, _Header]
# (source, type, subject, site, device) -> the record key and the headers that are the same for
# every event of that device stream: built once, shared by its records (aiokafka only reads them).
_EDGE_DEVICE_HEADERS: dict[tuple[str, str, str, str, str], _DeviceHeaders] = {}
_EDGE_DEVICE_HEADERS_MAX = 65_536


class EventType(StrEnum):
    """The CloudEvents ``type`` values reflexarc produces."""

    DATA = "io.reflexarc.data"
    TASK_REQUEST = "io.reflexarc.task.request"
    TASK_RESULT = "io.reflexarc.task.result"
    JOB_STATE = "io.reflexarc.job.state"
    COMMAND = "io.reflexarc.command"
    COMMAND_ACK = "io.reflexarc.command.ack"
    COMMAND_STATUS = "io.reflexarc.command.status"
    DEADLETTER = "io.reflexarc.deadletter"
    RECEIPT = "io.reflexarc.receipt"
    SITE_STATUS = "io.reflexarc.site.status"


class EnvelopeError(ValueError):
    """A message could not be read as a reflexarc event; the text says why."""


def utcnow() -> datetime:
    """Timezone-aware now, the only clock events are stamped with."""
    return datetime.now(UTC)


def ack_event_id(command_id: str) -> str:
    """The event id of a device's answer to command ``command_id`` (one answer per command)."""
    return f"{command_id}.ack"


def _is_structured_type(content_type: str | None) -> bool:
    """True for a CloudEvents structured-mode media type (``application/cloudevents...``)."""
    return content_type is not None and content_type[:23].lower() == "application/cloudevents"


def device_source(site: str, device: str) -> str:
    """The CloudEvents ``source`` of events a device produces."""
    return f"/sites/{site}/devices/{device}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event, independent of how it travels.

    ``extensions`` holds CloudEvents extension attributes; reflexarc sets
    ``site`` and ``device`` on every device event, so consumers can route
    without parsing ``source``.
    """

    type: str
    source: str
    data: dict[str, Any] | bytes | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    subject: str | None = None
    time: datetime = field(default_factory=utcnow)
    datacontenttype: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fix the content type at construction, so an event equals itself after a round trip.
        if self.datacontenttype is None:
            ctype = OCTETS if isinstance(self.data, bytes | bytearray) else JSON
            object.__setattr__(self, "datacontenttype", ctype)
        if not isinstance(self.extensions, dict):
            object.__setattr__(self, "extensions", dict(self.extensions))

    # ---- convenience ----------------------------------------------------------
    @property
    def site(self) -> str | None:
        """Site extension attribute, if any."""
        return self.extensions.get("site")

    @property
    def device(self) -> str | None:
        """Device extension attribute, if any."""
        return self.extensions.get("device")

    @property
    def content_type(self) -> str:
        """Data content type (always set: defaulted from the data at construction)."""
        return self.datacontenttype or JSON

    def with_(self, **changes: Any) -> Envelope:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def for_device(
        cls,
        type: EventType | str,
        site: str,
        device: str,
        data: dict[str, Any] | bytes | None,
        *,
        subject: str | None = None,
        id: str | None = None,
        time: datetime | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> Envelope:
        """An event produced by (or addressed to) one device."""
        ext = {"site": check_name(site, "site"), "device": check_name(device, "device")}
        if extensions:
            ext.update(extensions)
        return cls(
            type=str(type),
            source=device_source(site, device),
            data=data,
            id=id or str(uuid.uuid4()),
            subject=subject,
            time=time or utcnow(),
            extensions=ext,
        )

    # ---- CloudEvents SDK bridge -----------------------------------------------
    def _attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": self.content_type,
        }
        if self.subject is not None:
            attrs["subject"] = self.subject
        attrs.update(self.extensions)
        return attrs

    def to_cloudevent(self) -> CloudEvent:
        """The equivalent ``cloudevents`` SDK object (validated against the spec)."""
        try:
            return CloudEvent(self._attributes(), self.data)
        except BaseCloudEventException as exc:
            raise EnvelopeError(f"not a valid CloudEvent: {exc}") from exc

    @classmethod
    def from_cloudevent(cls, event: Any) -> Envelope:
        """Build from a ``cloudevents`` SDK object."""
        attrs = dict(event.get_attributes())
        if attrs.get("specversion") != SPECVERSION:
            raise EnvelopeError(f"unsupported specversion {attrs.get('specversion')!r}")
        for required in ("id", "source", "type"):
            if not attrs.get(required):
                raise EnvelopeError(f"missing required attribute {required!r}")
        time = attrs.get("time") or utcnow()
        if isinstance(time, str):
            time = _parse_time(time)
        # partitionkey included: the Kafka binding requires it to be carried (it maps to the record key).
        ext = {k: str(v) for k, v in attrs.items() if k not in _CORE_ATTRS}
        data = event.get_data()
        if isinstance(data, str):
            # The SDK hands back text for non-JSON content; JSON data must be an object.
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise EnvelopeError(f"data is not valid JSON: {exc}") from None
        if data is not None and not isinstance(data, dict | bytes):
            raise EnvelopeError(f"data must be a JSON object or bytes, got {type(data).__name__}")
        return cls(
            type=str(attrs["type"]),
            source=str(attrs["source"]),
            data=data,
            id=str(attrs["id"]),
            subject=attrs.get("subject"),
            time=time,
            datacontenttype=attrs.get("datacontenttype"),
            extensions=ext,
        )

    # ---- Kafka ----------------------------------------------------------------
    def to_kafka(self, key: bytes | None = None) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """Kafka binary mode: ``(key, value, headers)`` ready for aiokafka ``send``.

        The key is ``key``, else the ``partitionkey`` extension, else ``site/device``; an event without
        data has a null value.
        """
        if self._plain():
            # Without the SDK, byte for byte what it writes (the site agent publishes every job state).
            try:
                record = self._kafka_fast(json.dumps(self.data).encode())
            except (TypeError, ValueError):  # data the SDK's encoder must write (e.g. datetimes)
                record = None
            if record is not None:
                return (key if key is not None else record[0]), record[1], record[2]
        msg = ce_kafka.to_binary(self.to_cloudevent(), _FORMAT, key_mapper=lambda _e: None)
        headers = list(msg.headers.items())
        value: bytes | None = msg.value
        if self.data is None:
            # No data: a null record value and no content type (Kafka binding §3.2: the value is the data).
            value = None
            headers = [h for h in headers if h[0] != "content-type"]
        if key is None:
            partition_key = self.extensions.get("partitionkey")
            if partition_key:
                # The Kafka binding maps the partitionkey extension to the record key (and carries it).
                key = partition_key.encode()
            elif self.site and self.device:
                key = Topics.device_key(self.site, self.device)
        return key, value, headers

    @classmethod
    def from_kafka(
        cls, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None, key: bytes | None = None
    ) -> Envelope:
        """Parse a Kafka record in binary or structured mode."""
        if headers is not None and not isinstance(headers, list | tuple):
            headers = list(headers)
        quick = cls._from_kafka_fast(value, headers)
        if quick is not None:
            return quick
        msg = ce_kafka.KafkaMessage(headers=dict(headers or ()), key=None, value=value or b"")
        try:
            event = ce_kafka.from_kafka(msg, _FORMAT)
        except (BaseCloudEventException, ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"not a CloudEvent Kafka record: {exc}") from None
        return cls.from_cloudevent(event)

    @classmethod
    def _from_kafka_fast(cls, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> Envelope | None:
        """Binary mode as :meth:`_kafka_fast` writes it, read without the SDK; ``None``: the SDK judges.

        The inverse of the fog's fast path, for consumers that read every
        record (the trigger engine): see :func:`kafka_event_fields`.
        """
        fields = kafka_event_fields(value, headers)
        if fields is None:
            return None
        event_id, event_type, source, subject, time, ext, data = fields
        return cls(
            type=event_type,
            source=source,
            data=data,
            id=event_id,
            subject=subject,
            time=time,
            datacontenttype=JSON,
            extensions=ext,
        )

    # ---- structured JSON ------------------------------------------------------
    def to_json(self) -> bytes:
        """Structured mode: the whole event as ``application/cloudevents+json``."""
        if self._plain():
            # Without the SDK, byte for byte what it writes: its attributes in its order, then data.
            doc: dict[str, Any] = {
                "specversion": SPECVERSION,
                "id": self.id,
                "source": self.source,
                "type": self.type,
                "time": _attr_text(self.time),
                "datacontenttype": self.datacontenttype,
            }
            if self.subject is not None:
                doc["subject"] = self.subject
            doc.update(self.extensions)
            doc["data"] = self.data
            try:
                return json.dumps(doc).encode()
            except (TypeError, ValueError):  # data the SDK's encoder must write (e.g. datetimes)
                pass
        return _FORMAT.write(self.to_cloudevent())

    def _plain(self) -> bool:
        """True when the SDK would accept this event as it is and write its JSON data with no help.

        JSON-object data, string id/source/type, a time-zone-aware time, a non-empty subject if
        any, string extensions with names the SDK allows. The fast writers of :meth:`to_kafka` and
        :meth:`to_json` are used only then; anything else goes through the SDK, which judges it.
        """
        if type(self.data) is not dict or self.datacontenttype != JSON:
            return False
        if not (
            type(self.id) is str
            and self.id
            and type(self.source) is str
            and self.source
            and type(self.type) is str
            and self.type
        ):
            return False
        if not isinstance(self.time, datetime) or self.time.tzinfo is None:
            return False
        if self.subject is not None and (type(self.subject) is not str or not self.subject):
            return False
        return all(
            type(name) is str and type(value) is str and name not in _NOT_EXTENSIONS and _EXT_NAME.fullmatch(name)
            for name, value in self.extensions.items()
        )

    @classmethod
    def from_json(cls, payload: bytes) -> Envelope:
        """Parse a structured-mode event."""
        try:
            event = _FORMAT.read(None, payload)
        except (BaseCloudEventException, ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"not a structured CloudEvent: {exc}") from None
        return cls.from_cloudevent(event)

    # ---- MQTT -----------------------------------------------------------------
    def to_mqtt(self, *, binary: bool = True) -> tuple[bytes, list[tuple[str, str]], str]:
        """MQTT encoding: ``(payload, user_properties, content_type)``.

        With ``binary=True`` (MQTT 5) the attributes go into user properties;
        with ``binary=False`` (MQTT 3.1.1 peers) the payload is structured JSON
        and the property list is empty.
        """
        if not binary:
            return self.to_json(), [], STRUCTURED
        props: list[tuple[str, str]] = []
        for name, value in self._attributes().items():
            if name == "datacontenttype":
                continue
            props.append((name, _attr_text(value)))
        data = self.data
        if data is None:
            payload = b""
        elif isinstance(data, bytes | bytearray):
            payload = bytes(data)
        else:
            payload = json.dumps(data, separators=(",", ":")).encode()
        return payload, props, self.content_type

    @classmethod
    def from_mqtt(
        cls,
        payload: bytes,
        user_properties: Iterable[tuple[str, str]] | None,
        content_type: str | None,
        topic: MqttTopic | None = None,
    ) -> Envelope:
        """Parse an MQTT message in binary, structured or bare-JSON form.

        ``topic`` (parsed by :class:`reflexarc.topics.Topics`) supplies site,
        device and stream for bare JSON from devices that are not ours, and is
        checked against the event's own ``site``/``device`` so that a device
        cannot speak for another.
        """
        props = dict(user_properties or ())
        if _is_structured_type(content_type):
            # MQTT binding §3.1: the content type decides, whatever user properties come with it.
            env = cls._from_mqtt_structured(payload, content_type)
        elif "specversion" in props:
            env = cls._from_mqtt_binary(payload, props, content_type)
        elif content_type == STRUCTURED or _looks_structured(payload):
            env = cls.from_json(payload)
        else:
            env = cls._from_bare_json(payload, topic)
        if topic is not None:
            _check_topic_agrees(env, topic)
        return env

    @classmethod
    def transcode_mqtt(
        cls,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]] | None,
        content_type: str | None,
        topic: MqttTopic | None = None,
    ) -> Transcoded:
        """``from_mqtt(...)`` and its ``to_kafka()`` in one step, without the SDK on the common path.

        The fog bridge's hot path. An MQTT 5 binary-mode message becomes
        Kafka binary-mode headers directly (user properties -> ``ce_*``, the
        content type -> ``content-type``) and the original payload bytes stay
        the record value (JSON data is parsed once, to check it is an object
        and for validation, never re-serialised); a bare JSON object is
        forwarded as it came unless ``id``/``time`` had to be lifted out of it.
        The result is what ``from_mqtt`` + ``to_kafka`` give: headers
        byte-identical, the value identical for bytes data and equal after
        parsing for JSON data (the SDK re-serialises with other whitespace).
        Errors are the same :class:`EnvelopeError`; anything unusual
        (structured mode, extension names or attributes the SDK must judge)
        takes the SDK path, so the verdict is always the SDK's.

        A device event exactly as reflexarc's edge sends it (the eight
        attributes of :meth:`for_device` in :meth:`to_mqtt`'s order, JSON
        data, a canonical UTC time, on its own data topic) is forwarded
        without building the :class:`Envelope` at all: the result builds it
        when asked (:attr:`Transcoded.envelope`).
        """
        if topic is not None and content_type in _EDGE_CTYPES and user_properties and len(user_properties) == 8:
            quick = cls._transcode_edge(payload, user_properties, topic)
            if quick is not None:
                return quick
        props = dict(user_properties or ())
        if _is_structured_type(content_type):
            return cls._transcode_slow(payload, props, content_type, topic)
        if "specversion" in props:
            if props["specversion"] != SPECVERSION or not (
                props.get("id") and props.get("source") and props.get("type")
            ):
                return cls._transcode_slow(payload, props, content_type, topic)
            ctype = content_type or JSON
            data: dict[str, Any] | bytes | None
            if not payload:
                # No data: a null record value without a content type, as to_kafka writes it.
                return cls._transcode_slow(payload, props, content_type, topic)
            elif _is_json(ctype):
                data = _utf8_json_object(payload)
                if data is None:
                    return cls._transcode_slow(payload, props, content_type, topic)
            else:
                data = payload
            env = cls._of_properties(props, data, ctype)
            value = payload
        elif content_type == STRUCTURED or _looks_structured(payload):
            return cls._transcode_slow(payload, props, content_type, topic)
        else:
            bare = _utf8_json_object(payload)
            if bare is None or topic is None or topic.kind is not MqttKind.DATA:
                return cls._transcode_slow(payload, props, content_type, topic)
            lifted = isinstance(bare.get("id"), str) or isinstance(bare.get("time"), str)
            env = cls._bare_envelope(bare, topic)
            # Lifting id/time out changed the object: only then must it be written again.
            value = json.dumps(env.data).encode() if lifted else payload
        if topic is not None:
            _check_topic_agrees(env, topic)
        time_text = props.get("time")
        record = env._kafka_fast(value, time_text if time_text and _CANONICAL_UTC.fullmatch(time_text) else None)
        return Transcoded.of(env, record or env.to_kafka())

    @classmethod
    def _transcode_edge(
        cls, payload: bytes, user_properties: Sequence[tuple[str, str]], topic: MqttTopic
    ) -> Transcoded | None:
        """An edge device event as Kafka headers straight from its properties; None: take the general path.

        Only when every check the general path makes passes here trivially:
        the attributes are the eight :data:`_EDGE_ATTRS`, in that order (so no
        extension for the SDK to judge), non-empty, naming this topic's site,
        device and stream; the time is canonical UTC (forwarded as it came,
        parsed only if the Envelope is asked for); the data is a JSON object.
        The properties are read by position: no dict per message.
        """
        (
            (k0, specversion),
            (k1, event_id),
            (k2, source),
            (k3, event_type),
            (k4, time_text),
            (k5, subject),
            (k6, site),
            (k7, device),
        ) = user_properties
        if (
            k0 != "specversion"
            or k1 != "id"
            or k2 != "source"
            or k3 != "type"
            or k4 != "time"
            or k5 != "subject"
            or k6 != "site"
            or k7 != "device"
            or specversion != SPECVERSION
            or topic.kind is not MqttKind.DATA
            or site != topic.site
            or device != topic.device
            or subject != topic.stream
            or not (event_id and source and event_type)
            or _CANONICAL_UTC.fullmatch(time_text) is None
        ):
            return None
        if not payload or not _is_json_object(payload):
            return None
        per_device = _EDGE_DEVICE_HEADERS.get((source, event_type, subject, site, device))
        if per_device is None:
            per_device = _edge_device_headers(source, event_type, subject, site, device)
        key, source_h, type_h, subject_h, site_h, device_h = per_device
        # The headers _kafka_fast writes for this event, in its order.
        headers = [
            _SPECVERSION_HEADER,
            ("ce_id", event_id.encode()),
            source_h,
            type_h,
            ("ce_time", time_text.encode()),
            _JSON_HEADER,
            subject_h,
            site_h,
            device_h,
        ]
        return Transcoded(source, event_id, (key, payload, headers), _UNPARSED, user_properties)

    @classmethod
    def _transcode_slow(
        cls, payload: bytes, props: dict[str, str], content_type: str | None, topic: MqttTopic | None
    ) -> Transcoded:
        env = cls.from_mqtt(payload, props.items(), content_type, topic)
        return Transcoded.of(env, env.to_kafka())

    def _kafka_fast(self, value: bytes, time_text: str | None = None) -> KafkaRecord | None:
        """Kafka binary mode without the SDK; ``None`` when the SDK must judge the attributes.

        Headers come in the SDK's order (specversion, id, source, type, time,
        content-type, subject, extensions) with its text forms, so records
        are byte-identical whichever path built them. ``time_text`` is the
        time attribute as it came, when it is already in that text form.
        """
        subject = self.subject
        if subject == "" or not self.id or not self.source or not self.type or not self.datacontenttype:
            return None
        ext = self.extensions
        ext_headers = []
        for name, val in ext.items():
            header = _EXT_HEADERS.get(name)
            if header is None:
                # "dataschema" is an optional attribute with rules of its own: the SDK judges it.
                if name in ("data", "dataschema") or not _EXT_NAME.fullmatch(name):
                    return None
                header = f"ce_{name}"
                if len(_EXT_HEADERS) < 1000:
                    _EXT_HEADERS[name] = header
            ext_headers.append((header, str(val).encode()))
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", self.id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("ce_time", (time_text or _attr_text(self.time)).encode()),
            ("content-type", self.datacontenttype.encode()),
        ]
        if subject is not None:
            headers.append(("ce_subject", subject.encode()))
        headers += ext_headers
        partition_key = ext.get("partitionkey")
        if partition_key:
            # The Kafka binding maps the partitionkey extension to the record key.
            return partition_key.encode(), value, headers
        site, device = ext.get("site"), ext.get("device")
        key = Topics.device_key(site, device) if site and device else None
        return key, value, headers

    @classmethod
    def _from_mqtt_binary(cls, payload: bytes, props: dict[str, str], content_type: str | None) -> Envelope:
        ctype = content_type or JSON
        data: dict[str, Any] | bytes | None
        if not payload:
            data = None
        elif _is_json(ctype):
            data = _json_object(payload)
        else:
            data = payload
        for required in ("id", "source", "type"):
            if not props.get(required):
                raise EnvelopeError(f"missing required attribute {required!r}")
        if props.get("specversion") != SPECVERSION:
            raise EnvelopeError(f"unsupported specversion {props.get('specversion')!r}")
        return cls._of_properties(props, data, ctype)

    @classmethod
    def _of_properties(cls, props: dict[str, str], data: dict[str, Any] | bytes | None, ctype: str) -> Envelope:
        """An event from MQTT 5 binary-mode attributes (already checked) and its decoded data."""
        return cls(
            type=props["type"],
            source=props["source"],
            data=data,
            id=props["id"],
            subject=props.get("subject"),
            time=_parse_time(props["time"]) if props.get("time") else utcnow(),
            datacontenttype=ctype,
            extensions={k: v for k, v in props.items() if k not in _CORE_ATTRS},
        )

    @classmethod
    def _from_mqtt_structured(cls, payload: bytes, content_type: str | None) -> Envelope:
        if content_type is not None and content_type.split(";")[0].strip().lower() != STRUCTURED:
            raise EnvelopeError(
                f"structured content type {content_type!r} is not supported: send {STRUCTURED} "
                "(one event per message) or binary mode"
            )
        return cls.from_json(payload)

    @classmethod
    def _from_bare_json(cls, payload: bytes, topic: MqttTopic | None) -> Envelope:
        if topic is not None and topic.kind is MqttKind.ACK:
            return cls._bare_ack(_json_object(payload), topic)
        if topic is None or topic.kind is not MqttKind.DATA:
            raise EnvelopeError("payload is not a CloudEvent (no specversion) and the topic gives no stream")
        return cls._bare_envelope(_json_object(payload), topic)

    @classmethod
    def _bare_ack(cls, data: dict[str, Any], topic: MqttTopic) -> Envelope:
        """A device's bare JSON answer to a command (``{"command_id": ..., "ok": ...}``) as a command ack event."""
        command_id = data.get("command_id")
        if not isinstance(command_id, str) or not command_id:
            raise EnvelopeError(
                'a bare JSON ack needs "command_id" (the command\'s id, a string) and "ok" (true or false)'
            )
        data.setdefault("site", topic.site)
        data.setdefault("device", topic.device)
        actuator = data.get("actuator")
        return cls.for_device(
            EventType.COMMAND_ACK,
            topic.site,
            topic.device,
            data,
            id=ack_event_id(command_id),
            subject=actuator if isinstance(actuator, str) and actuator else None,
        )

    @classmethod
    def _bare_envelope(cls, data: dict[str, Any], topic: MqttTopic) -> Envelope:
        assert topic.stream is not None
        # A bare payload may carry its own id/time to make retries deduplicate.
        event_id = data.pop("id", None) if isinstance(data.get("id"), str) else None
        time = _parse_time(data.pop("time")) if isinstance(data.get("time"), str) else utcnow()
        return cls.for_device(
            EventType.DATA, topic.site, topic.device, data, subject=topic.stream, id=event_id, time=time
        )


_UNPARSED: Any = object()


@dataclass(slots=True, eq=False)
class Transcoded:
    """An MQTT message read for forwarding to Kafka (:meth:`Envelope.transcode_mqtt`).

    ``record`` is the Kafka record; ``source`` and ``id`` are what the fog
    bridge needs of every event (deduplication). :attr:`data` and
    :attr:`envelope` are built on first use (validation and shaping need
    them; plain forwarding does not).
    """

    source: str
    id: str
    record: KafkaRecord
    # JSON data not parsed yet (_UNPARSED) until asked for; the record value holds it.
    _data: dict[str, Any] | bytes | None = None
    # The edge's user properties, to build the Envelope from (None once it is built).
    _props: Sequence[tuple[str, str]] | None = None
    _envelope: Envelope | None = None

    @classmethod
    def of(cls, env: Envelope, record: KafkaRecord) -> Transcoded:
        """An already built envelope and its record."""
        return cls(env.source, env.id, record, env.data, None, env)

    @property
    def data(self) -> dict[str, Any] | bytes | None:
        """The event data, as ``Envelope.from_mqtt`` reads it."""
        data = self._data
        if data is _UNPARSED:
            # Checked already (_is_json_object): this parse gives the exact values (integers of any size).
            value = self.record[1]
            assert value is not None  # _UNPARSED only stands for a payload that is a JSON object
            data = self._data = _json_object(value)
        return data

    @property
    def envelope(self) -> Envelope:
        """The event, as ``Envelope.from_mqtt`` reads it."""
        env = self._envelope
        if env is None:
            assert self._props is not None
            env = self._envelope = Envelope._of_properties(dict(self._props), self.data, JSON)
            self._props = None
        return env


# ---- dead letters -------------------------------------------------------------
DEADLETTER_HEADERS = ("rx-error", "rx-stage", "rx-origin", "rx-time", "rx-topic", "rx-key")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Something that could not be taken: the original bytes, untouched, and why.

    In Kafka the record value is the original payload and the reason travels
    in headers (``rx-error``, ``rx-stage``, ``rx-origin`` such as the MQTT
    topic, ``rx-time``), so a dead letter is data that can be inspected and
    replayed with any Kafka client. A consumed Kafka record's letter also
    keeps the record's headers, and its topic and key (``rx-topic``, ``rx-key``):
    ``reflexarc deadletters replay`` sends it back as it was.
    """

    error: str
    stage: str
    origin: str
    payload: bytes
    time: datetime = field(default_factory=utcnow)
    extra_headers: tuple[tuple[str, bytes], ...] = ()
    # Of a consumed Kafka record (see of_record): its topic and key, so it can be replayed as it was.
    topic: str | None = None
    key: bytes | None = None

    @classmethod
    def of_record(cls, record: Any, stage: str, error: str) -> DeadLetter:
        """The dead letter of a consumed Kafka record: value, key and headers kept (a binary-mode
        CloudEvent keeps its ``ce_*`` attributes), ``topic/partition/offset`` as the origin."""
        return cls(
            error=error,
            stage=stage,
            origin=f"{record.topic}/{record.partition}/{record.offset}",
            payload=record.value or b"",
            extra_headers=tuple(record.headers or ()),
            topic=record.topic,
            key=record.key,
        )

    def to_kafka(self) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """``(key, value, headers)`` for the dead-letter topic."""
        headers = [
            ("rx-error", self.error.encode()),
            ("rx-stage", self.stage.encode()),
            ("rx-origin", self.origin.encode()),
            ("rx-time", _attr_text(self.time).encode()),
            *self.extra_headers,
        ]
        if self.topic is not None:
            headers.append(("rx-topic", self.topic.encode()))
        if self.key is not None:
            headers.append(("rx-key", self.key))
        return self.origin.encode(), self.payload, headers

    @classmethod
    def from_kafka(cls, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None) -> DeadLetter:
        """Read a dead-letter record back."""
        h = {k: v for k, v in (headers or ())}
        extra = tuple((k, v) for k, v in (headers or ()) if k not in DEADLETTER_HEADERS)
        return cls(
            error=h.get("rx-error", b"").decode(errors="replace"),
            stage=h.get("rx-stage", b"").decode(errors="replace"),
            origin=h.get("rx-origin", b"").decode(errors="replace"),
            payload=value or b"",
            time=_parse_time(h["rx-time"].decode()) if "rx-time" in h else utcnow(),
            extra_headers=extra,
            topic=h["rx-topic"].decode(errors="replace") if "rx-topic" in h else None,
            key=h.get("rx-key"),
        )


# ---- helpers ------------------------------------------------------------------
def _attr_text(value: Any) -> str:
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    return str(value)


def _parse_time(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EnvelopeError(f"invalid time attribute {text!r} (want RFC 3339)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON or base.endswith("+json")


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EnvelopeError(f"payload must be a JSON object, got {type(data).__name__}")
    return data


def _utf8_json_object(payload: bytes) -> dict[str, Any] | None:
    """The JSON object in strict UTF-8 ``payload``, or ``None`` (then the slow path decides).

    Strict on purpose: consumers read a record value as UTF-8 (the SDK's
    ``read_data``), so the original bytes are forwarded only when they read
    back the same there. A BOM, UTF-16 or lone surrogates, which
    ``json.loads(bytes)`` would accept, take the re-serialising path.
    """
    try:
        data = json.loads(payload.decode())
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def _edge_device_headers(source: str, event_type: str, subject: str, site: str, device: str) -> _DeviceHeaders:
    """The key and per-device headers of :meth:`Envelope._transcode_edge`, remembered (bounded)."""
    built = (
        Topics.device_key(site, device),
        ("ce_source", source.encode()),
        ("ce_type", event_type.encode()),
        ("ce_subject", subject.encode()),
        ("ce_site", site.encode()),
        ("ce_device", device.encode()),
    )
    if len(_EDGE_DEVICE_HEADERS) >= _EDGE_DEVICE_HEADERS_MAX:
        _EDGE_DEVICE_HEADERS.clear()  # names come from devices: never grow without bound
    _EDGE_DEVICE_HEADERS[(source, event_type, subject, site, device)] = built
    return built


KafkaEventFields = tuple[str, str, str, str | None, datetime, dict[str, str], dict[str, Any]]


def kafka_event_fields(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> KafkaEventFields | None:
    """``(id, type, source, subject, time, extensions, data)`` of a record as :meth:`Envelope.from_kafka` reads it.

    Without the SDK and without building an :class:`Envelope`, for the
    consumers that read every record (the trigger engine), and only for
    binary mode as reflexarc writes it: lower-case ``ce_*`` headers with UTF-8
    values, specversion 1.0, non-empty id/source/type, a canonical UTC time,
    extension names the SDK accepts, JSON data that is an object. For
    anything else (structured mode, other content types, odd names or times)
    it returns ``None``: then :meth:`Envelope.from_kafka` decides, through the
    SDK, so the verdict on unusual records is always the SDK's. The values are
    those of ``Envelope.from_kafka`` (the time as the same instant).
    """
    if not value or headers is None:
        return None
    try:
        names = tuple([h[0] for h in headers])
        shape = _KAFKA_SHAPES.get(names)
        if shape is None:
            shape = _kafka_shape(names)
        if shape is False:
            return None
        i_id, i_source, i_type, i_time, i_subject, i_ctype, i_spec, exts = shape
        if headers[i_ctype][1] != b"application/json" or headers[i_spec][1] != b"1.0":
            return None
        event_id = headers[i_id][1].decode()
        source = headers[i_source][1].decode()
        event_type = headers[i_type][1].decode()
        time_text = headers[i_time][1].decode()
        subject = headers[i_subject][1].decode() if i_subject is not None else None
        ext = {name: headers[i][1].decode() for name, i in exts}
    except (UnicodeDecodeError, AttributeError, TypeError, ValueError, IndexError):
        return None
    if not (event_id and source and event_type) or subject == "" or _CANONICAL_UTC.fullmatch(time_text) is None:
        return None
    data = _record_json_object(value)
    if data is None:
        return None
    return event_id, event_type, source, subject, datetime.fromisoformat(time_text), ext, data


# Kafka header names of a record (in order) -> where kafka_event_fields finds each attribute, or False
# when the SDK must read such records. Bounded: header names come from producers.
_KafkaShape = tuple[int, int, int, int, int | None, int, int, tuple[tuple[str, int], ...]]
_KAFKA_SHAPES: dict[tuple[str, ...], _KafkaShape | Literal[False]] = {}


def _kafka_shape(names: tuple[str, ...]) -> _KafkaShape | Literal[False]:
    """Positions of the attributes in records with these header names (the last of a repeated name wins)."""
    pos: dict[str, int] = {}
    for i, name in enumerate(names):
        if name.startswith("ce_") or name == "content-type":
            pos[name] = i
        elif name.lower().startswith("ce_") or name.lower() == "content-type":
            pos = {}  # the SDK reads header names case-insensitively: let it
            break
    exts = []
    for name, i in pos.items():
        attr = name[3:]
        if name == "content-type" or attr in _CORE_ATTRS:
            continue
        if attr in ("data", "dataschema", "partitionkey") or not _EXT_NAME.fullmatch(attr):
            pos = {}
            break
        exts.append((attr, i))
    need = ("ce_id", "ce_source", "ce_type", "ce_time", "content-type", "ce_specversion")
    shape: _KafkaShape | Literal[False] = False
    # A ce_datacontenttype header competes with content-type in the SDK: let it decide.
    if all(n in pos for n in need) and "ce_datacontenttype" not in pos:
        shape = (
            pos["ce_id"],
            pos["ce_source"],
            pos["ce_type"],
            pos["ce_time"],
            pos.get("ce_subject"),
            pos["content-type"],
            pos["ce_specversion"],
            tuple(exts),
        )
    if len(_KAFKA_SHAPES) >= 1000:
        _KAFKA_SHAPES.clear()
    _KAFKA_SHAPES[names] = shape
    return shape


# 19 digits in a row: perhaps an integer beyond 64 bits, which orjson would read as a double.
_LONG_DIGITS = re.compile(rb"\d{19}")


def _record_json_object(payload: bytes) -> dict[str, Any] | None:
    """:func:`_utf8_json_object`, faster: orjson reads it when that gives the same values.

    orjson refuses what the standard parser would read differently (NaN,
    Infinity, lone surrogates, invalid UTF-8: then the standard parser
    decides) except integers beyond 64 bits, which it turns into doubles: a
    payload with 19 digits in a row anywhere goes to the standard parser.
    """
    if _LONG_DIGITS.search(payload) is None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return _utf8_json_object(payload)
        return data if type(data) is dict else None
    return _utf8_json_object(payload)


def _is_json_object(payload: bytes) -> bool:
    """True when ``payload`` is a JSON object in strict UTF-8: a check, several times faster than parsing.

    orjson accepts a subset of what ``json.loads(payload.decode())`` accepts
    (it refuses NaN, Infinity and lone surrogates, which then take the
    general path, where the standard parser decides). Its values are not
    kept: it reads integers beyond 64 bits as floats, and validation must
    see the exact numbers.
    """
    try:
        return type(orjson.loads(payload)) is dict
    except orjson.JSONDecodeError:
        return False


def _looks_structured(payload: bytes) -> bool:
    head = payload[:512]
    return head.lstrip().startswith(b"{") and b'"specversion"' in payload


def _check_topic_agrees(env: Envelope, topic: MqttTopic) -> None:
    for attr in ("site", "device"):
        claimed = env.extensions.get(attr)
        actual = getattr(topic, attr)
        if claimed is not None and claimed != actual:
            raise EnvelopeError(f"event says {attr}={claimed!r} but was published on {actual!r}'s topic")
    if topic.kind is MqttKind.DATA and env.subject not in (None, topic.stream):
        raise EnvelopeError(f"event subject {env.subject!r} does not match stream {topic.stream!r}")
    if "site" not in env.extensions or "device" not in env.extensions:
        ext = dict(env.extensions)
        ext.setdefault("site", topic.site)
        ext.setdefault("device", topic.device)
        object.__setattr__(env, "extensions", ext)


__all__ = [
    "JSON",
    "OCTETS",
    "STRUCTURED",
    "DeadLetter",
    "Envelope",
    "EnvelopeError",
    "EventType",
    "TopicError",
    "device_source",
    "kafka_event_fields",
    "utcnow",
]
