"""What a pilot's worker does with a dispatch queued behind another task, when it reaches it."""

from __future__ import annotations

import time
from pathlib import Path

from reflexarc.hpc_bridge.engines.pilot_worker import cancel_marker, claim, claim_file, run_pilot_task
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome

APP = "reflexarc.hpc_bridge.examples.apps:sleep"


def spec(tmp_path: Path) -> RunSpec:
    work = tmp_path / "t"
    return RunSpec(
        task_id="t",
        attempt=1,
        kind="python",
        workdir=str(work),
        result_path=str(work / "outcome.json"),
        function=APP,
        args={"seconds": 0, "marker_dir": str(tmp_path / "ran"), "tag": "t"},
        timeout_s=30,
    )


def test_a_queued_dispatch_starts_when_nothing_stops_it_and_claims_it(tmp_path: Path) -> None:
    s = spec(tmp_path)
    out = run_pilot_task(s.to_json(), [], "a1/w0", time.time() + 60, "tok1")
    assert out["ok"] and out["machine"] == "a1/w0" and "not_started" not in out
    assert read_outcome(s.result_path) is not None and len(list((tmp_path / "ran").iterdir())) == 1
    # The worker claimed it first: the agent can no longer take it back (it would run twice).
    assert Path(claim_file(s.workdir, "tok1")).read_text() == "started"
    assert not claim(s.workdir, "tok1", "taken back")


def test_a_queued_dispatch_taken_back_cancelled_or_too_late_does_not_start(tmp_path: Path) -> None:
    s = spec(tmp_path)
    Path(s.workdir).mkdir(parents=True)
    # Taken back (the agent claimed it first, to place it elsewhere with another token): it never runs here.
    assert claim(s.workdir, "old", "taken back")
    out = run_pilot_task(s.to_json(), [], "a1/w0", None, "old")
    assert out["not_started"] and not out["ok"] and "taken back" in out["error"]
    # Too late: the allocation's wall time left no longer holds its timeout.
    out = run_pilot_task(s.to_json(), [], "a1/w0", time.time() - 1, "new")
    assert out["not_started"] and "wall time" in out["error"]
    # Cancelled while it was queued.
    Path(cancel_marker(s.workdir)).write_text("cancelled\n")
    out = run_pilot_task(s.to_json(), [], "a1/w0", time.time() + 60, "new")
    assert out["not_started"] and "cancelled" in out["error"]
    # None of them ran the app or wrote an outcome (a restarted agent must not take one as a result).
    assert not (tmp_path / "ran").exists() and read_outcome(s.result_path) is None
