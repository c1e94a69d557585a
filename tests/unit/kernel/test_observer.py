"""The observer joins a loop's events by id and decides whether every loop closed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reflexarc.envelope import DeadLetter, Envelope, EventType
from reflexarc.events import Cause, Command, CommandAck, TaskRequest, TaskResult
from reflexarc.observer import LoopStats, percentile

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def loop_events(n: int, *, acked: bool = True, ok: bool = True) -> list[Envelope]:
    cause = Cause(event_ids=[f"ev-{n}"], site="bl1", device="det1", stream="counts", time=T0)
    tid = f"task-{n}"
    out = [
        Envelope.for_device(EventType.DATA, "bl1", "det1", {"value": 900}, subject="counts", id=f"ev-{n}", time=T0),
        TaskRequest(task_id=tid, app="find_peak", site="local", trigger="spike", cause=cause).to_envelope(),
        TaskResult(
            task_id=tid, app="find_peak", site="local", status="done", result={"position": 1.0}, cause=cause
        ).to_envelope(),
        Command(
            command_id=f"cmd-{n}", site="bl1", device="det1", actuator="motor", task_id=tid, cause=cause
        ).to_envelope(),
    ]
    if acked:
        at = T0 + timedelta(milliseconds=100 * (n + 1))
        out.append(
            CommandAck(command_id=f"cmd-{n}", site="bl1", device="det1", actuator="motor", ok=ok, at=at).to_envelope()
        )
    return out


def test_closed_loops_and_latency() -> None:
    stats = LoopStats()
    for n in range(3):
        for env in loop_events(n):
            stats.take(env)
    assert stats.events == 3 and len(stats.tasks) == 3 and stats.done() == 3
    assert stats.delivered() == 3 and stats.all_closed()
    assert [round(x, 3) for x in sorted(stats.latencies)] == [0.1, 0.2, 0.3]
    assert stats.summary()["latency_p50_ms"] == 200.0


def test_redelivered_events_are_counted_once() -> None:
    stats = LoopStats()
    for env in loop_events(0) + loop_events(0)[1:]:
        stats.take(env)
    assert len(stats.tasks) == 1 and len(stats.latencies) == 1


def test_ack_before_command_still_measures_latency() -> None:
    stats = LoopStats()
    events = loop_events(0)
    for env in [*events[:3], events[4], events[3]]:  # the ack topic was read first
        stats.take(env)
    assert stats.all_closed() and len(stats.latencies) == 1


def test_unacked_or_refused_commands_leave_loops_open() -> None:
    stats = LoopStats()
    for env in loop_events(0) + loop_events(1, acked=False) + loop_events(2, ok=False):
        stats.take(env)
    assert sorted(stats.open_loops()) == ["task-1", "task-2"]
    assert not stats.all_closed() and stats.rejected() == 1


def test_no_trigger_is_not_success() -> None:
    stats = LoopStats()
    stats.take(loop_events(0)[0])
    assert not stats.all_closed()


def test_dead_letters_are_counted() -> None:
    stats = LoopStats()
    stats.take_deadletter(DeadLetter("payload is not valid JSON", "fog.ingest", "rx/bl1/det1/data/counts", b"x"))
    assert stats.deadletters == 1 and "not valid JSON" in stats.dead_reasons[0]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0


def test_a_closed_loop_is_broken_down_per_hop() -> None:
    """Every hop between the event and the ack, from record times, job state times and the ack's time."""
    from reflexarc.events import JobState
    from reflexarc.observer import HOPS

    ms = timedelta(milliseconds=1)
    events = loop_events(0)
    data, request, result, command, ack = events
    base = T0.timestamp()
    stats = LoopStats()
    stats.take(data, base + 0.002)  # the fog's record: 2 ms after the event
    stats.take(request, base + 0.005)
    for state, after in (("queued", 7), ("running", 12), ("done", 40)):
        stats.take(JobState(task_id="task-0", site="local", state=state, at=T0 + after * ms).to_envelope())
    # A retry re-queues: the first time a state was reached counts.
    stats.take(JobState(task_id="task-0", site="local", state="queued", seq=9, at=T0 + 90 * ms).to_envelope())
    stats.take(result, base + 0.041)
    stats.take(command, base + 0.045)
    stats.take(ack)  # at T0 + 100 ms
    hops = {h: stats.hop(h, 50) for h in HOPS}
    got = {h: round(v * 1000, 3) for h, v in hops.items() if v is not None}
    assert got == {
        "edge->kafka": 2.0,
        "trigger": 3.0,
        "request->queued": 2.0,
        "queued->running": 5.0,
        "running->done": 28.0,
        "done->result": 1.0,
        "result->command": 4.0,
        "command->ack": 55.0,
    }
    assert abs(sum(got.values()) - stats.latencies[0] * 1000) < 1e-6


def test_a_loop_missing_a_time_stamp_has_no_breakdown() -> None:
    stats = LoopStats()
    for env in loop_events(0):
        stats.take(env)  # no record times: the loop latency is known, the hops are not
    assert len(stats.latencies) == 1 and stats.hop("trigger", 50) is None
