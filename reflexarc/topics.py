"""Every MQTT topic and Kafka topic name reflexarc uses is built and parsed here.

No other module formats a topic string. The layout is:

MQTT (per device, so a broker ACL can scope each device to its own prefix)::

    {ns}/{site}/{device}/data/{stream}   instrument events, edge -> fog
    {ns}/{site}/{device}/cmd             commands, fog -> edge actuators
    {ns}/{site}/{device}/ack             command acks/nacks, edge -> fog
    {ns}/{site}/{device}/status          retained online/offline (last will)
    {ns}/{site}/{device}/receipt         fog -> edge: event ids Kafka now holds (end-to-end receipts)
    {ns}/_probe/{probe}                  a broker check's own traffic (`reflexarc fog check --broker`)

Kafka (keyed by ``site/device`` so each device's order is kept per partition)::

    {ns}.data            every instrument event
    {ns}.deadletter      anything that could not be taken, with the reason
    {ns}.tasks.{site}    task requests for one HPC site
    {ns}.results         task results
    {ns}.jobs            job state transitions
    {ns}.commands        commands on their way down to devices
    {ns}.acks            command acks/nacks and delivery status

``ns`` defaults to ``rx``. Names are restricted to a safe alphabet so that a
device can never inject MQTT wildcards or path separators into a topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

DEFAULT_NAMESPACE = "rx"

# Letters, digits, '-', '_' and '.' (not leading): safe in MQTT levels, Kafka
# topic names and file names alike.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


class TopicError(ValueError):
    """A topic or a name that goes into one is malformed."""


class MqttKind(StrEnum):
    """What an MQTT topic carries."""

    DATA = "data"
    CMD = "cmd"
    ACK = "ack"
    STATUS = "status"
    RECEIPT = "receipt"


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe topic level, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '-', '_' or '.' (no '/', '+', '#' or spaces)"
        )
    return value


@dataclass(frozen=True, slots=True)
class MqttTopic:
    """A parsed reflexarc MQTT topic."""

    namespace: str
    site: str
    device: str
    kind: MqttKind
    stream: str | None = None

    def __str__(self) -> str:
        parts = [self.namespace, self.site, self.device, self.kind.value]
        if self.stream is not None:
            parts.append(self.stream)
        return "/".join(parts)


#: How many parsed MQTT topics a :class:`Topics` keeps (valid ones only).
PARSE_CACHE_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses topic names for one namespace.

    >>> t = Topics()
    >>> t.mqtt_data("bl1", "det1", "counts")
    'rx/bl1/det1/data/counts'
    >>> t.kafka_tasks("alcf")
    'rx.tasks.alcf'
    """

    namespace: str = DEFAULT_NAMESPACE
    # The namespace's fixed Kafka topics, built once: hot paths use the same str object per
    # record (its hash is computed once, for every dict lookup by topic).
    #: Kafka topic holding every instrument event.
    kafka_data: str = field(init=False, repr=False, compare=False)
    #: Kafka topic holding whatever could not be taken, with the reason.
    kafka_deadletter: str = field(init=False, repr=False, compare=False)
    #: Kafka topic of task results.
    kafka_results: str = field(init=False, repr=False, compare=False)
    #: Kafka topic of job state transitions.
    kafka_jobs: str = field(init=False, repr=False, compare=False)
    #: Kafka topic of commands on their way to devices.
    kafka_commands: str = field(init=False, repr=False, compare=False)
    #: Kafka topic of command acks/nacks and delivery status.
    kafka_acks: str = field(init=False, repr=False, compare=False)
    # Parsed MQTT topics: a bridge sees the same few thousand topics millions of times.
    _parsed: dict[str, MqttTopic] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ns = check_name(self.namespace, "namespace")
        for kind in ("data", "deadletter", "results", "jobs", "commands", "acks"):
            object.__setattr__(self, f"kafka_{kind}", f"{ns}.{kind}")

    # ---- MQTT -----------------------------------------------------------------
    def mqtt_device_prefix(self, site: str, device: str) -> str:
        """The prefix every topic of one device lives under (for ACLs)."""
        return f"{self.namespace}/{check_name(site, 'site')}/{check_name(device, 'device')}"

    def mqtt_data(self, site: str, device: str, stream: str) -> str:
        """Topic a device publishes one stream's events on."""
        return f"{self.mqtt_device_prefix(site, device)}/data/{check_name(stream, 'stream')}"

    def mqtt_cmd(self, site: str, device: str) -> str:
        """Topic a device receives commands on."""
        return f"{self.mqtt_device_prefix(site, device)}/cmd"

    def mqtt_ack(self, site: str, device: str) -> str:
        """Topic a device answers commands on."""
        return f"{self.mqtt_device_prefix(site, device)}/ack"

    def mqtt_status(self, site: str, device: str) -> str:
        """Retained online/offline topic of a device (also its last will)."""
        return f"{self.mqtt_device_prefix(site, device)}/status"

    def mqtt_status_filter(self) -> str:
        """Subscription filter of every device's retained status (``reflexarc status``)."""
        return f"{self.namespace}/+/+/status"

    def mqtt_receipt(self, site: str, device: str) -> str:
        """Topic the fog confirms to a device which of its events Kafka holds (end-to-end receipts)."""
        return f"{self.mqtt_device_prefix(site, device)}/receipt"

    def mqtt_probe(self, probe: str) -> str:
        """Topic of one broker check run (``reflexarc fog check --broker``).

        Three levels under the namespace, so no device filter (``{ns}/+/+/...``) and no fog
        ingest subscription ever matches it; an ACL entry for ``{ns}/_probe/#`` scopes it.
        """
        return f"{self.namespace}/_probe/{check_name(probe, 'probe id')}"

    def mqtt_ingest_filters(self, site: str = "+", device: str = "+") -> list[str]:
        """Subscription filters a fog bridge takes device traffic from."""
        return [
            f"{self.namespace}/{site}/{device}/data/+",
            f"{self.namespace}/{site}/{device}/ack",
        ]

    def mqtt_shared(self, group: str, topic_filter: str) -> str:
        """An MQTT 5 shared subscription, so several bridges split one filter."""
        return f"$share/{check_name(group, 'share group')}/{topic_filter}"

    def parse_mqtt(self, topic: str) -> MqttTopic:
        """Parse an MQTT topic into its parts; raise :class:`TopicError` if foreign."""
        parsed = self._parsed.get(topic)
        if parsed is None:
            parsed = self._parse_mqtt(topic)
            if len(self._parsed) >= PARSE_CACHE_SIZE:
                self._parsed.clear()  # bounded: topic names come from devices
            self._parsed[topic] = parsed
        return parsed

    def _parse_mqtt(self, topic: str) -> MqttTopic:
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != self.namespace:
            raise TopicError(f"not a reflexarc topic in namespace {self.namespace!r}: {topic!r}")
        _, site, device, kind_s, *rest = parts
        try:
            kind = MqttKind(kind_s)
        except ValueError:
            raise TopicError(f"unknown topic kind {kind_s!r} in {topic!r}") from None
        check_name(site, "site")
        check_name(device, "device")
        if kind is MqttKind.DATA:
            if len(rest) != 1:
                raise TopicError(f"data topic needs exactly one stream level: {topic!r}")
            return MqttTopic(self.namespace, site, device, kind, check_name(rest[0], "stream"))
        if rest:
            raise TopicError(f"unexpected levels after {kind_s!r} in {topic!r}")
        return MqttTopic(self.namespace, site, device, kind)

    # ---- Kafka ----------------------------------------------------------------
    def kafka_tasks(self, site: str) -> str:
        """Kafka topic of task requests for one HPC site."""
        return f"{self.namespace}.tasks.{check_name(site, 'site')}"

    def parse_kafka_tasks(self, topic: str) -> str | None:
        """The site of a task topic (``{ns}.tasks.<site>``); None for any other topic."""
        prefix = f"{self.namespace}.tasks."
        return topic[len(prefix) :] if topic.startswith(prefix) and len(topic) > len(prefix) else None

    @property
    def kafka_sites(self) -> str:
        """Compacted Kafka topic of the sites' presence (one status record per site, keyed by site)."""
        return f"{self.namespace}.sites"

    def kafka_core(self) -> list[str]:
        """The topics every pipeline has (site task topics are added per site)."""
        return [
            self.kafka_data,
            self.kafka_deadletter,
            self.kafka_results,
            self.kafka_jobs,
            self.kafka_commands,
            self.kafka_acks,
        ]

    @staticmethod
    def device_key(site: str, device: str) -> bytes:
        """Kafka record key for a device: keeps each device's order per partition."""
        return f"{site}/{device}".encode()

    @staticmethod
    def parse_device_key(key: bytes | str) -> tuple[str, str]:
        """Inverse of :meth:`device_key`."""
        text = key.decode() if isinstance(key, bytes) else key
        site, sep, device = text.partition("/")
        if not sep:
            raise TopicError(f"not a device key: {text!r}")
        return check_name(site, "site"), check_name(device, "device")


def mqtt_match(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` matches an MQTT filter with ``+``/``#`` wildcards."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)
