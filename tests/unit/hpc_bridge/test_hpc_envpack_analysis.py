"""Environment analysis: imports -> installed distributions and versions, the app's own code."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest

from reflexarc.hpc_bridge.apps import AppSpec, EnvSpec
from reflexarc.hpc_bridge.envpack import EnvError, EnvManager


def test_imports_map_to_pinned_distributions(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "rx_mod_a.py").write_text(
        "import json, os\nimport yaml\nfrom sqlalchemy import select\ndef f():\n    return {}\n"
    )
    spec = AppSpec(function="rx_mod_a:f", env=EnvSpec(paths=[str(code)], requirements=["extra-pkg==1.0"]))
    env = EnvManager(tmp_path / "cache").analyse("a", spec)
    assert f"PyYAML=={md.version('PyYAML')}" in env.requirements
    assert f"SQLAlchemy=={md.version('SQLAlchemy')}" in env.requirements
    assert "extra-pkg==1.0" in env.requirements
    assert not any(r.lower().startswith(("json", "os")) for r in env.requirements)
    assert str(code) in env.local_code and env.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    # Same inputs, same hash; changed code, new hash.
    again = EnvManager(tmp_path / "cache").analyse("a", spec)
    assert again.hash == env.hash
    (code / "rx_mod_a.py").write_text("import yaml\ndef f():\n    return {1: 2}\n")
    assert EnvManager(tmp_path / "cache").analyse("a", spec).hash != env.hash


def test_missing_module_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match=r"env\.paths"):
        EnvManager(tmp_path).analyse("a", AppSpec(function="rx_no_such_mod:f", env=EnvSpec()))
