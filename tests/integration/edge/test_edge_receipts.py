"""delivery: pipeline against a real Mosquitto at its packaged limits: nothing lost though the broker drops.

The broker (``mosquitto_defaults``) queues at most 1000 messages for a
subscriber that is away and drops the rest after PUBACKing them to the
device. The "fog" here is :class:`ReceiptResponder`, which confirms only what
it really received. While it is away the agent publishes more than the
broker can keep for it; every event must still reach it (counted by distinct
id), and the agent's spool must end empty.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from edge_helpers import agent_process, metric, scrape, write_yaml
from receipt_responder import ReceiptResponder
from test_edge_security import PASSWORDS, secured  # noqa: F401  (the password + ACL broker fixture)
from typer.testing import CliRunner

from reflexarc.brokers import MqttBroker
from reflexarc.config import MqttSettings
from reflexarc.edge.agent import EdgeAgent
from reflexarc.edge.cli import app as edge_cli
from reflexarc.edge.config import load_agent_config
from reflexarc.events import Receipt, stable_id
from reflexarc.mqtt import MqttClient
from reflexarc.topics import Topics

pytestmark = pytest.mark.integration

# More than the broker keeps for the absent fog: 1000 queued + 20 in flight.
BROKER_KEEPS = 1000 + 20


def _yaml(tmp: Path, port: int, count: int, rate_hz: float, window: int, mqtt_extra: str = "") -> Path:
    return write_yaml(
        tmp / "agent.yaml",
        f"""
site: bl1
device: det1
state_dir: state
metrics_port: 0
mqtt: {{host: 127.0.0.1, port: {port}, protocol: "5"{mqtt_extra}}}
publish:
  reconnect_min_s: 0.2
  reconnect_max_s: 1.0
  unconfirmed_max: {window}
  confirm_timeout_s: 1.0
  confirm_timeout_max_s: 4.0
sources:
  - {{type: simulated, stream: counts, rate_hz: {rate_hz}, count: {count}}}
""",
    )


def _ids(count: int) -> set[str]:
    """The ids the simulated source gives its events (stable: site, device, stream, n)."""
    return {stable_id("bl1", "det1", "counts", str(n)) for n in range(count)}


async def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.05)


def _status(tmp: Path) -> dict[str, Any]:
    try:
        return json.loads((tmp / "state" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _spool_depth(tmp: Path) -> int:
    db = sqlite3.connect(tmp / "state" / "spool.db")
    try:
        return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        db.close()


@pytest.mark.timeout(120)
async def test_fog_away_on_a_default_broker_loses_nothing(tmp_path: Path, mosquitto_defaults: MqttBroker) -> None:
    count = 8000
    fog = ReceiptResponder(MqttSettings(host="127.0.0.1", port=mosquitto_defaults.port))
    await fog.start()
    agent = EdgeAgent(load_agent_config(_yaml(tmp_path, mosquitto_defaults.port, count, 1000, 3000)))
    await agent.start()
    try:
        await _until(lambda: fog.distinct >= 500, 30, "the first events to be confirmed")
        await fog.away()
        u = agent.unconfirmed
        assert u is not None
        # The broker PUBACKed far more than it can keep for the absent fog: it dropped some.
        await _until(lambda: len(u) >= 2500, 30, "the agent's unconfirmed window to fill")
        assert len(u) <= 3000, "the window bounds what is out unconfirmed"
        status = agent.status()["events"]
        assert status["unconfirmed"] >= 2500 and status["oldest_unconfirmed_s"] > 0
        await fog.start()
        await _until(lambda: fog.distinct >= count, 60, f"all {count} events at the fog")
        assert set(fog.received) == _ids(count), "exactly the produced ids, each counted once"
        assert agent.spool is not None
        await _until(lambda: agent.spool.depth == 0 and len(u) == 0, 20, "an empty spool")  # type: ignore[union-attr]
        text = scrape(agent.metrics_port)  # type: ignore[arg-type]
        # Events the broker dropped could only come through again by a re-send.
        assert metric(text, "rx_edge_events_resent_total") >= 2500 - BROKER_KEEPS
        assert metric(text, "rx_edge_events_published_total") == count
        assert metric(text, "rx_edge_unconfirmed_events") == 0
        assert metric(text, "rx_edge_receipts_total") > 0
        dupes = sum(fog.received.values()) - count
        print(
            f"{count} events, resent {metric(text, 'rx_edge_events_resent_total'):.0f}, {dupes} duplicates at the fog"
        )
    finally:
        await agent.stop()
        await fog.away()


@pytest.mark.timeout(120)
async def test_agent_killed_while_events_await_receipts_loses_nothing(
    tmp_path: Path, mosquitto_defaults: MqttBroker
) -> None:
    count = 6000
    fog = ReceiptResponder(MqttSettings(host="127.0.0.1", port=mosquitto_defaults.port))
    await fog.start()
    path = _yaml(tmp_path, mosquitto_defaults.port, count, 1000, 2500)
    proc = agent_process(path, tmp_path / "agent.log").start()
    try:
        await _until(lambda: fog.distinct >= 500, 30, "the first events to be confirmed")
        await fog.away()
        await _until(
            lambda: _status(tmp_path).get("events", {}).get("unconfirmed", 0) >= 2000, 30, "events awaiting receipts"
        )
        shown = CliRunner().invoke(edge_cli, ["status", str(path)])
        assert shown.exit_code == 0, shown.output
        assert re.search(r"awaiting the fog's receipt: \d{4}, oldest for \d+\.\d s", shown.output), shown.output
        proc.kill()  # SIGKILL: the in-memory window is gone; the spool still holds every unconfirmed event
        waiting = await asyncio.to_thread(_spool_depth, tmp_path)
        assert waiting >= 2000
        proc = agent_process(path, tmp_path / "agent2.log").start()
        await fog.start()
        await _until(lambda: fog.distinct >= count, 60, f"all {count} events at the fog")
        assert set(fog.received) == _ids(count)
        await _until(lambda: _status(tmp_path).get("spool", {}).get("depth") == 0, 20, "an empty spool")
        assert await asyncio.to_thread(_spool_depth, tmp_path) == 0
        print(f"killed with {waiting} in the spool; {sum(fog.received.values()) - count} duplicates at the fog")
    finally:
        proc.stop()
        await fog.away()


@pytest.mark.timeout(60)
async def test_device_acl_lets_the_agent_read_only_its_own_receipts(
    tmp_path: Path,
    secured: MqttBroker,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DET1_PW", PASSWORDS["bl1-det1"])
    monkeypatch.setenv("FOG_PW", PASSWORDS["fog"])
    fog_settings = MqttSettings(host="127.0.0.1", port=secured.port, username="fog", password_env="FOG_PW")
    fog = ReceiptResponder(fog_settings)
    await fog.start()
    path = _yaml(tmp_path, secured.port, 200, 500, 1000, ", username: bl1-det1, password_env: DET1_PW")
    agent = EdgeAgent(load_agent_config(path))
    await agent.start()
    try:
        assert agent.spool is not None
        await _until(lambda: fog.distinct >= 200, 20, "the agent's events")
        # Confirmed through the device's own ACL: the spool empties.
        await _until(lambda: agent.spool.depth == 0, 20, "receipts to free the spool")  # type: ignore[union-attr]
    finally:
        await agent.stop()
        await fog.away()
    # det1's credentials cannot read det2's receipts (Mosquitto grants the subscription, delivers nothing).
    t = Topics()
    det1 = MqttSettings(host="127.0.0.1", port=secured.port, username="bl1-det1", password_env="DET1_PW")
    async with MqttClient(det1, "intruder") as c, MqttClient(fog_settings, "fog-2") as f:
        await c.subscribe([(t.mqtt_receipt("bl1", "det2"), 1), (t.mqtt_receipt("bl1", "det1"), 1)])
        for dev in ("det2", "det1"):
            payload, props, ctype = Receipt(site="bl1", device=dev, ids=["x"]).to_envelope().to_mqtt()
            await f.publish(t.mqtt_receipt("bl1", dev), payload, 1, user_properties=props, content_type=ctype)
        # One publisher, one subscriber: delivered in order, so det2's would have come first.
        got = await asyncio.wait_for(c.messages.get(), 10)
        assert got.topic == t.mqtt_receipt("bl1", "det1"), "det1 received det2's receipt"
        assert c.messages.empty()
