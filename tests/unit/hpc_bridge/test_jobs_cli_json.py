"""The site/jobs/env verbs: --json for scripts, --site-file beside -s/--site, reading never creates a database,
and `env pack` shows its progress on a terminal."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.cli import env_app, jobs_app
from reflexarc.hpc_bridge.store import JobStore, NewJob
from reflexarc.topics import Topics

runner = CliRunner()


def site_file(tmp_path: Path) -> Path:
    f = tmp_path / "site.yaml"
    f.write_text(f"site: hpc\nstate_dir: {tmp_path / 'state'}\napps: {{a: {{argv: [echo, hi]}}}}\n")
    return f


def test_jobs_list_on_a_new_site_creates_nothing(tmp_path: Path) -> None:
    f = site_file(tmp_path)
    res = runner.invoke(jobs_app, ["list", "--site-file", str(f)])
    assert res.exit_code == 0, res.output
    assert "no jobs" in res.output
    res = runner.invoke(jobs_app, ["list", "-s", str(f), "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == {"jobs": [], "counts": {}}
    res = runner.invoke(jobs_app, ["show", "t1", "--site", str(f)])
    assert res.exit_code == 1 and "no job 't1'" in res.output
    assert not (tmp_path / "state").exists(), "reading jobs must not create the state directory or database"


def test_jobs_list_and_show_json(tmp_path: Path) -> None:
    f = site_file(tmp_path)
    (tmp_path / "state").mkdir()
    store = JobStore(f"sqlite:///{tmp_path / 'state' / 'jobs.db'}", "hpc", Topics())
    try:
        store.create_jobs([NewJob(TaskRequest(task_id="t1", app="a", site="hpc", args={"x": 1}))])
    finally:
        store.close()
    res = runner.invoke(jobs_app, ["list", "--site-file", str(f), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [(j["task_id"], j["app"]) for j in doc["jobs"]] == [("t1", "a")]
    assert sum(doc["counts"].values()) == 1
    res = runner.invoke(jobs_app, ["show", "t1", "--site-file", str(f), "--json"])
    assert res.exit_code == 0, res.output
    one = json.loads(res.output)
    assert one["task_id"] == "t1" and one["args"] == {"x": 1}
    assert [t["state"] for t in one["transitions"]] == ["queued"] and one["state"] == "queued"


def test_env_list_json_on_an_empty_cache(tmp_path: Path) -> None:
    res = runner.invoke(env_app, ["list", "--site-file", str(site_file(tmp_path)), "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == []


def test_env_pack_progress_shows_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexarc.hpc_bridge.cli import _with_progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert _with_progress("packing demo", lambda: 42) == 42
    assert "packing demo" in tty.getvalue()
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    assert _with_progress("packing demo", lambda: 7) == 7 and plain.getvalue() == ""
