"""Stream shaping: how a stream's events become Kafka records.

Each shaper keeps per-(device, stream) state, so a device's order is kept and
one device never delays another's records beyond the configured window.
A shaper that buffers events holds their MQTT tickets until the record that
carries them is durable in Kafka, so a crash with events in a buffer loses
nothing: the broker redelivers them. The price is that acknowledgements wait
for the window: keep ``receive_maximum`` above events-per-window of the
busiest stream, or the broker pauses the stream until the window closes.

Record formats (all CloudEvents, keyed ``site/device``):

* batch: type ``io.reflexarc.data.batch``, subject = stream, data
  ``{"stream", "count", "events": [{"id", "type", "time", "data" | "data_base64"}]}``.
* aggregate: type ``io.reflexarc.data`` with extension ``shape=aggregate``,
  data ``{"count", "window_start", "window_end", "<stat>": {"<field>": value}}``.
* downsample and passthrough: the events themselves.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from reflexarc.envelope import Envelope, EventType
from reflexarc.events import stable_id
from reflexarc.fog.config import ShapeSettings
from reflexarc.fog.sender import AckQueue, Ticket

BATCH_TYPE = f"{EventType.DATA.value}.batch"
AGGREGATE_SHAPE = "aggregate"

# (site, device, stream)
Key = tuple[str, str, str]
Emit = Callable[[Envelope, list[Ticket]], Awaitable[None]]


def _iso(env: Envelope) -> str:
    text = env.time.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class Shaper:
    """Base: passthrough. ``add`` takes an event whose ticket the caller still holds."""

    def __init__(self, settings: ShapeSettings, emit: Emit, acks: AckQueue) -> None:
        self.settings = settings
        self.emit = emit
        self.acks = acks

    async def add(self, key: Key, env: Envelope, ticket: Ticket) -> bool:
        """Take one event; return False when it was dropped on purpose (downsampling)."""
        self.acks.hold(ticket)
        await self.emit(env, [ticket])
        return True

    async def tick(self, now: float) -> None:
        """Close windows that are due (called periodically)."""

    async def flush_all(self) -> None:
        """Close every open window (at shutdown)."""

    def tick_interval(self) -> float | None:
        """How often :meth:`tick` should run, in seconds; ``None`` if never."""
        return None


@dataclass(slots=True)
class _Batch:
    start: float
    events: list[Envelope] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    size: int = 0


class BatchShaper(Shaper):
    """``max_events`` events or ``max_ms`` of one device and stream in one record."""

    #: keep a batch well under Kafka's default 1 MiB request limit
    max_bytes = 512 * 1024

    def __init__(self, settings: ShapeSettings, emit: Emit, acks: AckQueue) -> None:
        super().__init__(settings, emit, acks)
        self._open: dict[Key, _Batch] = {}

    async def add(self, key: Key, env: Envelope, ticket: Ticket) -> bool:
        """Append to the device's open batch; close it when full."""
        b = self._open.get(key)
        if b is None:
            b = self._open[key] = _Batch(time.monotonic())
        self.acks.hold(ticket)
        b.events.append(env)
        b.tickets.append(ticket)
        b.size += len(ticket.msg.payload) if ticket.msg is not None else 256
        if len(b.events) >= self.settings.max_events or b.size >= self.max_bytes:
            await self._close(key)
        return True

    async def _close(self, key: Key) -> None:
        b = self._open.pop(key, None)
        if b is None or not b.events:
            return
        site, device, stream = key
        events = []
        for e in b.events:
            item: dict[str, Any] = {"id": e.id, "type": e.type, "time": _iso(e)}
            if isinstance(e.data, bytes):
                item["data_base64"] = base64.b64encode(e.data).decode()
            else:
                item["data"] = e.data
            events.append(item)
        first, last = b.events[0], b.events[-1]
        env = Envelope.for_device(
            BATCH_TYPE,
            site,
            device,
            {"stream": stream, "count": len(events), "events": events},
            subject=stream,
            id=stable_id("batch", first.id, last.id, str(len(events))),
            time=last.time,
        )
        await self.emit(env, b.tickets)

    async def tick(self, now: float) -> None:
        """Close batches older than ``max_ms``."""
        limit = self.settings.max_ms / 1000.0
        for key in [k for k, b in self._open.items() if now - b.start >= limit]:
            await self._close(key)

    async def flush_all(self) -> None:
        """Close every batch."""
        for key in list(self._open):
            await self._close(key)

    def tick_interval(self) -> float | None:
        """A quarter of the batch window, within 5-250 ms."""
        return min(max(self.settings.max_ms / 4000.0, 0.005), 0.25)


class DownsampleShaper(Shaper):
    """Keep one event in ``every`` and/or at most one per ``interval_ms``, per device and stream."""

    def __init__(self, settings: ShapeSettings, emit: Emit, acks: AckQueue, on_drop: Callable[[], None]) -> None:
        super().__init__(settings, emit, acks)
        self._count: dict[Key, int] = {}
        self._last: dict[Key, float] = {}
        self._on_drop = on_drop

    async def add(self, key: Key, env: Envelope, ticket: Ticket) -> bool:
        """Forward the event if it is one to keep; else drop it (it is still acknowledged)."""
        n = self._count.get(key, 0)
        self._count[key] = n + 1
        keep = n % self.settings.every == 0
        if keep and self.settings.interval_ms is not None:
            now = time.monotonic()
            last = self._last.get(key)
            keep = last is None or (now - last) * 1000.0 >= self.settings.interval_ms
            if keep:
                self._last[key] = now
        if not keep:
            self._on_drop()
            return False
        return await super().add(key, env, ticket)


@dataclass(slots=True)
class _Window:
    start: float
    first: Envelope
    last: Envelope
    count: int = 0
    n: dict[str, int] = field(default_factory=dict)
    sum: dict[str, float] = field(default_factory=dict)
    min: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    firstv: dict[str, float] = field(default_factory=dict)
    lastv: dict[str, float] = field(default_factory=dict)
    tickets: list[Ticket] = field(default_factory=list)


def _numbers(data: Any, fields: list[str] | None) -> dict[str, float]:
    if not isinstance(data, dict):
        return {}
    names = fields if fields is not None else list(data)
    out = {}
    for name in names:
        v = data.get(name)
        # bool is an int in Python but not a measurement.
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = float(v)
    return out


class AggregateShaper(Shaper):
    """Per ``window_ms`` (or ``max_events``), one record of ``stats`` over numeric fields."""

    async def add(self, key: Key, env: Envelope, ticket: Ticket) -> bool:
        """Fold the event into its device's window; close the window when full."""
        w = self._open.get(key)
        if w is None:
            w = self._open[key] = _Window(time.monotonic(), env, env)
        self.acks.hold(ticket)
        w.tickets.append(ticket)
        w.count += 1
        w.last = env
        for name, v in _numbers(env.data, self.settings.fields).items():
            if name not in w.n:
                w.n[name] = 0
                w.sum[name] = 0.0
                w.min[name] = v
                w.max[name] = v
                w.firstv[name] = v
            w.n[name] += 1
            w.sum[name] += v
            w.min[name] = min(w.min[name], v)
            w.max[name] = max(w.max[name], v)
            w.lastv[name] = v
        if w.count >= self.settings.max_events:
            await self._close(key)
        return True

    def __init__(self, settings: ShapeSettings, emit: Emit, acks: AckQueue) -> None:
        super().__init__(settings, emit, acks)
        self._open: dict[Key, _Window] = {}

    async def _close(self, key: Key) -> None:
        w = self._open.pop(key, None)
        if w is None:
            return
        site, device, stream = key
        data: dict[str, Any] = {
            "count": w.count,
            "window_start": _iso(w.first),
            "window_end": _iso(w.last),
        }
        for stat in self.settings.stats:
            if stat == "mean":
                data["mean"] = {k: w.sum[k] / w.n[k] for k in w.n}
            elif stat == "sum":
                data["sum"] = dict(w.sum)
            elif stat == "min":
                data["min"] = dict(w.min)
            elif stat == "max":
                data["max"] = dict(w.max)
            elif stat == "first":
                data["first"] = dict(w.firstv)
            elif stat == "last":
                data["last"] = dict(w.lastv)
        env = Envelope.for_device(
            EventType.DATA,
            site,
            device,
            data,
            subject=stream,
            id=stable_id("aggregate", w.first.id, w.last.id, str(w.count)),
            time=w.last.time,
            extensions={"shape": AGGREGATE_SHAPE},
        )
        await self.emit(env, w.tickets)

    async def tick(self, now: float) -> None:
        """Close windows older than ``window_ms``."""
        limit = self.settings.window_ms / 1000.0
        for key in [k for k, w in self._open.items() if now - w.start >= limit]:
            await self._close(key)

    async def flush_all(self) -> None:
        """Close every window."""
        for key in list(self._open):
            await self._close(key)

    def tick_interval(self) -> float | None:
        """A tenth of the window, within 5-250 ms."""
        return min(max(self.settings.window_ms / 10_000.0, 0.005), 0.25)


def make_shaper(settings: ShapeSettings, emit: Emit, acks: AckQueue, on_drop: Callable[[], None]) -> Shaper:
    """The shaper for a stream's ``shape`` settings."""
    if settings.mode == "batch":
        return BatchShaper(settings, emit, acks)
    if settings.mode == "downsample":
        return DownsampleShaper(settings, emit, acks, on_drop)
    if settings.mode == "aggregate":
        return AggregateShaper(settings, emit, acks)
    return Shaper(settings, emit, acks)
