"""Libraries whose internals reflexarc relies on are the tested release series, installed and declared.

A failure here means: a new release of paho-mqtt or aiokafka is installed (or allowed by
pyproject.toml). Run the MQTT and Kafka tests against it, then move reflexarc.pins.TESTED
and the pyproject.toml pins together.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from reflexarc.extras import EXTRA_OF, install_hint
from reflexarc.pins import TESTED, mismatch

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


@pytest.mark.parametrize("dist", sorted(TESTED))
def test_installed_version_is_the_tested_series(dist: str) -> None:
    assert mismatch(dist) is None, (
        f"{mismatch(dist)}: reflexarc patches/drives its internals; test the new release, "
        "then move reflexarc.pins.TESTED and pyproject.toml together"
    )
    assert version(dist).startswith(TESTED[dist] + ".") or version(dist) == TESTED[dist]


@pytest.mark.parametrize("dist", sorted(TESTED))
def test_pyproject_admits_only_the_tested_series(dist: str) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"]) + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    reqs = [Requirement(r) for r in lines if Requirement(r).name.lower() == dist]
    assert reqs, f"{dist} is not declared in pyproject.toml"
    major, minor = (int(x) for x in TESTED[dist].split("."))
    for req in reqs:
        assert Version(f"{major}.{minor}.0") in req.specifier, (str(req), TESTED[dist])
        assert Version(f"{major}.{minor + 1}.0") not in req.specifier, f"{req} admits an untested release"


def test_mismatch_words_the_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reflexarc.pins.version", lambda _d: "0.15.1")
    assert mismatch("aiokafka") == "aiokafka 0.15.1 is installed, reflexarc is tested with 0.14.x"


def test_every_extra_named_for_a_missing_module_exists() -> None:
    extras = set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])
    assert {e for names in EXTRA_OF.values() for e in names} <= extras
    assert install_hint("sqlalchemy.orm") == (
        "this command needs sqlalchemy, which is not installed: pip install 'reflexarc[site]' "
        "(or the extra of the tier you run: compose)"
    )
    assert install_hint("no_such_module") is None
