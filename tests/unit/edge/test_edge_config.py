"""agent.yaml validation: plugin fields, positions in errors, secure defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflexarc.config import ConfigError
from reflexarc.edge.config import load_agent_config, parse_agent_config
from reflexarc.edge.sources import available_sources, source_class

EXAMPLE = Path(__file__).parents[3] / "edge" / "examples" / "agent.yaml"


def test_shipped_example_is_valid() -> None:
    cfg = load_agent_config(EXAMPLE)
    assert cfg.commands.require_signed is True
    assert [s.type for s in cfg.sources] == ["simulated", "frames"]
    assert {a.name for a in cfg.actuators} == {"motor", "shutter"}


def test_source_field_error_names_line_and_field() -> None:
    text = "site: s\ndevice: d\nsources:\n  - type: simulated\n    stream: t\n    rate_hz: -1\n"
    with pytest.raises(ConfigError) as err:
        parse_agent_config(text, "agent.yaml")
    assert "agent.yaml:6:" in str(err.value) and "sources[0].rate_hz" in str(err.value)


def test_unknown_source_type_lists_choices() -> None:
    text = "site: s\ndevice: d\nsources:\n  - {type: telepathy, stream: t}\n"
    with pytest.raises(ConfigError, match=r"unknown source type 'telepathy'.*simulated"):
        parse_agent_config(text, "agent.yaml")


def test_unknown_key_and_bad_stream_name() -> None:
    with pytest.raises(ConfigError, match=r"spool\.polcy: unknown field"):
        parse_agent_config("site: s\ndevice: d\nspool: {polcy: block}\n")
    with pytest.raises(ConfigError, match="invalid stream"):
        parse_agent_config("site: s\ndevice: d\nsources: [{type: simulated, stream: 'a/#'}]\n")


def test_duplicate_streams_refused() -> None:
    text = "site: s\ndevice: d\nsources: [{type: simulated, stream: t}, {type: frames, stream: t}]\n"
    with pytest.raises(ConfigError, match="stream 't' is produced by two sources"):
        parse_agent_config(text)


def test_actuator_schema_and_placeholders_checked() -> None:
    bad_schema = "site: s\ndevice: d\nactuators: [{name: m, schema: {type: 12}, handler: {python: 'a:b'}}]\n"
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        parse_agent_config(bad_schema)
    placeholder = (
        "site: s\ndevice: d\nactuators: [{name: m, schema: {type: object, properties: {x: {}}},"
        " handler: {argv: [echo, '{y}']}}]\n"
    )
    with pytest.raises(ConfigError, match=r"placeholder \{y\}"):
        parse_agent_config(placeholder)
    with pytest.raises(ConfigError, match="module:function"):
        parse_agent_config("site: s\ndevice: d\nactuators: [{name: m, handler: {python: nocolon}}]\n")


def test_default_actuator_schema_allows_no_args() -> None:
    cfg = parse_agent_config("site: s\ndevice: d\nactuators: [{name: m, handler: {argv: [/bin/true]}}]\n")
    assert cfg.actuators[0].args_schema == {"type": "object", "additionalProperties": False}


def test_yaml_never_constructs_objects() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_agent_config("site: !!python/object/apply:os.system ['true']\ndevice: d\n")


def test_state_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RX_STATE_DIR", str(tmp_path))
    cfg = parse_agent_config("site: s\ndevice: d\n")
    assert cfg.spool_path() == tmp_path / "s-d" / "spool.db"
    assert cfg.claim_url().startswith("file://")
    assert cfg.client_id() == "rx-edge-s-d"


def test_builtin_sources_resolve() -> None:
    for name in ("simulated", "frames", "replay", "directory", "lines"):
        assert name in available_sources()
        assert source_class(name).config_model.model_fields["type"].default == name
