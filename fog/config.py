"""fog.yaml: what a fog bridge connects to, which streams it validates and shapes, how commands go down.

Every section has defaults, so an empty file is a working bridge on the
brokers named by ``RX_MQTT_HOST``/``RX_MQTT_PORT``/``RX_MQTT_PROTOCOL`` and
``RX_KAFKA_BOOTSTRAP``. ``docs/fog.md`` documents each field.

YAML never executes code here: stream payload models are declared as data
(JSON Schema, or a table of typed ``fields`` turned into a pydantic model).
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from reflexarc.config import (
    KafkaSettings,
    MqttSettings,
    Name,
    PipelineSettings,
    StrictModel,
    load_yaml,
)
from reflexarc.topics import check_name

#: Kafka's default maximum request is 1 MiB; keep room for CloudEvents headers and the key.
KAFKA_RECORD_LIMIT = 960 * 1024


def _default_client_id() -> str:
    # Stable across restarts of the same host, so a restarted bridge resumes its
    # persistent MQTT session (and the messages the broker kept for it).
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"rx-fog-{host or 'node'}"[:64]


class DedupeSettings(StrictModel):
    """Drop events whose id was seen recently (a bounded window: count and age)."""

    enabled: bool = True
    window_size: int = Field(100_000, ge=1, description="remember at most this many recent event ids")
    window_s: float = Field(600.0, gt=0, description="forget ids older than this many seconds")
    seed_from_kafka: bool = Field(
        True, description="at start, fill the window with the ids of the data topic's tail (survives a restart)"
    )
    seed_timeout_s: float = Field(10.0, gt=0, description="read the data topic's tail for at most this long")


class ReceiptSettings(StrictModel):
    """End-to-end receipts: tell each device which of its events Kafka holds."""

    enabled: bool = True
    interval_ms: float = Field(100.0, gt=0, le=60_000, description="publish each device's receipt this often")
    max_ids: int = Field(1000, ge=1, le=10_000, description="ids in one receipt; a device reaching it is sent at once")
    qos: Literal[0, 1] = Field(1, description="MQTT QoS of receipts (1: kept in an offline device's session)")


class BufferSettings(StrictModel):
    """The disk buffer that takes MQTT traffic while Kafka is slow or away (like EMQX's replayq)."""

    enabled: bool = True
    path: str | None = Field(
        None,
        description="SQLite file (relative to fog.yaml; default: $RX_STATE_DIR/fog-CLIENT_ID/buffer.db or "
        "~/.local/state/reflexarc/fog/NS/CLIENT_ID/buffer.db)",
    )
    max_bytes: int = Field(1 << 30, ge=1 << 20, description="record bytes the buffer holds at most (then backpressure)")
    max_events: int = Field(1_000_000, ge=100, description="records the buffer holds at most (then backpressure)")
    spill_after_ms: float = Field(
        500.0, gt=0, le=600_000, description="engage when a record waited this long for Kafka (or a batch failed)"
    )
    sync: Literal["normal", "full"] = Field(
        "normal", description="SQLite synchronous: normal survives a crash of the bridge, full also a power cut"
    )

    @field_validator("path")
    @classmethod
    def _relative_to_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        p = Path(os.path.expanduser(v))
        if not p.is_absolute():
            p = Path((info.context or {}).get("source", "./.")).parent / p
        return str(p)


class FieldSpec(StrictModel):
    """One field of a declared payload model (turned into a pydantic field)."""

    type: Literal["number", "integer", "string", "boolean", "object", "array", "any"] = "any"
    required: bool = True
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=0)
    pattern: str | None = None
    enum: list[Any] | None = None


class ShapeSettings(StrictModel):
    """How a stream's events become Kafka records.

    * ``passthrough``: one record per event.
    * ``batch``: up to ``max_events`` events, or what arrived within
      ``max_ms``, of one device and stream in one record.
    * ``downsample``: keep one event in ``every``, and/or at most one per
      ``interval_ms``; the others are acknowledged and counted, not forwarded.
    * ``aggregate``: per ``window_ms`` (or ``max_events``), one record with
      ``stats`` of the numeric ``fields``.
    """

    mode: Literal["passthrough", "batch", "downsample", "aggregate"] = "passthrough"
    max_events: int = Field(100, ge=1, le=100_000, description="batch/aggregate: close after this many events")
    max_ms: float = Field(50.0, gt=0, description="batch: close after this many milliseconds")
    every: int = Field(1, ge=1, description="downsample: keep one event in this many")
    interval_ms: float | None = Field(None, gt=0, description="downsample: keep at most one event per interval")
    window_ms: float = Field(1000.0, gt=0, description="aggregate: window length")
    fields: list[str] | None = Field(None, description="aggregate: numeric fields (default: every numeric field)")
    stats: list[Literal["mean", "min", "max", "sum", "last", "first"]] = Field(["mean", "min", "max", "last"])


class StreamSettings(StrictModel):
    """Validation and shaping for the streams whose name matches ``match`` (a glob)."""

    match: str = Field("*", description="stream name or glob pattern (e.g. 'temp', 'cam-*')")
    max_payload_bytes: int | None = Field(None, ge=1, description="overrides ingest.max_payload_bytes")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="JSON Schema of the event data")
    schema_file: str | None = Field(None, description="JSON Schema file (relative to fog.yaml)")
    fields: dict[str, FieldSpec] | None = Field(None, description="declared pydantic model of the event data")
    extra_fields: Literal["allow", "forbid", "ignore"] = Field(
        "allow", description="with 'fields': what to do with fields not declared"
    )
    require_json: bool = Field(False, description="dead-letter events whose data is not a JSON object")
    shape: ShapeSettings = Field(default_factory=ShapeSettings)

    @model_validator(mode="after")
    def _one_schema(self) -> StreamSettings:
        if self.json_schema is not None and self.schema_file is not None:
            raise ValueError("give either 'schema' or 'schema_file', not both")
        return self

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _check_schema(v)
        return v

    @field_validator("schema_file")
    @classmethod
    def _load_schema_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        base = Path((info.context or {}).get("source", ".")).parent
        path = Path(v) if os.path.isabs(v) else base / v
        try:
            schema = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read schema file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"schema file {path} is not valid JSON: {exc}") from None
        _check_schema(schema)
        return str(path)

    def matches(self, stream: str) -> bool:
        """True when this entry applies to ``stream``."""
        return fnmatch.fnmatchcase(stream, self.match)

    def schema_in_force(self) -> dict[str, Any] | None:
        """The JSON Schema in force (inline or from ``schema_file``)."""
        if self.json_schema is not None:
            return self.json_schema
        if self.schema_file is not None:
            loaded: dict[str, Any] = json.loads(Path(self.schema_file).read_text())
            return loaded
        return None


def _check_schema(schema: Any) -> None:
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict):
        raise ValueError("a JSON Schema must be a mapping")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        raise ValueError(f"invalid JSON Schema: {exc.message}") from None


class IngestSettings(StrictModel):
    """MQTT -> Kafka: subscription, flow control, limits, dedupe."""

    enabled: bool = True
    client_id: Name = Field(default_factory=_default_client_id, description="stable across restarts")
    share_group: Name | None = Field(
        "rx-fog", description="MQTT 5 shared-subscription group (null: plain subscription; off on 3.1.1)"
    )
    peers: list[Name] = Field(
        default_factory=list,
        description="client ids of the other bridges of the share group: drain a dead peer's session",
    )
    sites: str = Field("+", description="site level of the subscription ('+' = every site)")
    devices: str = Field("+", description="device level of the subscription ('+' = every device)")
    session_expiry_s: int = Field(86_400, ge=0, description="how long the broker keeps our session while we are away")
    receive_maximum: int = Field(
        1000, ge=1, le=65_535, description="unacknowledged MQTT messages at once (MQTT 5 flow control)"
    )
    max_in_flight: int = Field(10_000, ge=1, description="Kafka records sent and not yet acknowledged")
    max_payload_bytes: int = Field(256 * 1024, ge=1, description="larger MQTT payloads are dead-lettered")
    deadletter_max_bytes: int = Field(
        512 * 1024, ge=1024, description="original bytes kept in a dead letter (truncated above, marked)"
    )
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    receipts: ReceiptSettings = Field(default_factory=ReceiptSettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    linger_ms: int = Field(5, ge=0, description="Kafka producer linger")
    max_batch_bytes: int = Field(256 * 1024, ge=1024, description="Kafka producer batch size")
    request_timeout_ms: int = Field(30_000, ge=1000, description="Kafka request timeout (then the bridge retries)")
    retry_backoff_ms: int = Field(500, ge=10, description="pause before re-sending records Kafka did not take")

    @field_validator("sites", "devices")
    @classmethod
    def _level(cls, v: str) -> str:
        return v if v == "+" else check_name(v, "topic level")


class CommandSettings(StrictModel):
    """Kafka -> MQTT: command delivery and tracking."""

    enabled: bool = True
    group_id: Name = Field("rx-fog-commands", description="Kafka consumer group of the commands topic")
    client_id: Name | None = Field(None, description="MQTT client id of the publisher (default: ingest id + '-cmd')")
    retry_interval_s: float = Field(30.0, gt=0, description="re-publish when the device has not answered")
    default_deadline_s: float = Field(600.0, gt=0, description="how long a command without a deadline is tracked")
    max_pending: int = Field(10_000, ge=1, description="commands tracked at once (then consumption pauses)")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Kafka consumer group session timeout")


class FogConfig(PipelineSettings):
    """The whole fog.yaml."""

    mqtt: MqttSettings = Field(default_factory=MqttSettings.from_env)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings.from_env)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    commands: CommandSettings = Field(default_factory=CommandSettings)
    streams: list[StreamSettings] = Field(default_factory=list, description="first match wins")
    create_topics: bool = Field(True, description="create the core Kafka topics at start")

    @model_validator(mode="after")
    def _fits_kafka(self) -> FogConfig:
        limits = [("ingest.max_payload_bytes", self.ingest.max_payload_bytes)]
        limits += [
            (f"streams[{i}].max_payload_bytes", s.max_payload_bytes)
            for i, s in enumerate(self.streams)
            if s.max_payload_bytes is not None
        ]
        for where, n in limits:
            if n > KAFKA_RECORD_LIMIT:
                raise ValueError(
                    f"{where} = {n} is above what one Kafka record can carry by default "
                    f"({KAFKA_RECORD_LIMIT} bytes with headroom for headers): send large data by reference"
                )
        return self

    def stream(self, name: str) -> StreamSettings | None:
        """Settings for one stream: the first entry whose ``match`` fits."""
        for s in self.streams:
            if s.matches(name):
                return s
        return None

    def buffer_path(self) -> Path:
        """The disk buffer's SQLite file: one per bridge (client id), kept across restarts."""
        if self.ingest.buffer.path:
            return Path(self.ingest.buffer.path)
        env = os.environ.get("RX_STATE_DIR")
        if env:
            return Path(env) / f"fog-{self.ingest.client_id}" / "buffer.db"
        return Path.home() / ".local/state/reflexarc/fog" / self.namespace / self.ingest.client_id / "buffer.db"

    def share_group(self) -> str | None:
        """The shared-subscription group in force: none on MQTT 3.1.1."""
        return self.ingest.share_group if self.mqtt.protocol == "5" else None


def load_config(path: str | os.PathLike[str]) -> FogConfig:
    """Read and validate fog.yaml; :class:`reflexarc.config.ConfigError` names file, line and field."""
    return load_yaml(path, FogConfig)
