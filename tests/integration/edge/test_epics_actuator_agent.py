"""The epics actuator in a running edge agent: signed commands over real Mosquitto move a real caproto IOC's motor.

The agent (``python -m reflexarc edge run``) runs the actuator as
``handler: {epics: {...}}`` from its agent.yaml. Every command gets exactly
one answer; refused commands leave the PV as it was.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.brokers import MqttBroker
from reflexarc.config import MqttSettings
from reflexarc.events import Command, CommandAck
from reflexarc.mqtt import MqttClient
from reflexarc.process import free_port
from reflexarc.scenarios.epics.ioc import IocProcess, caget, caput
from reflexarc.signing import load_signing_key, sign_envelope
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()


def agent_yaml(d: Path, mqtt: MqttBroker, pub: Path, prefix: str) -> Path:
    """An agent whose ``motor`` is the IOC's motor; the schema allows more than the PV's limits (±10)."""
    doc = {
        "site": "bl1",
        "device": "mtr1",
        "state_dir": str(d / "state"),
        "mqtt": {"host": mqtt.host, "port": mqtt.port, "protocol": "5"},
        "commands": {"verify_keys": [str(pub)], "max_age_s": 60},
        "actuators": [
            {
                "name": "motor",
                "schema": {
                    "type": "object",
                    "properties": {"position": {"type": "number", "minimum": -20, "maximum": 20}},
                    "required": ["position"],
                    "additionalProperties": False,
                },
                "handler": {
                    "epics": {
                        "pv": f"{prefix}mtr",
                        "arg": "position",
                        "readback_pv": f"{prefix}mtr.RBV",
                        "tolerance": 0.001,
                        "readback_timeout_s": 1,
                        "connect_timeout_s": 1,
                    }
                },
                "timeout_s": 20,
            }
        ],
    }
    (d / "agent.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return d / "agent.yaml"


async def send(client: MqttClient, key: Any, cid: str, **args: Any) -> None:
    """One signed command for the motor."""
    env = sign_envelope(
        Command(command_id=cid, site="bl1", device="mtr1", actuator="motor", args=args).to_envelope(), key
    )
    payload, props, ctype = env.to_mqtt(binary=True)
    await client.publish(T.mqtt_cmd("bl1", "mtr1"), payload, 1, user_properties=props, content_type=ctype)


def answers(collector: Any) -> dict[str, list[CommandAck]]:
    """Every ack/nack received, by command id."""
    out: dict[str, list[CommandAck]] = {}
    for env in collector.events("/ack"):
        ack = CommandAck.from_envelope(env)
        out.setdefault(ack.command_id, []).append(ack)
    return out


async def answer(collector: Any, cid: str, timeout: float = 20) -> CommandAck:
    """The answer to ``cid`` (waits for it)."""
    await collector.wait_for(lambda: cid in answers(collector), timeout, f"the answer to {cid}")
    return answers(collector)[cid][0]


async def test_signed_commands_move_the_motor_and_every_refusal_is_one_nack(
    tmp_path: Path, mosquitto: MqttBroker, collect: Any, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ioc = IocProcess(tmp_path, prefix=f"AA{free_port()}:")
    for k, v in ioc.env.items():
        monkeypatch.setenv(k, v)
    env = dict(ioc.env)
    priv, pub = keys
    key = load_signing_key(priv)
    agent = TierProcess("edge", agent_yaml(tmp_path, mosquitto, pub, ioc.prefix), tmp_path / "agent.log", env=env)
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, protocol="5")
    sink = await collect(settings, T.mqtt_ack("bl1", "mtr1"))
    cloud = MqttClient(settings, "cloud")
    mtr, rbv = ioc.pv("mtr"), ioc.pv("mtr.RBV")
    try:
        ioc.start()
        await agent.start()
        await cloud.connect()
        # The agent subscribes to its command topic right after it connects (it says ready then).
        await send(cloud, key, "move-1", position=2.5)
        ok = await answer(sink, "move-1")
        assert ok.ok and ok.result is not None, ok
        assert ok.result["readback"] == pytest.approx(2.5, abs=0.001) and ok.result["readback_pv"] == rbv
        assert await caget(rbv) == pytest.approx(2.5, abs=0.001)

        # Outside the PV's control limits (the schema allows it): refused before anything is written.
        await send(cloud, key, "limit-1", position=15.0)
        # The wrong type: refused by the actuator's schema.
        await send(cloud, key, "type-1", position="far")
        nack_limit, nack_type = await answer(sink, "limit-1"), await answer(sink, "type-1")
        assert not nack_limit.ok and "out of limits: 15.0 is outside" in (nack_limit.reason or "")
        assert not nack_type.ok and "invalid args" in (nack_type.reason or "")
        assert await caget(mtr) == 2.5

        # The encoder disagrees by 0.5 mm: the put completes, the readback never arrives.
        await caput(ioc.pv("mtr.OFF"), 0.5)
        await send(cloud, key, "readback-1", position=1.0)
        nack_rb = await answer(sink, "readback-1")
        assert not nack_rb.ok and "readback timeout" in (nack_rb.reason or "") and "reads 1.5" in (nack_rb.reason or "")
        await caput(ioc.pv("mtr.OFF"), 0.0)

        # The IOC is down: a clear nack, nothing written; once it is back, commands work again.
        await asyncio.to_thread(ioc.stop)
        started = time.monotonic()
        await send(cloud, key, "down-1", position=-1.0)
        nack_down = await answer(sink, "down-1")
        assert not nack_down.ok and "IOC unreachable" in (nack_down.reason or ""), nack_down.reason
        assert time.monotonic() - started < 10
        await asyncio.to_thread(ioc.start)
        await send(cloud, key, "move-2", position=-3.0)
        assert (await answer(sink, "move-2")).ok
        assert await caget(rbv) == pytest.approx(-3.0, abs=0.001)

        await asyncio.sleep(0.5)  # any second answer would have arrived by now
        counts = {cid: len(a) for cid, a in answers(sink).items()}
        assert counts == dict.fromkeys(["move-1", "limit-1", "type-1", "readback-1", "down-1", "move-2"], 1), counts
    finally:
        await cloud.disconnect()
        agent.stop()
        ioc.close()
