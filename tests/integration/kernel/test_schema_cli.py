"""`reflexarc schema KIND` prints a JSON Schema every shipped example of that kind validates against.

The examples are read as an editor's yaml-language-server reads them (YAML 1.2: a bare ``on``
is a string, not a boolean), and validated with ``jsonschema`` against the command's output.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from reflexarc.schemacli import Kind
from reflexarc.schemas import KINDS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]

EXAMPLES: dict[str, list[str]] = {
    "triggers": ["cloud/examples/triggers.yaml", "reflexarc/scenarios/*/triggers.yaml"],
    "agent": ["edge/examples/agent.yaml", "reflexarc/scenarios/*/agent.yaml"],
    "fog": ["fog/examples/fog.yaml", "reflexarc/scenarios/*/fog.yaml"],
    "site": ["hpc_bridge/examples/site.yaml", "cloud/examples/site.yaml", "reflexarc/scenarios/*/site.yaml"],
    "pipeline": ["reflexarc/scenarios/*/pipeline.yaml"],
    "fleet": ["deploy/examples/fleet.yaml"],
    "pools": ["hpc_bridge/compose/examples/pools.yaml"],
}


class Yaml12Loader(yaml.SafeLoader):
    """Booleans only as YAML 1.2 spells them (true/false), as editors read the files."""


Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def files_of(kind: str) -> list[Path]:
    return sorted(p for pattern in EXAMPLES[kind] for p in REPO.glob(pattern))


def test_every_kind_has_examples_and_the_cli_lists_every_kind() -> None:
    assert set(EXAMPLES) == set(KINDS) == {k.value for k in Kind}
    assert all(files_of(k) for k in KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_validates_the_shipped_examples(kind: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reflexarc", "schema", kind], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in files_of(kind):
        data = yaml.load(path.read_text(), Loader=Yaml12Loader) or {}
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert errors == [], f"{path.relative_to(REPO)} against `reflexarc schema {kind}`: {errors}"
        # The schema is strict: an unknown top-level key in the same file is refused.
        broken = copy.deepcopy(data)
        broken["no_such_field"] = 1
        assert not validator.is_valid(broken), path
