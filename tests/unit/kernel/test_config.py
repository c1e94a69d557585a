"""Config errors name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from reflexarc.config import (
    ConfigError,
    KafkaSettings,
    MqttSettings,
    StrictModel,
    load_yaml,
    parse_yaml,
)


class Source(StrictModel):
    kind: str
    rate_hz: float = Field(gt=0)


class Agent(StrictModel):
    device: str
    sources: list[Source] = []
    mqtt: MqttSettings = Field(default_factory=MqttSettings.from_env)


def test_valid_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("device: det1\nsources:\n  - kind: sim\n    rate_hz: 5\n")
    cfg = load_yaml(f, Agent)
    assert cfg.device == "det1" and cfg.sources[0].rate_hz == 5


def test_error_names_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("device: det1\nsources:\n  - kind: sim\n    rate_hz: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(f, Agent)
    (problem,) = exc.value.problems
    assert problem.file == str(f)
    assert problem.line == 4
    assert problem.field == "sources[0].rate_hz"
    assert "greater than 0" in problem.message
    assert f"{f}:4:" in str(exc.value)


def test_unknown_field_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_yaml("device: d\ndevcie: typo\n", Agent, "a.yaml")
    (problem,) = exc.value.problems
    assert problem.field == "devcie" and problem.line == 2 and "unknown field" in problem.message


def test_missing_field_points_at_its_parent() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_yaml("sources:\n  - rate_hz: 1\n", Agent, "a.yaml")
    fields = {p.field for p in exc.value.problems}
    assert fields == {"device", "sources[0].kind"}
    assert {p.field: p.line for p in exc.value.problems}["sources[0].kind"] == 2


def test_invalid_yaml_syntax_has_a_position() -> None:
    with pytest.raises(ConfigError, match=r"a.yaml:2:\d+: invalid YAML"):
        parse_yaml("device: d\n\tsources: []\n", Agent, "a.yaml")


def test_yaml_never_constructs_python_objects() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("device: !!python/object/apply:os.system ['true']\n", Agent, "a.yaml")


def test_non_mapping_file() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_yaml("- a\n- b\n", Agent, "a.yaml")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "nope.yaml", Agent)


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = MqttSettings(username="dev1", password_env="RX_TEST_PW")
    monkeypatch.delenv("RX_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match=r"\$RX_TEST_PW"):
        s.password()
    monkeypatch.setenv("RX_TEST_PW", "s3cret")
    assert s.password() == "s3cret"


def test_broker_defaults_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_MQTT_PORT", "18830")
    monkeypatch.setenv("RX_MQTT_PROTOCOL", "3.1.1")
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    cfg = parse_yaml("device: d\n", Agent)
    assert cfg.mqtt.port == 18830 and cfg.mqtt.protocol == "3.1.1"
    assert KafkaSettings.from_env().bootstrap_servers == "127.0.0.1:19092"


def test_kafka_sasl_without_a_mechanism_is_a_config_error_naming_the_file_and_what_to_set(tmp_path: Path) -> None:
    path = tmp_path / "fog.yaml"
    path.write_text("kafka:\n  bootstrap_servers: 127.0.0.1:9092\n  security_protocol: SASL_SSL\n  username: rx\n")

    class File(StrictModel):
        kafka: KafkaSettings

    with pytest.raises(ConfigError, match="needs sasl_mechanism") as info:
        load_yaml(path, File)
    assert "fog.yaml" in str(info.value)
