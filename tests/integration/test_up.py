"""`reflexarc up` and `reflexarc brokers up` leave no process behind, however they are stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflexarc.demo import prepare_scenario
from reflexarc.testing.poll import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces: the ppid is the 2nd field after the closing ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], set[int]]:
    pipeline, _ = prepare_scenario(tmp_path / "scenario", duration=600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflexarc", "up", str(pipeline), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    # `up` prints "running" once brokers are up and every tier reported ready.
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "running" in line:
            break
        assert proc.poll() is None, "".join(lines)
    kids = children_of(proc.pid)
    # brokers (2) + site, cloud, fog, edge
    assert len(kids) >= 6, (kids, "".join(lines))
    return proc, kids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_stops_everything_on_ctrl_c_and_sigterm(tmp_path: Path, sig: signal.Signals) -> None:
    proc, kids = start_up(tmp_path)
    proc.send_signal(sig)
    proc.wait(60)
    assert proc.returncode is not None
    assert poll_until(lambda: not any(alive(k) for k in kids), 20), [k for k in kids if alive(k)]


def test_up_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    proc, kids = start_up(tmp_path)
    grandchildren = set().union(*(children_of(k) for k in kids))
    proc.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    proc.wait(10)
    assert poll_until(lambda: not any(alive(k) for k in kids | grandchildren), 30), [
        k for k in kids | grandchildren if alive(k)
    ]


def test_brokers_up_prints_env_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflexarc", "brokers", "up", "--data-dir", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    env = {}
    while len(env) < 4:
        line = proc.stdout.readline()
        assert line, "brokers up exited early"
        if line.startswith("export "):
            k, v = line[len("export ") :].strip().split("=", 1)
            env[k] = v
    assert set(env) == {"RX_MQTT_HOST", "RX_MQTT_PORT", "RX_MQTT_PROTOCOL", "RX_KAFKA_BOOTSTRAP"}
    kids = children_of(proc.pid)
    assert len(kids) == 2
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 0
    assert poll_until(lambda: not any(alive(k) for k in kids), 15)
