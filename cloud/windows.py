"""Window state over event time, as plain JSON data (so a faust table can hold and replay it).

A window's state is a dict that :func:`add_event` updates in place and that
survives JSON round trips unchanged. Time is event time in epoch seconds, so
the same events always give the same windows, whatever the wall clock and
however often a worker restarts.

* Time panes (tumbling = hopping with ``hop == size``): ``panes`` holds the
  open windows ``[start, start + size)``; ``hi`` is the latest event time seen.
  A pane closes when an event at or after its end arrives. An event older
  than every open pane is *late* and ignored (counted by the caller).
* Count panes (tumbling by ``events``): one pane of at most N events.
* Sliding: ``samples`` within ``[hi - size, hi]`` (or the last N events).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from reflexarc.cloud.model import MAX_SLIDING_SAMPLES, Window


@dataclass
class Pane:
    """A window as the condition sees it: bounds, counts and aggregate values."""

    start: float
    end: float
    count: int
    first_time: float | None
    last_time: float | None
    values: dict[str, Any]
    last_event: dict[str, Any] | None = None
    first_event_id: str | None = None
    last_event_id: str | None = None

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


@dataclass
class Update:
    """What one event did to a window: panes to evaluate now, and whether it was late."""

    current: list[Pane] = field(default_factory=list)
    closed: list[Pane] = field(default_factory=list)
    late: bool = False


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


def _numeric(op: str, name: str, v: Any) -> Any:
    if op in ("sum", "mean", "min", "max", "rate"):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"aggregate {name!r} ({op}) needs a number, got {type(v).__name__} {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise TypeError(f"aggregate {name!r} ({op}) got {v!r}")
    return v


# ---- the window -------------------------------------------------------------------
class WindowKeeper:
    """Applies events to one trigger's window state (a JSON dict)."""

    def __init__(self, spec: Window) -> None:
        self.spec = spec
        self.ops = {name: a.op for name, a in spec.aggregates.items()}
        self.keep_event = spec.emit == "close"

    # -- panes
    def _new_pane(self, start: float, end: float) -> dict[str, Any]:
        return {"s": start, "e": end, "n": 0, "acc": {k: _new_acc() for k in self.ops}}

    def _add_to_pane(self, pane: dict[str, Any], t: float, values: dict[str, Any], ev: dict[str, Any]) -> None:
        pane["n"] += 1
        if pane.get("ft") is None or t < pane["ft"]:
            pane["ft"] = t
            pane["fid"] = ev["id"]
        if pane.get("lt") is None or t >= pane["lt"]:
            pane["lt"] = t
            pane["lid"] = ev["id"]
            if self.keep_event:
                pane["ev"] = ev
        for name, op in self.ops.items():
            _add(pane["acc"][name], op, t, values.get(name))

    def _view(self, pane: dict[str, Any]) -> Pane:
        return Pane(
            start=pane["s"],
            end=pane["e"],
            count=pane["n"],
            first_time=pane.get("ft"),
            last_time=pane.get("lt"),
            values={name: _value(pane["acc"][name], op) for name, op in self.ops.items()},
            last_event=pane.get("ev"),
            first_event_id=pane.get("fid"),
            last_event_id=pane.get("lid"),
        )

    def values_of(self, values: dict[str, Any]) -> dict[str, Any]:
        """Check the per-event aggregate inputs (numbers where needed)."""
        return {name: _numeric(op, name, values.get(name)) for name, op in self.ops.items()}

    def add_event(self, state: dict[str, Any], t: float, values: dict[str, Any], ev: dict[str, Any]) -> Update:
        """Apply one event at event time ``t`` with its aggregate inputs ``values``."""
        values = self.values_of(values)
        if self.spec.type == "sliding":
            return self._sliding(state, t, values, ev)
        if self.spec.events is not None:
            return self._count_tumbling(state, t, values, ev)
        return self._time_panes(state, t, values, ev)

    def _time_panes(self, state: dict[str, Any], t: float, values: dict[str, Any], ev: dict[str, Any]) -> Update:
        size = float(self.spec.size or 0.0)
        hop = float(self.spec.hop or size)
        panes: list[dict[str, Any]] = state.setdefault("panes", [])
        hi = state.get("hi")
        up = Update()
        if hi is None or t > hi:
            hi = t
            state["hi"] = t
            # Close every pane the new high-water time is past.
            still = []
            for p in panes:
                (up.closed if p["e"] <= hi else still).append(p)
            panes[:] = still
            up.closed = [self._view(p) for p in up.closed]
        # Windows [k*hop, k*hop + size) that contain t and are still open.
        k_hi = math.floor(t / hop)
        k_lo = math.floor((t - size) / hop) + 1
        open_starts = {p["s"] for p in panes}
        for k in range(k_lo, k_hi + 1):
            start = round(k * hop, 9)
            end = round(start + size, 9)
            if start <= t < end and end > hi and start not in open_starts:
                panes.append(self._new_pane(start, end))
                open_starts.add(start)
        panes.sort(key=lambda p: p["s"])
        hit = [p for p in panes if p["s"] <= t < p["e"]]
        if not hit:
            up.late = True
            return up
        for p in hit:
            self._add_to_pane(p, t, values, ev)
        up.current = [self._view(p) for p in hit]
        return up

    def _count_tumbling(self, state: dict[str, Any], t: float, values: dict[str, Any], ev: dict[str, Any]) -> Update:
        n_max = int(self.spec.events or 1)
        pane = state.get("pane")
        if pane is None or pane["n"] >= n_max:
            pane = self._new_pane(t, t)
            state["pane"] = pane
        self._add_to_pane(pane, t, values, ev)
        pane["s"] = pane["ft"]
        pane["e"] = pane["lt"]
        view = self._view(pane)
        up = Update(current=[view])
        if pane["n"] >= n_max:
            up.closed = [view]
        return up

    def _sliding(self, state: dict[str, Any], t: float, values: dict[str, Any], ev: dict[str, Any]) -> Update:
        samples: list[list[Any]] = state.setdefault("samples", [])
        names = list(self.ops)
        hi = max(t, state.get("hi") or t)
        state["hi"] = hi
        if self.spec.size is not None and t < hi - self.spec.size:
            return Update(late=True)
        row = [t, ev["id"], [values.get(n) for n in names]]
        # Keep time order even when events arrive slightly out of order.
        idx = bisect.bisect_right([s[0] for s in samples], t)
        samples.insert(idx, row)
        if self.spec.size is not None:
            lo = hi - self.spec.size
            drop = bisect.bisect_left([s[0] for s in samples], lo)
            del samples[:drop]
            start, end = lo, hi
        else:
            del samples[: max(0, len(samples) - int(self.spec.events or 1))]
            start, end = samples[0][0], samples[-1][0]
        if len(samples) > MAX_SLIDING_SAMPLES:
            del samples[: len(samples) - MAX_SLIDING_SAMPLES]
        accs = {n: _new_acc() for n in names}
        for st, _id, vals in samples:
            for i, n in enumerate(names):
                _add(accs[n], self.ops[n], st, vals[i])
        view = Pane(
            start=start,
            end=end,
            count=len(samples),
            first_time=samples[0][0],
            last_time=samples[-1][0],
            values={n: _value(accs[n], self.ops[n]) for n in names},
            first_event_id=samples[0][1],
            last_event_id=samples[-1][1],
        )
        return Update(current=[view])
