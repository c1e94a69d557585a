"""A user's mistake on the command line is one line that says what to do, a non-zero exit and no traceback.

Each case runs the real ``reflexarc`` command in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reflexarc.testing.slurm import free_port

pytestmark = pytest.mark.integration


def rx(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``reflexarc ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "reflexarc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, no traceback, and an ``error:`` line containing every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_keys_generate_twice_needs_force(tmp_path: Path) -> None:
    assert rx("keys", "generate", str(tmp_path)).returncode == 0
    before = (tmp_path / "pipeline.key").read_bytes()
    assert_one_line_error(rx("keys", "generate", str(tmp_path)), "pipeline.key", "already exists", "--force")
    assert (tmp_path / "pipeline.key").read_bytes() == before, "the key must not be replaced without --force"
    assert rx("keys", "generate", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "pipeline.key").read_bytes() != before


def test_a_bad_topic_name_is_one_line() -> None:
    assert_one_line_error(rx("edge", "acl", "--site", "bl 1", "--device", "d1"), "invalid site 'bl 1'")


@pytest.mark.parametrize(("flag", "value"), [("--cpus", "-3"), ("--gpus", "-1")])
def test_an_invalid_number_is_one_line_naming_the_field(flag: str, value: str) -> None:
    assert_one_line_error(rx("compose", "compose", flag, value), flag.removeprefix("--"), "greater than or equal")


def test_results_subscribe_without_a_broker_fails_fast_and_says_where() -> None:
    port = free_port()  # nothing listens there
    proc = rx("results", "subscribe", "--bootstrap", f"127.0.0.1:{port}", timeout=60)
    assert_one_line_error(proc, "cannot reach Kafka", str(port))
    assert "Unclosed" not in proc.stderr


def test_rx_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = rx("edge", "acl", "--site", "bl 1", "--device", "d1", env={"RX_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "TopicError" in proc.stderr
