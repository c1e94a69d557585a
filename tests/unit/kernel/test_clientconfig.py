"""Client settings come from the same places as every tier's: a kafka: section or the RX_KAFKA_* variables.

The SASL mapping is checked here at unit level only: Tansu 0.6 (the wheel installed
here) gave no working SASL login on loopback (see reflexarc/testing/tlskafka.py), and
noida-db 0.2.3 completes a SASL/PLAIN handshake but accepts any user and password (it
has no user configuration), so a test against it could not fail on a wrong mapping.
TLS is tested against a real listener in tests/integration/kernel/test_clients_secured.py.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reflexarc.clientconfig import kafka_is_configured, load_client_config
from reflexarc.config import ConfigError, KafkaSettings
from reflexarc.kafka import security_options
from reflexarc.kafkastart import parse_start
from reflexarc.testing.tlskafka import self_signed_cert


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "RX_KAFKA_BOOTSTRAP",
        "RX_KAFKA_SECURITY_PROTOCOL",
        "RX_KAFKA_SASL_MECHANISM",
        "RX_KAFKA_USERNAME",
        "RX_KAFKA_PASSWORD",
        "RX_KAFKA_PASSWORD_ENV",
        "RX_KAFKA_CA_FILE",
        "RX_KAFKA_CERT_FILE",
        "RX_KAFKA_KEY_FILE",
        "RX_KAFKA_FETCH_WAIT_MS",
        "RX_NAMESPACE",
    ):
        monkeypatch.delenv(var, raising=False)


def test_sasl_plain_from_the_environment_reaches_aiokafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "k1:9093,k2:9093")
    monkeypatch.setenv("RX_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RX_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("RX_KAFKA_USERNAME", "analyst")
    monkeypatch.setenv("RX_KAFKA_PASSWORD", "s3cret")
    monkeypatch.setenv("RX_NAMESPACE", "bl7")
    cfg = load_client_config()
    assert cfg.namespace == "bl7" and cfg.topics().kafka_results == "bl7.results"
    assert cfg.kafka.bootstrap_servers == "k1:9093,k2:9093"
    assert security_options(cfg.kafka) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "analyst",
        "sasl_plain_password": "s3cret",
    }


def test_password_env_names_another_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("RX_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("RX_KAFKA_USERNAME", "u")
    monkeypatch.setenv("RX_KAFKA_PASSWORD_ENV", "SITE_KAFKA_PW")
    monkeypatch.setenv("SITE_KAFKA_PW", "pw")
    opts = security_options(KafkaSettings.from_env())
    assert opts["sasl_plain_password"] == "pw" and isinstance(opts["ssl_context"], ssl.SSLContext)


def test_tls_files_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("RX_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("RX_KAFKA_CA_FILE", str(cert))
    monkeypatch.setenv("RX_KAFKA_CERT_FILE", str(cert))
    monkeypatch.setenv("RX_KAFKA_KEY_FILE", str(key))
    s = KafkaSettings.from_env()
    assert s.tls is not None and (s.tls.ca_file, s.tls.cert_file, s.tls.key_file) == (str(cert), str(cert), str(key))
    ctx = security_options(s)["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and len(ctx.get_ca_certs()) == 1


def test_sasl_without_mechanism_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValueError, match="needs sasl_mechanism"):
        KafkaSettings.from_env()


def test_file_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "from-env:9092")
    f = tmp_path / "kafka.yaml"
    f.write_text("namespace: ops\nkafka:\n  bootstrap_servers: from-file:9093\n  security_protocol: SSL\n")
    cfg = load_client_config(f)
    assert (cfg.namespace, cfg.kafka.bootstrap_servers, cfg.kafka.security_protocol) == ("ops", "from-file:9093", "SSL")
    cfg = load_client_config(f, bootstrap="flag:1", namespace="other")
    assert (cfg.namespace, cfg.kafka.bootstrap_servers, cfg.kafka.security_protocol) == ("other", "flag:1", "SSL")
    # A file without kafka: takes the cluster from the environment, as a tier's file does.
    g = tmp_path / "ns.yaml"
    g.write_text("namespace: ops\n")
    assert load_client_config(g).kafka.bootstrap_servers == "from-env:9092"


def test_a_bad_file_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "kafka.yaml"
    f.write_text("kafka:\n  bootstrap_servers: a:1\n  security_protcol: SSL\n")
    with pytest.raises(ConfigError) as err:
        load_client_config(f)
    assert f"{f}:3:3: kafka.security_protcol" in str(err.value)


def test_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not kafka_is_configured(None, None)
    assert kafka_is_configured(None, "h:1")
    f = tmp_path / "c.yaml"
    f.write_text("namespace: x\n")
    assert not kafka_is_configured(f, None)
    f.write_text("kafka: {bootstrap_servers: 'h:1'}\n")
    assert kafka_is_configured(f, None)
    monkeypatch.setenv("RX_KAFKA_BOOTSTRAP", "h:2")
    assert kafka_is_configured(None, None)


def test_parse_start() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_start("beginning") == "beginning" and parse_start("earliest") == "beginning"
    assert parse_start("now") == "now" and parse_start("latest") == "now"
    assert parse_start("15m", now=now) == now - timedelta(minutes=15)
    assert parse_start("2h", now=now) == now - timedelta(hours=2)
    assert parse_start("2026-05-01T10:00:00Z") == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_start("2026-05-01T10:00:00") == datetime(2026, 5, 1, 10, tzinfo=UTC)  # no zone: UTC
    with pytest.raises(ValueError, match="duration ago"):
        parse_start("yesterday")
