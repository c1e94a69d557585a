"""The trigger engine: events and state in, decisions out. No broker, no clock of its own.

The faust worker, ``reflexarc triggers test`` and the unit tests all run this
same code. State is a JSON dict per *state key* (``trigger\\x1fsite/device`` or
``...\\x1fsite/device/stream``); the caller stores it (a faust table in the
worker, a dict in a dry run) and hands it back for the next event of that key.

Determinism is what makes restarts exact: decisions depend only on the
events (their event time, not the wall clock) and the state, and every
request carries an id derived from the events that caused it
(``stable_id(trigger, event ids...)``), so replaying an event after a crash
reproduces the same request instead of a second task. A state records the
source position (Kafka offset) of the last event applied to it, so an event
replayed after its state change was already stored is not counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from reflexarc.cloud.expr import CelEvalError, Scope
from reflexarc.cloud.validate import CompiledAction, CompiledConfig, CompiledTrigger
from reflexarc.cloud.windows import Pane, WindowKeeper
from reflexarc.envelope import Envelope, EnvelopeError, EventType, utcnow
from reflexarc.events import Cause, Command, Resources, TaskRequest, TaskResult, stable_id

log = logging.getLogger(__name__)
SEP = "\x1f"


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


@dataclass
class Outcome:
    """What one event caused: firings, state to store, failures, late events."""

    firings: list[Firing] = field(default_factory=list)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    late: int = 0
    skipped: int = 0


def epoch(t: datetime) -> float:
    """Event time as epoch seconds (naive times are UTC)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def from_epoch(x: float | None) -> datetime | None:
    """Inverse of :func:`epoch`."""
    return None if x is None else datetime.fromtimestamp(x, UTC)


def event_context(env: Envelope) -> dict[str, Any]:
    """The ``event`` variable of CEL for one instrument event."""
    return {
        "id": env.id,
        "type": env.type,
        "source": env.source,
        "site": env.site or "",
        "device": env.device or "",
        "stream": env.subject or "",
        "time": env.time if env.time.tzinfo else env.time.replace(tzinfo=UTC),
        "data": env.data if isinstance(env.data, dict) else {},
    }


def _stored_event(ctx: dict[str, Any]) -> dict[str, Any]:
    return {**ctx, "time": epoch(ctx["time"])}


def _loaded_event(stored: dict[str, Any]) -> dict[str, Any]:
    return {**stored, "time": from_epoch(stored["time"])}


def _window_vars(p: Pane) -> dict[str, Any]:
    v = p.variables()
    for k in ("start", "end", "first_time", "last_time"):
        v[k] = from_epoch(v[k])
    return v


class TriggerEngine:
    """Evaluates compiled triggers against events; pure apart from the ``now`` used for deadlines."""

    def __init__(self, config: CompiledConfig, now: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self.now = now
        self.triggers = [t for t in config.triggers if t.spec.enabled]
        self._by_name = {t.name: t for t in config.triggers}
        self.trigger_names = frozenset(self._by_name)
        self._keepers = {t.name: WindowKeeper(t.spec.window) for t in self.triggers if t.spec.window}
        self._select_cache: dict[tuple[str, str, str], list[CompiledTrigger]] = {}
        self.command_deadline = config.file.command_deadline

    # ---- selection -----------------------------------------------------------------
    def selected(self, site: str, device: str, stream: str) -> list[CompiledTrigger]:
        """Triggers listening to one stream (cached: selectors are fixed per config)."""
        k = (site, device, stream)
        hit = self._select_cache.get(k)
        if hit is None:
            if len(self._select_cache) > 100_000:
                self._select_cache.clear()
            hit = [t for t in self.triggers if t.selects(site, device, stream)]
            self._select_cache[k] = hit
        return hit

    @staticmethod
    def state_key(trig: CompiledTrigger, site: str, device: str, stream: str) -> str:
        """Where a trigger's state for this event lives."""
        by_stream = trig.spec.window is not None and trig.spec.window.key == "stream"
        key = f"{site}/{device}/{stream}" if by_stream else f"{site}/{device}"
        return f"{trig.name}{SEP}{key}"

    def state_keys(self, env: Envelope) -> list[str]:
        """The state keys an event may read or write (for a store to fetch in advance)."""
        site, device, stream = env.site or "", env.device or "", env.subject or ""
        return [self.state_key(t, site, device, stream) for t in self.selected(site, device, stream) if t.stateful]

    # ---- events --------------------------------------------------------------------
    def check_event(self, env: Envelope) -> None:
        """Raise :class:`EnvelopeError` if ``env`` is not an instrument event the engine can use."""
        if env.type != EventType.DATA.value:
            raise EnvelopeError(f"expected a {EventType.DATA.value} event, got {env.type!r}")
        missing = [n for n, v in (("site", env.site), ("device", env.device), ("subject (stream)", env.subject)) if not v]
        if missing:
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
        and is skipped for that state.
        """
        self.check_event(env)
        out = Outcome()
        ctx = event_context(env)
        scope = Scope({"event": ctx})
        site, device, stream = ctx["site"], ctx["device"], ctx["stream"]
        for trig in self.selected(site, device, stream):
            try:
                self._one(trig, scope, ctx, states, position, out)
            except CelEvalError as exc:
                out.failures.append(Failure(trig.name, str(exc)))
            except (TypeError, ValueError) as exc:
                out.failures.append(Failure(trig.name, f"{type(exc).__name__}: {exc}"))
        return out

    def _one(
        self,
        trig: CompiledTrigger,
        scope: Scope,
        ctx: dict[str, Any],
        states: Mapping[str, dict[str, Any] | None],
        position: int | None,
        out: Outcome,
    ) -> None:
        extra = {"trigger": trig.name}
        if trig.filter is not None and not trig.filter.truth(scope.get(trig.filter, extra)):
            return
        site, device, stream = ctx["site"], ctx["device"], ctx["stream"]
        skey = self.state_key(trig, site, device, stream)
        key = skey.split(SEP, 1)[1]
        state: dict[str, Any] | None = None
        if trig.stateful:
            old = states.get(skey)
            if old is not None and old.get("fp") == trig.fingerprint:
                if position is not None and old.get("pos") is not None and position <= old["pos"]:
                    out.skipped += 1
                    return
                # Updated in place: the caller stores it again (a condition that fails
                # afterwards still leaves the event counted in its window).
                state = old
            else:
                state = {"fp": trig.fingerprint}
        t = epoch(ctx["time"])
        candidates: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]] = []
        if trig.spec.window is not None:
            assert state is not None
            values = {
                n: (e.eval(scope.get(e, extra)) if e is not None else None) for n, e in trig.aggregates.items()
            }
            keeper = self._keepers[trig.name]
            up = keeper.add_event(state.setdefault("win", {}), t, values, _stored_event(ctx))
            if up.late:
                out.late += 1
            panes = up.closed if trig.spec.window.emit == "close" else up.current
            for pane in panes:
                pctx = _loaded_event(pane.last_event) if pane.last_event else ctx
                ids = [pane.first_event_id, pane.last_event_id] if trig.spec.window.emit == "close" else [ctx["id"]]
                ids = [i for i in dict.fromkeys(ids) if i]
                candidates.append((pctx, pane.values, _window_vars(pane), ids))
        else:
            candidates.append((ctx, {}, {}, [ctx["id"]]))
        for ectx, agg, window, ids in candidates:
            variables = {"event": ectx, "agg": agg, "window": window, "key": key, "trigger": trig.name}
            wctx = scope.get(trig.when, variables) if ectx is ctx else {
                k: variables[k] for k in trig.when.variables if k in variables
            }
            if not trig.when.truth(wctx):
                continue
            fire_t = epoch(ectx["time"])
            if trig.spec.cooldown is not None:
                assert state is not None
                until = state.get("cool")
                if until is not None and fire_t < until:
                    continue
                state["cool"] = fire_t + trig.spec.cooldown
            out.firings.append(self._fire(trig, key, ectx, ids, variables))
            if trig.spec.window is None or trig.spec.window.emit == "update":
                break  # at most one firing per event (the oldest window that holds)
        if state is not None:
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
                f"command {cmd.actuator!r} has no target: set site and device on the action "
                "(the cause names none)"
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
            return [], Failure(result.trigger, f"result of task {result.task_id} is for trigger "
                               f"{result.trigger!r}, which is not in the triggers file")
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
                self._command(trig, a, a.args.render(variables), stable_id(result.task_id, str(a.index)), cause, result.task_id)
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
