"""The CLI's conventions hold on every tier: --log-level on run commands, --json where scripts read,
metavars FILE/APP, `compose create` (old name `compose compose` kept), and the GPU model in `compose pools`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reflexarc.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]


def help_of(*cmd: str) -> str:
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("tier", ["edge", "fog", "cloud", "site"])
def test_every_run_command_takes_log_level_and_a_file(tier: str) -> None:
    out = help_of(tier, "run")
    assert "--log-level" in out and "FILE" in out


@pytest.mark.parametrize(
    "cmd",
    [
        ("jobs", "list"),
        ("jobs", "show"),
        ("env", "list"),
        ("env", "pack"),
        ("site", "check"),
        ("triggers", "validate"),
        ("fog", "check"),
        ("edge", "check"),
    ],
)
def test_json_where_scripts_read(cmd: tuple[str, ...]) -> None:
    assert "--json" in help_of(*cmd)


def test_site_file_option_and_metavars() -> None:
    out = help_of("jobs", "list")
    assert "--site-file" in out and "-s" in out and "FILE" in out
    assert "APP" in help_of("env", "pack")
    assert "TASK" in help_of("jobs", "show")


def test_compose_create_and_its_old_name(tmp_path: Path) -> None:
    pools = REPO / "hpc_bridge" / "compose" / "examples" / "pools.yaml"
    env = {
        "RX_COMPOSE_DB": str(tmp_path / "c.db"),
        "RX_COMPOSE_POOLS": str(pools),
        "RX_COMPOSE_USER": "alice",
        "RX_COMPOSE_TOKEN": "alice-example-token",
    }
    made = []
    for verb, model in (("create", "H100"), ("compose", "A100")):
        res = runner.invoke(
            app, ["compose", verb, "--cpus", "4", "--gpus", "1", "--gpu-model", model, "--json"], env=env
        )
        assert res.exit_code == 0, res.output
        made.append(json.loads(res.output)["id"])
    assert len(set(made)) == 2
    res = runner.invoke(app, ["compose", "pools", "--json"], env=env)
    assert res.exit_code == 0, res.output
    gpus = {r["model"]: (r["used"], r["total"]) for r in json.loads(res.output) if r["kind"] == "gpu"}
    assert gpus == {"A100": (1, 4), "H100": (1, 8)}
    assert "model" in runner.invoke(app, ["compose", "pools"], env={**env, "COLUMNS": "200"}).output


def test_a_group_whose_extra_is_missing_is_a_stand_in_that_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import reflexarc.cli as cli
    from reflexarc.errors import explain

    def no_kafka(_name: str) -> None:
        raise ModuleNotFoundError("No module named 'aiokafka'", name="aiokafka")

    monkeypatch.setattr(cli.importlib, "import_module", no_kafka)
    cli._mount_group("reflexarc.nonexistent_cli_rx", "app", "zz-missing-rx", "A group needing Kafka.")
    res = runner.invoke(app, ["zz-missing-rx", "list", "--json"])
    assert isinstance(res.exception, ModuleNotFoundError)
    assert explain(res.exception) == (
        "this command needs aiokafka, which is not installed: pip install "
        "'reflexarc[fog]' (or the extra of the tier you run: cloud, site)"
    )
