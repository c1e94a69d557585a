"""``reflexarc status`` on a running pipeline (issue 17).

Real Mosquitto and Tansu, the four tier processes of the beamline scenario, and the
real command line. ``--json`` must show: a site whose agent stopped, with its backlog
(consumer lag) growing while triggers keep firing; a device offline after its agent
stops; dead letters per stage after garbage is published. ``--watch`` runs in a
pseudo-terminal, shows the tiers, and exits 0 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.brokers import EmbeddedBrokers
from reflexarc.config import MqttSettings
from reflexarc.demo import prepare_scenario
from reflexarc.mqtt import MqttClient
from reflexarc.signing import generate_keypair
from reflexarc.testing.poll import poll_until
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GARBAGE = [b"\xff\xfe not json", b'{"value": 12', b"[1, 2, 3]"]


def write_pipeline(scenario: Path, b: EmbeddedBrokers) -> Path:
    """The scenario's pipeline.yaml, naming the test's brokers (``status`` reads them from it)."""
    assert b.mqtt is not None
    triggers = scenario / "triggers.yaml"
    doc = yaml.safe_load(triggers.read_text())
    doc["worker"] = {"session_timeout": 6}  # group joins take half of it on Tansu
    triggers.write_text(yaml.safe_dump(doc, sort_keys=False))
    pipeline = scenario / "pipeline.yaml"
    doc = yaml.safe_load(pipeline.read_text())
    doc["brokers"] = {
        "mqtt": {"host": b.mqtt.host, "port": b.mqtt.port, "protocol": b.mqtt.protocol},
        "kafka": {"bootstrap_servers": b.kafka_bootstrap},
    }
    pipeline.write_text(yaml.safe_dump(doc, sort_keys=False))
    return pipeline


def status_json(pipeline: Path) -> dict[str, Any]:
    """``reflexarc status PIPELINE --json``, the way a script calls it (an environment without RX_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RX_")}
    out = subprocess.run(
        [sys.executable, "-m", "reflexarc", "status", str(pipeline), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Watcher:
    """Polls ``status --json`` and keeps the last report, for assertion messages."""

    def __init__(self, pipeline: Path) -> None:
        self.pipeline = pipeline
        self.last: dict[str, Any] = {}

    def until(self, check: Any, timeout: float) -> dict[str, Any]:
        def probe() -> bool:
            self.last = status_json(self.pipeline)
            return bool(check(self.last))

        assert poll_until(probe, timeout, interval=0.5), json.dumps(self.last, indent=1)[:4000]
        return self.last


def device(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in report["devices"] if f"{d['site']}/{d['device']}" == name), None)


@pytest.fixture
def pipeline(tmp_path: Path, brokers: EmbeddedBrokers) -> Iterator[tuple[Path, dict[str, TierProcess]]]:
    """The beamline scenario's four tiers on the test's brokers, running (stopped afterwards)."""
    pipeline_file, _ = prepare_scenario(tmp_path / "scenario", duration=600)
    pipeline_file = write_pipeline(tmp_path / "scenario", brokers)
    private, public = generate_keypair(tmp_path / "keys", "pipeline")  # commands are signed, as under `up`
    env = {**brokers.env(), "RX_SIGNING_KEY": str(private), "RX_VERIFY_KEYS": str(public)}
    tiers = {
        tier: TierProcess(tier, tmp_path / "scenario" / name, tmp_path / f"{tier}.log", env=env)
        for tier, name in [
            ("site", "site.yaml"),
            ("cloud", "triggers.yaml"),
            ("fog", "fog.yaml"),
            ("edge", "agent.yaml"),
        ]
    }

    async def start() -> None:
        await asyncio.gather(*(tiers[t].start(90) for t in ("site", "cloud", "fog")))
        await tiers["edge"].start(60)

    try:
        asyncio.run(start())
        yield pipeline_file, tiers
    finally:
        for t in ("edge", "fog", "cloud", "site"):
            tiers[t].stop(grace=15)


def test_status_json_shows_lag_offline_devices_and_dead_letters(
    pipeline: tuple[Path, dict[str, TierProcess]], brokers: EmbeddedBrokers
) -> None:
    pipeline_file, tiers = pipeline
    w = Watcher(pipeline_file)
    t0 = time.monotonic()

    # A healthy loop: the device online, loops closing at the actuator, nothing waiting at the site.
    r = w.until(lambda r: r["loop"]["loops"] >= 2 and r["commands"]["delivered"] >= 2, 90)
    assert r["brokers"]["kafka"]["reachable"] and r["brokers"]["mqtt"]["reachable"]
    assert device(r, "bl1/det1")["state"] == "online"  # type: ignore[index]
    assert 0 < r["loop"]["p50_s"] <= r["loop"]["p99_s"] < 60
    assert r["sites"]["local"]["groups"] == ["rx-site-local"]
    # The site's own heartbeat ({ns}.sites): live, with its engine's slots.
    assert r["sites"]["local"]["state"] == "live" and r["sites"]["local"]["slots"] >= 1
    assert {row["group"] for row in r["lag"]} >= {"rx-site-local", "rx-triggers", "rx-fog-commands"}
    healthy_s = time.monotonic() - t0

    # The site agent stops: triggers keep firing, so its backlog (the group's lag) grows.
    assert tiers["site"].stop() == 0
    first = w.until(lambda r: r["sites"]["local"]["backlog"] >= 1, 60)["sites"]["local"]["backlog"]
    w.until(lambda r: r["sites"]["local"]["backlog"] > first, 60)
    site_lag = [row for row in w.last["lag"] if row["group"] == "rx-site-local"]
    assert sum(row["lag"] for row in site_lag) == w.last["sites"]["local"]["backlog"]
    assert all(row["topic"] == "rx.tasks.local" for row in site_lag)
    assert w.last["sites"]["local"]["state"] == "stopped"  # its last word, on a clean stop
    assert w.last["commands"]["issued"] >= w.last["commands"]["delivered"]

    # Garbage from a misbehaving device: dead letters, counted per stage.
    async def garbage() -> None:
        client = MqttClient(mqtt_settings(brokers), "garbage")
        await client.connect()
        for payload in GARBAGE:
            await client.publish(Topics().mqtt_data("bl1", "det1", "counts"), payload, qos=1)
        await client.disconnect()

    asyncio.run(garbage())
    r = w.until(lambda r: r["dead_letters"]["total"] >= len(GARBAGE), 30)
    # None are events: the fog's parse stage refuses every one.
    assert r["dead_letters"]["by_stage"] == {"parse": len(GARBAGE)}, r["dead_letters"]

    # The edge agent dies (no goodbye): its last will marks the device offline.
    tiers["edge"].kill()
    r = w.until(lambda r: (device(r, "bl1/det1") or {}).get("state") == "offline", 30)
    assert r["offline"] == 1 and r["online"] == 0
    print(f"healthy after {healthy_s:.1f}s; every acceptance item after {time.monotonic() - t0:.1f}s")


def mqtt_settings(b: EmbeddedBrokers) -> MqttSettings:
    """Client settings of the test's MQTT broker."""
    assert b.mqtt is not None
    return MqttSettings(host=b.mqtt.host, port=b.mqtt.port, protocol=b.mqtt.protocol)


def read_until(fd: int, wanted: list[str], timeout: float) -> str:
    """Read the terminal until every string in ``wanted`` was shown (or time runs out)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w.encode() in seen for w in wanted):
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_status_watch_runs_in_a_terminal_and_quits_on_ctrl_c(tmp_path: Path, brokers: EmbeddedBrokers) -> None:
    pipeline_file, _ = prepare_scenario(tmp_path / "scenario", duration=1)
    pipeline_file = write_pipeline(tmp_path / "scenario", brokers)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RX_")}
    env.update(COLUMNS="100", LINES="60", TERM="xterm")
    argv = [sys.executable, "-m", "reflexarc", "status", str(pipeline_file), "--watch", "--interval", "0.5"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its controlling terminal
        os.execvpe(argv[0], argv, env)
    status: int | None = None
    try:
        shown = read_until(fd, ["brokers", "edge", "fog", "HPC sites", "the loop", "reachable", "Ctrl-C quits"], 60)
        assert "Ctrl-C quits" in shown and "HPC sites" in shown and "edge" in shown, shown[-3000:]
        os.write(fd, b"\x03")  # Ctrl-C, as typed: the terminal sends SIGINT to the foreground process
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:  # (0, 0) while it still runs
                status = code
                break
            read_until(fd, ["\x00never"], 0.2)  # keep reading what it prints while it leaves (no full pty)
        assert status is not None, "still running 20 s after Ctrl-C"
        assert os.WIFEXITED(status), status
        assert os.WEXITSTATUS(status) == 0
    finally:
        if status is None:  # not reaped: the test failed while it ran
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
