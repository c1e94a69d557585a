"""`reflexarc brokers up --s3` also starts SeaweedFS and prints its settings like the brokers'."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from reflexarc.objectstore import ObjectStoreSettings, put_bytes, read_bytes
from reflexarc.testing.poll import poll_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def test_brokers_up_s3_prints_a_working_store_and_stops_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflexarc", "brokers", "up", "--s3", "--data-dir", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    env: dict[str, str] = {}
    try:
        while "AWS_SECRET_ACCESS_KEY" not in env:
            line = proc.stdout.readline()
            assert line, "brokers up exited early"
            if line.startswith("export "):
                k, v = line[len("export ") :].strip().split("=", 1)
                env[k] = v
        assert {"RX_S3_ENDPOINT_URL", "RX_S3_URL", "AWS_ACCESS_KEY_ID", "RX_KAFKA_BOOTSTRAP"} <= set(env)
        kids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(kids) == 3  # MQTT, Kafka, SeaweedFS
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        try:
            settings = ObjectStoreSettings(endpoint_url=env["RX_S3_ENDPOINT_URL"])
            ref = put_bytes(f"{env['RX_S3_URL']}/hello.bin", b"hello", settings)
            assert read_bytes(ref, settings) == b"hello"
        finally:
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.pop(k, None)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert poll_until(lambda: not any(_alive(k) for k in kids), 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
