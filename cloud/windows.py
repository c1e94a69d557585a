"""Window state over event time, as plain JSON data (so a changelog can hold and replay it).

A window's state is a dict that :meth:`WindowKeeper.add_event` updates in place
and that survives JSON round trips unchanged. Time is event time in epoch
seconds, so the same events always give the same windows, whatever the wall
clock and however often a worker restarts.

* Time panes (tumbling = hopping with ``hop == size``): ``panes`` holds the
  open windows ``[start, start + size)``; ``hi`` is the latest event time seen.
  A pane closes when an event at or after its end arrives. An event older
  than every open pane is *late* and ignored (counted by the caller).
* Count panes (tumbling by ``events``): one pane of at most N events; ``lo`` is
  the first event time of the last closed pane: older events are late.
* Sliding: the samples within ``[hi - size, hi]`` (or the last N events: an
  event older than all of a full window's N is late), column by column: their
  times ``ts`` and one list of values per aggregate in ``cols``.

**Each event id is applied at most once.** ``ids`` maps the id of every event
applied to the window, for as long as a copy of it could still be applied, to
``[event time, hash of the event]``. A copy of a remembered id is a
*duplicate* (a fog or broker redelivery) and changes nothing; a copy with
another hash is a device reusing an id for different data, a *conflict*, and
changes nothing either. How long is "could still be applied" depends on the
window: an id is forgotten once an event at its time would be late anyway
(time windows: older than every open pane; sliding: older than ``hi - size``
or than the oldest of a full window's N events; count windows: older than the
window before the current one). So the memory holds about one window of ids
(two for count windows), and is pruned when it doubles. A hard cap,
:data:`MAX_REMEMBERED_IDS`, bounds it whatever the window: beyond it the
oldest quarter is forgotten and ``floor`` marks their time, below which every
event is late - so no copy of a forgotten id is ever applied.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from reflexarc.cloud.model import MAX_SLIDING_SAMPLES, Window

# Ids remembered per window state at most (see the module docstring). The state travels
# in one changelog record, so it must stay well under a Kafka record's 1 MB default.
MAX_REMEMBERED_IDS = 10_000
# A new id is a new event; a remembered id with the same hash a duplicate; with another, a conflict.
NEW, DUPLICATE, CONFLICT = 0, 1, 2
# Time panes: ids older than ``hi - size`` by this margin are surely late (pane bounds are rounded to 1e-9).
_PANE_MARGIN = 1e-6


class Pane:
    """A window as the condition sees it: bounds, counts and aggregate values."""

    __slots__ = (
        "count",
        "end",
        "first_event_id",
        "first_time",
        "last_event",
        "last_event_id",
        "last_time",
        "start",
        "values",
    )

    def __init__(
        self,
        start: float,
        end: float,
        count: int,
        first_time: float | None,
        last_time: float | None,
        values: dict[str, Any],
        last_event: dict[str, Any] | None = None,
        first_event_id: str | None = None,
        last_event_id: str | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self.count = count
        self.first_time = first_time
        self.last_time = last_time
        self.values = values
        self.last_event = last_event
        self.first_event_id = first_event_id
        self.last_event_id = last_event_id

    def variables(self) -> dict[str, Any]:
        """The ``window`` variable of CEL (times as epoch seconds; the engine converts)."""
        span = (self.last_time - self.first_time) if self.first_time is not None and self.last_time is not None else 0.0
        return {
            "start": self.start,
            "end": self.end,
            "count": self.count,
            "span": float(span),
            "first_time": self.first_time,
            "last_time": self.last_time,
        }


class Update:
    """What one event did to a window: panes to evaluate now, and whether it was late."""

    __slots__ = ("closed", "current", "late")

    def __init__(self, current: list[Pane] | None = None, closed: list[Pane] | None = None, late: bool = False) -> None:
        self.current = [] if current is None else current
        self.closed = [] if closed is None else closed
        self.late = late


_LATE = Update(late=True)


# ---- accumulators ---------------------------------------------------------------
def _new_acc() -> dict[str, Any]:
    return {"n": 0}


def _add(acc: dict[str, Any], op: str, t: float, v: Any) -> None:
    acc["n"] += 1
    if op in ("sum", "mean"):
        acc["s"] = acc.get("s", 0.0) + v
    elif op == "min":
        acc["m"] = v if "m" not in acc else min(acc["m"], v)
    elif op == "max":
        acc["m"] = v if "m" not in acc else max(acc["m"], v)
    elif op == "first":
        if "t" not in acc or t < acc["t"]:
            acc["v"], acc["t"] = v, t
    elif op == "last":
        if "t" not in acc or t >= acc["t"]:
            acc["v"], acc["t"] = v, t
    elif op == "rate":
        if "ft" not in acc or t < acc["ft"]:
            acc["fv"], acc["ft"] = v, t
        if "lt" not in acc or t >= acc["lt"]:
            acc["lv"], acc["lt"] = v, t


def _value(acc: dict[str, Any], op: str) -> Any:
    n = acc["n"]
    if op == "count":
        return n
    if n == 0:
        return None
    if op == "sum":
        return acc["s"]
    if op == "mean":
        return acc["s"] / n
    if op in ("min", "max"):
        return acc["m"]
    if op in ("first", "last"):
        return acc["v"]
    if op == "rate":
        dt = acc["lt"] - acc["ft"]
        # One sample (or all at one instant) has no slope: report no change.
        return (acc["lv"] - acc["fv"]) / dt if dt > 0 else 0.0
    raise ValueError(f"unknown aggregate {op}")


def _rate(times: list[float], col: list[Any]) -> Any:
    dt = times[-1] - times[0]
    return (col[-1] - col[0]) / dt if dt > 0 else 0.0


# One Python expression per aggregate of a sliding window (``ts``: its times, ``cols[i]``: its values,
# time order), giving what _add over them gives: the C builtins fold in the same order (sum from 0.0
# left to right; min/max keep the earliest of equals), without a Python loop per sample.
_COLUMN_CODE = {
    "count": "len(ts)",
    "sum": "sum({c}, 0.0)",
    "mean": "sum({c}, 0.0) / len(ts)",
    "min": "min({c})",
    "max": "max({c})",
    "first": "{c}[0]",
    "last": "{c}[-1]",
    "rate": "_rate(ts, {c})",
}


def _column_aggregates(ops: list[tuple[str, str]]) -> Any:
    """``f(ts, cols) -> {name: value}`` for a sliding window's aggregates, as one generated expression.

    One expression, so no call per aggregate (evaluated on every event).
    Names are identifiers (checked at load) and enter only as string
    literals; operations come from the fixed table above.
    """
    items = ", ".join(f"{name!r}: {_COLUMN_CODE[op].format(c=f'cols[{i}]')}" for i, (name, op) in enumerate(ops))
    return eval(f"lambda ts, cols: {{{items}}}", {"_rate": _rate})


def _numeric(op: str, name: str, v: Any) -> Any:
    if op in ("sum", "mean", "min", "max", "rate"):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"aggregate {name!r} ({op}) needs a number, got {type(v).__name__} {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise TypeError(f"aggregate {name!r} ({op}) got {v!r}")
    return v


_Slide = Callable[[dict[str, Any], float, list[Any], str, int], dict[str, Any] | None]


def _sliding_code(
    ops: list[tuple[str, str]],
    size: float | None,
    n_max: int,
    prune: Callable[[dict[str, Any], dict[str, list[Any]]], None],
) -> _Slide:
    """:meth:`WindowKeeper.slide` for one sliding window, as one generated function without loops.

    The steps and their order are those of :meth:`WindowKeeper.slide` (the
    readable reference, which ``test_cloud_sliding_fast.py`` compares this
    with); here the aggregates' columns are locals, the checks and the
    aggregates are unrolled, and ``_admit``/``_remember`` are inline: a
    sliding window is updated on every event. Names are identifiers checked
    at load and enter only as string literals; sizes as numbers.
    """
    n = len(ops)
    vs = [f"v{i}" for i in range(n)]
    cs = [f"c{i}" for i in range(n)]
    unpack_v = f"    {', '.join(vs)}, = values" if n else "    pass"
    unpack_c = f"    {', '.join(cs)}, = cols" if n else "    pass"
    lines = ["def _slide(state, t, values, event_id, digest):", unpack_v]
    for i, (name, op) in enumerate(ops):
        if op in ("sum", "mean", "min", "max", "rate"):
            lines += [
                f"    if not (type(v{i}) is int or (type(v{i}) is float and v{i} - v{i} == 0.0)):",
                f"        _numeric({op!r}, {name!r}, v{i})",
            ]
    lines += [
        "    floor = state.get('floor')",
        "    if floor is not None and t < floor:",
        "        return None",
        "    ts = state.get('ts')",
        "    if ts is None:",
        "        ts = state['ts'] = []",
        f"        cols = state.setdefault('cols', [{', '.join('[]' for _ in ops)}])",
        "    else:",
        "        cols = state['cols']",
        unpack_c,
        "    hi = state.get('hi')",
        "    if hi is None or t > hi:",
        "        hi = t",
    ]
    if size is not None:
        lines += [f"    if t < hi - {size!r}:", "        return None"]
    else:
        lines += [f"    if len(ts) >= {n_max} and t < ts[0]:", "        return None"]
    lines += [
        "    state['hi'] = hi",
        "    if not ts or t >= ts[-1]:",
        "        ts.append(t)",
        *[f"        c{i}.append(v{i})" for i in range(n)],
        "    else:",
        "        i = bisect_right(ts, t)",
        "        ts.insert(i, t)",
        *[f"        c{i}.insert(i, v{i})" for i in range(n)],
    ]
    if size is not None:
        lines += [f"    lo = hi - {size!r}", "    drop = bisect_left(ts, lo) if ts[0] < lo else 0"]
    else:
        lines += [f"    drop = len(ts) - {n_max}"]
    lines += [
        f"    if len(ts) - drop > {MAX_SLIDING_SAMPLES}:",
        f"        drop = len(ts) - {MAX_SLIDING_SAMPLES}",
        "    if drop > 0:",
        "        del ts[:drop]",
        *[f"        del c{i}[:drop]" for i in range(n)],
        "    ids = state.get('ids')",
        "    if ids is None:",
        "        ids = state['ids'] = {}",
        "    ids[event_id] = [t, digest]",
        "    if len(ids) >= state.get('idn', 64):",
        "        prune(state, ids)",
    ]
    items = ", ".join(f"{name!r}: {_COLUMN_CODE[op].format(c=f'c{i}')}" for i, (name, op) in enumerate(ops))
    lines.append(f"    return {{{items}}}")
    namespace: dict[str, Any] = {
        "bisect_left": bisect.bisect_left,
        "bisect_right": bisect.bisect_right,
        "_numeric": _numeric,
        "_rate": _rate,
        "prune": prune,
    }
    exec(compile("\n".join(lines) + "\n", "<sliding-window>", "exec"), namespace)
    slide: _Slide = namespace["_slide"]
    return slide


# ---- the window -------------------------------------------------------------------
class WindowKeeper:
    """Applies events to one trigger's window state (a JSON dict), each event id at most once."""

    def __init__(self, spec: Window) -> None:
        self.spec = spec
        self.ops = {name: a.op for name, a in spec.aggregates.items()}
        # Aggregate inputs come as a list in this order; these positions must hold numbers.
        self._numeric = [
            (i, op, name)
            for i, (name, op) in enumerate(self.ops.items())
            if op in ("sum", "mean", "min", "max", "rate")
        ]
        self._names_ops = list(self.ops.items())
        self._aggregates: Callable[[list[float], list[list[Any]]], dict[str, Any] | None] = _column_aggregates(
            list(self.ops.items())
        )
        self._size = float(spec.size) if spec.size is not None else None
        self._n_max = int(spec.events or 0)
        self.keep_event = spec.emit == "close"
        # :meth:`slide` generated for this window's aggregates (see _sliding_code): the hot path of sliding windows.
        self.slide_fast: _Slide = (
            _sliding_code(list(self.ops.items()), self._size, self._n_max, self._prune)
            if spec.type == "sliding"
            else self.slide
        )
        if spec.events is not None:
            self._apply = self._count_tumbling
        else:
            self._apply = self._time_panes

    # -- ids
    @staticmethod
    def check(state: dict[str, Any], event_id: str, digest: int) -> int:
        """:data:`NEW`, :data:`DUPLICATE` or :data:`CONFLICT`: was ``event_id`` applied here already?"""
        ids = state.get("ids")
        seen = ids.get(event_id) if ids else None
        if seen is None:
            return NEW
        return DUPLICATE if seen[1] == digest else CONFLICT

    def horizon(self, state: dict[str, Any]) -> float | None:
        """Event time below which this window finds every event late (so their ids can be forgotten)."""
        spec = self.spec
        if spec.type == "sliding":
            if spec.size is not None:
                hi = state.get("hi")
                return None if hi is None else hi - spec.size
            ts = state.get("ts")
            return ts[0] if ts and len(ts) >= int(spec.events or 1) else None
        if spec.events is not None:
            return state.get("lo")
        hi = state.get("hi")
        return None if hi is None else hi - float(spec.size or 0.0) - _PANE_MARGIN

    def _prune(self, state: dict[str, Any], ids: dict[str, list[Any]]) -> None:
        """Forget the ids no copy of which could be applied any more; cap the rest."""
        limits = [x for x in (self.horizon(state), state.get("floor")) if x is not None]
        if limits:
            lo = max(limits)
            for k in [k for k, v in ids.items() if v[0] < lo]:
                del ids[k]
        if len(ids) > MAX_REMEMBERED_IDS:
            # Forget the oldest quarter; from now on events at or before their time are late.
            times = sorted(v[0] for v in ids.values())
            floor = math.nextafter(times[len(times) - MAX_REMEMBERED_IDS * 3 // 4 - 1], math.inf)
            state["floor"] = max(floor, state.get("floor") or floor)
            for k in [k for k, v in ids.items() if v[0] < floor]:
                del ids[k]
        # Prune again when the memory has doubled: amortised O(1) per event.
        state["idn"] = max(2 * len(ids), 64)

    # -- panes
    def _new_pane(self, start: float, end: float) -> dict[str, Any]:
        return {"s": start, "e": end, "n": 0, "acc": {k: _new_acc() for k in self.ops}}

    def _add_to_pane(
        self, pane: dict[str, Any], t: float, values: list[Any], event_id: str, ev: dict[str, Any] | None
    ) -> None:
        pane["n"] += 1
        if pane.get("ft") is None or t < pane["ft"]:
            pane["ft"] = t
            pane["fid"] = event_id
        if pane.get("lt") is None or t >= pane["lt"]:
            pane["lt"] = t
            pane["lid"] = event_id
            if self.keep_event:
                pane["ev"] = ev
        acc = pane["acc"]
        for (name, op), v in zip(self._names_ops, values, strict=True):
            _add(acc[name], op, t, v)

    def _view(self, pane: dict[str, Any]) -> Pane:
        acc = pane["acc"]
        return Pane(
            start=pane["s"],
            end=pane["e"],
            count=pane["n"],
            first_time=pane.get("ft"),
            last_time=pane.get("lt"),
            values={name: _value(acc[name], op) for name, op in self.ops.items()},
            last_event=pane.get("ev"),
            first_event_id=pane.get("fid"),
            last_event_id=pane.get("lid"),
        )

    def add_event(
        self,
        state: dict[str, Any],
        t: float,
        values: list[Any],
        event_id: str,
        digest: int,
        ev: dict[str, Any] | None = None,
    ) -> Update:
        """Apply one new event (:meth:`check` said :data:`NEW`) at event time ``t``.

        ``values`` are its aggregate inputs (in the order of the window's
        aggregates), ``digest`` the hash of the event remembered with its id,
        ``ev`` the stored event (only for ``emit: close``). Raises ``TypeError``
        if an aggregate that needs a number got something else.
        """
        if self.spec.type == "sliding":
            agg = self.slide_fast(state, t, values, event_id, digest)
            return _LATE if agg is None else Update([self.sliding_pane(state, agg)])
        if not self._admit(state, t, values):
            return _LATE
        up = self._apply(state, t, values, event_id, ev)
        if not up.late:
            self._remember(state, event_id, t, digest)
        return up

    def _admit(self, state: dict[str, Any], t: float, values: list[Any]) -> bool:
        """Check the aggregate inputs (``TypeError``); False if ``t`` is below the floor of forgotten ids."""
        for i, op, name in self._numeric:
            v = values[i]
            tv = type(v)
            if not (tv is int or (tv is float and v - v == 0.0)):  # a finite number
                _numeric(op, name, v)
        floor = state.get("floor")
        return floor is None or t >= floor

    def _remember(self, state: dict[str, Any], event_id: str, t: float, digest: int) -> None:
        """Remember an applied event's id with its time and hash; prune when the memory has doubled."""
        ids = state.get("ids")
        if ids is None:
            ids = state["ids"] = {}
        ids[event_id] = [t, digest]
        if len(ids) >= state.get("idn", 64):
            self._prune(state, ids)

    def _time_panes(
        self, state: dict[str, Any], t: float, values: list[Any], event_id: str, ev: dict[str, Any] | None
    ) -> Update:
        size = float(self.spec.size or 0.0)
        hop = float(self.spec.hop or size)
        panes: list[dict[str, Any]] = state.setdefault("panes", [])
        hi = state.get("hi")
        up = Update()
        if hi is None or t > hi:
            hi = t
            state["hi"] = t
            # Close every pane the new high-water time is past.
            still: list[dict[str, Any]] = []
            closed: list[dict[str, Any]] = []
            for p in panes:
                (closed if p["e"] <= hi else still).append(p)
            if closed:
                panes[:] = still
                up.closed = [self._view(p) for p in closed]
        # Windows [k*hop, k*hop + size) that contain t and are still open.
        k_hi = math.floor(t / hop)
        k_lo = math.floor((t - size) / hop) + 1
        open_starts = {p["s"] for p in panes}
        added = False
        for k in range(k_lo, k_hi + 1):
            start = round(k * hop, 9)
            end = round(start + size, 9)
            if start <= t < end and end > hi and start not in open_starts:
                panes.append(self._new_pane(start, end))
                open_starts.add(start)
                added = True
        if added:
            panes.sort(key=lambda p: p["s"])
        hit = [p for p in panes if p["s"] <= t < p["e"]]
        if not hit:
            up.late = True
            return up
        for p in hit:
            self._add_to_pane(p, t, values, event_id, ev)
        up.current = [self._view(p) for p in hit]
        return up

    def _count_tumbling(
        self, state: dict[str, Any], t: float, values: list[Any], event_id: str, ev: dict[str, Any] | None
    ) -> Update:
        n_max = int(self.spec.events or 1)
        lo = state.get("lo")
        if lo is not None and t < lo:
            # Older than the whole window before this one: it belongs to a window long closed.
            return _LATE
        pane = state.get("pane")
        if pane is None or pane["n"] >= n_max:
            if pane is not None and pane.get("ft") is not None:
                state["lo"] = pane["ft"] if lo is None else max(lo, pane["ft"])
            pane = self._new_pane(t, t)
            state["pane"] = pane
        self._add_to_pane(pane, t, values, event_id, ev)
        pane["s"] = pane["ft"]
        pane["e"] = pane["lt"]
        view = self._view(pane)
        up = Update(current=[view])
        if pane["n"] >= n_max:
            up.closed = [view]
        return up

    def slide(
        self, state: dict[str, Any], t: float, values: list[Any], event_id: str, digest: int
    ) -> dict[str, Any] | None:
        """:meth:`add_event` for a sliding window: the aggregates after the event, or ``None`` if it is late.

        The engine's hot path (a sliding window is evaluated on every event), so
        in one function; :meth:`sliding_pane` gives the window's bounds when a
        condition or a firing needs them.
        """
        if not self._admit(state, t, values):
            return None
        ts: list[float] | None = state.get("ts")
        if ts is None:
            ts = state["ts"] = []
            cols: list[list[Any]] = state.setdefault("cols", [[] for _ in self.ops])
        else:
            cols = state["cols"]
        hi = state.get("hi")
        if hi is None or t > hi:
            hi = t  # a new latest event is never late
        size = self._size
        if size is not None:
            if t < hi - size:
                return None
        elif len(ts) >= self._n_max and t < ts[0]:
            # It would enter a full window only to leave it at once: older than all its N events.
            return None
        state["hi"] = hi
        # Keep time order even when events arrive slightly out of order (ties: arrival order).
        if not ts or t >= ts[-1]:
            ts.append(t)
            for col, v in zip(cols, values):  # noqa: B905 - one column per value, by construction
                col.append(v)
        else:
            i = bisect.bisect_right(ts, t)
            ts.insert(i, t)
            for col, v in zip(cols, values):  # noqa: B905
                col.insert(i, v)
        if size is not None:
            lo = hi - size
            drop = bisect.bisect_left(ts, lo) if ts[0] < lo else 0
        else:
            drop = len(ts) - self._n_max
        if len(ts) - drop > MAX_SLIDING_SAMPLES:
            drop = len(ts) - MAX_SLIDING_SAMPLES
        if drop > 0:
            del ts[:drop]
            for col in cols:
                del col[:drop]
        self._remember(state, event_id, t, digest)
        return self._aggregates(ts, cols)

    def sliding_pane(self, state: dict[str, Any], values: dict[str, Any]) -> Pane:
        """A sliding window as a :class:`Pane` (after :meth:`slide`), for the ``window`` variable."""
        ts = state["ts"]
        if self._size is not None:
            start, end = state["hi"] - self._size, state["hi"]
        else:
            start, end = ts[0], ts[-1]
        return Pane(start, end, len(ts), ts[0], ts[-1], values)
