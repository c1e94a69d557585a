"""Load YAML configuration into pydantic models, with errors that name file, line and field.

Every YAML file reflexarc reads goes through :func:`load_yaml` (or
:func:`parse_yaml`), so every tier reports problems the same way::

    agent.yaml:12:5: source.rate_hz: Input should be greater than 0

YAML is parsed with the safe loader only: a configuration file never
constructs Python objects or runs code. Secrets are never stored in YAML;
models name an environment variable (``password_env``) instead.

This module also holds the connection settings shared by every tier
(:class:`MqttSettings`, :class:`KafkaSettings`). Their defaults come from
``RX_MQTT_HOST``/``RX_MQTT_PORT``/``RX_KAFKA_BOOTSTRAP``, which
``reflexarc up`` sets for the tiers it starts on embedded brokers.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from reflexarc.topics import DEFAULT_NAMESPACE, Topics, check_name

M = TypeVar("M", bound=BaseModel)


def _valid_name(value: str) -> str:
    return check_name(value, "name")


Name = Annotated[str, AfterValidator(_valid_name)]
"""A site, device, stream, app, actuator ... name: safe as an MQTT topic level, a Kafka name and a file name."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors (typos do not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration file."""

    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(ValueError):
    """A configuration file is invalid; ``problems`` lists each error with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _marks(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], yaml.Mark]) -> None:
    out.setdefault(path, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            # Point at the key for the field itself; children point at themselves.
            out[(*path, key)] = key_node.start_mark
            _marks(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _marks(item, (*path, i), out)


def _locate(loc: tuple[Any, ...], marks: dict[tuple[Any, ...], yaml.Mark]) -> tuple[int | None, int | None]:
    # Missing fields have no mark of their own: fall back to the nearest parent.
    for n in range(len(loc), -1, -1):
        mark = marks.get(tuple(loc[:n]))
        if mark is not None:
            return mark.line + 1, mark.column + 1
    return None, None


def parse_yaml_text(text: str, source: str = "<string>") -> tuple[Any, dict[tuple[Any, ...], yaml.Mark]]:
    """Parse YAML safely; return the data and a map from field path to its position."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            [
                Problem(
                    source,
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                    "",
                    f"invalid YAML: {exc.problem}",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, None, None, "", f"invalid YAML: {exc}")]) from None
    marks: dict[tuple[Any, ...], yaml.Mark] = {}
    if node is not None:
        _marks(node, (), marks)
    return data, marks


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models a field may hold, each with whether a list index or dict key comes first."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, set, frozenset, tuple, dict) or (isinstance(origin, type) and issubclass(origin, dict | list)):
        inner = args[-1:] if origin is dict else args  # a dict's values; a sequence's items
        return [(m, True) for a in inner for m, _ in _models_in(a)]
    return [found for a in args for found in _models_in(a)]  # Optional, unions, Annotated


def field_names_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The field names (and aliases) valid at ``loc`` inside ``model``; empty when the path cannot be followed."""
    current: list[tuple[type[BaseModel], bool]] = [(model, False)]
    for part in loc:
        following: list[tuple[type[BaseModel], bool]] = []
        for m, keyed in current:
            if keyed:
                following.append((m, False))  # this part is the index or key of a container
                continue
            f = m.model_fields.get(part) if isinstance(part, str) else None
            if f is not None:
                following.extend(_models_in(f.annotation))
        current = following
    names: set[str] = set()
    for m, keyed in current:
        if not keyed:
            names.update(f.alias or name for name, f in m.model_fields.items())
    return names


def did_you_mean(word: str, candidates: set[str] | list[str]) -> str:
    """`` (did you mean 'x'?)`` when a candidate is close to ``word``, else ``''``."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def plain_message(err: Any, model: type[BaseModel] | None = None, loc: tuple[Any, ...] | None = None) -> str:
    """A pydantic error's message in plain words: no "Value error," prefix, "unknown field" with a suggestion."""
    if err["type"] == "extra_forbidden":
        loc = loc if loc is not None else tuple(err["loc"])
        hint = did_you_mean(str(loc[-1]), field_names_at(model, loc[:-1])) if model is not None and loc else ""
        return "unknown field" + (hint or " (check the spelling; see the documentation for valid fields)")
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def validation_problems(
    exc: ValidationError, source: str, marks: dict[tuple[Any, ...], yaml.Mark], model: type[BaseModel] | None = None
) -> list[Problem]:
    """Turn a pydantic error into :class:`Problem` entries with YAML positions (``model``: for "did you mean")."""
    problems = []
    for err in exc.errors():
        # pydantic puts the tag of a discriminated union into loc; drop it for the YAML path.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line, col = _locate(loc, marks)
        problems.append(Problem(source, line, col, _field_name(loc), plain_message(err, model, loc)))
    return problems


def parse_yaml(text: str, model: type[M], source: str = "<string>", context: dict[str, Any] | None = None) -> M:
    """Validate YAML text against ``model``; raise :class:`ConfigError` on any problem."""
    data, marks = parse_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, 1, 1, "", "the file must be a YAML mapping (key: value)")])
    try:
        return model.model_validate(data, context={"source": source, **(context or {})})
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, source, marks, model)) from None


def load_yaml(path: str | os.PathLike[str], model: type[M], context: dict[str, Any] | None = None) -> M:
    """Read and validate a YAML file; errors name the file, the line and the field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([Problem(str(p), None, None, "", f"cannot read: {exc.strerror}")]) from None
    return parse_yaml(text, model, str(p), context)


def secret_from_env(var: str | None, what: str) -> str | None:
    """Read a secret from the environment variable ``var``; a clear error if it is unset."""
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise ConfigError([Problem("<environment>", None, None, var, f"{what} is read from ${var}, which is not set")])
    return value


class TlsSettings(StrictModel):
    """TLS for a broker connection. Paths to files; the private key never goes in YAML."""

    ca_file: str | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="client private key (mutual TLS)")
    insecure_skip_verify: bool = Field(False, description="accept any broker certificate (testing only)")


class MqttSettings(StrictModel):
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password")
    tls: TlsSettings | None = None
    keepalive: int = Field(30, ge=5, le=3600)

    @classmethod
    def from_env(cls) -> MqttSettings:
        """Defaults from ``RX_MQTT_HOST``/``RX_MQTT_PORT``/``RX_MQTT_PROTOCOL``."""
        return cls(
            host=os.environ.get("RX_MQTT_HOST", "127.0.0.1"),
            port=int(os.environ.get("RX_MQTT_PORT", "1883")),
            protocol=os.environ.get("RX_MQTT_PROTOCOL", "5"),  # type: ignore[arg-type]  # pydantic checks the text against the Literal
        )

    def password(self) -> str | None:
        """The password, read from the environment at connect time."""
        return secret_from_env(self.password_env, "the MQTT password")


class KafkaSettings(StrictModel):
    """How to reach the Kafka-protocol cluster."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the SASL password")
    tls: TlsSettings | None = None
    partitions: int = Field(4, ge=1, le=1024, description="partitions for topics reflexarc creates")
    replication_factor: int = Field(1, ge=1)
    fetch_max_wait_ms: int = Field(
        50,
        ge=0,
        le=30_000,
        description="longest a consumer's fetch waits for data (every Kafka hop of the loop pays part of it "
        "on Tansu; use 500, Kafka's own default, on Apache Kafka or Redpanda: they answer as soon as data arrives)",
    )

    @model_validator(mode="after")
    def _sasl_needs_a_mechanism(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and self.sasl_mechanism is None:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512), username and password_env"
            )
        return self

    @classmethod
    def from_env(cls) -> KafkaSettings:
        """Defaults from the ``RX_KAFKA_*`` variables (see :data:`KAFKA_ENV`); every tier and client reads them here.

        ``RX_KAFKA_PASSWORD`` holds the SASL password itself (``password_env`` then names it);
        ``RX_KAFKA_PASSWORD_ENV`` names another variable that holds it.
        """
        data: dict[str, Any] = {"bootstrap_servers": os.environ.get("RX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")}
        for var, field in KAFKA_ENV.items():
            if os.environ.get(var) and field != "bootstrap_servers":
                data[field] = os.environ[var]
        if os.environ.get("RX_KAFKA_PASSWORD") and "password_env" not in data:
            data["password_env"] = "RX_KAFKA_PASSWORD"
        tls = {f: os.environ[v] for v, f in KAFKA_TLS_ENV.items() if os.environ.get(v)}
        if tls:
            data["tls"] = tls
        return cls.model_validate(data)

    def password(self) -> str | None:
        """The SASL password, read from the environment at connect time."""
        return secret_from_env(self.password_env, "the Kafka password")


#: Environment variables :meth:`KafkaSettings.from_env` reads, and the field each sets.
KAFKA_ENV: dict[str, str] = {
    "RX_KAFKA_BOOTSTRAP": "bootstrap_servers",
    "RX_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "RX_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "RX_KAFKA_USERNAME": "username",
    "RX_KAFKA_PASSWORD_ENV": "password_env",
    "RX_KAFKA_FETCH_WAIT_MS": "fetch_max_wait_ms",
}

#: Environment variables that fill :class:`TlsSettings` of :meth:`KafkaSettings.from_env`.
KAFKA_TLS_ENV: dict[str, str] = {
    "RX_KAFKA_CA_FILE": "ca_file",
    "RX_KAFKA_CERT_FILE": "cert_file",
    "RX_KAFKA_KEY_FILE": "key_file",
}


class MetricsSettings(StrictModel):
    """Where a tier serves Prometheus ``/metrics``: ``metrics: {host, port}`` in every tier's YAML."""

    host: str = Field(
        "127.0.0.1",
        description="address to bind: loopback suits a laptop; 0.0.0.0 (or the host's own address) lets a "
        "Prometheus on another host scrape it",
    )
    port: int | None = Field(None, ge=0, le=65535, description="0 = any free port; omitted = no endpoint")


class HasMetrics(StrictModel):
    """A tier config with ``metrics: {host, port}``; the older top-level ``metrics_port`` still works."""

    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="the Prometheus endpoint")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="older spelling of metrics.port")

    @model_validator(mode="after")
    def _fold_metrics_port(self) -> HasMetrics:
        # Both spellings name one setting: fold the old into the new, and keep the old readable.
        if self.metrics_port is not None:
            if self.metrics.port is not None and self.metrics.port != self.metrics_port:
                raise ValueError(
                    f"metrics_port {self.metrics_port} and metrics.port {self.metrics.port} disagree: keep metrics.port"
                )
            self.metrics = self.metrics.model_copy(update={"port": self.metrics_port})
        self.metrics_port = self.metrics.port
        return self


class PipelineSettings(HasMetrics):
    """Settings every tier shares: namespace and metrics."""

    namespace: str = Field(
        default_factory=lambda: os.environ.get("RX_NAMESPACE", DEFAULT_NAMESPACE),
        description="prefix of every topic (default: $RX_NAMESPACE or 'rx')",
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus endpoint port (0 = any free)")

    def topics(self) -> Topics:
        """The topic helper for this namespace."""
        return Topics(self.namespace)
