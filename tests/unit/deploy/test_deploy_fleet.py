"""Fleet file: layering, validation errors with their place, secrets, config hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reflexarc.config import ConfigError
from reflexarc.deploy.containers import config_hash
from reflexarc.deploy.fleet import STATE_DIR, HealthSettings, device_specs, load_fleet
from reflexarc.deploy.merge import deep_merge
from reflexarc.deploy.secrets import SecretError, read_secrets

BASE = {
    "fleet": "lab",
    "image": "rx/agent:1",
    "endpoints": {"a": {"url": "unix:///run/a.sock"}},
    "defaults": {
        "agent": {
            "site": "bl1",
            "mqtt": {"host": "10.0.0.1", "port": 1883},
            "sources": [{"type": "simulated", "stream": "temp", "rate_hz": 1}],
        },
        "env": {"RX_LOG_LEVEL": "INFO"},
        "resources": {"memory": "256m"},
    },
    "labels": {
        "fast": {"agent": {"sources": [{"type": "simulated", "stream": "temp", "rate_hz": 100}]}},
        "remote": {"agent": {"mqtt": {"host": "10.0.0.2"}}, "resources": {"cpus": 0.5}},
    },
    "devices": {
        "d1": {"endpoint": "a", "labels": ["fast", "remote"], "agent": {"mqtt": {"port": 8883}}},
        "d2": {"endpoint": "unix:///run/b.sock"},
    },
}


def write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def specs(tmp_path: Path, doc: dict) -> dict:
    p = write(tmp_path, doc)
    return {s.name: s for s in device_specs(load_fleet(p), str(p))}


def test_deep_merge_merges_mappings_replaces_lists_and_deletes_on_null() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": 2}
    out = deep_merge(base, {"a": {"y": [3], "z": 4}, "b": None})
    assert out == {"a": {"x": 1, "y": [3], "z": 4}, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": 2}  # not modified


def test_layers_apply_base_then_labels_in_order_then_device(tmp_path: Path) -> None:
    s = specs(tmp_path, BASE)
    d1, d2 = s["d1"], s["d2"]
    assert d1.agent["mqtt"] == {"host": "10.0.0.2", "port": 8883}
    assert d1.agent["sources"][0]["rate_hz"] == 100
    assert d1.agent["device"] == "d1" and d1.agent["state_dir"] == STATE_DIR
    assert d1.resources.memory_bytes() == 256 << 20 and d1.resources.cpus == 0.5
    assert d2.agent["mqtt"] == {"host": "10.0.0.1", "port": 1883} and d2.resources.cpus is None
    assert d2.endpoint.url == "unix:///run/b.sock" and d1.endpoint_name == "a"
    assert (d1.site, d1.device, d1.namespace) == ("bl1", "d1", "rx")


def test_unknown_field_names_file_line_and_field(tmp_path: Path) -> None:
    doc = {**BASE, "devices": {"d1": {"endpoint": "a", "lables": ["fast"]}}}
    with pytest.raises(ConfigError) as exc:
        load_fleet(write(tmp_path, doc))
    text = str(exc.value)
    assert "fleet.yaml:" in text and "devices.d1.lables" in text and "unknown field" in text


def test_references_must_exist(tmp_path: Path) -> None:
    doc = {**BASE, "devices": {"d1": {"endpoint": "nowhere", "labels": ["nolabel"]}}}
    with pytest.raises(ConfigError) as exc:
        load_fleet(write(tmp_path, doc))
    assert "endpoint 'nowhere'" in str(exc.value) and "label 'nolabel'" in str(exc.value)


def test_plain_tcp_endpoint_is_refused_without_tls(tmp_path: Path) -> None:
    doc = {**BASE, "endpoints": {"a": {"url": "tcp://10.0.0.9:2375"}}}
    with pytest.raises(ConfigError, match="add tls"):
        load_fleet(write(tmp_path, doc))
    doc = {**BASE, "endpoints": {"a": {"url": "tcp://10.0.0.9:2376", "tls": {"ca_file": "ca.pem"}}}}
    s = specs(tmp_path, doc)
    assert s["d1"].endpoint.tls.ca_file == str(tmp_path / "ca.pem")  # relative to the fleet file


def test_agent_config_is_validated_per_device(tmp_path: Path) -> None:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["labels"]["fast"]["agent"]["sources"] = [{"type": "nosuchsource", "stream": "x"}]
    doc["devices"]["d2"]["agent"] = {"mqtt": {"port": 0}}
    with pytest.raises(ConfigError) as exc:
        specs(tmp_path, doc)
    text = str(exc.value)
    assert "device d1" in text and "sources[0].type" in text and "nosuchsource" in text
    assert "device d2" in text and "mqtt.port" in text


def test_state_dir_is_managed(tmp_path: Path) -> None:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["devices"]["d2"]["agent"] = {"state_dir": "/data"}
    with pytest.raises(ConfigError, match="volume"):
        specs(tmp_path, doc)


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file\n")
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["defaults"]["secrets"] = {"RX_MQTT_PASSWORD": {"env": "FLEET_PW"}, "TOKEN": {"file": "token"}}
    s = specs(tmp_path, doc)["d1"]
    with pytest.raises(SecretError, match=r"\$FLEET_PW, which is not set"):
        read_secrets(s.secrets)
    monkeypatch.setenv("FLEET_PW", "pw")
    assert read_secrets(s.secrets) == {"RX_MQTT_PASSWORD": "pw", "TOKEN": "from-file"}
    # The fleet file never holds a value: a secret with a literal is refused.
    doc["defaults"]["secrets"] = {"X": {"value": "literal"}}
    with pytest.raises(ConfigError):
        specs(tmp_path, doc)


def test_config_hash_covers_config_image_and_secret_values(tmp_path: Path) -> None:
    s = specs(tmp_path, BASE)["d1"]
    health = HealthSettings()
    h = config_hash(s, "sha256:1", {"A": "x"}, health)
    assert h == config_hash(s, "sha256:1", {"A": "x"}, health)
    assert h != config_hash(s, "sha256:2", {"A": "x"}, health)
    assert h != config_hash(s, "sha256:1", {"A": "y"}, health)
    other = s.model_copy(update={"agent": {**s.agent, "metrics_port": 9100}})
    assert h != config_hash(other, "sha256:1", {"A": "x"}, health)
    assert "x" not in h


def test_passthrough_and_memory_formats_are_checked(tmp_path: Path) -> None:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["devices"]["d2"]["passthrough"] = ["ttyUSB0"]
    doc["devices"]["d2"]["resources"] = {"memory": "lots"}
    with pytest.raises(ConfigError) as exc:
        load_fleet(write(tmp_path, doc))
    assert "devices.d2.passthrough" in str(exc.value) and "devices.d2.resources.memory" in str(exc.value)


def test_shipped_example_fleet_is_valid() -> None:
    example = Path(__file__).parents[3] / "deploy" / "examples" / "fleet.yaml"
    names = {s.name: s.endpoint.url for s in device_specs(load_fleet(example), str(example))}
    assert names["cam1"].startswith("ssh://") and names["det2"].startswith("tcp://")
