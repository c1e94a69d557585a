"""The EPICS scenario's pieces: the peak fit, the run's points, and the demo's verdict (no services)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from reflexarc.events import Command, CommandAck, TaskRequest, TaskResult
from reflexarc.observer import LoopStats
from reflexarc.scenarios.epics.analysis import FitError, fit_gaussian, points
from reflexarc.scenarios.epics.demo import verdict
from reflexarc.scenarios.epics.ioc import detector_counts


@pytest.mark.parametrize("centre", [-3.2, -0.51, 0.0, 1.234, 2.9])
def test_the_fit_finds_the_detectors_peak_from_a_scan(centre: float) -> None:
    xs = [-5 + 0.25 * i for i in range(41)]
    ys = [detector_counts(x, centre, 900.0, 0.6) for x in xs]
    fit = fit_gaussian(xs, ys)
    assert fit["position"] == pytest.approx(centre, abs=1e-3)
    assert fit["width"] == pytest.approx(0.6, abs=0.01) and fit["background"] == pytest.approx(100, abs=0.5)


def test_the_fit_refuses_what_is_not_a_peak() -> None:
    xs = [float(i) for i in range(11)]
    with pytest.raises(FitError, match="no peak"):
        fit_gaussian(xs, [100.0] * 11)
    with pytest.raises(FitError, match="at least 5"):
        fit_gaussian(xs[:3], [1.0, 5.0, 1.0])
    with pytest.raises(FitError, match=r"no maximum|outside the scan|only"):
        fit_gaussian(xs, [100.0 + 10 * x for x in xs])  # a ramp: the "peak" is at the edge


def test_points_are_the_primary_streams_events_in_order() -> None:
    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", {"uid": "r"}),
        ("descriptor", {"uid": "d1", "name": "primary"}),
        ("descriptor", {"uid": "d2", "name": "baseline"}),
        ("event", {"descriptor": "d2", "data": {"motor": 9.0, "det": 9.0}}),
        ("event", {"descriptor": "d1", "data": {"motor": -1.0, "det": 110.0}}),
        ("event", {"descriptor": "d1", "data": {"motor": 0.0, "det": 900.0}}),
        ("event", {"descriptor": "d1", "data": {"motor": 1.0}}),  # no detector reading: skipped
        ("stop", {"run_start": "r"}),
    ]
    assert points(docs, "det", "motor") == ([-1.0, 0.0], [110.0, 900.0])


def closed_loop(fitted: float, ack_ok: bool = True) -> LoopStats:
    """Stats of one loop: task, result (the fit), command and its ack."""
    stats = LoopStats()
    stats.tasks["t1"] = TaskRequest(task_id="t1", app="fit_peak", site="local")
    stats.results["t1"] = TaskResult(
        task_id="t1", app="fit_peak", site="local", status="done", result={"position": fitted}
    )
    stats.commands["c1"] = Command(
        command_id="c1", site="bl1", device="scan1", actuator="motor", args={"position": fitted}, task_id="t1"
    )
    stats.acks["c1"] = CommandAck(
        command_id="c1",
        site="bl1",
        device="scan1",
        actuator="motor",
        ok=ack_ok,
        reason=None if ack_ok else "readback timeout: ...",
    )
    return stats


def test_the_demo_passes_only_when_the_motor_stands_at_the_fitted_peak() -> None:
    ok, why = verdict(closed_loop(1.2345), readback=1.2350, centre=1.234)
    assert ok, why
    assert not verdict(LoopStats(), readback=0.0, centre=1.0)[0]
    assert "did not complete (readback timeout" in verdict(closed_loop(1.2345, ack_ok=False), 1.2345, 1.234)[1]
    assert "motor reads 0.5000" in verdict(closed_loop(1.2345), readback=0.5, centre=1.234)[1]
    assert "could not be read" in verdict(closed_loop(1.2345), readback=None, centre=1.234)[1]
    assert "the peak was at 2.000" in verdict(closed_loop(1.2345), readback=1.2345, centre=2.0)[1]
    failed = closed_loop(1.0)
    failed.results["t1"] = TaskResult(task_id="t1", app="fit_peak", site="local", status="failed", error="FitError")
    assert "the fit did not finish" in verdict(failed, 1.0, 1.0)[1]


async def test_the_scenario_trigger_fires_once_per_successful_scan_on_real_documents(tmp_path: Path) -> None:
    """RunEngine -> Publisher -> bluesky source -> the scenario's triggers.yaml (dry run): fires on success only."""
    from bluesky import RunEngine
    from bluesky.plan_stubs import trigger_and_read
    from bluesky.plans import count, scan
    from bluesky.preprocessors import run_decorator
    from ophyd.sim import det, motor

    from reflexarc.cloud.dryrun import dry_run
    from reflexarc.cloud.validate import load_triggers
    from reflexarc.demo import scenario_dir
    from reflexarc.edge.bluesky import BlueskyConfig, BlueskySource, Publisher
    from reflexarc.edge.claimcheck import ClaimCheck
    from reflexarc.edge.sources import Reading, SourceContext

    docs = tmp_path / "scan.jsonl"

    @run_decorator(md={"plan_name": "scan"})
    def failing() -> Any:  # a "scan" whose run ends in failure
        yield from trigger_and_read([det, motor])
        raise RuntimeError("the sample moved")

    engine = RunEngine({}, context_managers=[])
    with Publisher(docs) as pub:
        engine.subscribe(pub)
        (good,) = engine(scan([det], motor, -1, 1, 5), sample="A")
        with pytest.raises(RuntimeError):
            engine(failing())
        engine(count([det], 3))  # a successful run of another plan
    readings: list[Reading] = []

    async def emit(r: Reading) -> None:
        readings.append(r)

    cfg = BlueskyConfig.model_validate({"type": "bluesky", "path": str(docs), "poll_s": 0.01})
    source = BlueskySource(cfg, SourceContext("bl1", "scan1", None, ClaimCheck("memory://c", 1 << 20)))
    task = asyncio.create_task(source.run(emit))
    total = len(docs.read_text().splitlines())
    while len(readings) < total:
        await asyncio.sleep(0.01)
    task.cancel()
    recorded = tmp_path / "events.jsonl"
    recorded.write_text(
        "".join(
            json.dumps(
                {
                    "site": "bl1",
                    "device": "scan1",
                    "stream": r.stream,
                    "id": r.id,
                    "time": r.time.isoformat() if r.time else None,
                    "data": r.data,
                }
            )
            + "\n"
            for r in readings
        )
    )
    report = dry_run(load_triggers(scenario_dir("epics") / "triggers.yaml"), recorded)
    assert not report.problems, report.problems
    assert len(report.firings) == 1
    firing = report.firings[0][1]
    assert firing.trigger == "fit-scan"
    assert "run_uid" in json.dumps(report.lines(True)[0]) and good in report.lines(True)[0]
