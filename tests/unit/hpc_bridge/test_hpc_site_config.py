"""site.yaml validation: errors name file, line and field; defaults are sane."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflexarc.config import ConfigError
from reflexarc.hpc_bridge.site_config import load_site


def test_example_site_file_is_valid() -> None:
    import reflexarc.hpc_bridge.examples as ex

    cfg = load_site(Path(ex.__file__).parent / "site.yaml")
    assert cfg.site == "hpc" and "find_peak" in cfg.apps and cfg.engine.kind == "local"


def test_errors_point_at_the_line(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("site: hpc\napps:\n  a:\n    argv: [x]\n    retries: -1\nengine:\n  kind: slurm\n")
    with pytest.raises(ConfigError) as err:
        load_site(p)
    text = str(err.value)
    assert f"{p}:5:" in text and "apps.a.retries" in text
    assert f"{p}:7:" in text and "engine.kind" in text


def test_unknown_keys_and_bad_names_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("site: hpc\napps: {}\nengin: {}\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_site(p)
    p.write_text("site: 'a/b'\napps: {}\n")
    with pytest.raises(ConfigError, match="invalid site"):
        load_site(p)


def test_relative_paths_are_next_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "127.0.0.1:1234")
    monkeypatch.setenv("RX_NAMESPACE", "lab")
    p = tmp_path / "conf" / "site.yaml"
    p.parent.mkdir()
    p.write_text("site: hpc\napps: {}\nstate_dir: state\n")
    cfg = load_site(p)
    assert cfg.state_path == tmp_path / "conf" / "state"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'conf' / 'state' / 'jobs.db'}"
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:1234" and cfg.namespace == "lab"
