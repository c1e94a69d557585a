"""Instrument sources: a small plugin interface, found through the ``reflexarc.sources`` entry points.

A source is a class with a pydantic ``config_model`` (a :class:`SourceConfig`
whose ``type`` names the plugin) and an ``async run(emit)`` that produces
:class:`Reading` objects until it is done or cancelled. ``emit`` returns once
the reading is queued for the spool (it blocks when the spool applies
backpressure). A reading may carry a ``checkpoint``: the spool stores it in
the same transaction as the event, and the source gets the last stored value
back on restart (``ctx.checkpoint``), so a source that resumes from its
checkpoint never loses or repeats what the spool accepted, even after
``kill -9``.

Third-party sources register in their own package::

    [project.entry-points."reflexarc.sources"]
    camera = "mypkg.camera:CameraSource"
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic

from pydantic import Field, field_validator
from typing_extensions import TypeVar

from reflexarc.config import StrictModel
from reflexarc.topics import check_name

ENTRY_POINT_GROUP = "reflexarc.sources"

# The built-ins, also declared as entry points in pyproject.toml; listed here so
# they work from a source checkout that was never pip-installed.
BUILTIN_SOURCES: dict[str, str] = {
    "simulated": "reflexarc.edge.sources.simulated:SimulatedSource",
    "frames": "reflexarc.edge.sources.frames:FrameSource",
    "replay": "reflexarc.edge.sources.replay:ReplaySource",
    "directory": "reflexarc.edge.sources.directory:DirectorySource",
    "lines": "reflexarc.edge.sources.lines:LineSource",
    "epics": "reflexarc.edge.sources.epics:EpicsSource",
    "bluesky": "reflexarc.edge.bluesky:BlueskySource",
}


class SourceConfig(StrictModel):
    """Fields every source has; plugins subclass it with ``type: Literal["name"]``."""

    type: str
    stream: str = Field(description="stream name: the last level of the data topic")

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str) -> str:
        return check_name(v, "stream")


@dataclass(slots=True)
class Reading:
    """One instrument event on its way into the spool."""

    stream: str
    data: dict[str, Any] | bytes
    id: str | None = None
    time: datetime | None = None
    checkpoint: str | None = None


async def _no_reject(error: str, origin: str, payload: bytes) -> None:
    raise ValueError(error)


@dataclass(slots=True)
class SourceContext:
    """What the agent gives a source: who it is, where it resumes, where big payloads go.

    ``reject(error, origin, payload)`` records input the source could not turn
    into an event (a bad line, an unreadable file) as a dead letter on the
    device, counted in metrics, instead of stopping the source. ``flush()``
    waits until everything emitted so far is committed to the spool.
    """

    site: str
    device: str
    checkpoint: str | None
    claim_check: Any  # reflexarc.edge.claimcheck.ClaimCheck (kept loose to avoid a cycle)
    base_dir: Path = field(default_factory=Path)
    reject: Callable[[str, str, bytes], Awaitable[None]] = _no_reject
    flush: Callable[[], Awaitable[None]] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("reflexarc.edge.source"))
    # The agent's prometheus_client CollectorRegistry, where a source may add its own metrics (None: not served).
    registry: Any = None

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


Emit = Callable[[Reading], Awaitable[None]]
# The default keeps a bare ``Source`` meaning "any source" (PEP 696, through typing_extensions on 3.11).
ConfigT = TypeVar("ConfigT", bound=SourceConfig, default=SourceConfig)


class Source(ABC, Generic[ConfigT]):
    """Base class of sources; ``Source[MyConfig]`` types ``self.config`` as the plugin's own model."""

    config_model: ClassVar[type[SourceConfig]]

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        self.config: ConfigT = config
        self.ctx = ctx

    @property
    def checkpoint_key(self) -> str:
        """Key of this source's checkpoint in the spool."""
        return f"{self.config.type}:{self.config.stream}"

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Produce readings through ``emit`` until done (return) or cancelled."""


def _load(ref: str) -> type[Source]:
    module, _, attr = ref.partition(":")
    obj = getattr(import_module(module), attr)
    if not (isinstance(obj, type) and issubclass(obj, Source)):
        raise LookupError(f"{ref} is not a reflexarc.edge.sources.Source subclass")
    return obj


def available_sources() -> dict[str, str]:
    """Plugin name -> ``module:Class`` for the built-ins and every installed entry point."""
    found = dict(BUILTIN_SOURCES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def source_class(name: str) -> type[Source]:
    """The source class registered as ``name``; :class:`LookupError` naming the choices if none."""
    refs = available_sources()
    if name not in refs:
        raise LookupError(
            f"unknown source type {name!r}; available: {', '.join(sorted(refs))} "
            f"(plugins register in the {ENTRY_POINT_GROUP!r} entry-point group)"
        )
    return _load(refs[name])
