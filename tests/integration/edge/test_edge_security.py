"""Broker security with real Mosquitto: per-device ACL, password from the environment, mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from edge_helpers import write_yaml

from reflexarc.brokers import MqttBroker, start_mqtt
from reflexarc.config import MqttSettings, TlsSettings
from reflexarc.edge.acl import bridge_acl, device_acl
from reflexarc.edge.agent import AgentError, EdgeAgent, run_agent
from reflexarc.edge.config import load_agent_config
from reflexarc.mqtt import MqttClient, MqttError
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration

PASSWORDS = {"bl1-det1": "s3cret-one", "bl1-det2": "s3cret-two", "fog": "s3cret-fog"}


@pytest.fixture
def secured(tmp_path: Path) -> MqttBroker:
    """Mosquitto with a password file and the per-device ACL the edge tier generates."""
    pw = tmp_path / "passwd"
    for user, password in PASSWORDS.items():
        flag = ["-c"] if not pw.exists() else []
        subprocess.run(["mosquitto_passwd", *flag, "-b", str(pw), user, password], check=True)
    t = Topics()
    acl = tmp_path / "mosquitto.acl"
    acl.write_text(device_acl(t, "bl1", "det1") + device_acl(t, "bl1", "det2") + bridge_acl(t))
    broker = start_mqtt(
        tmp_path / "mq",
        flavour="mosquitto",
        anonymous=False,
        extra_conf=f"password_file {pw}\nacl_file {acl}",
    )
    yield broker  # type: ignore[misc]
    broker.process.stop()


def _agent_yaml(tmp: Path, port: int, extra_mqtt: str = "") -> Path:
    return write_yaml(
        tmp / "agent.yaml",
        f"""
site: bl1
device: det1
state_dir: state
delivery: broker  # no fog behind this broker: the PUBACK frees an event
mqtt: {{host: 127.0.0.1, port: {port}, username: bl1-det1, password_env: DET1_PW{extra_mqtt}}}
publish: {{reconnect_min_s: 0.2, reconnect_max_s: 1.0}}
sources:
  - {{type: simulated, stream: temp, rate_hz: 200, count: 50}}
""",
    )


@pytest.mark.timeout(60)
async def test_acl_scopes_each_device(
    tmp_path: Path,
    secured: MqttBroker,
    collect,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("DET1_PW", PASSWORDS["bl1-det1"])
    fog = MqttSettings(host="127.0.0.1", port=secured.port, username="fog", password_env="FOG_PW")
    monkeypatch.setenv("FOG_PW", PASSWORDS["fog"])
    sink = await collect(fog, "rx/#")
    agent = EdgeAgent(load_agent_config(_agent_yaml(tmp_path, secured.port)))
    await agent.start()
    try:
        await sink.wait_for(lambda: len(sink.events("/data/temp")) >= 50, 20, "the agent's 50 events")
        assert agent.publisher is not None
        await sink.wait_for(lambda: agent.publisher.published >= 50, 10, "acks")  # type: ignore[union-attr]
        status = [b for t, b in sink.messages if t.endswith("/status")]
        assert status, "the retained online status was published under the device's prefix"
    finally:
        await agent.stop()
    assert not list((tmp_path / "state").glob("dead*")), "nothing was refused"

    # The same credentials cannot read another device's commands (Mosquitto 2.0 grants the
    # subscription but never delivers) nor speak for another device (PUBACK "Not authorized").
    det1 = MqttSettings(host="127.0.0.1", port=secured.port, username="bl1-det1", password_env="DET1_PW")
    t = Topics()
    async with MqttClient(det1, "intruder") as c, MqttClient(fog, "fog-cmd") as f:
        await c.subscribe([(t.mqtt_cmd("bl1", "det2"), 1), (t.mqtt_cmd("bl1", "det1"), 1)])
        await f.publish(t.mqtt_cmd("bl1", "det2"), b"for det2 only", 1)
        await f.publish(t.mqtt_cmd("bl1", "det1"), b"for det1", 1)
        got = await asyncio.wait_for(c.messages.get(), 10)
        assert got.topic == t.mqtt_cmd("bl1", "det1")
        await asyncio.sleep(0.5)
        assert c.messages.empty(), "det1 received det2's command"
        await c.publish(t.mqtt_data("bl1", "det1", "temp"), b'{"value": 1}', 1)
        with pytest.raises(MqttError, match="Not authorized"):
            await c.publish(t.mqtt_data("bl1", "det2", "temp"), b'{"value": 1}', 1)


@pytest.mark.timeout(30)
async def test_wrong_password_is_a_clear_error(
    tmp_path: Path, secured: MqttBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DET1_PW", "wrong")
    cfg = load_agent_config(_agent_yaml(tmp_path, secured.port))
    # Mosquitto answers a bad password with "Not authorized" (MQTT 5 reason 0x87).
    with pytest.raises(AgentError, match=r"refused the connection.*user 'bl1-det1'.*\$DET1_PW"):
        await run_agent(cfg)
    monkeypatch.delenv("DET1_PW")
    with pytest.raises(Exception, match=r"DET1_PW, which is not set"):
        await run_agent(cfg)


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, issuer_key, ca: bool, ip: bool
) -> x509.Certificate:  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@pytest.mark.timeout(60)
async def test_mutual_tls_with_client_certificates(tmp_path: Path, collect) -> None:  # type: ignore[no-untyped-def]
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("reflexarc test CA", ca_key, None, None, ca=True, ip=False)
    ca_pem, _ = _write(pki / "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_pem, server_keyfile = _write(
        pki / "server", _cert("127.0.0.1", server_key, ca.subject, ca_key, ca=False, ip=True), server_key
    )
    certs = {}
    for user in ("bl1-det1", "fog"):
        k = ec.generate_private_key(ec.SECP256R1())
        certs[user] = _write(pki / user, _cert(user, k, ca.subject, ca_key, ca=False, ip=False), k)
    t = Topics()
    acl = tmp_path / "acl"
    acl.write_text(device_acl(t, "bl1", "det1") + bridge_acl(t))
    broker = start_mqtt(
        tmp_path / "mq",
        flavour="mosquitto",
        anonymous=False,
        extra_conf=(
            f"cafile {ca_pem}\ncertfile {server_pem}\nkeyfile {server_keyfile}\n"
            f"require_certificate true\nuse_identity_as_username true\nacl_file {acl}"
        ),
    )
    try:
        fog = MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            tls=TlsSettings(ca_file=ca_pem, cert_file=certs["fog"][0], key_file=certs["fog"][1]),
        )
        sink = await collect(fog, "rx/#")
        path = write_yaml(
            tmp_path / "agent.yaml",
            f"""
site: bl1
device: det1
state_dir: state
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  tls: {{ca_file: {ca_pem}, cert_file: {certs["bl1-det1"][0]}, key_file: {certs["bl1-det1"][1]}}}
sources:
  - {{type: simulated, stream: temp, rate_hz: 200, count: 40}}
""",
        )
        agent = EdgeAgent(load_agent_config(path))
        await agent.start()
        try:
            await sink.wait_for(lambda: len(sink.events("/data/temp")) >= 40, 20, "40 events over TLS")
        finally:
            await agent.stop()
        # Without a client certificate the broker refuses the TLS handshake.
        no_cert = MqttSettings(host="127.0.0.1", port=broker.port, tls=TlsSettings(ca_file=ca_pem))
        with pytest.raises(MqttError):
            await MqttClient(no_cert, "anon").connect(timeout=5)
    finally:
        broker.process.stop()
