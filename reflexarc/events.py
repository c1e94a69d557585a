"""Typed payloads of the events tiers exchange: the contract between tiers.

Each model turns into an :class:`~reflexarc.envelope.Envelope` with a stable
id (so every retry deduplicates) and back. Tiers never build these payload
dicts by hand.

=================  ==========================  ===============================
event type          id                          Kafka topic / MQTT topic
=================  ==========================  ===============================
TaskRequest        the task id                 ``rx.tasks.{hpc_site}``
TaskResult         ``{task_id}.result``        ``rx.results``
JobState           ``{task_id}.{seq}``         ``rx.jobs``
Command            the command id              ``rx.commands`` -> ``rx/{site}/{device}/cmd``
CommandAck         ``{command_id}.ack``        ``rx/{site}/{device}/ack`` -> ``rx.acks``
CommandStatus      ``{command_id}.{status}``   ``rx.acks``
Receipt            hash of the ids             ``rx/{site}/{device}/receipt`` (fog -> edge, MQTT only)
=================  ==========================  ===============================
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reflexarc.envelope import Envelope, EnvelopeError, EventType, ack_event_id, utcnow

PIPELINE_SOURCE = "/reflexarc"


def stable_id(*parts: str) -> str:
    """A deterministic id from its causes: the same causes always give the same id."""
    h = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return h[:32]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[EventType]

    def _envelope(
        self, id: str, source: str, ext: dict[str, str] | None = None, subject: str | None = None
    ) -> Envelope:
        return Envelope(
            type=self.event_type.value,
            source=source,
            data=self.model_dump(mode="json"),
            id=id,
            subject=subject,
            extensions=ext or {},
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> Self:
        """Read the payload of an event of this type; :class:`EnvelopeError` if it does not fit."""
        if env.type != cls.event_type.value:
            raise EnvelopeError(f"expected a {cls.event_type.value} event, got {env.type}")
        if not isinstance(env.data, dict):
            raise EnvelopeError(f"{cls.__name__} data must be a JSON object")
        try:
            return cls.model_validate(env.data)
        except ValidationError as exc:
            raise EnvelopeError(
                f"invalid {cls.__name__}: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
            ) from None


class Cause(BaseModel):
    """The instrument event(s) that made a trigger fire."""

    event_ids: list[str]
    site: str | None = None
    device: str | None = None
    stream: str | None = None
    time: datetime | None = Field(None, description="event time of the (last) triggering event")


class Resources(BaseModel):
    """What a task needs; the HPC site decides where that is."""

    cpus: int = Field(1, ge=1)
    gpus: int = Field(0, ge=0)
    gpu_model: str | None = None
    memory_gb: float | None = Field(None, gt=0)
    walltime_s: float | None = Field(None, gt=0)


class TaskRequest(_Payload):
    """A trigger asks an HPC site to run an app."""

    event_type: ClassVar[EventType] = EventType.TASK_REQUEST
    task_id: str
    app: str
    args: dict[str, Any] = Field(default_factory=dict)
    site: str = Field(description="HPC site that should run it")
    resources: Resources = Field(default_factory=Resources)
    priority: int = 0
    timeout_s: float | None = Field(None, gt=0)
    retries: int = Field(0, ge=0)
    trigger: str | None = None
    cause: Cause | None = None
    depends_on: list[str] = Field(default_factory=list)

    def to_envelope(self) -> Envelope:
        """The event; its id is the task id."""
        return self._envelope(self.task_id, f"{PIPELINE_SOURCE}/triggers/{self.trigger or 'api'}", subject=self.app)


class TaskResult(_Payload):
    """What became of a task (once, at its end)."""

    event_type: ClassVar[EventType] = EventType.TASK_RESULT
    task_id: str
    app: str
    site: str
    status: Literal["done", "failed", "timed_out", "cancelled"]
    result: dict[str, Any] | None = None
    result_ref: str | None = Field(None, description="URL of a large result (claim check, readable with fsspec)")
    error: str | None = None
    attempts: int = 1
    trigger: str | None = None
    cause: Cause | None = None
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    machine: str | None = Field(None, description="where it ran (node, composed machine)")

    def to_envelope(self) -> Envelope:
        """The event; one result per task, so its id derives from the task id."""
        return self._envelope(f"{self.task_id}.result", f"{PIPELINE_SOURCE}/sites/{self.site}", subject=self.app)


class JobState(_Payload):
    """One transition of a job's state machine, with the reason."""

    event_type: ClassVar[EventType] = EventType.JOB_STATE
    task_id: str
    site: str
    state: str
    previous: str | None = None
    reason: str = ""
    seq: int = 0
    attempt: int = 1
    at: datetime = Field(default_factory=utcnow)
    machine: str | None = None

    def to_envelope(self) -> Envelope:
        """The event; ``seq`` numbers the transitions of one task."""
        return self._envelope(f"{self.task_id}.{self.seq}", f"{PIPELINE_SOURCE}/sites/{self.site}", subject=self.state)


class Command(_Payload):
    """An instruction for one actuator on one device."""

    event_type: ClassVar[EventType] = EventType.COMMAND
    command_id: str
    site: str
    device: str
    actuator: str
    args: dict[str, Any] = Field(default_factory=dict)
    deadline: datetime | None = Field(None, description="not to be executed after this time")
    task_id: str | None = None
    trigger: str | None = None
    cause: Cause | None = None

    def to_envelope(self) -> Envelope:
        """The event, addressed to its device (``site``/``device`` extensions)."""
        return self._envelope(
            self.command_id,
            f"{PIPELINE_SOURCE}/triggers/{self.trigger or 'api'}",
            {"site": self.site, "device": self.device},
            subject=self.actuator,
        )


class CommandAck(_Payload):
    """A device's answer to a command: executed (ok) or refused/failed, and why."""

    event_type: ClassVar[EventType] = EventType.COMMAND_ACK
    command_id: str
    site: str
    device: str
    actuator: str | None = None
    ok: bool
    result: dict[str, Any] | None = None
    reason: str | None = None
    at: datetime = Field(default_factory=utcnow)

    def to_envelope(self) -> Envelope:
        """The event; one answer per command id."""
        return Envelope.for_device(
            self.event_type,
            self.site,
            self.device,
            self.model_dump(mode="json"),
            id=ack_event_id(self.command_id),
            subject=self.actuator,
        )


class CommandStatus(_Payload):
    """The fog bridge's account of a command's delivery."""

    event_type: ClassVar[EventType] = EventType.COMMAND_STATUS
    command_id: str
    site: str
    device: str
    status: Literal["delivered", "acked", "rejected", "expired", "failed"]
    reason: str = ""
    attempts: int = 1
    at: datetime = Field(default_factory=utcnow)

    def to_envelope(self) -> Envelope:
        """The event; one per command and status."""
        return self._envelope(
            f"{self.command_id}.{self.status}",
            f"{PIPELINE_SOURCE}/fog",
            {"site": self.site, "device": self.device},
        )


class Receipt(_Payload):
    """The fog's confirmation to one device that Kafka durably holds some of its events.

    Sent on ``{ns}/{site}/{device}/receipt`` only after Kafka acknowledged
    (``acks=all``) every event named in ``ids``. An edge agent with
    ``delivery: pipeline`` frees its spool rows on a receipt, not on the MQTT
    PUBACK, because a broker with a bounded session queue may drop a message
    it already acknowledged. Receipts are batched (many ids per message) and
    may be lost or repeated: the device re-sends what stays unconfirmed and
    the fog deduplicates by event id, then confirms again.
    """

    event_type: ClassVar[EventType] = EventType.RECEIPT
    site: str
    device: str
    ids: list[str] = Field(description="event ids of this device that Kafka now holds")

    def to_envelope(self) -> Envelope:
        """The event, addressed to its device (``site``/``device`` extensions)."""
        return self._envelope(
            stable_id(self.site, self.device, *self.ids),
            f"{PIPELINE_SOURCE}/fog",
            {"site": self.site, "device": self.device},
        )


class SiteApp(BaseModel):
    """What a site offers for one app: its resources and a fingerprint of its definition."""

    model_config = ConfigDict(extra="ignore")
    cpus: int = 1
    gpus: int = 0
    gpu_model: str | None = None
    memory_gb: float | None = None
    #: changes whenever the app's definition in site.yaml changes (validation can tell stale catalogues)
    fingerprint: str = ""


class SiteStatus(_Payload):
    """A site agent's heartbeat: what it offers, what waits and what it can still take.

    Published every ``presence.interval_s`` to the compacted ``{ns}.sites``
    topic, keyed by site, and once more (``state: stopped``) when the agent
    stops. A site is live while its heartbeats are fresh: see
    :func:`reflexarc.sites.site_views`.
    """

    event_type: ClassVar[EventType] = EventType.SITE_STATUS
    site: str
    state: Literal["running", "stopped"] = "running"
    at: datetime = Field(default_factory=utcnow)
    #: seconds between heartbeats (readers judge staleness by it)
    interval_s: float
    engine: str
    #: tasks taken and waiting for a slot, and tasks handed to the engine
    queued: int = 0
    running: int = 0
    #: worker slots the engine has, and those free now
    slots: int = 0
    free_slots: int = 0
    cpus: int | None = None
    gpus: int | None = None
    apps: dict[str, SiteApp] = Field(default_factory=dict)

    def to_envelope(self) -> Envelope:
        """The event (one id per heartbeat)."""
        return self._envelope(
            stable_id(self.site, self.state, self.at.isoformat()),
            f"{PIPELINE_SOURCE}/site/{self.site}",
            {"site": self.site},
        )
