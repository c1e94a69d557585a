"""The triggers file (``triggers.yaml``) as pydantic models: the documented schema.

These models check the *shape* of a file (types, ranges, unknown keys). What
needs more than one field at a time - CEL that compiles, apps that exist on a
site, streams that are known - is checked by :mod:`reflexarc.cloud.validate`,
which also places every error at its file, line, trigger and field.

Durations are written ``500ms``, ``10s``, ``5m``, ``1h`` or as a number of seconds.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from reflexarc.config import KafkaSettings, Name, PipelineSettings, StrictModel
from reflexarc.topics import check_name

# A window holds at most this much state per key; bigger is refused at validation
# ("window too large") because the state lives in a Kafka changelog and in memory.
MAX_WINDOW_SECONDS = 24 * 3600.0
MAX_WINDOW_EVENTS = 100_000
MAX_SLIDING_SAMPLES = 100_000

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``10s``/``500ms``/``5m``/``1h``/``1d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '10s', '500ms', '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(
            f"invalid duration {value!r}: write a number of seconds or a string like '10s', '500ms', '5m', '1h'"
        )
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            ],
            "description": "seconds, or a string like '500ms', '10s', '5m', '1h'",
        }
    ),
]


AggOp = Literal["count", "sum", "mean", "min", "max", "first", "last", "rate"]


class Aggregate(StrictModel):
    """One aggregate of a window: ``op`` over the CEL value ``of`` (not needed for count)."""

    op: AggOp = Field(description="count, sum, mean, min, max, first, last, or rate (change per second)")
    of: str | None = Field(None, description="CEL expression over `event` giving the value (e.g. event.data.counts)")

    @model_validator(mode="after")
    def _of_needed(self) -> Aggregate:
        if self.op != "count" and not self.of:
            raise ValueError(f"aggregate '{self.op}' needs 'of' (a CEL expression such as event.data.value)")
        return self


class Window(StrictModel):
    """State kept per key over event time: which events count, and what is computed of them.

    * tumbling: back-to-back windows of ``size`` seconds (or ``events`` events);
    * hopping: windows of ``size`` seconds starting every ``hop`` seconds (they overlap);
    * sliding: the last ``size`` seconds (or ``events`` events) before each event.
    """

    type: Literal["tumbling", "hopping", "sliding"]
    size: Duration | None = Field(None, description="window length (duration); or give `events`")
    events: int | None = Field(None, ge=1, description="window length in events (tumbling, sliding)")
    hop: Duration | None = Field(None, description="hopping only: how often a new window starts")
    key: Literal["device", "stream"] = Field(
        "device", description="state is kept per device (site/device) or per stream of a device"
    )
    emit: Literal["update", "close"] = Field(
        "update",
        description="update: evaluate `when` on every event; close: once per window when it is complete",
    )
    aggregates: dict[str, Aggregate] = Field(default_factory=dict, description="name -> aggregate")

    @model_validator(mode="after")
    def _consistent(self) -> Window:
        if (self.size is None) == (self.events is None):
            raise ValueError("give exactly one of 'size' (a duration) or 'events' (a count)")
        if self.type == "hopping":
            if self.size is None or self.hop is None:
                raise ValueError("a hopping window needs 'size' and 'hop' (durations)")
            if self.hop > self.size:
                raise ValueError(f"hop ({self.hop:g}s) must not exceed size ({self.size:g}s)")
            if self.size / self.hop > 1000:
                raise ValueError("window too large: size/hop must be at most 1000 overlapping windows")
        elif self.hop is not None:
            raise ValueError(f"'hop' is only for hopping windows, not {self.type}")
        if self.type == "sliding" and self.emit == "close":
            raise ValueError("a sliding window ends at every event: use emit: update")
        if self.size is not None and self.size > MAX_WINDOW_SECONDS:
            raise ValueError(f"window too large: size {self.size:g}s exceeds {MAX_WINDOW_SECONDS:g}s (1 day)")
        if self.events is not None and self.events > MAX_WINDOW_EVENTS:
            raise ValueError(f"window too large: {self.events} events exceeds {MAX_WINDOW_EVENTS}")
        for name in self.aggregates:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"aggregate name {name!r} must be an identifier (letters, digits, _)")
        return self


ArgValue = Any  # a CEL expression (string) or a YAML literal (number, bool, list, map)


class TaskAction(StrictModel):
    """Ask an HPC site to run an app. ``args`` values are CEL expressions (strings) or literals."""

    app: str
    site: str | list[str] | None = Field(
        None, description="site name or preference list; default: the first listed site that has the app"
    )
    args: dict[str, ArgValue] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict, description="cpus, gpus, gpu_model, memory_gb, walltime_s")
    priority: int = 0
    timeout: Duration | None = Field(None, description="give up on the task after this long (duration)")
    retries: int = Field(0, ge=0, le=100)


class CommandAction(StrictModel):
    """Send a command straight to an actuator (signed). ``args`` as for tasks."""

    actuator: Name
    args: dict[str, ArgValue] = Field(default_factory=dict)
    site: Name | None = Field(None, description="default: the site of the triggering event")
    device: Name | None = Field(None, description="default: the device of the triggering event")
    deadline: Duration | None = Field(None, description="not to be executed later than this (duration)")


class Action(StrictModel):
    """One thing a trigger does when it fires: exactly one of ``task`` or ``command``."""

    task: TaskAction | None = None
    command: CommandAction | None = None

    @model_validator(mode="after")
    def _one(self) -> Action:
        if (self.task is None) == (self.command is None):
            raise ValueError("each action is either 'task: {...}' or 'command: {...}'")
        return self


class OnResult(StrictModel):
    """How a finished task's result becomes actuator commands."""

    status: list[Literal["done", "failed", "timed_out", "cancelled"]] = Field(
        ["done"], description="result statuses this applies to"
    )
    when: str | None = Field(None, description="CEL over `result` and `cause`; commands only if true")
    commands: list[CommandAction] = Field(min_length=1)


class Trigger(StrictModel):
    """One trigger: which events, which condition, what to do."""

    name: str
    on: Annotated[
        list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ]
            }
        ),
    ] = Field(min_length=1, description="stream selectors site/device/stream, MQTT wildcards + and #")
    filter: str | None = Field(None, description="CEL over `event`; events where it is false are ignored")
    window: Window | None = None
    when: str = Field(description="CEL over event, agg, window, key: fire when true")
    cooldown: Duration | None = Field(None, description="after firing, stay quiet this long per key (event time)")
    then: list[Action] = Field(min_length=1)
    on_result: OnResult | None = None
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean True.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("on", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "trigger name")


class WorkerSettings(StrictModel):
    """How the trigger worker runs."""

    app_id: str | None = Field(None, description="consumer group of the workers (default: {namespace}-triggers)")
    reload: bool = Field(True, description="watch the file and apply changes while running")
    reload_interval: Duration = 1.0
    session_timeout: Duration = Field(10.0, description="Kafka consumer session timeout")
    commit_interval: Duration = Field(1.0, description="how often processed offsets are committed")
    fetch_wait: Duration = Field(
        0.01,
        ge=0.005,
        le=5.0,
        description="longest a fetch waits at the broker for new records: the worker's added latency on "
        "brokers that poll (Tansu: a median of about a fifth of it per hop); shorter costs more empty "
        "fetches while idle (one per wait). On Apache Kafka or Redpanda, which answer as soon as data "
        "arrives, 500ms costs no latency",
    )
    max_batch: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="most records evaluated together: their requests are acked together and each device's "
        "state is written once for them (larger: fewer round trips; smaller: less to redo after a crash)",
    )
    data_dir: str | None = Field(None, description="no longer used (the faust worker's data directory); ignored")
    single_record_batches: bool = Field(
        True,
        description="no longer used, ignored: state recovery reads the changelog up to a marker record, "
        "which is exact on every broker (Tansu's wrong end offsets included) with batches of any size",
    )


class TriggersFile(StrictModel):
    """The whole ``triggers.yaml``."""

    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings.from_env)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    sites: list[str] = Field(
        default_factory=list, description="HPC site files (relative to this file) whose apps tasks may use"
    )
    streams: list[str] | None = Field(
        None, description="known streams site/device/stream (wildcards allowed); when given, every `on` must match one"
    )
    signing_key_file: str | None = Field(
        None, description="Ed25519 PEM key commands are signed with (else $RX_SIGNING_KEY)"
    )
    command_deadline: Duration = Field(60.0, description="default deadline of commands (duration)")
    triggers: list[Trigger] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> TriggersFile:
        names = [t.name for t in self.triggers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"trigger names must be unique, repeated: {dupes}")
        return self
