"""``reflexarc triggers validate|test|schema`` through the typer app (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reflexarc.cloud.cli import app, triggers_app

EXAMPLES = Path(__file__).resolve().parents[3] / "cloud" / "examples"
runner = CliRunner()


def test_validate_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The example sends commands: it validates once a signing key is configured, as `cloud run` needs.
    from reflexarc.signing import generate_keypair

    private, _public = generate_keypair(tmp_path, "pipeline")
    monkeypatch.setenv("RX_SIGNING_KEY", str(private))
    res = runner.invoke(triggers_app, ["validate", str(EXAMPLES / "triggers.yaml")])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "bright-spot" in res.output


def test_validate_reports_unknown_app_and_fails(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("site: s1\napps: {fit: {argv: [fit]}}\n")
    f = tmp_path / "t.yaml"
    f.write_text(
        "sites: [site.yaml]\ntriggers:\n  - name: a\n    on: x/+/y\n    when: 'true'\n    then: [{task: {app: fitt}}]\n"
    )
    res = runner.invoke(triggers_app, ["validate", str(f)])
    assert res.exit_code == 1
    assert f"{f}:6:" in res.output and "trigger 'a' then[0].task.app" in res.output
    assert "unknown app 'fitt'" in res.output and "s1: fit" in res.output
    assert "1 problem" in res.output


def test_dry_run_prints_firings_and_task_arguments() -> None:
    res = runner.invoke(
        triggers_app, ["test", str(EXAMPLES / "triggers.yaml"), "--events", str(EXAMPLES / "events.jsonl")]
    )
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if " fires: " in ln]
    assert len(lines) == 4
    assert lines[0].startswith("line 2:") and "bright-spot" in lines[0]
    assert "task find-peak@local" in lines[0] and '"value": 450.0' in lines[0]
    assert any("beam-drop" in ln and "command shutter -> bl1/mon1" in ln for ln in lines)
    assert "11 events, 4 firings" in res.output


def test_dry_run_json_and_bad_lines(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    events.write_text(
        '{"site": "bl1", "device": "d", "stream": "counts", "time": "2024-01-01T00:00:00Z", "data": {"value": 999}}\n'
        "not json\n"
        '{"site": "bl1", "device": "d", "stream": "counts", "data": {}}\n'
        '{"site": "bl1", "device": "d", "stream": "counts", "time": "2024-01-01T00:00:01Z", "data": {"v": 1}}\n'
    )
    res = runner.invoke(triggers_app, ["test", str(EXAMPLES / "triggers.yaml"), "-e", str(events), "--json"])
    assert res.exit_code == 1, res.output  # problems were reported: strict by default
    assert (
        runner.invoke(
            triggers_app, ["test", str(EXAMPLES / "triggers.yaml"), "-e", str(events), "--no-strict"]
        ).exit_code
        == 0
    )
    firings = [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]
    assert [f["trigger"] for f in firings] == ["bright-spot"]
    assert firings[0]["tasks"][0]["args"] == {"value": 999.0, "frame": 0}
    assert f"{events}:2: not JSON" in res.output
    assert f"{events}:3: missing 'time'" in res.output
    assert f"{events}:4: trigger 'bright-spot'" in res.output and "value" in res.output


def test_schema_command(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = runner.invoke(triggers_app, ["schema", "-o", str(out)])
    assert res.exit_code == 0
    schema = json.loads(out.read_text())
    assert "triggers" in schema["properties"] and schema["additionalProperties"] is False


def test_run_refuses_an_invalid_file(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("triggers: [{name: a}]\n")
    res = runner.invoke(app, ["run", str(f)])
    assert res.exit_code == 2 and "trigger 'a' when: Field required" in res.output
