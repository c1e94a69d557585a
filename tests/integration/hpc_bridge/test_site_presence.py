"""Site presence on real Tansu: agents announce themselves, `reflexarc sites` sees them live, stopped or stale."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reflexarc.config import KafkaSettings
from reflexarc.process import ManagedProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

APPS = "reflexarc.hpc_bridge.examples.apps"
INTERVAL = 0.5


def start_site(tmp_path: Path, kafka: KafkaSettings, name: str, slots: int) -> ManagedProcess:
    """A site agent process with a fast heartbeat."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": name,
                "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
                "state_dir": str(tmp_path / name),
                "engine": {"kind": "local", "local": {"max_workers": slots}},
                "presence": {"interval_s": INTERVAL},
                "apps": {"sleep": {"function": f"{APPS}:sleep"}, "fit": {"function": f"{APPS}:sleep", "cpus": 2}},
            }
        )
    )
    argv = [sys.executable, "-c", "from reflexarc.hpc_bridge.cli import site_app; site_app()", "run", str(path)]
    return ManagedProcess(name, argv, tmp_path / f"{name}.log").start()


def sites_json(kafka: KafkaSettings) -> dict[str, Any]:
    """`reflexarc sites --json`, as a script would run it."""
    out = subprocess.run(
        [sys.executable, "-m", "reflexarc", "sites", "--json", "--bootstrap", kafka.bootstrap_servers],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {s["site"]: s for s in json.loads(out.stdout)["sites"]}


def wait_for(kafka: KafkaSettings, check: Any, what: str, timeout: float = 40.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = sites_json(kafka)
        if check(seen):
            return seen
    raise AssertionError(f"{what}: sites now {json.dumps(seen, indent=1)}")


def test_sites_announce_themselves_and_go_stopped_or_stale(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    polaris = start_site(tmp_path, kafka_settings, "polaris", 3)
    aurora = start_site(tmp_path, kafka_settings, "aurora", 2)
    try:
        seen = wait_for(
            kafka_settings,
            lambda s: all(s.get(n, {}).get("state") == "live" for n in ("polaris", "aurora")),
            "both sites live",
        )
        p = seen["polaris"]
        assert (p["engine"], p["slots"], p["free_slots"], p["queued"]) == ("local", 3, 3, 0)
        assert sorted(p["apps"]) == ["fit", "sleep"] and p["apps"]["fit"]["cpus"] == 2
        assert p["apps"]["fit"]["fingerprint"] and p["interval_s"] == INTERVAL
        assert seen["aurora"]["slots"] == 2

        polaris.stop()  # SIGTERM: a clean stop says so
        wait_for(kafka_settings, lambda s: s["polaris"]["state"] == "stopped", "polaris stopped")
        aurora.kill()  # SIGKILL: no last word, stale by age (3 missed beats)
        seen = wait_for(kafka_settings, lambda s: s["aurora"]["state"] == "stale", "aurora stale")
        assert seen["aurora"]["age_s"] >= 3 * INTERVAL
        assert seen["polaris"]["state"] == "stopped"
    finally:
        polaris.stop()
        aurora.stop()

    # The human view lists both, with their state.
    out = subprocess.run(
        [sys.executable, "-m", "reflexarc", "sites", "--bootstrap", kafka_settings.bootstrap_servers],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "polaris" in out and "stopped" in out and "aurora" in out and "stale" in out
