"""Packed environments: an app importing a package the site's Python lacks runs inside its env."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.cli import env_app
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.envpack import EnvManager
from reflexarc.hpc_bridge.registry import resolve_apps
from reflexarc.hpc_bridge.site_config import load_site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def make_wheel(dest: Path, name: str = "rxabsent", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    files = {
        f"{name}/__init__.py": "MAGIC = 42\n\ndef times(x):\n    return MAGIC * x\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    lines.append(f"{record},,")
    files[record] = "\n".join(lines) + "\n"
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def write_app_and_site(tmp_path: Path, kafka: KafkaSettings) -> Path:
    """An app module importing ``rxabsent`` and a site.yaml that packs its environment."""
    wheel = make_wheel(tmp_path / "wheels")
    code = tmp_path / "appcode"
    code.mkdir()
    (code / "rx_envapp.py").write_text(
        "import sys\nimport rxabsent\n\ndef run(x):\n    return {'value': rxabsent.times(x), 'prefix': sys.prefix}\n"
    )
    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: packed\nstate_dir: {tmp_path / 'state'}\n"
        f"kafka: {{bootstrap_servers: '{kafka.bootstrap_servers}'}}\n"
        "engine: {kind: local, local: {max_workers: 1}}\n"
        "apps:\n  envapp:\n    function: 'rx_envapp:run'\n    env:\n"
        f"      requirements: ['rxabsent @ {wheel.as_uri()}']\n      paths: ['{code}']\n"
    )
    return site


async def test_app_runs_in_its_packed_env_and_the_tarball_is_reused(
    tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RX_ENV_UNPACK_DIR", str(tmp_path / "node-local"))
    assert importlib.util.find_spec("rxabsent") is None  # the site's Python does not have it
    site = write_app_and_site(tmp_path, kafka_settings)
    cfg = load_site(site)
    agent = SiteAgent(cfg)  # the agent does not import the app (its package is absent here)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    try:
        async with SiteClient(kafka_settings) as client:
            t0 = time.monotonic()
            await client.submit([TaskRequest(task_id="env-1", app="envapp", args={"x": 2}, site="packed")])
            first = (await client.wait_results(["env-1"], 150))["env-1"]
            first_s = time.monotonic() - t0
            assert first.status == "done", first.error
            assert first.result and first.result["value"] == 84
            assert first.result["prefix"].startswith(str(tmp_path / "node-local"))
            t1 = time.monotonic()
            await client.submit([TaskRequest(task_id="env-2", app="envapp", args={"x": 3}, site="packed")])
            second = (await client.wait_results(["env-2"], 60))["env-2"]
            second_s = time.monotonic() - t1
            assert second.result and second.result["value"] == 126
            print(f"\nfirst task (build + pack + unpack + run): {first_s:.2f}s; second (cached): {second_s:.2f}s")
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
    tarballs = list(cfg.env_cache_path.glob("env-*.tar.gz"))
    assert len(tarballs) == 1  # built once, reused
    # The CLI reuses the cached tarball too, and lists it.
    runner = CliRunner()
    out = runner.invoke(env_app, ["pack", "envapp", "--site", str(site)])
    assert out.exit_code == 0, out.output
    assert "reused cached" in out.output and tarballs[0].name in out.output and "rxabsent" in out.output
    print(out.output.strip())
    listing = runner.invoke(env_app, ["list", "--site", str(site)])
    assert listing.exit_code == 0 and "envapp" in listing.output and "rxabsent" in listing.output
    # A changed app (new code) is a new spec, a new hash, a new tarball.
    (tmp_path / "appcode" / "rx_envapp.py").write_text(
        "import rxabsent\n\ndef run(x):\n    return {'value': -rxabsent.times(x)}\n"
    )
    mgr = EnvManager(cfg.env_cache_path)
    packed = mgr.pack("envapp", resolve_apps(load_site(site), import_code=False)["envapp"])
    assert not packed.cached and packed.tarball != tarballs[0]
    py = mgr.python_for("envapp", resolve_apps(load_site(site), import_code=False)["envapp"])
    val = subprocess.run(
        [str(py), "-c", "import rx_envapp; print(rx_envapp.run(1)['value'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert val == "-42"
    assert sys.prefix not in str(py)
