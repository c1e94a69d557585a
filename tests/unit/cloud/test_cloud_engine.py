"""The pure trigger engine: every construct fires, and does not fire just across its boundary."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reflexarc.cloud.engine import Firing, TriggerEngine
from reflexarc.cloud.validate import compile_text
from reflexarc.envelope import Envelope, EventType
from reflexarc.events import Cause, TaskResult, stable_id

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SITE = "site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n  other: {function: 'pkg.mod:other'}\n"


def engine(tmp_path: Path, triggers: str, extra: str = "") -> TriggerEngine:
    """An engine for a triggers list (YAML text of the list items)."""
    (tmp_path / "site.yaml").write_text(SITE)
    body = "sites: [site.yaml]\n" + extra + "triggers:\n" + textwrap.indent(textwrap.dedent(triggers), "  ")
    cfg = compile_text(body, str(tmp_path / "triggers.yaml"), tmp_path)
    return TriggerEngine(cfg, now=lambda: T0)


def ev(
    i: int, seconds: float, data: dict[str, Any], device: str = "det1", stream: str = "counts", site: str = "bl1"
) -> Envelope:
    """Instrument event number ``i`` at ``T0 + seconds``."""
    return Envelope.for_device(
        EventType.DATA, site, device, data, subject=stream, id=f"e{i}", time=T0 + timedelta(seconds=seconds)
    )


def run(
    eng: TriggerEngine, events: list[Envelope], store: dict[str, Any] | None = None, start: int = 0
) -> list[Firing]:
    """Feed events in order; state goes through JSON between events, as in the faust table."""
    store = {} if store is None else store
    fired: list[Firing] = []
    for pos, e in enumerate(events, start):
        states = {k: store.get(k) for k in eng.state_keys(e)}
        out = eng.process(e, states, position=pos)
        assert not out.failures, out.failures
        for k, v in out.states.items():
            store[k] = json.loads(json.dumps(v))
        fired.extend(out.firings)
    return fired


def names(fired: list[Firing]) -> list[str]:
    return [f.trigger for f in fired]


# ---- threshold, filter ---------------------------------------------------------------
THRESHOLD = """
- name: thr
  on: bl1/+/counts
  when: event.data.value > 400
  then: [{task: {app: fit, args: {v: event.data.value}}}]
"""


def test_threshold_fires_above_and_not_at_the_boundary(tmp_path: Path) -> None:
    eng = engine(tmp_path, THRESHOLD)
    fired = run(eng, [ev(0, 0, {"value": 400}), ev(1, 1, {"value": 401}), ev(2, 2, {"value": 400.0})])
    assert [f.cause.event_ids for f in fired] == [["e1"]]
    task = fired[0].tasks[0]
    assert task.task_id == stable_id("thr", "e1")
    assert task.args == {"v": 401}
    assert task.site == "local" and task.trigger == "thr"
    assert task.cause == Cause(
        event_ids=["e1"], site="bl1", device="det1", stream="counts", time=T0 + timedelta(seconds=1)
    )


def test_on_selects_streams_with_wildcards(tmp_path: Path) -> None:
    eng = engine(tmp_path, THRESHOLD)
    fired = run(
        eng,
        [
            ev(0, 0, {"value": 500}, stream="temps"),
            ev(1, 0, {"value": 500}, site="bl2"),
            ev(2, 0, {"value": 500}, device="det9"),
        ],
    )
    assert [f.cause.event_ids for f in fired] == [["e2"]]


def test_filter_drops_events_before_the_condition(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: flt
      on: bl1/+/counts
      filter: event.data.quality >= 0.5
      when: event.data.value > 1
      then: [{task: {app: fit}}]
    """,
    )
    fired = run(eng, [ev(0, 0, {"value": 5, "quality": 0.49}), ev(1, 1, {"value": 5, "quality": 0.5})])
    assert [f.cause.event_ids for f in fired] == [["e1"]]


# ---- tumbling ------------------------------------------------------------------------
def test_tumbling_time_window_counts_per_window(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: tum
      on: bl1/+/counts
      window: {type: tumbling, size: 10s, aggregates: {s: {op: sum, of: event.data.value}}}
      when: agg.s >= 10
      then: [{task: {app: fit, args: {s: agg.s, start: window.start}}}]
    """,
    )
    # Window [0,10): 4+5 = 9 (no fire); window [10,20): 9 then +1 = 10 at t=19.999 -> fires once.
    fired = run(
        eng, [ev(0, 0, {"value": 4}), ev(1, 9.5, {"value": 5}), ev(2, 10, {"value": 9}), ev(3, 19.999, {"value": 1})]
    )
    assert [f.cause.event_ids for f in fired] == [["e3"]]
    assert fired[0].tasks[0].args["s"] == 10
    assert fired[0].tasks[0].args["start"].startswith("2024-05-01T12:00:10")


def test_tumbling_close_emits_once_per_complete_window(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: tclose
      on: bl1/+/counts
      window: {type: tumbling, size: 10s, emit: close, aggregates: {n: {op: count}}}
      when: agg.n >= 3
      then: [{task: {app: fit, args: {n: agg.n}}}]
    """,
    )
    events = [
        ev(0, 1, {}),
        ev(1, 2, {}),
        ev(2, 3, {}),  # [0,10): 3 events
        ev(3, 11, {}),
        ev(4, 12, {}),  # [10,20): 2 events
        ev(5, 25, {}),
    ]  # closes [10,20)
    fired = run(eng, events)
    assert len(fired) == 1
    assert fired[0].cause.event_ids == ["e0", "e2"]
    assert fired[0].tasks[0].args == {"n": 3}
    # The window closed at e3, not before.
    assert (
        len(
            run(
                engine(
                    tmp_path,
                    """
    - name: tclose
      on: bl1/+/counts
      window: {type: tumbling, size: 10s, emit: close, aggregates: {n: {op: count}}}
      when: agg.n >= 3
      then: [{task: {app: fit}}]
    """,
                ),
                events[:3],
            )
        )
        == 0
    )


def test_every_100th_frame(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: every100
      on: bl1/+/frames
      window: {type: tumbling, events: 100, emit: close, aggregates: {last: {op: last, of: event.data.frame}}}
      when: "true"
      then: [{task: {app: fit, args: {frame: agg.last}}}]
    """,
    )
    events = [ev(i, i * 0.01, {"frame": i + 1}, stream="frames") for i in range(299)]
    fired = run(eng, events)
    assert [f.tasks[0].args["frame"] for f in fired] == [100, 200]  # frame 300 not yet seen


# ---- hopping -------------------------------------------------------------------------
HOPPING = """
- name: hop
  on: bl1/+/counts
  window:
    type: hopping
    size: 10s
    hop: 2s
    aggregates: {mean: {op: mean, of: double(event.data.value)}, n: {op: count}}
  when: agg.n >= 3 && agg.mean > 300.0
  then: [{task: {app: fit, args: {mean: agg.mean}}}]
"""


def test_hopping_mean_above_threshold_in_any_10s_window(tmp_path: Path) -> None:
    eng = engine(tmp_path, HOPPING)
    # Low values early; the later high ones share a 10 s window without the low ones only
    # in windows starting at >= 4 s.
    fired = run(
        eng,
        [
            ev(0, 0, {"value": 0}),
            ev(1, 3, {"value": 0}),
            ev(2, 8, {"value": 400}),
            ev(3, 11, {"value": 400}),
            ev(4, 13, {"value": 301}),
        ],
    )
    assert [f.cause.event_ids for f in fired] == [["e4"]]
    assert fired[0].tasks[0].args["mean"] == pytest.approx((400 + 400 + 301) / 3)


def test_hopping_mean_at_threshold_does_not_fire(tmp_path: Path) -> None:
    eng = engine(tmp_path, HOPPING)
    fired = run(
        eng,
        [
            ev(0, 0, {"value": 0}),
            ev(1, 3, {"value": 0}),
            ev(2, 8, {"value": 300}),
            ev(3, 11, {"value": 300}),
            ev(4, 13, {"value": 300}),
        ],
    )
    assert fired == []


# ---- sliding: sustained drop, rate of change -----------------------------------------
DROP = """
- name: drop
  on: bl1/+/intensity
  window: {type: sliding, size: 5s, aggregates: {peak: {op: max, of: double(event.data.i)}}}
  when: agg.peak < 10.0 && window.span >= 5.0
  then: [{command: {actuator: shutter, args: {position: "'closed'"}}}]
"""


def _intensity(values: list[tuple[float, float]]) -> list[Envelope]:
    return [ev(i, t, {"i": v}, stream="intensity") for i, (t, v) in enumerate(values)]


def test_sustained_drop_over_5s_fires(tmp_path: Path) -> None:
    eng = engine(tmp_path, DROP, "signing_key_file: none.pem\n")
    fired = run(eng, _intensity([(0, 100), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (6, 5)]))
    # Low from t=1; [1, 6] is the first 5 s window of low values only.
    assert [f.cause.event_ids for f in fired] == [["e6"]]
    cmd = fired[0].commands[0]
    assert (cmd.site, cmd.device, cmd.actuator, cmd.args) == ("bl1", "det1", "shutter", {"position": "closed"})
    assert cmd.deadline == T0 + timedelta(seconds=60)


def test_drop_of_4_9s_does_not_fire(tmp_path: Path) -> None:
    eng = engine(tmp_path, DROP)
    fired = run(eng, _intensity([(0, 100), (1, 5), (2, 5), (3, 5), (4, 5), (5.9, 5), (6.0, 100)]))
    assert fired == []


RATE = """
- name: heat
  on: +/+/temperature
  window: {type: sliding, size: 60s, aggregates: {slope: {op: rate, of: double(event.data.k)}}}
  when: window.count >= 2 && agg.slope * 60.0 > 2.0
  then: [{task: {app: fit, args: {per_min: agg.slope * 60.0}}}]
"""


@pytest.mark.parametrize(("rise", "fires"), [(2.5, True), (2.0, False), (1.9, False)])
def test_temperature_rising_faster_than_2k_per_min(tmp_path: Path, rise: float, fires: bool) -> None:
    eng = engine(tmp_path, RATE)
    events = [ev(i, 30.0 * i, {"k": 300.0 + rise * i / 2}, device="oven", stream="temperature") for i in range(3)]
    fired = run(eng, events)
    assert bool(fired) is fires
    if fires:
        assert fired[0].tasks[0].args["per_min"] == pytest.approx(rise)


def test_sliding_by_events_and_other_aggregates(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: last3
      on: bl1/+/counts
      window:
        type: sliding
        events: 3
        aggregates:
          n: {op: count}
          lo: {op: min, of: event.data.v}
          hi: {op: max, of: event.data.v}
          first: {op: first, of: event.data.v}
          last: {op: last, of: event.data.v}
          total: {op: sum, of: event.data.v}
      when: agg.n == 3 && agg.total > 6
      then: [{task: {app: fit, args: {a: agg}}}]
    """,
    )
    fired = run(eng, [ev(i, i, {"v": v}) for i, v in enumerate([1, 2, 3, 1, 5])])
    # Windows: [1,2,3]=6 no; [2,3,1]=6 no; [3,1,5]=9 yes.
    assert [f.cause.event_ids for f in fired] == [["e4"]]
    assert fired[0].tasks[0].args["a"] == {"n": 3, "lo": 1, "hi": 5, "first": 3, "last": 5, "total": 9}


# ---- cooldown, keys, actions -----------------------------------------------------------
COOL = """
- name: cool
  on: bl1/+/counts
  when: event.data.value > 400
  cooldown: 10s
  then: [{task: {app: fit}}]
"""


def test_cooldown_per_key_boundary(tmp_path: Path) -> None:
    eng = engine(tmp_path, COOL)
    fired = run(
        eng,
        [
            ev(0, 0, {"value": 500}),  # fires, quiet until t=10
            ev(1, 9.999, {"value": 500}),  # inside the cooldown
            ev(2, 5, {"value": 500}, device="det2"),  # another key: fires
            ev(3, 10, {"value": 500}),  # cooldown over: fires
        ],
    )
    assert [f.cause.event_ids for f in fired] == [["e0"], ["e2"], ["e3"]]


def test_window_key_stream_separates_streams(tmp_path: Path) -> None:
    tmpl = """
    - name: bykey
      on: bl1/det1/+
      window: {{type: tumbling, events: 2, key: {key}, aggregates: {{n: {{op: count}}}}}}
      when: agg.n == 2
      then: [{{task: {{app: fit, args: {{k: key}}}}}}]
    """
    events = [ev(0, 0, {}, stream="a"), ev(1, 1, {}, stream="b")]
    assert names(run(engine(tmp_path, tmpl.format(key="device")), events)) == ["bykey"]
    assert run(engine(tmp_path, tmpl.format(key="stream")), events) == []


def test_multiple_actions_have_distinct_stable_ids(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: multi
      on: bl1/+/counts
      when: "true"
      then:
        - task: {app: fit, priority: 7, timeout: 5m, retries: 2, resources: {cpus: 4, gpus: 1}}
        - task: {app: other, args: {x: "'lit'", n: 3}}
        - command: {actuator: led, site: bl1, device: panel, deadline: 5s, args: {lit: true}}
    """,
    )
    fired = run(eng, [ev(0, 0, {})])
    f = fired[0]
    t1, t2 = f.tasks
    assert t1.task_id == stable_id("multi", "e0") and t2.task_id == stable_id("multi", "e0", "1")
    assert (t1.priority, t1.timeout_s, t1.retries, t1.resources.cpus, t1.resources.gpus) == (7, 300.0, 2, 4, 1)
    assert t2.args == {"x": "lit", "n": 3}
    (cmd,) = f.commands
    assert cmd.command_id == stable_id("multi", "e0", "command", "2")
    assert (cmd.site, cmd.device, cmd.args, cmd.deadline) == ("bl1", "panel", {"lit": True}, T0 + timedelta(seconds=5))
    # Same event again (e.g. redelivered without position): same ids.
    again = run(
        engine(
            tmp_path,
            """
    - name: multi
      on: bl1/+/counts
      when: "true"
      then: [{task: {app: fit}}]
    """,
        ),
        [ev(0, 0, {})],
    )
    assert again[0].tasks[0].task_id == t1.task_id


# ---- replay, determinism, errors -----------------------------------------------------------
def test_replayed_positions_are_not_counted_twice(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: three
      on: bl1/+/counts
      window: {type: tumbling, events: 3, emit: close, aggregates: {n: {op: count}}}
      when: "true"
      then: [{task: {app: fit}}]
    """,
    )
    store: dict[str, Any] = {}
    events = [ev(i, i, {}) for i in range(6)]
    first = run(eng, events[:2], store)
    # A crash after storing state for positions 0-1 replays them: they must be skipped.
    replay = run(eng, events[:4], store)
    rest = run(eng, events[4:], store, start=4)
    assert first == [] and len(replay) == 1 and len(rest) == 1
    assert [f.cause.event_ids for f in replay + rest] == [["e0", "e2"], ["e3", "e5"]]


def test_same_events_same_decisions(tmp_path: Path) -> None:
    events = [ev(i, i * 0.7, {"value": (i * 37) % 500}) for i in range(200)]
    a = run(engine(tmp_path, HOPPING), events)
    b = run(engine(tmp_path, HOPPING), events)
    assert a and [t.task_id for f in a for t in f.tasks] == [t.task_id for f in b for t in f.tasks]


def test_late_events_are_ignored_by_time_windows(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
    - name: late
      on: bl1/+/counts
      window: {type: tumbling, size: 10s, aggregates: {n: {op: count}}}
      when: agg.n >= 2
      then: [{task: {app: fit}}]
    """,
    )
    store: dict[str, Any] = {}
    run(eng, [ev(0, 25, {})], store)
    out = eng.process(ev(1, 5, {}), store, position=1)
    assert out.late == 1 and out.firings == []


def test_evaluation_errors_are_reported_not_raised(tmp_path: Path) -> None:
    eng = engine(tmp_path, THRESHOLD)
    out = eng.process(ev(0, 0, {"other": 1}), {}, position=0)
    assert out.firings == [] and len(out.failures) == 1
    assert out.failures[0].trigger == "thr" and "value" in out.failures[0].message
    out = eng.process(ev(1, 0, {"value": "high"}), {}, position=1)
    assert out.failures and "No such overload" in out.failures[0].message


def test_non_boolean_condition_is_an_error(tmp_path: Path) -> None:
    eng = engine(tmp_path, THRESHOLD.replace("event.data.value > 400", "event.data.value"))
    out = eng.process(ev(0, 0, {"value": 1}), {}, position=0)
    assert "not true/false" in out.failures[0].message


# ---- on_result -------------------------------------------------------------------------
ON_RESULT = """
- name: fitres
  on: bl1/+/counts
  when: event.data.value > 400
  then: [{task: {app: fit}}]
  on_result:
    when: result.result.peak > 0.0
    commands:
      - {actuator: motor, args: {position: result.result.peak, from: cause.device}, deadline: 30s}
      - {actuator: log, device: logger}
"""


def _result(status: str = "done", peak: float = 1.5, trigger: str = "fitres") -> TaskResult:
    cause = Cause(event_ids=["e1"], site="bl1", device="det1", stream="counts", time=T0)
    return TaskResult(
        task_id="t1", app="fit", site="local", status=status, result={"peak": peak}, trigger=trigger, cause=cause
    )


def test_on_result_turns_done_results_into_commands(tmp_path: Path) -> None:
    eng = engine(tmp_path, ON_RESULT)
    cmds, failure = eng.on_result(_result())
    assert failure is None and len(cmds) == 2
    motor, log = cmds
    assert motor.command_id == stable_id("t1", "0") and log.command_id == stable_id("t1", "1")
    assert (motor.site, motor.device, motor.args) == ("bl1", "det1", {"position": 1.5, "from": "det1"})
    assert motor.deadline == T0 + timedelta(seconds=30) and motor.task_id == "t1"
    assert motor.cause is not None and motor.cause.event_ids == ["e1"]
    assert log.device == "logger" and log.site == "bl1"


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (_result(peak=0.0), "when is false at the boundary"),
        (_result(status="failed"), "status not listed"),
    ],
)
def test_on_result_gives_nothing(tmp_path: Path, result: TaskResult, why: str) -> None:
    cmds, failure = engine(tmp_path, ON_RESULT).on_result(result)
    assert (cmds, failure) == ([], None), why


def test_result_of_unknown_trigger_is_a_failure(tmp_path: Path) -> None:
    cmds, failure = engine(tmp_path, ON_RESULT).on_result(_result(trigger="gone"))
    assert cmds == [] and failure is not None and "'gone'" in failure.message


# ---- triggers without state: evaluated together, each as on its own -------------------
GROUP = """
- {name: a, on: bl1/+/counts, filter: has(event.data.x), when: event.data.v > 1, then: [{task: {app: fit}}]}
- {name: b, on: bl1/+/counts, filter: has(event.data.x), when: event.data.v > 1, then: [{task: {app: fit}}]}
- {name: c, on: bl1/+/counts, filter: event.data.v > 100, when: event.data.v > 1, then: [{task: {app: fit}}]}
- {name: d, on: bl1/+/counts, when: event.data.v > 1, then: [{task: {app: fit}}]}
- {name: e, on: bl1/+/counts, when: "trigger == 'e'", then: [{task: {app: fit}}]}
- {name: f, on: bl1/+/counts, when: "trigger == 'e'", then: [{task: {app: fit}}]}
- {name: g, on: bl1/+/counts, filter: has(event.data.m), when: event.data.m.x > 1, then: [{task: {app: fit}}]}
- {name: h, on: bl1/+/counts, when: "event.data.s.matches('^a')", then: [{task: {app: fit}}]}
- {name: i, on: bl1/+/counts, when: event.data.nope > 1, then: [{task: {app: fit}}]}
- {name: j, on: bl1/+/counts, filter: event.data.v > 1, when: event.data.v > 1, then: [{task: {app: fit}}]}
"""


@pytest.mark.parametrize(
    ("data", "fired"),
    [
        ({"x": 1, "v": 5, "s": "abc"}, ["a", "b", "d", "e", "h", "j"]),
        ({"v": 0, "s": "zz"}, ["e"]),
        ({"x": 1, "v": 500, "s": "a", "m": {"x": 2}}, ["a", "b", "c", "d", "e", "g", "h", "j"]),
        ({"x": 1, "v": 5.5, "s": 3}, ["a", "b", "d", "e", "j"]),  # h fails: matches() of a number
    ],
)
def test_triggers_without_state_fire_and_fail_each_as_alone(
    tmp_path: Path, data: dict[str, Any], fired: list[str]
) -> None:
    eng = engine(tmp_path, GROUP)
    out = eng.process(ev(0, 0, data), {}, position=0)
    assert [f.trigger for f in out.firings] == fired
    failed = sorted(f.trigger for f in out.failures)
    assert failed == (["h", "i"] if data["s"] == 3 else ["i"]), out.failures
    assert "nope" in next(f.message for f in out.failures if f.trigger == "i")


def test_the_selector_index_matches_as_mqtt_filters_do(tmp_path: Path) -> None:
    import itertools

    from reflexarc.cloud.engine import SelectorIndex
    from reflexarc.topics import mqtt_match

    levels = ["s1", "s2", "+"]
    selectors = ["#", "s1/#", "+/#", "s1/d1/#", "+/+/#"] + [
        "/".join(p) for p in itertools.product(levels, ["d1", "+"], ["x", "+"])
    ]
    triggers = [SimpleNamespace(spec=SimpleNamespace(on=[sel])) for sel in selectors]
    index = SelectorIndex(triggers)  # type: ignore[arg-type]
    for names in itertools.product(["s1", "s2"], ["d1", "d2"], ["x", "y"]):
        want = {i for i, sel in enumerate(selectors) if mqtt_match(sel, "/".join(names))}
        assert index.lookup(names) == want, names
