"""Acceptance: ``reflexarc fog check --broker`` finds the session-queue bound of a real Mosquitto.

The packaged defaults (``mosquitto_defaults``: no ``max_queued_messages`` line, so 1000) must be
reported as bounded at 1000 with exit code 1; reflexarc's embedded configuration
(``mosquitto``: ``max_queued_messages 0``) as "no bound" with exit code 0. Each run is the real
console script in a subprocess, configured as a user would (``RX_MQTT_*`` or a fog.yaml), and the
probe session must be gone from the broker afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from reflexarc.brokers import MqttBroker, free_port
from reflexarc.config import MqttSettings
from reflexarc.mqtt import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# The installed console script, as a user runs it (.venv/bin/reflexarc).
REFLEXARC = str(Path(sys.executable).with_name("reflexarc"))


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``reflexarc ARGS``; return exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        REFLEXARC,
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env(broker: MqttBroker, protocol: str = "5") -> dict[str, str]:
    return {"RX_MQTT_HOST": broker.host, "RX_MQTT_PORT": str(broker.port), "RX_MQTT_PROTOCOL": protocol}


async def _session_left(broker: MqttBroker, client_id: str, protocol: str) -> bool:
    """Whether the broker still holds a session for ``client_id`` (resuming it tells)."""
    settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]
    c = MqttClient(settings, client_id, clean_start=False, session_expiry=0)
    await c.connect()
    present = c.session_present
    await c.disconnect()
    return present


async def test_broker_check_reports_the_packaged_mosquitto_bound(
    mosquitto_defaults: MqttBroker, tmp_path: Path
) -> None:
    # MQTT 5 through RX_MQTT_*, human output.
    code, out, err = await _cli("fog", "check", "--broker", env=_env(mosquitto_defaults))
    assert code == 1, (out, err)
    assert out.startswith(
        f"bounded: the broker at {mosquitto_defaults.host}:{mosquitto_defaults.port} (MQTT 5) kept 1000 of 3000 "
        "queued QoS 1 messages for an offline session"
    ), out
    assert "dropped the newest 2000" in out
    for setting in ("max_queued_messages 0", "max_inflight_messages", "mqtt.max_mqueue_len", "max-queue-size"):
        assert setting in out, setting
    assert "delivery: pipeline" in out and "disk buffer" in out
    assert "Traceback" not in err

    # MQTT 3.1.1 through a fog.yaml, JSON for scripts; the namespace comes from the file too.
    fog_yaml = tmp_path / "fog.yaml"
    fog_yaml.write_text(
        yaml.safe_dump(
            {
                "namespace": "lab",
                "mqtt": {"host": mosquitto_defaults.host, "port": mosquitto_defaults.port, "protocol": "3.1.1"},
            }
        )
    )
    code, out, err = await _cli("fog", "check", "--broker", str(fog_yaml), "--json", "--messages", "1500")
    assert code == 1, (out, err)
    result = json.loads(out)
    assert result["status"] == "problem" and result["exit_code"] == 1
    assert result["bounded"] is True and result["bound"] == 1000
    assert (result["published"], result["kept"], result["duplicates"]) == (1500, 1000, 0)
    assert (result["kept_first"], result["kept_last"], result["dropped"]) == (0, 999, "newest")
    assert result["session_kept"] is True and result["session_removed"] is True
    assert set(result["broker_settings"]) == {"Mosquitto", "EMQX", "HiveMQ"}
    # Nothing left behind: the probe's persistent session is gone.
    assert not await _session_left(mosquitto_defaults, result["probe_client_id"], "3.1.1")

    # `reflexarc doctor pipeline.yaml` runs the same check against the pipeline's broker.
    (tmp_path / "pipeline.yaml").write_text(
        yaml.safe_dump(
            {
                "brokers": {"mqtt": {"host": mosquitto_defaults.host, "port": mosquitto_defaults.port}},
                "processes": [{"tier": "fog", "config": "fog.yaml"}],
            }
        )
    )
    code, out, err = await _cli("doctor", str(tmp_path / "pipeline.yaml"), "--json")
    assert code == 1, (out, err)
    report = json.loads(out)
    assert report["exit_code"] == 1
    assert [(c["check"], c["status"], c["bound"]) for c in report["checks"]] == [("broker-queue", "problem", 1000)]


async def test_broker_check_finds_no_bound_on_the_embedded_mosquitto(mosquitto: MqttBroker) -> None:
    code, out, err = await _cli("fog", "check", "--broker", "--json", env=_env(mosquitto))
    assert code == 0, (out, err)
    result = json.loads(out)
    assert result["status"] == "ok" and result["bounded"] is False and result["bound"] is None
    assert (result["published"], result["kept"], result["kept_first"], result["kept_last"]) == (3000, 3000, 0, 2999)
    assert result["session_removed"] is True
    assert not await _session_left(mosquitto, result["probe_client_id"], "5")

    code, out, err = await _cli("fog", "check", "--broker", env=_env(mosquitto, "3.1.1"))
    assert code == 0, (out, err)
    assert out.startswith(
        f"no bound found up to 3000: the broker at {mosquitto.host}:{mosquitto.port} (MQTT 3.1.1) kept all 3000"
    ), out


async def test_broker_check_unreachable_broker_is_one_line_and_exit_2() -> None:
    port = free_port()  # nothing listens there
    code, out, err = await _cli(
        "fog", "check", "--broker", env={"RX_MQTT_HOST": "127.0.0.1", "RX_MQTT_PORT": str(port)}
    )
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cannot check the MQTT broker: cannot reach the MQTT broker at 127.0.0.1:{port}")
    assert "RX_MQTT_HOST" in lines[0] and "mqtt.port" in lines[0]

    code, out, err = await _cli(
        "fog", "check", "--broker", "--json", env={"RX_MQTT_HOST": "127.0.0.1", "RX_MQTT_PORT": str(port)}
    )
    assert code == 2
    assert json.loads(out)["status"] == "error"
