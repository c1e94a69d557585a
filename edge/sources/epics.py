"""EPICS process variables as a source: Channel Access monitors (caproto), one event per update.

Each configured PV is subscribed with ``DBR_TIME`` (value, alarm status and
severity, the IOC's own timestamp); on every (re)connection its ``DBR_CTRL``
metadata is read once (units, precision, enum strings, limits) and carried in
the events. The event's time is the IOC's timestamp, not the agent's clock,
so windows and latencies downstream are in the instrument's time.

Per PV: the stream it goes to, an absolute ``deadband`` (an update within it
of the last published value, with the same alarm state, is not published), a
``max_rate_hz`` (updates in between are coalesced: the newest one is
published at the end of the interval, so the last state always arrives) and
``publish_on_connect`` (whether the value a (re)connection brings is an
event).

Connection changes are status events on ``status_stream``
(``{"pv", "state": "connected"|"disconnected", ...}``) and the metrics
``rx_edge_epics_connected{pv}`` and ``rx_edge_epics_disconnects_total{pv}``.
"connected" is published with the first update of a connection (so the
monitor is live when it is seen), "disconnected" when the circuit is lost; a
PV that never answered is reported disconnected after ``connect_timeout_s``.
caproto re-searches a lost PV and re-subscribes by itself; events resume
with the first update after the reconnection.

Event ids are stable: site, device, stream, PV, the IOC timestamp and a digest
of value and alarm state. The value a reconnection repeats (same timestamp,
same value) is the same update and is not published twice, also across agent
restarts (the last published update per PV is the source's checkpoint).

Arrays above the claim-check threshold are stored there and the event
carries the URL (``ref``), dtype and shape; arrays above ``max_array_bytes``
are refused: a dead letter naming the PV, its size and the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from caproto import AlarmSeverity, AlarmStatus
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, field_validator, model_validator

from reflexarc.config import StrictModel
from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id
from reflexarc.topics import check_name

# Seconds between the UNIX epoch and the EPICS epoch (1990-01-01 UTC).
EPICS_EPOCH_OFFSET = 631_152_000


class PvSettings(StrictModel):
    """One monitored PV."""

    pv: str = Field(min_length=1, max_length=200, description="PV name, e.g. BL1:det1:counts")
    stream: str | None = Field(None, description="stream of its events (default: the source's stream)")
    deadband: float | None = Field(
        None, ge=0, description="absolute: updates within this of the last published value are not published"
    )
    max_rate_hz: float | None = Field(
        None, gt=0, le=100_000, description="publish at most this often; the newest update in between is kept"
    )
    publish_on_connect: bool = Field(True, description="publish the value each (re)connection brings")

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "stream")


class EpicsConfig(SourceConfig):
    """``type: epics`` — monitor PVs over Channel Access; one event per published update."""

    type: Literal["epics"] = "epics"
    pvs: list[PvSettings | str] = Field(min_length=1, description="PV names, or {pv, stream, deadband, ...}")
    status_stream: str = Field("epics-status", description="stream of connection status events")
    connect_timeout_s: float = Field(5.0, gt=0, description="a PV not connected after this is reported disconnected")
    request_timeout_s: float = Field(2.0, gt=0, description="timeout of the metadata read on each connection")
    max_array_bytes: int = Field(
        16 << 20,
        ge=1,
        description="larger arrays are refused (dead letter naming the limit); arrays above the claim-check "
        "threshold travel by reference",
    )

    @field_validator("status_stream")
    @classmethod
    def _status_stream(cls, v: str) -> str:
        return check_name(v, "status_stream")

    @model_validator(mode="after")
    def _unique(self) -> EpicsConfig:
        names = [p.pv if isinstance(p, PvSettings) else p for p in self.pvs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"PVs listed twice: {dupes}")
        return self

    def pv_settings(self) -> list[PvSettings]:
        """Every PV as :class:`PvSettings` (plain names take the defaults)."""
        return [p if isinstance(p, PvSettings) else PvSettings(pv=p) for p in self.pvs]


class EpicsMetrics:
    """Connection and update metrics of the epics sources, in the agent's registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, EpicsMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge("rx_edge_epics_connected", "1 while the PV is connected", ["pv"], registry=r)
        self.disconnects = Counter(
            "rx_edge_epics_disconnects", "Times the PV was lost (IOC down, network)", ["pv"], registry=r
        )
        self.updates = Counter("rx_edge_epics_updates", "Monitor updates received", ["pv"], registry=r)
        self.published = Counter("rx_edge_epics_published", "Updates published as events", ["pv"], registry=r)
        self.suppressed = Counter(
            "rx_edge_epics_suppressed",
            "Updates not published (deadband, rate, repeat, on_connect)",
            ["pv", "reason"],
            registry=r,
        )
        self.refused = Counter(
            "rx_edge_epics_refused", "Updates refused (array above max_array_bytes)", ["pv"], registry=r
        )

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> EpicsMetrics:
        """The metrics in ``registry`` (created once per registry; a private one when None)."""
        if registry is None:
            return cls(CollectorRegistry())
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


@dataclass
class PvState:
    """What the source knows about one PV between updates."""

    settings: PvSettings
    stream: str
    connected: bool = False
    ever_connected: bool = False
    monitoring: bool = False  # "connected" was published for this connection: updates flow
    fresh_connection: bool = False
    circuit: Any = None  # caproto's circuit of the last update: a new one means a (re)connection
    meta_circuit: Any = None  # the circuit the metadata was read on
    down_since: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    enum_strings: list[str] | None = None
    last_key: tuple[int, str] | None = None  # (ts_ns, digest) of the last published update
    last_value: float | None = None
    last_alarm: tuple[int, int] | None = None
    last_emit: float = 0.0  # monotonic
    pending: Any = None  # the newest update held back by max_rate_hz
    flush_handle: asyncio.TimerHandle | None = None
    counters: dict[str, Any] = field(default_factory=dict)  # this PV's metric children, looked up once


_STATUS: dict[int, str] = {int(v): v.name for v in AlarmStatus}
_SEVERITY: dict[int, str] = {int(v): v.name for v in AlarmSeverity}


def unix_ns(stamp: Any) -> int:
    """An EPICS ``TimeStamp`` (seconds since 1990, nanoseconds) as UNIX nanoseconds, exactly."""
    return (int(stamp.secondsSinceEpoch) + EPICS_EPOCH_OFFSET) * 1_000_000_000 + int(stamp.nanoSeconds)


def _finite(x: float) -> float | None:
    # JSON has no NaN/Infinity (the fog refuses such payloads): they travel as null.
    return x if math.isfinite(x) else None


def _decode(b: Any) -> Any:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def plain_value(data: Any) -> tuple[Any, int]:
    """A CA response's data as JSON-ready Python: a scalar for one element, else a list; and the count."""
    items = data.tolist() if hasattr(data, "tolist") else list(data)
    items = [_decode(v) for v in items]
    items = [_finite(v) if isinstance(v, float) else v for v in items]
    if len(items) == 1:
        return items[0], 1
    return items, len(items)


def value_digest(data: Any) -> str:
    """A short digest of a value (raw bytes for arrays): part of the update's identity."""
    raw = data.tobytes() if hasattr(data, "tobytes") else repr(list(data)).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


class EpicsSource(Source[EpicsConfig]):
    """Subscribes to the configured PVs and emits their updates (see the module docstring)."""

    config_model = EpicsConfig

    def __init__(self, config: EpicsConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        cfg = config
        self.cfg = cfg
        self.metrics = EpicsMetrics.of(getattr(ctx, "registry", None))
        self.states: dict[str, PvState] = {s.pv: PvState(s, s.stream or cfg.stream) for s in cfg.pv_settings()}
        m = self.metrics
        for pv, st in self.states.items():
            st.counters = {
                "updates": m.updates.labels(pv),
                "published": m.published.labels(pv),
                "refused": m.refused.labels(pv),
                **{r: m.suppressed.labels(pv, r) for r in ("on_connect", "repeat", "deadband", "rate")},
            }
        self._queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        # caproto holds callbacks by weak reference: keep them alive here.
        self._callbacks: list[Callable[..., Any]] = []
        self._pvs: dict[str, Any] = {}
        self._checkpoint: dict[str, list[Any]] = {}

    @property
    def queued(self) -> int:
        """Updates received and not yet handled (grows only while the spool pushes back)."""
        return self._queue.qsize()

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe, and publish updates until cancelled."""
        from caproto.asyncio.client import Context

        # A fresh start (the agent restarts a failed source on the same object): nothing is connected yet.
        self._queue = asyncio.Queue()
        self._callbacks.clear()
        self._pvs.clear()
        for st in self.states.values():
            st.connected = st.monitoring = st.fresh_connection = False
            st.circuit = st.meta_circuit = st.pending = st.flush_handle = None
        if self.ctx.checkpoint:
            with contextlib.suppress(ValueError, TypeError):
                self._checkpoint = dict(json.loads(self.ctx.checkpoint))
        for pv, key in self._checkpoint.items():
            if pv in self.states and isinstance(key, list) and len(key) == 2:
                self.states[pv].last_key = (int(key[0]), str(key[1]))
        context = Context(timeout=self.cfg.request_timeout_s)
        watchdog: asyncio.Task[None] | None = None
        try:
            pvs = await context.get_pvs(*self.states)
            for pv in pvs:
                self._pvs[pv.name] = pv
                name = pv.name

                async def on_conn(pv: Any, state: str, _name: str = name) -> None:
                    self._queue.put_nowait(("conn", _name, state))

                async def on_update(sub: Any, response: Any, _name: str = name) -> None:
                    self._queue.put_nowait(("update", _name, (response, None)))

                self._callbacks += [on_conn, on_update]
                pv.connection_state_callback.add_callback(on_conn, run=True)
                sub = pv.subscribe(data_type="time")
                sub.add_callback(on_update)  # activates the subscription (and re-activates it on reconnect)
                self._take_directly(sub, name)
            watchdog = asyncio.create_task(self._watch_unconnected())
            while True:
                kind, name, payload = await self._queue.get()
                st = self.states[name]
                if kind == "conn":
                    await self._on_connection(st, payload == "connected", emit)
                elif kind == "update":
                    await self._on_update(st, payload, emit)
                elif kind == "flush":
                    await self._flush(st, emit)
                elif kind == "unreachable" and not st.ever_connected:
                    await self._status(st, "disconnected", emit, reason=payload)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for st in self.states.values():
                if st.flush_handle is not None:
                    st.flush_handle.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.disconnect(), 5)

    def _take_directly(self, sub: Any, name: str) -> None:
        """Queue this subscription's updates straight from caproto's circuit loop.

        caproto hands every update to user callbacks through a queue that
        schedules each put with ``run_coroutine_threadsafe``; profiled under a
        fast PV that was the largest cost of the whole agent. The circuit loop
        calls ``Subscription.process(command)`` on this same event loop, so this
        instance's ``process`` queues the update itself, in arrival order (and
        keeps ``most_recent_response``, which caproto reads on reconnect). If
        caproto's internals differ, the callback path above stays in use.
        """
        if not callable(getattr(type(sub), "process", None)) or not hasattr(sub, "most_recent_response"):
            return
        put = self._queue.put_nowait
        pv = sub.pv

        def process(command: Any) -> None:
            sub.most_recent_response = command
            # The update overtakes the connection callback (that one goes through caproto's executor):
            # the circuit it came on says whether it is the first of a (re)connection.
            put(("update", name, (command, pv.circuit_manager)))

        sub.process = process

    async def _watch_unconnected(self) -> None:
        # A PV that never answers (IOC down at start, a typo) must be visible, not just silent.
        await asyncio.sleep(self.cfg.connect_timeout_s)
        for name, st in self.states.items():
            if not st.ever_connected:
                reason = f"no IOC answered for {name} within {self.cfg.connect_timeout_s:g}s"
                self._queue.put_nowait(("unreachable", name, reason))

    # ---- connection -------------------------------------------------------------------
    async def _on_connection(self, st: PvState, up: bool, emit: Emit) -> None:
        """caproto's connection callback. "connected" is published with the monitor's first update."""
        pv = st.settings.pv
        if up:
            if not st.connected:
                st.connected = True
                st.fresh_connection = True
                self.metrics.connected.labels(pv).set(1)
            return
        if not st.connected and not st.monitoring:
            return
        st.connected = st.monitoring = False
        st.down_since = time.time()
        self.metrics.connected.labels(pv).set(0)
        self.metrics.disconnects.labels(pv).inc()
        self.ctx.log.warning("EPICS PV %s disconnected; caproto keeps searching for it", pv)
        await self._status(st, "disconnected", emit, reason="connection lost (IOC stopped or unreachable)")

    async def _monitoring(self, st: PvState, emit: Emit) -> None:
        """The first update of a connection arrived: the monitor is live (so say "connected" now, not before)."""
        await self._metadata_for_circuit(st)
        if st.monitoring:
            return
        st.monitoring = st.ever_connected = True
        if not st.connected:  # the update overtook caproto's connection callback
            st.connected = True
            self.metrics.connected.labels(st.settings.pv).set(1)
        extra: dict[str, Any] = {}
        if st.down_since is not None:
            extra["down_s"] = round(time.time() - st.down_since, 3)
            st.down_since = None
        await self._status(st, "connected", emit, **extra)

    async def _metadata_for_circuit(self, st: PvState) -> None:
        """Read the PV's metadata once per circuit (per connection)."""
        circuit = self._pvs[st.settings.pv].circuit_manager
        if circuit is not None and circuit is st.meta_circuit:
            return
        st.meta_circuit = circuit  # also when the read fails: not once per update
        await self._read_metadata(st)

    async def _read_metadata(self, st: PvState) -> None:
        try:
            ctrl = await self._pvs[st.settings.pv].read(data_type="control", timeout=self.cfg.request_timeout_s)
        except Exception as exc:  # metadata is a nicety: events flow without it
            self.ctx.log.warning("cannot read metadata of %s: %s", st.settings.pv, exc)
            return
        md = ctrl.metadata
        meta: dict[str, Any] = {}
        units = _decode(getattr(md, "units", b""))
        if units:
            meta["units"] = units
        if hasattr(md, "precision"):
            meta["precision"] = int(md.precision)
        enum_strings = getattr(md, "enum_strings", None)
        st.enum_strings = [_decode(s) for s in enum_strings] if enum_strings else None
        st.meta = meta

    async def _status(self, st: PvState, state: str, emit: Emit, **extra: Any) -> None:
        now = time.time()
        data = {"pv": st.settings.pv, "state": state, "at": now, **extra}
        digest = stable_id(st.settings.pv, state, repr(now))
        await emit(
            Reading(
                self.cfg.status_stream,
                data,
                id=stable_id(self.ctx.site, self.ctx.device, self.cfg.status_stream, digest),
            )
        )

    # ---- updates ------------------------------------------------------------------------
    async def _on_update(self, st: PvState, payload: tuple[Any, Any], emit: Emit) -> None:
        s = st.settings
        response, circuit = payload
        st.counters["updates"].inc()
        if circuit is None:  # the callback path: the connection event came first
            first = st.fresh_connection
        else:
            first, st.circuit = circuit is not st.circuit, circuit
        st.fresh_connection = False
        if first:
            await self._monitoring(st, emit)
        key = (unix_ns(response.metadata.stamp), value_digest(response.data))
        if first and not s.publish_on_connect:
            # Not an event, and neither is a repeat of it (a subscription activated twice repeats it).
            self._remember(st, response, plain_value(response.data)[0])
            st.last_key = key
            st.counters["on_connect"].inc()
            return
        if key == st.last_key:
            # The value a reconnection (or an agent restart) repeats: published already.
            st.counters["repeat"].inc()
            return
        if s.deadband is not None and self._within_deadband(st, response):
            st.counters["deadband"].inc()
            return
        if s.max_rate_hz is not None:
            wait = st.last_emit + 1.0 / s.max_rate_hz - time.monotonic()
            if wait > 0:
                if st.pending is not None:
                    st.counters["rate"].inc()
                st.pending = response
                if st.flush_handle is None:
                    loop = asyncio.get_running_loop()
                    st.flush_handle = loop.call_later(wait, self._queue.put_nowait, ("flush", s.pv, None))
                return
        await self._publish(st, response, key, emit)

    async def _flush(self, st: PvState, emit: Emit) -> None:
        st.flush_handle = None
        response, st.pending = st.pending, None
        if response is not None:
            key = (unix_ns(response.metadata.stamp), value_digest(response.data))
            await self._publish(st, response, key, emit)

    def _within_deadband(self, st: PvState, response: Any) -> bool:
        value, count = plain_value(response.data)
        alarm = (int(response.metadata.status), int(response.metadata.severity))
        if count != 1 or not isinstance(value, int | float) or st.last_value is None:
            return False
        if alarm != st.last_alarm:
            return False  # an alarm change always goes out
        return abs(float(value) - st.last_value) <= (st.settings.deadband or 0.0)

    @staticmethod
    def _remember(st: PvState, response: Any, value: Any) -> None:
        st.last_value = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        st.last_alarm = (int(response.metadata.status), int(response.metadata.severity))

    async def _publish(self, st: PvState, response: Any, key: tuple[int, str], emit: Emit) -> None:
        s = st.settings
        md = response.metadata
        ts_ns = key[0]
        event_id = stable_id(self.ctx.site, self.ctx.device, st.stream, s.pv, str(ts_ns), key[1])
        data: dict[str, Any] = {"pv": s.pv}
        raw = response.data
        count = len(raw)
        value: Any = None
        if count > 1:
            nbytes = int(getattr(raw, "nbytes", 0)) or len(repr(raw))
            if nbytes > self.cfg.max_array_bytes:
                st.counters["refused"].inc()
                await self.ctx.reject(
                    f"EPICS PV {s.pv}: array of {count} elements ({nbytes} bytes) exceeds max_array_bytes="
                    f"{self.cfg.max_array_bytes} of the epics source; not published (raise max_array_bytes, or "
                    f"monitor fewer elements)",
                    f"epics:{s.pv}",
                    b"",
                )
                self._advance(st, response, key, None)
                return
            if hasattr(raw, "tobytes") and self.ctx.claim_check.should_reference(nbytes):
                blob = raw.tobytes()
                data["ref"] = await self.ctx.claim_check.put(f"{st.stream}/{event_id}.bin", blob)
                data["dtype"] = str(raw.dtype)
                data["shape"] = list(raw.shape)
                data["size"] = nbytes
                data["sha256"] = hashlib.sha256(blob).hexdigest()
        if "ref" not in data:
            value, _ = plain_value(raw)
            data["value"] = value
            if count > 1:
                data["count"] = count
            if st.enum_strings is not None and isinstance(value, int) and 0 <= value < len(st.enum_strings):
                data["enum"] = st.enum_strings[value]
        data["timestamp"] = ts_ns / 1e9
        data["ts_ns"] = ts_ns
        data["status"] = _STATUS.get(int(md.status), str(md.status))
        data["severity"] = _SEVERITY.get(int(md.severity), str(md.severity))
        data.update(st.meta)
        self._advance(st, response, key, value)
        self._checkpoint[s.pv] = [key[0], key[1]]
        await emit(
            Reading(
                st.stream,
                data,
                id=event_id,
                time=datetime.fromtimestamp(ts_ns / 1e9, UTC),
                checkpoint=json.dumps(self._checkpoint, separators=(",", ":")),
            )
        )
        st.counters["published"].inc()

    def _advance(self, st: PvState, response: Any, key: tuple[int, str], value: Any) -> None:
        st.last_key = key
        st.last_emit = time.monotonic()
        self._remember(st, response, value)
