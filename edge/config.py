"""``agent.yaml``: what an edge agent reads, publishes and obeys.

Validated with pydantic through the kernel's YAML loader, so every error names
file, line and field. Source entries are validated against the config model of
their plugin (``type:``), found through the ``reflexarc.sources`` entry points.
See ``docs/edge.md`` for the full format.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from reflexarc.config import (
    ConfigError,
    HasMetrics,
    MqttSettings,
    Name,
    Problem,
    StrictModel,
    parse_yaml_text,
    validation_problems,
)
from reflexarc.edge.epics_actuator import EpicsHandler
from reflexarc.objectstore import ObjectStoreSettings
from reflexarc.topics import DEFAULT_NAMESPACE, Topics

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _default_namespace() -> str:
    return os.environ.get("RX_NAMESPACE", DEFAULT_NAMESPACE)


class SpoolSettings(StrictModel):
    """The disk spool every event passes through before it is published."""

    path: str | None = Field(None, description="SQLite file (default: STATE_DIR/spool.db, see state_dir)")
    max_events: int = Field(1_000_000, ge=10, description="events the spool holds at most")
    max_bytes: int = Field(1 << 30, ge=1024, description="payload bytes the spool holds at most")
    policy: Literal["block", "drop_oldest"] = Field(
        "block",
        description="when full: block the sources (nothing lost) or drop the oldest unsent events",
    )
    sync: Literal["normal", "full"] = Field(
        "normal",
        description="normal survives a crash of the agent; full (fsync per batch) also power loss",
    )
    batch: int = Field(512, ge=1, le=10_000, description="events written per transaction at most")


class PublishSettings(StrictModel):
    """How spooled events go to the broker."""

    inflight: int = Field(1000, ge=1, le=65_535, description="unacknowledged QoS 1 publishes at most (paho: 65,535)")
    client_id: str | None = Field(None, description="MQTT client id (default rx-edge-SITE-DEVICE)")
    session_expiry_s: int = Field(86_400, ge=0, description="how long the broker keeps this agent's session (MQTT 5)")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, description="reconnect delay cap (doubles up to it)")
    reconnect_jitter: float = Field(
        0.5, ge=0, le=1, description="random extra delay, as a fraction of the current delay"
    )
    connect_timeout_s: float = Field(15.0, gt=0)
    unconfirmed_max: int = Field(
        5000,
        ge=1,
        le=1_000_000,
        description="delivery: pipeline: events published but not yet confirmed by the fog's receipt, at most "
        "(publishing waits while this many are out)",
    )
    confirm_timeout_s: float = Field(
        10.0,
        gt=0,
        description="delivery: pipeline: an event the broker took but the fog has not confirmed after this long "
        "is sent again (oldest first)",
    )
    confirm_timeout_max_s: float = Field(
        30.0,
        gt=0,
        description="delivery: pipeline: while re-sends go unanswered the timeout doubles up to this",
    )

    @model_validator(mode="after")
    def _order(self) -> PublishSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.confirm_timeout_max_s < self.confirm_timeout_s:
            raise ValueError("confirm_timeout_max_s must be >= confirm_timeout_s")
        return self


class ClaimCheckSettings(StrictModel):
    """Large payloads travel by reference: stored here, the event carries the URL."""

    url: str | None = Field(None, description="fsspec URL of a directory (default: file://STATE_DIR/claims)")
    threshold_bytes: int = Field(64 * 1024, ge=0, description="payloads above this go by reference")
    store: ObjectStoreSettings = Field(
        default_factory=ObjectStoreSettings,
        description="S3 endpoint, credentials (environment variable names or a profile), multipart size",
    )


class PythonHandler(StrictModel):
    """Call ``module:function(**args)`` off the event loop; it returns a JSON object or None."""

    python: str = Field(description="module:function")

    @field_validator("python")
    @classmethod
    def _ref(cls, v: str) -> str:
        module, sep, func = v.partition(":")
        if not sep or not module or not func:
            raise ValueError("use 'package.module:function'")
        return v


class ArgvHandler(StrictModel):
    """Run a program (never through a shell); ``{name}`` in an element is replaced by that arg."""

    argv: list[str] = Field(min_length=1)
    cwd: str | None = None
    stdin_json: bool = Field(False, description="also write the args as JSON to the program's stdin")


class ActuatorSettings(StrictModel):
    """One actuator: the commands it accepts and what runs them."""

    name: Name
    description: str = ""
    args_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "additionalProperties": False},
        alias="schema",
        description="JSON Schema of the args (default: no args allowed)",
    )
    handler: PythonHandler | ArgvHandler | EpicsHandler
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("args_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(v)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        if v.get("type", "object") != "object":
            raise ValueError("the args schema must describe an object (type: object)")
        return v

    @model_validator(mode="after")
    def _placeholders(self) -> ActuatorSettings:
        if isinstance(self.handler, ArgvHandler):
            props = set(self.args_schema.get("properties", {}))
            for item in self.handler.argv:
                for name in _PLACEHOLDER.findall(item):
                    if name not in props:
                        raise ValueError(f"argv placeholder {{{name}}} is not a property of the args schema")
        return self


class CommandSettings(StrictModel):
    """How commands are checked before any handler runs."""

    require_signed: bool = Field(True, description="refuse commands without a valid pipeline signature (keep it on)")
    verify_keys: list[str] = Field(default_factory=list, description="public key PEM files; RX_VERIFY_KEYS adds more")
    max_age_s: float = Field(300.0, gt=0, description="older commands are refused as replays")
    receive_maximum: int = Field(16, ge=1, le=65_535, description="unacked commands at most")


class SourceSpec(StrictModel):
    """A source entry before its plugin validated it (``type`` picks the plugin)."""

    model_config = StrictModel.model_config | {"extra": "allow"}
    type: str


class AgentConfig(HasMetrics):
    """The whole ``agent.yaml``."""

    site: Name
    device: Name
    namespace: Name = Field(default_factory=_default_namespace)
    state_dir: str | None = Field(
        None,
        description="spool, claims and status (default: $RX_STATE_DIR/SITE-DEVICE or "
        "~/.local/state/reflexarc/edge/NS/SITE/DEVICE)",
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="0 = any free port")
    delivery: Literal["pipeline", "broker"] = Field(
        "pipeline",
        description="pipeline: an event leaves the spool when the fog confirms Kafka holds it (receipt); "
        "broker: on the broker's PUBACK (for a broker with no reflexarc fog behind it)",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings.from_env)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    claim_check: ClaimCheckSettings = Field(default_factory=ClaimCheckSettings)
    commands: CommandSettings = Field(default_factory=CommandSettings)
    sources: list[Any] = Field(default_factory=list)
    actuators: list[ActuatorSettings] = Field(default_factory=list)
    base_dir: str = Field(".", exclude=True, description="directory relative paths start from")

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        names = [a.name for a in self.actuators]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"actuator names must be unique, repeated: {dupes}")
        return self

    # ---- derived --------------------------------------------------------------
    def topics(self) -> Topics:
        """Topic helper for this agent's namespace."""
        return Topics(self.namespace)

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.base_dir) / p

    def state_path(self) -> Path:
        """Directory holding spool, claim checks and status of this agent."""
        if self.state_dir:
            return self.resolve(self.state_dir)
        env = os.environ.get("RX_STATE_DIR")
        if env:
            return Path(env) / f"{self.site}-{self.device}"
        return Path.home() / ".local/state/reflexarc/edge" / self.namespace / self.site / self.device

    def spool_path(self) -> Path:
        """The SQLite spool file."""
        return self.resolve(self.spool.path) if self.spool.path else self.state_path() / "spool.db"

    def status_path(self) -> Path:
        """The status file ``reflexarc edge status`` reads."""
        return self.state_path() / "status.json"

    def claim_url(self) -> str:
        """fsspec URL of the claim-check directory."""
        if self.claim_check.url:
            return self.claim_check.url.rstrip("/")
        return (self.state_path() / "claims").absolute().as_uri()

    def client_id(self) -> str:
        """MQTT client id: stable across restarts so the broker session is resumed."""
        return self.publish.client_id or f"rx-edge-{self.site}-{self.device}"


def parse_agent_config(text: str, source: str = "<string>", base_dir: str = ".") -> AgentConfig:
    """Validate ``agent.yaml`` text, including each source against its plugin's model."""
    from reflexarc.edge.sources import source_class

    data, marks = parse_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, 1, 1, "", "the file must be a YAML mapping (key: value)")])
    data = {**data, "base_dir": base_dir}
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, source, marks, AgentConfig)) from None
    problems: list[Problem] = []
    parsed: list[Any] = []
    for i, raw in enumerate(cfg.sources):
        where = ("sources", i)
        sub_marks = {k[2:]: v for k, v in marks.items() if k[:2] == where}
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            line, col = _mark(marks, where)
            problems.append(Problem(source, line, col, f"sources[{i}]", "needs a 'type' (plugin)"))
            continue
        try:
            cls = source_class(raw["type"])
        except LookupError as exc:
            line, col = _mark(marks, (*where, "type"))
            problems.append(Problem(source, line, col, f"sources[{i}].type", str(exc)))
            continue
        try:
            parsed.append(cls.config_model.model_validate(raw))
        except ValidationError as exc:
            for p in validation_problems(exc, source, sub_marks):
                field = f"sources[{i}]" + (f".{p.field}" if p.field else "")
                if p.line is None:
                    line, col = _mark(marks, where)
                else:
                    line, col = p.line, p.column
                problems.append(Problem(source, line, col, field, p.message))
    streams = [getattr(s, "stream", None) for s in parsed]
    for s in {x for x in streams if x is not None and streams.count(x) > 1}:
        problems.append(Problem(source, None, None, "sources", f"stream {s!r} is produced by two sources"))
    if problems:
        raise ConfigError(problems)
    cfg.sources = parsed
    return cfg


def _mark(marks: dict[tuple[Any, ...], Any], path: tuple[Any, ...]) -> tuple[int | None, int | None]:
    for n in range(len(path), -1, -1):
        m = marks.get(path[:n])
        if m is not None:
            return m.line + 1, m.column + 1
    return None, None


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate ``agent.yaml``; relative paths in it start at its directory."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([Problem(str(p), None, None, "", f"cannot read: {exc.strerror}")]) from None
    return parse_agent_config(text, str(p), str(p.parent.absolute()))
