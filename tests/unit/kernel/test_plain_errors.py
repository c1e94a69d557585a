"""Configuration errors in plain words, at file:line: no "Value error," and "did you mean" for a misspelt field."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflexarc.config import ConfigError, field_names_at
from reflexarc.deploy.fleet import FleetFile, load_fleet
from reflexarc.hpc_bridge.compose import load_pools

REPO = Path(__file__).resolve().parents[3]


def test_fleet_misspelt_field_suggests_the_right_one(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "examples" / "fleet.yaml").read_text()
    bad = tmp_path / "fleet.yaml"
    bad.write_text(text.replace("\nrollout:", "\nrolout:"))
    with pytest.raises(ConfigError) as err:
        load_fleet(bad)
    line = text.split("\n").index("rollout:") + 1
    assert f"{bad}:{line}:1: rolout: unknown field (did you mean 'rollout'?)" in str(err.value)


def test_pools_errors_have_lines_and_no_pydantic_prefixes(tmp_path: Path) -> None:
    bad = tmp_path / "pools.yaml"
    bad.write_text("racks:\n  r1:\n    devices:\n      - {id: g, kind: gpu}\n      - {id: c, kind: cpu, cors: 4}\n")
    with pytest.raises(ValueError) as err:
        load_pools(bad)
    text = str(err.value)
    assert f"{bad}:4:" in text and "a gpu device needs 'model'" in text
    assert "Value error" not in text and "Extra inputs" not in text


def test_field_names_follow_nested_models_lists_and_dicts() -> None:
    assert "batch_size" in field_names_at(FleetFile, ("rollout",))
    assert field_names_at(FleetFile, ("no_such",)) == set()
