"""``reflexarc triggers test``: run the engine over recorded events without any broker.

Each line of the events file is one JSON object, either a structured
CloudEvent (``{"specversion": "1.0", ...}``, as ``reflexarc results subscribe``
or a Kafka dump prints them) or the short form::

    {"site": "bl1", "device": "det1", "stream": "counts", "time": "2024-05-01T12:00:00Z", "data": {"value": 450}}

(``id`` is optional: a missing one is derived from the line, so a dry run is
repeatable). The same :class:`~reflexarc.cloud.engine.TriggerEngine` as the
worker evaluates them, with state in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reflexarc.cloud.engine import CONFLICT_MESSAGE, Firing, MemoryStore, TriggerEngine
from reflexarc.cloud.validate import CompiledConfig
from reflexarc.envelope import Envelope, EnvelopeError, EventType
from reflexarc.events import stable_id
from reflexarc.topics import TopicError


class DryRunError(ValueError):
    """The events file cannot be read at all."""


@dataclass
class DryRunReport:
    """Firings of a dry run, and the lines that could not be used."""

    firings: list[tuple[int, Firing]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    events: int = 0
    duplicates: int = 0

    def lines(self, as_json: bool = False) -> list[str]:
        """One line per firing (text or JSON)."""
        out = []
        for lineno, f in self.firings:
            if as_json:
                out.append(
                    json.dumps(
                        {
                            "line": lineno,
                            "trigger": f.trigger,
                            "key": f.key,
                            "cause": f.cause.model_dump(mode="json"),
                            "tasks": [t.model_dump(mode="json", exclude={"cause"}) for t in f.tasks],
                            "commands": [c.model_dump(mode="json", exclude={"cause", "deadline"}) for c in f.commands],
                        },
                        sort_keys=True,
                    )
                )
                continue
            when = f.cause.time.isoformat() if f.cause.time else "?"
            acts = [
                f"task {t.app}@{t.site} id={t.task_id[:12]} args={json.dumps(t.args, sort_keys=True)}" for t in f.tasks
            ]
            acts += [
                f"command {c.actuator} -> {c.site}/{c.device} args={json.dumps(c.args, sort_keys=True)}"
                for c in f.commands
            ]
            out.append(f"line {lineno}: {when} {f.trigger} [{f.key}] fires: " + "; ".join(acts))
        return out

    def summary(self) -> str:
        """Totals per trigger."""
        counts: dict[str, int] = {}
        for _, f in self.firings:
            counts[f.trigger] = counts.get(f.trigger, 0) + 1
        per = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no trigger fired"
        dupes = f", {self.duplicates} duplicate events ignored" if self.duplicates else ""
        return f"{self.events} events, {len(self.firings)} firings ({per}){dupes}, {len(self.problems)} problems"


def parse_event_line(text: str, lineno: int, source: str = "events") -> Envelope:
    """One line of an events file as an instrument event."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EnvelopeError("each line must be a JSON object")
    if "specversion" in obj:
        return Envelope.from_json(text.encode())
    missing = [k for k in ("site", "device", "stream") if not isinstance(obj.get(k), str)]
    if missing:
        raise EnvelopeError(f"missing {', '.join(missing)} (or give a structured CloudEvent)")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise EnvelopeError("'data' must be a JSON object")
    raw_time = obj.get("time")
    if raw_time is None:
        raise EnvelopeError("missing 'time' (event time, RFC 3339): windows and cooldowns run on it")
    try:
        t = datetime.fromisoformat(str(raw_time).replace("Z", "+00:00"))
    except ValueError:
        raise EnvelopeError(f"invalid time {raw_time!r} (want RFC 3339)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    event_id = obj.get("id") or stable_id(source, str(lineno), text.strip())
    try:
        return Envelope.for_device(
            EventType.DATA, obj["site"], obj["device"], data, subject=obj["stream"], id=str(event_id), time=t
        )
    except TopicError as exc:
        raise EnvelopeError(str(exc)) from None


def dry_run(config: CompiledConfig, events: Path | str, engine: TriggerEngine | None = None) -> DryRunReport:
    """Evaluate every event of a JSONL file; state lives in memory."""
    path = Path(events)
    try:
        fh = path.open()
    except OSError as exc:
        raise DryRunError(f"cannot read {path}: {exc.strerror}") from None
    engine = engine or TriggerEngine(config)
    store = MemoryStore()
    report = DryRunReport()
    with fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            report.events += 1
            try:
                env = parse_event_line(text, lineno, str(path))
                outcome = engine.process(env, store, position=None)
            except EnvelopeError as exc:
                report.problems.append(f"{path}:{lineno}: {exc}")
                continue
            store.apply(outcome)
            report.firings.extend((lineno, f) for f in outcome.firings)
            report.problems.extend(f"{path}:{lineno}: trigger '{f.trigger}': {f.message}" for f in outcome.failures)
            if outcome.conflict:
                report.problems.append(f"{path}:{lineno}: " + CONFLICT_MESSAGE.format(id=env.id))
            elif outcome.duplicate:
                report.duplicates += 1
    return report


def summarize_args(firing: Firing) -> dict[str, Any]:
    """The task arguments of a firing, by app (handy in tests and notebooks)."""
    return {t.app: t.args for t in firing.tasks}
