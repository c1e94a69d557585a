"""``reflexarc compose ...`` through typer's test runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from compose_testkit import ALICE_TOKEN, BOB_TOKEN, write_pools
from typer.testing import CliRunner

from reflexarc.hpc_bridge.compose.cli import app

Run = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run the CLI with --db/--pools taken from the environment, as alice."""
    monkeypatch.setenv("RX_COMPOSE_DB", str(tmp_path / "compose.db"))
    monkeypatch.setenv("RX_COMPOSE_POOLS", str(write_pools(tmp_path / "pools.yaml")))
    monkeypatch.setenv("RX_COMPOSE_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: str, token: str | None = None) -> Result:
        env = {"RX_COMPOSE_TOKEN": token} if token else None
        return runner.invoke(app, list(args), env=env)

    return run


def test_help_lists_every_verb(cli: Run) -> None:
    out = cli("--help").output
    for verb in ("list", "show", "create", "free", "export", "apply", "pools", "audit"):
        assert f" {verb} " in out
    # `compose compose` (the old name of `create`) still works, but is no longer listed.
    assert cli("compose", "--help").exit_code == 0


def test_compose_show_free_round_trip(cli: Run, tmp_path: Path) -> None:
    r = cli("compose", "--cpus", "8", "--gpus", "2", "--gpu-model", "A100", "--name", "c1", "--json")
    assert r.exit_code == 0, r.output
    machine = json.loads(r.output)
    assert machine["owner"] == "alice" and machine["devices"][0]["rack"] == "r2"

    listed = json.loads(cli("list", "--json").output)
    assert [m["name"] for m in listed] == ["c1"]
    assert "r2-a100-1" in cli("show", "c1").output

    pools = {(row["rack"], row["kind"]): row for row in json.loads(cli("pools", "--json").output)}
    assert pools[("r2", "gpu")]["free"] == 1

    exported = tmp_path / "c1.yaml"
    assert cli("export", "c1", "-o", str(exported)).exit_code == 0

    refused = cli("free", "c1", token=BOB_TOKEN)
    assert refused.exit_code == 1
    assert "bob may not free machine c1 owned by alice" in refused.output

    assert cli("free", "c1").exit_code == 0
    applied = cli("apply", str(exported), "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.output)[0]["action"] == "created"

    audit = json.loads(cli("audit", "--json").output)
    assert [(e["user"], e["action"], e["outcome"]) for e in audit] == [
        ("alice", "compose", "ok"),
        ("bob", "free", "refused"),
        ("alice", "free", "ok"),
        ("alice", "compose", "ok"),
        ("alice", "apply", "ok"),
    ]


def test_errors_are_one_line_and_exit_1(cli: Run) -> None:
    r = cli("compose", "--gpus", "9")
    assert r.exit_code == 1
    assert "error: need 9 gpu in one fabric domain" in r.output
    r = cli("show", "nope")
    assert r.exit_code == 1 and "no machine with id or name 'nope'" in r.output
    r = cli("compose", token="wrong")
    assert r.exit_code == 1 and "token not recognised" in r.output
