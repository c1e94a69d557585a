"""The trigger engine: events and state in, decisions out. No broker, no clock of its own.

The worker, ``reflexarc triggers test`` and the unit tests all run this
same code. State is a JSON dict per *state key* (``trigger\\x1fsite/device`` or
``...\\x1fsite/device/stream``); the caller stores it (in the worker: in memory,
backed by a changelog; a dict in a dry run) and hands it back for the next
event of that key.

Determinism is what makes restarts exact: decisions depend only on the
events (their event time, not the wall clock) and the state, and every
request carries an id derived from the events that caused it
(``stable_id(trigger, event ids...)``), so replaying an event after a crash
reproduces the same request instead of a second task. A state records the
source position (Kafka offset) of the last event applied to it, so an event
replayed after its state change was already stored is not counted twice.

A window applies an event *id* at most once (see :mod:`reflexarc.cloud.windows`):
a copy of an event that reached Kafka twice (a fog or broker redelivery, at
another offset) is recognised by its id and changes nothing, so the windows
fire exactly as they would on the events delivered once; a copy with other
data under the same id is a device error (a *conflict*), reported and
ignored. Triggers without a window need no such memory: a copy gives the same
task ids (they derive from the event id), and a cooldown cannot fire twice on
one event time.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from reflexarc.cloud.expr import CelEvalError, Expr, Scope
from reflexarc.cloud.fastcel import GIVE_UP, HELPERS, MISSING, python_code
from reflexarc.cloud.validate import CompiledAction, CompiledConfig, CompiledTrigger
from reflexarc.cloud.windows import Pane, WindowKeeper
from reflexarc.envelope import Envelope, EnvelopeError, EventType, KafkaEventFields, utcnow
from reflexarc.events import Cause, Command, Resources, TaskRequest, TaskResult, stable_id

log = logging.getLogger(__name__)
SEP = "\x1f"


CONFLICT_MESSAGE = (
    "event id {id!r} was applied already with other data (a device reusing an event id "
    "for another event): this event is ignored"
)


@dataclass
class Firing:
    """One decision to act: which trigger, on which events, and the requests it makes."""

    trigger: str
    key: str
    cause: Cause
    tasks: list[TaskRequest] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A trigger could not evaluate an event (or a result); the message says why."""

    trigger: str | None
    message: str


class Outcome:
    """What one event caused: firings, state to store, failures, late events, copies recognised.

    ``duplicate``: windows that had applied this event id already (a copy:
    nothing changed); ``conflict``: windows that had applied this id with
    other data (a device reusing an id: nothing changed; :data:`CONFLICT_MESSAGE`
    says so in a dead letter). A plain class with slots: one is made per event.
    """

    __slots__ = ("conflict", "duplicate", "failures", "firings", "late", "skipped", "states")

    def __init__(self) -> None:
        self.firings: list[Firing] = []
        self.states: dict[str, dict[str, Any]] = {}
        self.failures: list[Failure] = []
        self.late = 0
        self.skipped = 0
        self.duplicate = 0
        self.conflict = 0

    def __repr__(self) -> str:
        return f"Outcome({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


def epoch(t: datetime) -> float:
    """Event time as epoch seconds (naive times are UTC)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def from_epoch(x: float | None) -> datetime | None:
    """Inverse of :func:`epoch`."""
    return None if x is None else datetime.fromtimestamp(x, UTC)


def event_context(env: Envelope) -> dict[str, Any]:
    """The ``event`` variable of CEL for one instrument event."""
    ext = env.extensions
    time = env.time
    data = env.data
    return {
        "id": env.id,
        "type": env.type,
        "source": env.source,
        "site": ext.get("site") or "",
        "device": ext.get("device") or "",
        "stream": env.subject or "",
        "time": time if time.tzinfo else time.replace(tzinfo=UTC),
        "data": data if isinstance(data, dict) else {},
    }


def event_digest(ctx: dict[str, Any], t: float | None = None) -> int:
    """A short, stable hash of what an event says (stream, time, data), remembered with its id.

    Only to tell a copy of an event from another event under the same id, so
    32 bits do: a device error goes unnoticed with probability 2**-32.
    """
    parts = [ctx["stream"], epoch(ctx["time"]) if t is None else t, ctx["data"]]
    try:
        text = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        # Integers beyond 64 bits and the like: the standard library writes them (slower, as rare).
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return zlib.crc32(text)


def ectx_t(ectx: dict[str, Any]) -> float:
    """Event time of a stored window event (emit: close), as epoch seconds."""
    return epoch(ectx["time"])


def _stored_event(ctx: dict[str, Any]) -> dict[str, Any]:
    return {**ctx, "time": epoch(ctx["time"])}


def _loaded_event(stored: dict[str, Any]) -> dict[str, Any]:
    return {**stored, "time": from_epoch(stored["time"])}


def _window_vars(p: Pane) -> dict[str, Any]:
    v = p.variables()
    for k in ("start", "end", "first_time", "last_time"):
        v[k] = from_epoch(v[k])
    return v


def _applied_already(win: dict[str, Any], event_id: str, digest: int, out: Outcome) -> bool:
    """Whether a window applied this event id already (:meth:`WindowKeeper.check`): a copy or a conflict, counted."""
    ids = win.get("ids")
    seen = ids.get(event_id) if ids else None
    if seen is None:
        return False
    if seen[1] == digest:
        out.duplicate += 1
    else:
        out.conflict += 1
    return True


class _Plan:
    """One enabled trigger, ready for the per-event loop: everything it needs, looked up once."""

    __slots__ = (
        "aggregates",
        "by_stream",
        "close",
        "cooldown",
        "filter",
        "fp",
        "keeper",
        "name",
        "needs_window",
        "order",
        "sliding",
        "stateful",
        "step",
        "trig",
        "when",
    )

    def __init__(self, trig: CompiledTrigger, order: int) -> None:
        w = trig.spec.window
        self.order = order
        self.trig = trig
        self.name = trig.name
        self.filter = trig.filter
        self.when = trig.when
        # Aggregate inputs: (expression, whether its value is the same for every trigger: it does
        # not read `trigger`, so triggers with the same expression share one evaluation per event).
        self.aggregates = [(e, e is not None and "trigger" not in e.variables) for e in trig.aggregates.values()]
        self.keeper = WindowKeeper(w) if w is not None else None
        self.close = w is not None and w.emit == "close"
        self.sliding = w is not None and w.type == "sliding"
        self.by_stream = w is not None and w.key == "stream"
        self.cooldown = trig.spec.cooldown
        self.stateful = trig.stateful
        self.fp = trig.fingerprint
        # The `window` variable costs four datetimes: built for `when` only if it reads it.
        self.needs_window = "window" in trig.when.variables
        # The engine's own function for this trigger's events (sliding windows), else TriggerEngine._stateful.
        self.step: _Step | None = None


class SelectorIndex:
    """The triggers' ``on:`` selectors as a tree of levels (site, device, stream), built once per config.

    A lookup follows the event's three names and the ``+``/``#`` branches, so
    its cost does not grow with the number of triggers; results are cached
    per stream (bounded).
    """

    def __init__(self, triggers: list[CompiledTrigger]) -> None:
        self.root: dict[str, Any] = {}
        for order, trig in enumerate(triggers):
            for sel in trig.spec.on:
                node = self.root
                for level in sel.split("/"):
                    if level == "#":
                        node.setdefault("#", set()).add(order)
                        break
                    node = node.setdefault("/" + level, {})
                else:
                    node.setdefault("", set()).add(order)

    def lookup(self, names: tuple[str, ...]) -> set[int]:
        """Positions (in config order) of the triggers whose selectors match ``names``."""
        found: set[int] = set()
        nodes = [self.root]
        for name in names:
            nxt = []
            for node in nodes:
                found |= node.get("#", set())
                for child in (node.get("/" + name), node.get("/+")):
                    if child is not None:
                        nxt.append(child)
            nodes = nxt
        for node in nodes:
            found |= node.get("", set()) | node.get("#", set())
        return found


_DATA = EventType.DATA.value
_MISSING = object()
# `agg` and `window` of triggers without a window (never changed: expressions only read).
_EMPTY: dict[str, Any] = {}
# A group function: (event, key, fired) appends i for a firing of plans[i], ~i for one the library must judge.
_Group = Callable[[dict[str, Any], str, list[int]], None]
# A stateful trigger's step: (state key, key, scope, filter variables, event, states, position, outcome, memo).
_Step = Callable[
    [
        str,
        str,
        Scope,
        dict[str, Any],
        dict[str, Any],
        Mapping[str, dict[str, Any] | None],
        int | None,
        "Outcome",
        list[Any],
    ],
    None,
]


def stateless_group(plans: list[_Plan]) -> _Group:
    """One generated function that evaluates the filter and condition of every trigger without state.

    These are most triggers (thresholds), evaluated on every event; in one
    function they cost no call, no loop and no dict per trigger. Each
    trigger's expressions are its Python forms (:func:`~reflexarc.cloud.fastcel.python_code`,
    with ``trigger`` as a constant); a trigger whose expression is outside the
    subset, or whose evaluation gives up or gives no boolean, is reported as
    ``~i`` and evaluated again by the library, trigger by trigger, as before.
    """
    body: list[str] = []
    # Field paths several triggers read (event.data.value ...): read once per event, in the prologue.
    shared: dict[str, str] = {}
    # Expressions several triggers share (the same filter ...): evaluated once, where first needed. A
    # condition is evaluated under its filter's `if`, so it is shared only under that same filter.
    results: dict[tuple[str, str | None, str | None], str] = {}

    def value_of(expr: Expr, plan: _Plan, role: str, indent: str, under: str | None) -> str | None:
        """The local holding ``expr``'s result (True/False/None: the library must judge), emitting its code once."""
        own = plan.name if "trigger" in expr.variables else None  # `trigger` differs per trigger
        local = results.get((expr.source, own, under))
        if local is not None:
            return local
        names = {"event": "E", "key": "K", "trigger": repr(plan.name), "agg": "_EMPTY", "window": "_EMPTY"}
        code = python_code(expr.source, names, f"_{role}{len(results)}_", shared)
        if code is None:
            return None
        local = f"_r{len(results)}"
        results[(expr.source, own, under)] = local
        body.extend(
            [
                f"{indent}try:",
                f"{indent}    {local} = {code}",
                f"{indent}except GIVE_UP:",
                f"{indent}    {local} = None",
            ]
        )
        return local

    # Consecutive triggers with the same filter share one `if` on it; `block` is that filter's local and
    # `pending` what its `elif` (the library must judge the filter) reports, in config order.
    block: str | None = None
    pending: list[int] = []

    def close() -> None:
        nonlocal block
        if block is not None and block != "True":
            body.append(f"    elif {block} is not False:")
            body.extend(f"        fired.append({j})" for j in pending)
        block = None

    for i, plan in enumerate(plans):
        # A result is computed at its first use: a filter at the top, a condition under its filter.
        if plan.filter is not None:
            own = plan.name if "trigger" in plan.filter.variables else None
            if results.get((plan.filter.source, own, None)) != block:
                close()  # (before value_of may emit the filter's code at the top level)
            flt = value_of(plan.filter, plan, "f", "    ", None)
        else:
            flt = "True"
            if block != "True":
                close()
        if flt is None:
            body.append(f"    fired.append({~i})")
            continue
        if flt != block:
            body.append(f"    if {flt} is True:")
            block, pending = flt, []
        when = value_of(plan.when, plan, "w", "        ", flt)
        if when is None:
            body.append(f"        fired.append({~i})")
        else:
            body += [
                f"        if {when} is True:",
                f"            fired.append({i})",
                f"        elif {when} is not False:",
                f"            fired.append({~i})",
            ]
        pending.append(~i)
    close()
    lines = ["def _group(E, K, fired):"]
    for path, local in shared.items():
        lines += ["    try:", f"        {local} = {path}", "    except GIVE_UP:", f"        {local} = MISSING"]
    lines += body
    namespace: dict[str, Any] = {**HELPERS, "GIVE_UP": GIVE_UP, "MISSING": MISSING, "_EMPTY": _EMPTY}
    # Generated from parsed expressions only (see reflexarc.cloud.fastcel): no expression text runs as code.
    exec(compile("\n".join(lines) + "\n", "<triggers-group>", "exec"), namespace)
    group: _Group = namespace["_group"]
    return group


class _Selection:
    """What an event of one stream selects: stateless triggers (one group function) and stateful ones."""

    __slots__ = ("group", "key", "stateful", "stateless")

    def __init__(
        self, key: str, stateless: list[_Plan], group: _Group | None, stateful: list[tuple[_Plan, str, str]]
    ) -> None:
        self.key = key  # site/device: the key of triggers without a window
        self.stateless = stateless
        self.group = group
        self.stateful = stateful  # (plan, state key, key) in config order


class TriggerEngine:
    """Evaluates compiled triggers against events; pure apart from the ``now`` used for deadlines."""

    def __init__(self, config: CompiledConfig, now: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self.now = now
        self.triggers = [t for t in config.triggers if t.spec.enabled]
        self._by_name = {t.name: t for t in config.triggers}
        self.trigger_names = frozenset(self._by_name)
        self._plans = [_Plan(t, i) for i, t in enumerate(self.triggers)]
        for plan in self._plans:
            if plan.sliding:
                plan.step = self._sliding_code(plan) or self._sliding_step(plan)
        self._order = {p.name: p.order for p in self._plans}
        self._index = SelectorIndex(self.triggers)
        self._select_cache: dict[tuple[str, str, str], _Selection] = {}
        # Group functions by the stateless triggers they run (the same for every device of a stream).
        self._groups: dict[tuple[int, ...], _Group] = {}
        self.command_deadline = config.file.command_deadline

    # ---- selection -----------------------------------------------------------------
    def _selection(self, site: str, device: str, stream: str) -> _Selection:
        k = (site, device, stream)
        hit = self._select_cache.get(k)
        if hit is None:
            if len(self._select_cache) > 100_000:
                self._select_cache.clear()  # stream names come from devices: never grow without bound
            if len(self._groups) > 10_000:
                self._groups.clear()  # one per distinct set of triggers: few, but bounded all the same
            plans = [self._plans[i] for i in sorted(self._index.lookup(k))]
            stateless = [p for p in plans if not p.stateful]
            shape = tuple(p.order for p in stateless)
            group = self._groups.get(shape)
            if group is None and stateless:
                group = self._groups[shape] = stateless_group(stateless)
            stateful = []
            for plan in plans:
                if plan.stateful:
                    key = f"{site}/{device}/{stream}" if plan.by_stream else f"{site}/{device}"
                    stateful.append((plan, f"{plan.name}{SEP}{key}", key))
            hit = _Selection(f"{site}/{device}", stateless, group, stateful)
            self._select_cache[k] = hit
        return hit

    def selected(self, site: str, device: str, stream: str) -> list[CompiledTrigger]:
        """Triggers listening to one stream (looked up in the selector index, cached), in config order."""
        sel = self._selection(site, device, stream)
        return sorted(
            [p.trig for p in sel.stateless] + [p.trig for p, _, _ in sel.stateful], key=lambda t: self._order[t.name]
        )

    @staticmethod
    def state_key(trig: CompiledTrigger, site: str, device: str, stream: str) -> str:
        """Where a trigger's state for this event lives."""
        by_stream = trig.spec.window is not None and trig.spec.window.key == "stream"
        key = f"{site}/{device}/{stream}" if by_stream else f"{site}/{device}"
        return f"{trig.name}{SEP}{key}"

    def state_keys(self, env: Envelope) -> list[str]:
        """The state keys an event may read or write (for a store to fetch in advance)."""
        site, device, stream = env.site or "", env.device or "", env.subject or ""
        return [skey for _, skey, _ in self._selection(site, device, stream).stateful]

    # ---- events --------------------------------------------------------------------
    def check_event(self, env: Envelope) -> None:
        """Raise :class:`EnvelopeError` if ``env`` is not an instrument event the engine can use."""
        if env.type != _DATA:
            raise EnvelopeError(f"expected a {_DATA} event, got {env.type!r}")
        ext = env.extensions
        if not (ext.get("site") and ext.get("device") and env.subject):
            missing = [
                n for n, v in (("site", env.site), ("device", env.device), ("subject (stream)", env.subject)) if not v
            ]
            raise EnvelopeError(f"instrument event {env.id} lacks {', '.join(missing)}")

    def process(
        self,
        env: Envelope,
        states: Mapping[str, dict[str, Any] | None],
        position: int | None = None,
    ) -> Outcome:
        """Evaluate every selected trigger on one event.

        ``states`` maps state keys (see :meth:`state_keys`) to stored states;
        ``position`` is the event's place in its source (Kafka offset): an
        event at or before a state's recorded position was applied already
        and is skipped for that state. States are updated in place and
        returned in :attr:`Outcome.states`, for the caller to store.
        """
        # check_event and event_context in one pass (the dry run calls this for every event).
        ext = env.extensions
        site, device, subject, event_type = ext.get("site"), ext.get("device"), env.subject, env.type
        if event_type != _DATA or not (site and device and subject):
            self.check_event(env)  # raises, saying why
        time, data = env.time, env.data
        ctx = {
            "id": env.id,
            "type": event_type,
            "source": env.source,
            "site": site,
            "device": device,
            "stream": subject,
            "time": time if time.tzinfo else time.replace(tzinfo=UTC),
            "data": data if isinstance(data, dict) else {},
        }
        return self.evaluate(ctx, states, position)

    def event_of(self, fields: KafkaEventFields) -> dict[str, Any]:
        """The ``event`` variable from a record's fields (:func:`~reflexarc.envelope.kafka_event_fields`).

        What :func:`event_context` gives for the Envelope of the same record,
        after the same checks as :meth:`check_event` (the same errors): the
        worker's way, which skips building the Envelope.
        """
        event_id, event_type, source, subject, time, ext, data = fields
        site, device = ext.get("site"), ext.get("device")
        if event_type != _DATA:
            raise EnvelopeError(f"expected a {_DATA} event, got {event_type!r}")
        if not (site and device and subject):
            missing = [n for n, v in (("site", site), ("device", device), ("subject (stream)", subject)) if not v]
            raise EnvelopeError(f"instrument event {event_id} lacks {', '.join(missing)}")
        return {
            "id": event_id,
            "type": event_type,
            "source": source,
            "site": site,
            "device": device,
            "stream": subject,
            "time": time,
            "data": data,
        }

    def evaluate(
        self,
        ctx: dict[str, Any],
        states: Mapping[str, dict[str, Any] | None],
        position: int | None = None,
    ) -> Outcome:
        """:meth:`process` for an event already checked and turned into its ``event`` variable."""
        out = Outcome()
        # The library's view of the event: made when a trigger may need it (most events fire no threshold).
        scope: Scope | None = None
        names = (ctx["site"], ctx["device"], ctx["stream"])
        sel = self._select_cache.get(names)  # _selection's cache, inline (once per event)
        if sel is None:
            sel = self._selection(*names)
        group = sel.group
        if group is not None:
            fired: list[int] = []
            group(ctx, sel.key, fired)
            if fired:
                scope = Scope(ctx)
                for i in fired:
                    self._stateless(sel.stateless[i if i >= 0 else ~i], sel.key, ctx, scope, out, judged=i >= 0)
        if sel.stateful:
            if scope is None:
                scope = Scope(ctx)
            # The variables of filters and aggregates: one dict per event, `trigger` set per trigger.
            evars: dict[str, Any] = {"event": ctx, "trigger": ""}
            # Event time (epoch s), digest, aggregate inputs by expression: computed on first use, once per event.
            memo: list[Any] = [None, None, {}]
            stateless_fired = len(out.firings)
            for plan, skey, key in sel.stateful:
                evars["trigger"] = plan.name
                try:
                    step = plan.step
                    if step is not None:
                        step(skey, key, scope, evars, ctx, states, position, out, memo)
                    else:
                        self._stateful(plan, skey, key, scope, evars, ctx, states, position, out, memo)
                except CelEvalError as exc:
                    out.failures.append(Failure(plan.name, str(exc)))
                except (TypeError, ValueError) as exc:
                    out.failures.append(Failure(plan.name, f"{type(exc).__name__}: {exc}"))
            if stateless_fired and len(out.firings) > stateless_fired:
                out.firings.sort(key=lambda f: self._order[f.trigger])  # config order, as one loop would give
        return out

    def _stateless(self, plan: _Plan, key: str, ctx: dict[str, Any], scope: Scope, out: Outcome, judged: bool) -> None:
        """A trigger without state that fired (``judged``), or that the library must evaluate."""
        variables = {"event": ctx, "agg": _EMPTY, "window": _EMPTY, "key": key, "trigger": plan.name}
        try:
            if not judged:
                if plan.filter is not None and not plan.filter.truth({"event": ctx, "trigger": plan.name}, scope):
                    return
                if not plan.when.truth(variables, scope):
                    return
            out.firings.append(self._fire(plan.trig, key, ctx, [ctx["id"]], variables))
        except CelEvalError as exc:
            out.failures.append(Failure(plan.name, str(exc)))
        except (TypeError, ValueError) as exc:
            out.failures.append(Failure(plan.name, f"{type(exc).__name__}: {exc}"))

    def _sliding_code(self, plan: _Plan) -> _Step | None:
        """:meth:`_sliding_step` as one generated function, with the aggregate inputs and ``when`` inline.

        Their Python forms (:func:`~reflexarc.cloud.fastcel.python_code`) read
        the event and the aggregates directly; when one gives up, the
        expression is evaluated as :meth:`_sliding_step` does (``Expr.eval`` /
        ``Expr.truth``: the library decides). ``None`` (use :meth:`_sliding_step`)
        when ``when`` reads ``window`` or is outside the subset. The code is
        generated from parsed expressions only: names and literals enter it as
        Python literals.
        """
        keeper = plan.keeper
        assert keeper is not None
        names = {"event": "E", "agg": "A", "window": "_EMPTY", "key": "K", "trigger": repr(plan.name)}
        when = python_code(plan.when.source, names, "_w_") if not plan.needs_window else None
        if when is None:
            return None
        lines = ["def _step(skey, K, scope, evars, E, states, position, out, memo):"]
        if plan.filter is not None:
            lines += ["    if not FLT.truth(evars, scope):", "        return"]
        lines += [
            "    state = states.get(skey)",
            "    if state is not None and state.get('fp') == FP:",
            "        if position is not None:",
            "            pos = state.get('pos')",
            "            if pos is not None and position <= pos:",
            "                out.skipped += 1",
            "                return",
            "        win = state.get('win')",
            "        if win is None:",
            "            win = state['win'] = {}",
            "    else:",
            "        win = {}",
            "        state = {'fp': FP, 'win': win}",
            "    t = memo[0]",
            "    if t is None:",
            "        t = memo[0] = epoch(E['time'])",
            "    digest = memo[1]",
            "    if digest is None:",
            "        digest = memo[1] = event_digest(E, t)",
            "    eid = E['id']",
            "    ids = win.get('ids')",
            "    if ids:",
            "        seen = ids.get(eid)",
            "        if seen is not None:",
            "            if seen[1] == digest:",
            "                out.duplicate += 1",
            "            else:",
            "                out.conflict += 1",
            "            return",
        ]
        namespace: dict[str, Any] = {
            **HELPERS,
            "GIVE_UP": GIVE_UP,
            "_EMPTY": _EMPTY,
            "_MISSING": _MISSING,
            "FP": plan.fp,
            "FLT": plan.filter,
            "WHEN": plan.when,
            "NAME": plan.name,
            "TRIG": plan.trig,
            "epoch": epoch,
            "event_digest": event_digest,
            "slide": keeper.slide_fast,
            "sliding_pane": keeper.sliding_pane,
            "window_vars": _window_vars,
            "fire": self._fire,
        }
        if plan.aggregates:
            lines.append("    shared = memo[2]")
        for i, (e, share) in enumerate(plan.aggregates):
            if e is None:
                lines.append(f"    v{i} = None")
                continue
            namespace[f"IN{i}"] = e
            code = python_code(e.source, {"event": "E", "trigger": repr(plan.name)}, f"_a{i}_")
            compute = (
                [
                    "    try:",
                    f"        v{i} = {code}",
                    "    except GIVE_UP:",
                    f"        v{i} = IN{i}.eval(evars, scope)",
                ]
                if code is not None
                else [f"    v{i} = IN{i}.eval(evars, scope)"]
            )
            if share:
                # Shared between triggers reading the same expression: evaluated once per event.
                lines += [
                    f"    v{i} = shared.get({e.source!r}, _MISSING)",
                    f"    if v{i} is _MISSING:",
                    *("    " + c for c in compute),
                    f"        shared[{e.source!r}] = v{i}",
                ]
            else:
                lines += compute
        values = ", ".join(f"v{i}" for i in range(len(plan.aggregates)))
        lines += [
            f"    A = slide(win, t, [{values}], eid, digest)",
            "    if A is None:",
            "        out.late += 1",
            "    else:",
            "        try:",
            f"            hit = {when}",
            "        except GIVE_UP:",
            "            hit = None",
            "        if hit is not True and hit is not False:",
            "            hit = WHEN.truth({'event': E, 'agg': A, 'window': _EMPTY, 'key': K, 'trigger': NAME}, scope)",
            "        if hit:",
        ]
        fire = [
            "variables = {'event': E, 'agg': A, 'window': window_vars(sliding_pane(win, A)), 'key': K, "
            "'trigger': NAME}",
            "out.firings.append(fire(TRIG, K, E, [eid], variables))",
        ]
        if plan.cooldown is not None:
            namespace["COOL"] = plan.cooldown
            lines += [
                "            until = state.get('cool')",
                "            if until is None or t >= until:",
                "                state['cool'] = t + COOL",
                *("                " + f for f in fire),
            ]
        else:
            lines += ["            " + f for f in fire]
        lines += ["    state['pos'] = position", "    out.states[skey] = state"]
        exec(compile("\n".join(lines) + "\n", f"<sliding-{plan.name}>", "exec"), namespace)
        step: _Step = namespace["_step"]
        return step

    def _sliding_step(self, plan: _Plan) -> _Step:
        """The path of an event through a sliding-window trigger: :meth:`_stateful`'s steps, one window.

        A sliding window is always the current one, so there is no generic
        ``Update``: the window's generated update (``WindowKeeper.slide_fast``)
        gives the aggregates, with the plan's parts bound once as locals.
        :meth:`_sliding_code` is the faster form; this one serves the triggers
        it does not cover (``when`` reads ``window`` or is outside the subset).
        """
        keeper = plan.keeper
        assert keeper is not None
        slide = keeper.slide_fast
        sliding_pane = keeper.sliding_pane
        fp, name, trig, cooldown, needs_window = plan.fp, plan.name, plan.trig, plan.cooldown, plan.needs_window
        flt, when = plan.filter, plan.when
        # (expression, shared by source) per aggregate input; None for `count`.
        inputs = [(e, e.source if share and e is not None else None) for e, share in plan.aggregates]
        fire = self._fire

        def step(
            skey: str,
            key: str,
            scope: Scope,
            evars: dict[str, Any],
            ctx: dict[str, Any],
            states: Mapping[str, dict[str, Any] | None],
            position: int | None,
            out: Outcome,
            memo: list[Any],
        ) -> None:
            if flt is not None and not flt.truth(evars, scope):
                return
            state = states.get(skey)
            if state is not None and state.get("fp") == fp:
                if position is not None:
                    pos = state.get("pos")
                    if pos is not None and position <= pos:
                        out.skipped += 1
                        return
                # Updated in place: the caller stores it again (a condition that fails
                # afterwards still leaves the event counted in its window).
                win = state.get("win")
                if win is None:
                    win = state["win"] = {}
            else:
                win = {}
                state = {"fp": fp, "win": win}
            t = memo[0]
            if t is None:
                t = memo[0] = epoch(ctx["time"])
            digest = memo[1]
            if digest is None:
                digest = memo[1] = event_digest(ctx, t)
            eid = ctx["id"]
            if _applied_already(win, eid, digest, out):
                return
            shared = memo[2]
            values: list[Any] = []
            for e, source in inputs:
                if e is None:
                    values.append(None)
                elif source is not None:
                    v = shared.get(source, _MISSING)
                    if v is _MISSING:
                        v = shared[source] = e.eval(evars, scope)
                    values.append(v)
                else:
                    values.append(e.eval(evars, scope))
            agg = slide(win, t, values, eid, digest)
            if agg is None:
                out.late += 1
            else:
                window = _window_vars(sliding_pane(win, agg)) if needs_window else _EMPTY
                variables = {"event": ctx, "agg": agg, "window": window, "key": key, "trigger": name}
                if when.truth(variables, scope):
                    until = state.get("cool") if cooldown is not None else None
                    if until is None or t >= until:
                        if cooldown is not None:
                            state["cool"] = t + cooldown
                        if not needs_window:
                            variables["window"] = _window_vars(sliding_pane(win, agg))
                        out.firings.append(fire(trig, key, ctx, [eid], variables))
            state["pos"] = position
            out.states[skey] = state

        return step

    def _stateful(
        self,
        plan: _Plan,
        skey: str,
        key: str,
        scope: Scope,
        evars: dict[str, Any],
        ctx: dict[str, Any],
        states: Mapping[str, dict[str, Any] | None],
        position: int | None,
        out: Outcome,
        memo: list[Any],
    ) -> None:
        if plan.filter is not None and not plan.filter.truth(evars, scope):
            return
        old = states.get(skey)
        if old is not None and old.get("fp") == plan.fp:
            if position is not None and old.get("pos") is not None and position <= old["pos"]:
                out.skipped += 1
                return
            # Updated in place: the caller stores it again (a condition that fails
            # afterwards still leaves the event counted in its window).
            state = old
        else:
            state = {"fp": plan.fp}
        keeper = plan.keeper
        t = memo[0]
        if t is None:
            t = memo[0] = epoch(ctx["time"])
        if keeper is None:
            # A cooldown alone: the event itself is the only candidate.
            variables = {"event": ctx, "agg": {}, "window": {}, "key": key, "trigger": plan.name}
            if plan.when.truth(variables, scope):
                until = state.get("cool")
                if until is None or t >= until:
                    state["cool"] = t + plan.cooldown
                    out.firings.append(self._fire(plan.trig, key, ctx, [ctx["id"]], variables))
            state["pos"] = position
            out.states[skey] = state
            return
        win = state.get("win")
        if win is None:
            win = state["win"] = {}
        digest = memo[1]
        if digest is None:
            digest = memo[1] = event_digest(ctx, t)
        if _applied_already(win, ctx["id"], digest, out):
            return
        shared = memo[2]
        values: list[Any] = []
        for e, share in plan.aggregates:
            if e is None:
                values.append(None)
            elif share:
                v = shared.get(e.source, _MISSING)
                if v is _MISSING:
                    v = shared[e.source] = e.eval(evars, scope)
                values.append(v)
            else:
                values.append(e.eval(evars, scope))
        # (Sliding windows have their own step: _sliding_code, _sliding_step.)
        up = keeper.add_event(win, t, values, ctx["id"], digest, _stored_event(ctx) if plan.close else None)
        if up.late:
            out.late += 1
        for pane in up.closed if plan.close else up.current:
            if plan.close:
                ectx = _loaded_event(pane.last_event) if pane.last_event else ctx
                ids = [i for i in dict.fromkeys((pane.first_event_id, pane.last_event_id)) if i]
            else:
                ectx, ids = ctx, [ctx["id"]]
            window = _window_vars(pane) if plan.needs_window else {}
            variables = {"event": ectx, "agg": pane.values, "window": window, "key": key, "trigger": plan.name}
            # Only the event of this very event has its library context in `scope`.
            if not plan.when.truth(variables, scope if ectx is ctx else None):
                continue
            fire_t = t if ectx is ctx else ectx_t(ectx)
            if plan.cooldown is not None:
                until = state.get("cool")
                if until is not None and fire_t < until:
                    continue
                state["cool"] = fire_t + plan.cooldown
            if not plan.needs_window:
                variables["window"] = _window_vars(pane)
            out.firings.append(self._fire(plan.trig, key, ectx, ids, variables))
            if not plan.close:
                break  # at most one firing per event (the oldest window that holds)
        state["pos"] = position
        out.states[skey] = state

    def _fire(
        self, trig: CompiledTrigger, key: str, ectx: dict[str, Any], ids: list[str], variables: dict[str, Any]
    ) -> Firing:
        cause = Cause(event_ids=ids, site=ectx["site"], device=ectx["device"], stream=ectx["stream"], time=ectx["time"])
        firing = Firing(trig.name, key, cause, variables=variables)
        for action in trig.actions:
            args = action.args.render(variables)
            if action.task is not None:
                firing.tasks.append(self._task(trig, action, args, ids, cause))
            elif action.command is not None:
                cid = stable_id(trig.name, *ids, "command", str(action.index))
                firing.commands.append(self._command(trig, action, args, cid, cause, None))
        return firing

    def _task(
        self, trig: CompiledTrigger, action: CompiledAction, args: dict[str, Any], ids: list[str], cause: Cause
    ) -> TaskRequest:
        task = action.task
        assert task is not None and action.site is not None
        # The first task of a firing has the contract's id; further ones add their index.
        parts = [trig.name, *ids] + ([str(action.index)] if action.index else [])
        return TaskRequest(
            task_id=stable_id(*parts),
            app=task.app,
            args=args,
            site=action.site,
            resources=action.resources or Resources(),
            priority=task.priority,
            timeout_s=task.timeout,
            retries=task.retries,
            trigger=trig.name,
            cause=cause,
        )

    def _command(
        self,
        trig: CompiledTrigger,
        action: CompiledAction,
        args: dict[str, Any],
        command_id: str,
        cause: Cause | None,
        task_id: str | None,
    ) -> Command:
        cmd = action.command
        assert cmd is not None
        site = cmd.site or (cause.site if cause else None)
        device = cmd.device or (cause.device if cause else None)
        if not site or not device:
            raise ValueError(
                f"command {cmd.actuator!r} has no target: set site and device on the action (the cause names none)"
            )
        deadline = self.now() + timedelta(seconds=cmd.deadline or self.command_deadline)
        return Command(
            command_id=command_id,
            site=site,
            device=device,
            actuator=cmd.actuator,
            args=args,
            deadline=deadline,
            task_id=task_id,
            trigger=trig.name,
            cause=cause,
        )

    # ---- results -------------------------------------------------------------------
    def on_result(self, result: TaskResult) -> tuple[list[Command], Failure | None]:
        """Commands a task result asks for according to its trigger's ``on_result``.

        A result for a trigger that does not exist (any more) is a failure
        (it goes to the dead-letter topic); one whose status or condition does
        not apply gives no commands.
        """
        if not result.trigger:
            return [], Failure(None, f"result of task {result.task_id} names no trigger")
        trig = self._by_name.get(result.trigger)
        if trig is None:
            return [], Failure(
                result.trigger,
                f"result of task {result.task_id} is for trigger {result.trigger!r}, which is not in the triggers file",
            )
        rule = trig.on_result
        if rule is None or result.status not in rule.statuses:
            return [], None
        cause = result.cause
        variables = {
            "result": result.model_dump(mode="json"),
            "cause": cause.model_dump(mode="json") if cause else {},
            "trigger": trig.name,
        }
        try:
            if rule.when is not None and not rule.when.truth(variables):
                return [], None
            commands = [
                self._command(
                    trig, a, a.args.render(variables), stable_id(result.task_id, str(a.index)), cause, result.task_id
                )
                for a in rule.commands
            ]
        except (CelEvalError, ValueError, TypeError) as exc:
            return [], Failure(trig.name, f"on_result for task {result.task_id}: {exc}")
        return commands, None


class MemoryStore(dict[str, dict[str, Any]]):
    """State store of a dry run: a dict that takes an :class:`Outcome`'s states."""

    def apply(self, outcome: Outcome) -> None:
        """Store the states an outcome changed."""
        self.update(outcome.states)
