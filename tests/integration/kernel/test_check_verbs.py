"""Every check verb lists every problem in one run and exits 0 ok / 1 problems / 2 cannot check.

Each case runs the real ``reflexarc`` command in a subprocess, as a user or CI would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def rx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``reflexarc ARGS``; RX_SIGNING_KEY/RX_VERIFY_KEYS only when the test gives them."""
    base = {k: v for k, v in os.environ.items() if k not in ("RX_SIGNING_KEY", "RX_VERIFY_KEYS")}
    return subprocess.run(
        [sys.executable, "-m", "reflexarc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


BAD_TRIGGERS = """\
sites: [site.yaml]
triggers:
  - name: dup
    on: bl1/+/counts
    when: agg.mean > 3.0
    window:
      type: sliding
      size: 10s
      aggregates:
        maen: {op: mean, of: double(event.data.value)}
    then: [{task: {app: fit}}]
  - name: dup
    on: "bl 1/det/counts"
    when: event.data.value > 1
    then:
      - command: {actuator: shutter, args: {position: "'closed'"}}
  - name: typo
    on: bl1/det/counts
    whem: event.data.value > 1
    then: [{task: {app: fit}}]
"""


def test_triggers_validate_lists_every_problem_in_one_run(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("site: s1\napps: {fit: {argv: [fit]}}\n")
    f = tmp_path / "triggers.yaml"
    f.write_text(BAD_TRIGGERS)
    proc = rx("triggers", "validate", str(f))
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    # Schema error of one trigger, and the checks that used to come only after it was fixed:
    assert f"{f}:19:5: trigger 'typo' whem: unknown field (did you mean 'when'?)" in err, err
    assert f"{f}:12:5: trigger 'dup' name: duplicate trigger name" in err, err
    assert "invalid stream selector 'bl 1/det/counts'" in err, err
    # New checks: an aggregate the window does not define, a command with no key to sign it.
    assert f"{f}:5:11: trigger 'dup' when: unknown aggregate agg.mean (did you mean 'maen'?)" in err, err
    assert "must be signed, and no key is configured" in err, err
    assert f"{f}:17:5: trigger 'typo' when: Field required" in err, err
    assert err.strip().endswith("6 problems"), err

    js = rx("triggers", "validate", "--json", str(f))
    assert js.returncode == 1
    doc = json.loads(js.stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 6
    assert {"file", "line", "column", "field", "message"} <= set(doc["problems"][0])


def test_triggers_validate_empty_file_ok_file_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    proc = rx("triggers", "validate", str(empty))
    assert proc.returncode == 1 and "no triggers" in proc.stderr, proc.stderr

    key = tmp_path / "keys"
    assert rx("keys", "generate", str(key)).returncode == 0
    example = REPO / "cloud" / "examples" / "triggers.yaml"
    ok = rx("triggers", "validate", "--json", str(example), env={"RX_SIGNING_KEY": str(key / "pipeline.key")})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True and "bright-spot" in json.loads(ok.stdout)["triggers"]

    missing = rx("triggers", "validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nope.yaml" in missing.stderr


def test_fog_check_lists_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "fog.yaml"
    f.write_text("mqtt:\n  hots: x\n  port: 0\nkafak: {}\n")
    proc = rx("fog", "check", str(f))
    assert proc.returncode == 1, proc.stderr
    assert "mqtt.hots: unknown field (did you mean 'host'?)" in proc.stderr
    assert "kafak: unknown field (did you mean 'kafka'?)" in proc.stderr
    assert "mqtt.port" in proc.stderr and "3 problems" in proc.stderr
    ok = rx("fog", "check", str(REPO / "fog" / "examples" / "fog.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert rx("fog", "check", str(tmp_path / "nope.yaml")).returncode == 2


def test_site_check_lists_every_broken_app(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(
        "site: s1\n"
        "modules: [no_such_module_rx]\n"
        "apps:\n"
        "  a: {function: 'no_such_pkg_rx.mod:f'}\n"
        "  b: {function: 'json:no_such_function'}\n"
        "  c: {argv: [echo, hi]}\n"
    )
    proc = rx("site", "check", str(f))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"{f}:2:" in proc.stderr and "no_such_module_rx" in proc.stderr
    assert f"{f}:4:3: apps.a" in proc.stderr and f"{f}:5:3: apps.b" in proc.stderr, proc.stderr
    assert "3 problems" in proc.stderr
    ok = rx("site", "check", "--json", str(REPO / "hpc_bridge" / "examples" / "site.yaml"))
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["site"] == "hpc" and "count_lines" in doc["apps"]


def test_edge_check(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(
        "site: bl1\ndevice: det1\n"
        "mqtt: {tls: {ca_file: missing-ca.pem}}\n"
        "commands: {verify_keys: [missing.pub]}\n"
        "actuators:\n"
        "  - name: motor\n"
        "    handler: {python: 'no_such_pkg_rx:move'}\n"
    )
    proc = rx("edge", "check", str(f))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    for needle in (
        "mqtt.tls.ca_file: no such file",
        "commands.verify_keys[0]: no such key file",
        "actuators[0].handler.python: cannot import 'no_such_pkg_rx'",
        "3 problems",
    ):
        assert needle in proc.stderr, proc.stderr
    schema = tmp_path / "bad.yaml"
    schema.write_text("site: bl1\ndevise: det1\n")
    proc = rx("edge", "check", str(schema))
    assert proc.returncode == 1 and "devise: unknown field (did you mean 'device'?)" in proc.stderr, proc.stderr

    keys = tmp_path / "keys"
    assert rx("keys", "generate", str(keys)).returncode == 0
    ok = rx(
        "edge",
        "check",
        str(REPO / "edge" / "examples" / "agent.yaml"),
        env={"RX_VERIFY_KEYS": str(keys / "pipeline.pub")},
    )
    assert ok.returncode == 0, ok.stderr
    assert rx("edge", "check", str(tmp_path / "nope.yaml")).returncode == 2
