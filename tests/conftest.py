"""Shared fixtures: real brokers on loopback, free ports, temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reflexarc.brokers import EmbeddedBrokers, KafkaBroker, MqttBroker, start_kafka, start_mqtt
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.s3store import S3Store, start_s3


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiers keep their state (spools, fog buffers) under the test's temporary directory, never the user's."""
    monkeypatch.setenv("RX_STATE_DIR", str(tmp_path / "rx-state"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MqttBroker]:
    """A real Mosquitto (MQTT 5) on a free loopback port, stopped afterwards."""
    broker = start_mqtt(tmp_path / "mosquitto", flavour="mosquitto")
    yield broker
    broker.process.stop()


@pytest.fixture
def mosquitto_defaults(tmp_path: Path) -> Iterator[MqttBroker]:
    """A real Mosquitto at its packaged queue limits (1000 queued per session), as a facility runs it.

    No persistence either: a restart forgets every session, as after a crash of a broker
    configured without it.
    """
    broker = start_mqtt(tmp_path / "mosquitto-defaults", flavour="mosquitto", packaged_limits=True, persistence=False)
    yield broker
    broker.process.stop()


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A real Tansu (Kafka protocol) on a free loopback port, stopped afterwards."""
    broker = start_kafka(tmp_path / "tansu")
    yield broker
    broker.process.stop()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[EmbeddedBrokers]:
    """Mosquitto + Tansu together, as ``reflexarc up`` starts them."""
    with EmbeddedBrokers(data_dir=tmp_path / "brokers", mqtt_flavour="mosquitto") as b:
        yield b


@pytest.fixture
def mqtt_settings(mosquitto: MqttBroker) -> MqttSettings:
    """Client settings for the ``mosquitto`` fixture."""
    return MqttSettings(host=mosquitto.host, port=mosquitto.port, protocol="5")


@pytest.fixture
def kafka_settings(tansu: KafkaBroker) -> KafkaSettings:
    """Client settings for the ``tansu`` fixture."""
    return KafkaSettings(bootstrap_servers=tansu.bootstrap_servers)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    """A real SeaweedFS S3 gateway on loopback with a bucket and throwaway keys, shared by the session."""
    store = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    yield store
    store.stop()


@pytest.fixture
def s3_env(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """``s3_store`` with its endpoint and keys in this test's environment (RX_S3_ENDPOINT_URL, AWS_*)."""
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    return s3_store
