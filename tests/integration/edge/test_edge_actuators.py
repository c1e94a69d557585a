"""Actuators against real Mosquitto: signed commands run once; everything else is nacked, never run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from edge_helpers import agent_process, handler_runs, metric, scrape, write_yaml

from reflexarc.brokers import MqttBroker
from reflexarc.config import MqttSettings
from reflexarc.edge.agent import EdgeAgent
from reflexarc.edge.config import load_agent_config
from reflexarc.envelope import Envelope
from reflexarc.events import Command, CommandAck
from reflexarc.mqtt import MqttClient
from reflexarc.process import READY_ENV
from reflexarc.signing import generate_keypair, load_signing_key, sign_envelope
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration
T = Topics()


def _yaml(tmp: Path, port: int, pub: Path) -> Path:
    return write_yaml(
        tmp / "agent.yaml",
        f"""
site: bl1
device: det1
state_dir: state
metrics_port: 0
mqtt: {{host: 127.0.0.1, port: {port}}}
commands: {{verify_keys: [{pub}], max_age_s: 60}}
actuators:
  - name: motor
    schema:
      type: object
      properties:
        position: {{type: number, minimum: -10, maximum: 10}}
        speed: {{type: number}}
        hold_s: {{type: number}}
      required: [position]
      additionalProperties: false
    handler: {{python: "edge_helpers:record_move"}}
  - name: echo
    schema: {{type: object, properties: {{word: {{type: string}}}}, required: [word]}}
    handler: {{argv: ["/bin/echo", "{{word}}"]}}
""",
    )


def _cmd(cid: str, actuator: str = "motor", **args: object) -> Envelope:
    return Command(command_id=cid, site="bl1", device="det1", actuator=actuator, args=args).to_envelope()


async def _send(client: MqttClient, env: Envelope | bytes) -> None:
    if isinstance(env, bytes):
        await client.publish(T.mqtt_cmd("bl1", "det1"), env, 1)
        return
    payload, props, ctype = env.to_mqtt(binary=True)
    await client.publish(T.mqtt_cmd("bl1", "det1"), payload, 1, user_properties=props, content_type=ctype)


def _acks(sink) -> dict[str, list[tuple[str, CommandAck]]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[tuple[str, CommandAck]]] = {}
    for env in sink.events("/ack"):
        ack = CommandAck.from_envelope(env)
        out.setdefault(ack.command_id, []).append((env.id, ack))
    return out


@pytest.mark.timeout(90)
async def test_commands_checked_run_once_and_answered(
    tmp_path: Path,
    mosquitto: MqttBroker,
    collect,
    keys,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    runs = tmp_path / "runs.jsonl"
    monkeypatch.setenv("RX_TEST_HANDLER_LOG", str(runs))
    priv, pub = keys
    key = load_signing_key(priv)
    rogue = load_signing_key(generate_keypair(tmp_path / "rogue", "rogue")[0])
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port)
    sink = await collect(settings, T.mqtt_ack("bl1", "det1"))
    agent = EdgeAgent(load_agent_config(_yaml(tmp_path, mosquitto.port, pub)))
    await agent.start()
    cloud = MqttClient(settings, "cloud")
    await cloud.connect()
    try:
        await asyncio.wait_for(agent.client.connected.wait(), 10)  # type: ignore[union-attr]
        await asyncio.sleep(0.3)  # the agent's subscription is in place
        good = sign_envelope(_cmd("ok-1", position=2.5), key)
        await _send(cloud, good)
        await _send(cloud, sign_envelope(_cmd("echo-1", "echo", word="hello world"), key))
        forged = sign_envelope(_cmd("forged-1", position=1.0), key)
        forged = forged.with_(data={**forged.data, "args": {"position": 9.0}})  # type: ignore[dict-item]
        await _send(cloud, forged)
        await _send(cloud, _cmd("unsigned-1", position=1.0))
        old = _cmd("stale-1", position=1.0).with_(time=datetime.now(UTC) - timedelta(hours=1))
        await _send(cloud, sign_envelope(old, key))
        await _send(cloud, sign_envelope(_cmd("schema-1", position="far"), key))
        await _send(cloud, sign_envelope(_cmd("range-1", position=99), key))
        await _send(cloud, sign_envelope(_cmd("rogue-1", position=1.0), rogue))
        await _send(cloud, sign_envelope(_cmd("nope-1", "laser", power=1), key))
        await _send(cloud, b"this is not a command")
        expected = {
            "ok-1": None,
            "echo-1": None,
            "forged-1": "bad signature",
            "unsigned-1": "unsigned",
            "stale-1": "stale",
            "schema-1": "invalid args",
            "range-1": "invalid args",
            "rogue-1": "unknown key",
            "nope-1": "unknown actuator",
        }
        await sink.wait_for(lambda: len(_acks(sink)) >= len(expected) + 1, 20, "an answer to every command")
        acks = _acks(sink)
        for cid, reason in expected.items():
            [(env_id, ack)] = acks[cid]
            assert env_id == f"{cid}.ack"
            if reason is None:
                assert ack.ok, ack.reason
            else:
                assert not ack.ok and ack.reason and ack.reason.startswith(reason), (cid, ack.reason)
        assert acks["ok-1"][0][1].result == {"position": 2.5, "speed": 1.0}
        assert acks["echo-1"][0][1].result["stdout"] == "hello world\n"  # type: ignore[index]
        [malformed] = [a for cid, a in acks.items() if cid.startswith("malformed-")]
        assert malformed[0][1].reason.startswith("malformed")  # type: ignore[union-attr]

        # A replay of the exact signed message: nacked under a distinct id, handler not run.
        await _send(cloud, good)
        await sink.wait_for(lambda: len(_acks(sink)["ok-1"]) == 2, 10, "the replay nack")
        env_id, replay = _acks(sink)["ok-1"][1]
        assert env_id.startswith("ok-1.ack.replay-") and not replay.ok
        assert replay.reason.startswith("replayed")  # type: ignore[union-attr]
        assert [r["position"] for r in handler_runs(runs)] == [2.5], "only the valid command ran"
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        assert metric(text, "rx_edge_commands_ok_total") == 2
        assert metric(text, "rx_edge_commands_rejected_total") == len(expected) - 2 + 1 + 1
    finally:
        await cloud.disconnect()
        await agent.stop()


@pytest.mark.timeout(90)
async def test_handler_interrupted_by_kill9_is_not_rerun(
    tmp_path: Path,
    mosquitto: MqttBroker,
    collect,
    keys,  # type: ignore[no-untyped-def]
) -> None:
    runs = tmp_path / "runs.jsonl"
    priv, pub = keys
    path = _yaml(tmp_path, mosquitto.port, pub)
    ready = tmp_path / "ready"
    env = {"RX_TEST_HANDLER_LOG": str(runs), "PYTHONPATH": str(Path(__file__).parent), READY_ENV: str(ready)}
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port)
    sink = await collect(settings, T.mqtt_ack("bl1", "det1"))
    proc = agent_process(path, tmp_path / "agent.log", env).start()
    try:
        async with MqttClient(settings, "cloud") as cloud:
            # The agent says it is ready once subscribed (a persistent session from then on).
            await asyncio.to_thread(proc.wait_ready, ready.exists, 30)
            cmd = sign_envelope(_cmd("slow-1", position=1.0, hold_s=30), load_signing_key(priv))
            await _send(cloud, cmd)
            await sink.wait_for(lambda: len(handler_runs(runs)) == 1, 20, "the handler to start")
            proc.kill()  # dies mid-handler: the command was never acknowledged to the broker
            proc = agent_process(path, tmp_path / "agent2.log", env).start()
            await sink.wait_for(lambda: "slow-1" in _acks(sink), 20, "the answer after restart")
            [(env_id, ack)] = _acks(sink)["slow-1"]
            assert env_id == "slow-1.ack" and not ack.ok
            assert ack.reason.startswith("interrupted")  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
            assert len(handler_runs(runs)) == 1, "the handler must not run twice"
            assert len(_acks(sink)["slow-1"]) == 1
    finally:
        proc.stop()
