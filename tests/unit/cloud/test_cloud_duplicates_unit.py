"""Each event id is applied at most once per state key: copies change nothing, in every window type.

A fog or broker redelivery puts a second copy of an event in Kafka, at another
offset. The engine must then fire exactly as on the events delivered once:
same firings, same task ids, same arguments.
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reflexarc.cloud import windows
from reflexarc.cloud.cli import triggers_app
from reflexarc.cloud.engine import MemoryStore, TriggerEngine
from reflexarc.cloud.validate import compile_text
from reflexarc.envelope import Envelope, EventType

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SITE = "site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n"

# One trigger per window type (and a cooldown), each firing several times over EVENTS.
WINDOWS = {
    "tumbling-time-update": "{type: tumbling, size: 4s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "tumbling-time-close": "{type: tumbling, size: 4s, emit: close, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "tumbling-count-update": "{type: tumbling, events: 3, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "tumbling-count-close": "{type: tumbling, events: 3, emit: close, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "hopping-update": "{type: hopping, size: 4s, hop: 1s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "hopping-close": "{type: hopping, size: 4s, hop: 1s, emit: close, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "sliding-time": "{type: sliding, size: 3s, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
    "sliding-count": "{type: sliding, events: 4, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}",
}
WHEN = {  # fire on some windows, not all, so that a shifted window would show
    "tumbling-time-update": "agg.s >= 12",
    "tumbling-time-close": "agg.n >= 3",
    "tumbling-count-update": "int(agg.s) % 2 == 0",
    "tumbling-count-close": "true",
    "hopping-update": "agg.s >= 20",
    "hopping-close": "int(agg.s) % 3 == 0",
    "sliding-time": "agg.s >= 15",
    "sliding-count": "agg.s >= 22.0",
}


def engine(tmp_path: Path, triggers: str) -> TriggerEngine:
    """An engine for a list of triggers (YAML text of the list items)."""
    (tmp_path / "site.yaml").write_text(SITE)
    body = "sites: [site.yaml]\ntriggers:\n" + textwrap.indent(textwrap.dedent(triggers), "  ")
    return TriggerEngine(compile_text(body, str(tmp_path / "triggers.yaml"), tmp_path), now=lambda: T0)


def window_trigger(kind: str) -> str:
    return f"""
- name: {kind}
  on: bl1/+/counts
  window: {WINDOWS[kind]}
  when: {json.dumps(WHEN[kind])}
  then: [{{task: {{app: fit, args: {{n: agg.n, s: agg.s, first: window.first_time}}}}}}]
"""


def ev(i: int, seconds: float, v: int, device: str = "det1") -> Envelope:
    return Envelope.for_device(
        EventType.DATA, "bl1", device, {"v": v}, subject="counts", id=f"e{i}", time=T0 + timedelta(seconds=seconds)
    )


EVENTS = [ev(i, 0.7 * i, (i * 7) % 10) for i in range(40)]


def run(eng: TriggerEngine, events: list[Envelope], store: dict[str, Any] | None = None) -> tuple[list[Any], int]:
    """Feed events at successive offsets (state through JSON, as in the changelog); (firings, duplicates)."""
    store = {} if store is None else store
    fired: list[Any] = []
    dupes = 0
    for pos, e in enumerate(events):
        out = eng.process(e, {k: store.get(k) for k in eng.state_keys(e)}, position=pos)
        assert not out.failures and not out.conflict, out.failures
        dupes += out.duplicate
        store.update({k: json.loads(json.dumps(v)) for k, v in out.states.items()})
        fired += [(f.trigger, t.task_id, t.args) for f in out.firings for t in f.tasks]
    return fired, dupes


def each_twice(events: list[Envelope]) -> list[Envelope]:
    return [e for e in events for _ in (0, 1)]


def late_copies(events: list[Envelope], every: int = 3, lag: int = 4) -> list[Envelope]:
    """Every ``every``-th event delivered again ``lag`` events later (a redelivery after a restart)."""
    out = list(events)
    for i in range(len(events) - 1, -1, -1):
        if i % every == 0:
            out.insert(min(i + 1 + lag, len(out)), events[i])
    return out


@pytest.mark.parametrize("kind", sorted(WINDOWS))
@pytest.mark.parametrize("copies", [each_twice, late_copies], ids=["each-twice", "late-copies"])
def test_copies_of_events_fire_exactly_as_the_events_once(tmp_path: Path, kind: str, copies: Any) -> None:
    once, none = run(engine(tmp_path, window_trigger(kind)), EVENTS)
    assert len(once) >= 2 and none == 0
    stream = copies(EVENTS)
    twice, dupes = run(engine(tmp_path, window_trigger(kind)), stream)
    assert twice == once
    # Every copy was recognised as one (or, delivered long after, was late for the window).
    assert dupes <= len(stream) - len(EVENTS)
    if copies is each_twice:
        assert dupes == len(EVENTS)


def test_cooldown_without_window_cannot_fire_twice_on_a_copy(tmp_path: Path) -> None:
    cool = """
- name: cool
  on: bl1/+/counts
  when: event.data.v >= 5
  cooldown: 2s
  then: [{task: {app: fit, args: {v: event.data.v}}}]
"""
    once, _ = run(engine(tmp_path, cool), EVENTS)
    assert len(once) >= 3
    assert run(engine(tmp_path, cool), each_twice(EVENTS))[0] == once
    assert run(engine(tmp_path, cool), late_copies(EVENTS))[0] == once


def test_the_issue_count_window_with_event_2_twice(tmp_path: Path) -> None:
    """``reflexarc triggers test``: 1..6 fire n=3,s=6 and n=3,s=15, with event 2 delivered twice as well."""
    (tmp_path / "site.yaml").write_text(SITE)
    f = tmp_path / "t.yaml"
    f.write_text(
        "sites: [site.yaml]\ntriggers:\n  - name: sum3\n    on: bl1/+/counts\n"
        "    window: {type: tumbling, events: 3, emit: close, aggregates: {n: {op: count}, s: {op: sum, of: event.data.v}}}\n"
        "    when: 'true'\n    then: [{task: {app: fit, args: {n: agg.n, s: agg.s}}}]\n"
    )
    lines = [
        json.dumps(
            {
                "id": f"e{i}",
                "site": "bl1",
                "device": "d1",
                "stream": "counts",
                "time": f"2024-05-01T12:00:0{i}Z",
                "data": {"v": i},
            }
        )
        for i in range(1, 7)
    ]
    outputs = []
    for name, seq in (("once", lines), ("dup", lines[:2] + lines[1:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(seq) + "\n")
        res = CliRunner().invoke(triggers_app, ["test", str(f), "--events", str(path), "--json"])
        assert res.exit_code == 0, res.output
        firings = [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]
        outputs.append([(t["task_id"], t["args"]) for fi in firings for t in fi["tasks"]])
        if name == "dup":
            assert "1 duplicate events ignored" in res.output
    once, dup = outputs
    assert [a for _, a in once] == [{"n": 3, "s": 6.0}, {"n": 3, "s": 15.0}]
    assert dup == once


def test_an_id_reused_for_other_data_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    eng = engine(tmp_path, window_trigger("tumbling-count-close"))
    store = MemoryStore()
    events = [ev(0, 0, 1), ev(1, 1, 2), ev(1, 1, 5), ev(2, 2, 3), ev(3, 3, 4)]  # e1 twice, other value
    outs = []
    for pos, e in enumerate(events):
        out = eng.process(e, store, position=pos)
        store.apply(out)
        outs.append(out)
    assert [o.conflict for o in outs] == [0, 0, 1, 0, 0]
    (firing,) = [f for o in outs for f in o.firings]
    assert firing.tasks[0].args["s"] == 6.0  # 1 + 2 + 3: the second e1 was not applied
    # The same id with the same data but another time is another event too.
    out = eng.process(ev(3, 3.5, 4), store, position=9)
    assert out.conflict == 1 and out.duplicate == 0


def test_dry_run_reports_a_conflict_as_a_problem(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(SITE)
    f = tmp_path / "t.yaml"
    f.write_text("sites: [site.yaml]\ntriggers:\n" + textwrap.indent(window_trigger("sliding-count"), "  "))
    ev_line = {"id": "x1", "site": "bl1", "device": "d1", "stream": "counts", "time": "2024-05-01T12:00:00Z"}
    path = tmp_path / "ev.jsonl"
    path.write_text(json.dumps({**ev_line, "data": {"v": 1}}) + "\n" + json.dumps({**ev_line, "data": {"v": 2}}) + "\n")
    res = CliRunner().invoke(triggers_app, ["test", str(f), "--events", str(path)])
    assert res.exit_code == 1  # a problem was reported (strict by default)
    assert f"{path}:2: event id 'x1' was applied already with other data" in res.output


@pytest.mark.parametrize("kind", sorted(WINDOWS))
def test_remembered_ids_stay_bounded_by_the_window(tmp_path: Path, kind: str) -> None:
    eng = engine(tmp_path, window_trigger(kind))
    store: dict[str, Any] = {}
    longest = 0
    for pos in range(3000):
        e = ev(pos, 0.1 * pos, pos % 10)
        out = eng.process(e, store, position=pos)
        store.update(out.states)
        (state,) = out.states.values()
        longest = max(longest, len(state["win"]["ids"]))
    # At most a window's worth (40 events of 0.1 s for 4 s windows, 2 count windows), doubled, plus slack.
    assert longest <= 2 * 40 + 64, longest
    # A copy of an event that was forgotten is late, never applied again.
    out = eng.process(ev(5, 0.5, 5), store, position=5000)
    assert out.firings == [] and (out.late == 1 or out.duplicate == 1)


def test_beyond_the_cap_the_oldest_ids_are_forgotten_and_their_time_is_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(windows, "MAX_REMEMBERED_IDS", 100)
    eng = engine(
        tmp_path,
        """
- name: day
  on: bl1/+/counts
  window: {type: tumbling, size: 1d, aggregates: {n: {op: count}}}
  when: agg.n % 50 == 0
  then: [{task: {app: fit}}]
""",
    )
    store: dict[str, Any] = {}
    fired = 0
    for pos in range(1000):
        out = eng.process(ev(pos, float(pos), 1), store, position=pos)
        store.update(out.states)
        fired += len(out.firings)
    win = next(iter(store.values()))["win"]
    assert fired == 20 and len(win["ids"]) <= 2 * 100
    # The window is open, but events at or before the forgotten ids' time can no longer be told from copies.
    floor = win["floor"] - T0.timestamp()
    assert 100 < floor < 1000
    for pos, seconds in ((1000, 10.0), (1001, floor - 0.5)):
        out = eng.process(ev(pos, seconds, 1), store, position=pos)
        assert out.late == 1 and not out.states[next(iter(out.states))]["win"]["ids"].get(f"e{pos}")
    # Newer than the floor: a new event counts, its copy does not.
    out = eng.process(ev(2000, 999.5, 1), store, position=2000)
    assert out.late == 0 and out.duplicate == 0
    out = eng.process(ev(2000, 999.5, 1), store, position=2001)
    assert out.duplicate == 1
