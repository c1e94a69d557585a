"""Pure pieces of the deployer: image requirements, Docker times, interrupted-rollout detection, CLI errors."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions, requires
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from reflexarc.deploy.cli import app
from reflexarc.deploy.containers import DeviceContainers
from reflexarc.deploy.endpoints import Unreachable, connect
from reflexarc.deploy.fleet import Endpoint
from reflexarc.deploy.health import parse_docker_time
from reflexarc.deploy.image import ImageBuildError, edge_requirements
from reflexarc.deploy.planner import _interrupted


def wheel_with(tmp_path: Path, requires: list[str]) -> Path:
    w = tmp_path / "reflexarc-0.1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: reflexarc\nVersion: 0.1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(w, "w") as zf:
        zf.writestr("reflexarc-0.1.0.dist-info/METADATA", meta)
    return w


def test_edge_requirements_are_the_edge_extra_with_its_constraints(tmp_path: Path) -> None:
    reqs = [
        "paho-mqtt<2.3,>=2.2",  # the core: every install, a device's included
        "pydantic<3,>=2.6",
        'caproto<2,>=1.3; extra == "edge"',
        'jsonschema>=4.20; extra == "edge"',
        'dask[distributed]>=2024.1; extra == "site"',  # other tiers' extras: not on a device
        'aiokafka<0.15,>=0.14; extra == "fog"',
        'pytest>=8; extra == "test"',
    ]
    out = edge_requirements(wheel_with(tmp_path, reqs))
    assert out == ["caproto<2,>=1.3", "jsonschema>=4.20", "paho-mqtt<2.3,>=2.2", "pydantic<3,>=2.6"]


def test_edge_requirements_fail_without_the_extra(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="'edge' extra"):
        edge_requirements(wheel_with(tmp_path, ["pydantic>=2"]))


def test_the_edge_extra_covers_what_the_agent_imports() -> None:
    """Every third-party package that reflexarc code loaded by the edge agent imports is in the extra."""
    code = (
        "import sys\n"
        "import reflexarc.edge.agent, reflexarc.edge.cli\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items()"
        " if n.startswith('reflexarc') and getattr(m, '__file__', None)))\n"
    )
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    imported: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(Path(f).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"reflexarc", "__future__"}
    dists = packages_distributions()
    needed = {norm(d) for top in third_party for d in dists.get(top, [top])}
    # What the agent image installs: the core (no marker) and the edge extra.
    extra = {
        norm(Requirement(r).name)
        for r in requires("reflexarc") or []
        if Requirement(r).marker is None
        or (Requirement(r).marker.evaluate({"extra": "edge"}) and not Requirement(r).marker.evaluate({"extra": ""}))
    }
    # Modules the edge loads but only touches on other tiers' paths would show up here too:
    # the agent's import graph must stay within its extra.
    assert needed - extra == set(), f"add to the edge extra in pyproject.toml: {sorted(needed - extra)}"


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_parse_docker_time_handles_nanoseconds() -> None:
    assert parse_docker_time("2024-01-02T03:04:05.123456789Z") == pytest.approx(1704164645.123456)
    assert parse_docker_time("2024-01-02T03:04:05Z") == pytest.approx(1704164645.0)


def test_interrupted_rollouts_are_recognised() -> None:
    c = SimpleNamespace(labels={})
    assert _interrupted(DeviceContainers(current=c)) is None
    assert "never started" in (_interrupted(DeviceContainers(current=c, next=c)) or "")
    assert "no new one" in (_interrupted(DeviceContainers(previous=c)) or "")
    assert "never confirmed" in (_interrupted(DeviceContainers(current=c, previous=c)) or "")


def test_dead_unix_socket_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(Unreachable, match=r"nobody\.sock"):
        connect(Endpoint(url=f"unix://{tmp_path}/nobody.sock", timeout_s=1))


def test_cli_reports_a_bad_fleet_file_with_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "fleet.yaml"
    p.write_text("fleet: lab\ndevices:\n  d1: {endpoint: a, colour: blue}\n")
    res = CliRunner().invoke(app, ["plan", str(p)])
    assert res.exit_code == 2
    assert "fleet.yaml:3" in res.output and "devices.d1.colour" in res.output


def test_cli_module_imports_stay_light() -> None:
    import subprocess
    import sys

    code = "import sys, reflexarc.deploy.cli; print(sorted(m for m in ('docker','rich.table','pydantic','yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
