"""A real Prometheus server (Debian's ``prometheus``) for tests: loopback, a free port, a temporary TSDB.

The packaged service is never used (it would sit on port 9090 for everyone): the binary
runs in the foreground with a config written here, and is stopped by its PID.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from reflexarc.process import ManagedProcess, free_port, port_open


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary (``scripts/system-deps.sh`` installs it)."""
    path = shutil.which("prometheus")
    if path is None:
        raise RuntimeError("prometheus is not installed: run scripts/system-deps.sh (Debian package 'prometheus')")
    return path


def scrape_config(targets: dict[str, list[str]], interval: float = 1.0) -> dict[str, Any]:
    """A Prometheus config scraping ``targets`` (job name -> ``host:port`` addresses) every ``interval`` s."""
    every = f"{round(interval * 1000)}ms"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": a}]} for job, a in targets.items()],
    }


class PrometheusServer:
    """One Prometheus with ``config`` (a ``prometheus.yml`` as a dict, e.g. :func:`scrape_config`)."""

    def __init__(self, data_dir: Path, config: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = data_dir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            "prometheus",
            [
                prometheus_binary(),
                f"--config.file={self.config_file}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={data_dir / 'tsdb'}",
            ],
            data_dir / "prometheus.log",
        )

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start it and wait until its API answers ``/-/ready``."""
        self.process.start()
        self.process.wait_ready(self._ready, timeout=timeout)
        return self

    def _ready(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a successful answer (raises otherwise)."""
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=promql)
        return list(data["result"])

    def values(self, promql: str) -> list[float]:
        """The sample values of an instant query."""
        return [float(r["value"][1]) for r in self.query(promql)]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health."""
        return list(self.api("targets")["activeTargets"])

    def series_names(self) -> set[str]:
        """Every metric name Prometheus has scraped."""
        return set(self.api("label/__name__/values"))

    def stop(self) -> None:
        """SIGTERM, by PID."""
        self.process.stop(grace=10)
