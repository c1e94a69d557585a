"""A real Prometheus scrapes every tier of a pipeline started by ``reflexarc up`` (issue 17).

The demo scenario runs under ``reflexarc up`` with ``metrics: {host, port}`` set in each
tier's file; Debian's ``prometheus`` scrapes the four endpoints every second, configured by
``deploy/prometheus.yml`` with the test's ports. PromQL through its HTTP API must show a
non-zero fog event rate and a loop-latency quantile at the actuator, and every metric the
Grafana dashboard (``deploy/grafana/reflexarc.json``) queries must exist in the scrape.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.demo import prepare_scenario
from reflexarc.kafka import make_producer
from reflexarc.mqtt import MqttClient
from reflexarc.process import free_port
from reflexarc.testing.poll import poll_until
from reflexarc.testing.prometheus import PrometheusServer
from reflexarc.topics import Topics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "reflexarc.json"
EXAMPLE = REPO / "deploy" / "prometheus.yml"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: tier -> (its file in the scenario, where ``metrics`` goes in it: None = top level)
TIER_FILES = {
    "edge": ("agent.yaml", None),
    "fog": ("fog.yaml", None),
    "site": ("site.yaml", None),
    "cloud": ("triggers.yaml", "pipeline"),
}

#: The histograms issue 17 asks for, one per tier at least.
HISTOGRAMS = [
    "rx_edge_loop_latency_seconds_bucket",
    "rx_edge_spool_age_seconds_bucket",
    "rx_fog_kafka_latency_seconds_bucket",
    "rx_triggers_evaluation_seconds_bucket",
    "rx_site_task_queue_seconds_bucket",
    "rx_site_task_run_seconds_bucket",
]


def give_metrics_ports(scenario: Path) -> dict[str, str]:
    """Set ``metrics: {host, port}`` in every tier file; job name -> scrape address."""
    targets = {}
    for tier, (name, section) in TIER_FILES.items():
        port = free_port()
        f = scenario / name
        doc = yaml.safe_load(f.read_text()) or {}
        (doc.setdefault(section, {}) if section else doc)["metrics"] = {"host": "127.0.0.1", "port": port}
        f.write_text(yaml.safe_dump(doc, sort_keys=False))
        targets[tier] = f"127.0.0.1:{port}"
    return targets


class Pipeline:
    """A pipeline under ``reflexarc up``: its tiers' scrape addresses and its brokers (as `up` printed them)."""

    def __init__(self, targets: dict[str, str], env: dict[str, str]) -> None:
        self.targets = targets
        self.env = env

    def mqtt(self) -> MqttSettings:
        return MqttSettings(host=self.env["RX_MQTT_HOST"], port=int(self.env["RX_MQTT_PORT"]), protocol="5")

    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.env["RX_KAFKA_BOOTSTRAP"])


@pytest.fixture
def running_pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    """``reflexarc up`` of the demo scenario with a metrics endpoint per tier."""
    pipeline, _ = prepare_scenario(tmp_path / "scenario", duration=600)
    targets = give_metrics_ports(tmp_path / "scenario")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflexarc", "up", str(pipeline), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        # `up` prints "running" once brokers are up and every tier reported ready.
        while not lines or "running" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, "reflexarc up exited:\n" + "".join(lines)
            lines.append(line)
        env: dict[str, str] = {}
        while len(env) < 3:  # then the brokers' addresses, one RX_* line each
            line = proc.stdout.readline().strip()
            assert line.startswith("RX_"), line
            key, value = line.split("=", 1)
            env[key] = value
        yield Pipeline(targets, env)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def prometheus(tmp_path: Path, running_pipeline: Pipeline) -> Iterator[PrometheusServer]:
    """Debian's Prometheus on a free loopback port: the shipped example config, every second, the test's ports."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    assert sorted(j["job_name"] for j in config["scrape_configs"]) == sorted(running_pipeline.targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [running_pipeline.targets[job["job_name"]]]}]
    server = PrometheusServer(tmp_path / "prometheus", config).start()
    try:
        yield server
    finally:
        server.stop()


def finite_positive(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs.append(doc["templating"]["list"][1]["definition"])
    names = {n for e in exprs for n in re.findall(r"\b(?:rx|reflexarc)_[a-z0-9_]+", e)}
    return names | ({"up"} if any(re.search(r"\bup\{", e) for e in exprs) else set())


async def publish_garbage(pipeline: Pipeline) -> None:
    """Bad input at each tier's door, so the dead-letter series every dashboard row shows exist."""
    t = Topics()
    client = MqttClient(pipeline.mqtt(), "garbage")
    await client.connect()
    await client.publish(t.mqtt_data("bl1", "det1", "counts"), b"\xff not an event", qos=1)  # -> fog
    await client.disconnect()
    producer = make_producer(pipeline.kafka())
    await producer.start()
    try:
        await producer.send_and_wait(t.kafka_data, b"not an event")  # -> trigger engine
        await producer.send_and_wait(t.kafka_tasks("local"), b"not a task request")  # -> site
    finally:
        await producer.stop()


def test_prometheus_scrapes_every_tier_of_a_running_pipeline(
    prometheus: PrometheusServer, running_pipeline: Pipeline
) -> None:
    t0 = time.monotonic()
    assert poll_until(lambda: len([t for t in prometheus.targets() if t["health"] == "up"]) == 4, 30), (
        prometheus.targets()
    )
    assert sorted(r["metric"]["job"] for r in prometheus.query("reflexarc_build_info == 1")) == [
        "cloud",
        "edge",
        "fog",
        "site",
    ]

    rate = 'sum(rate(rx_fog_messages_in_total{kind="data"}[5s]))'
    assert poll_until(lambda: finite_positive(prometheus.values(rate)), 30), prometheus.query(rate)

    # The loop's latency at the actuator: a quantile of the edge's histogram over what the actuator acked.
    p90 = "histogram_quantile(0.9, sum by (le, actuator) (rate(rx_edge_loop_latency_seconds_bucket[30s])))"
    assert poll_until(lambda: finite_positive(prometheus.values(p90)), 60), prometheus.query(
        "rx_edge_loop_latency_seconds_count"
    )
    (row,) = prometheus.query(p90)
    assert row["metric"]["actuator"] == "motor"
    assert 0 < float(row["value"][1]) < 300

    # Every histogram of the issue exists in the scrape, with observations where the demo makes them.
    names = prometheus.series_names()
    assert set(HISTOGRAMS) <= names, set(HISTOGRAMS) - names
    for h in HISTOGRAMS:
        count = h.removesuffix("_bucket") + "_count"
        assert poll_until(lambda count=count: finite_positive(prometheus.values(f"sum({count})")), 30), count

    # Every metric the Grafana dashboard queries is in the scrape (dead letters once bad input came).
    asyncio.run(publish_garbage(running_pipeline))
    wanted = dashboard_metrics()
    assert len(wanted) > 20
    assert poll_until(lambda: not wanted - prometheus.series_names(), 30), sorted(wanted - prometheus.series_names())
    print(f"prometheus saw every tier, histogram and dashboard metric {time.monotonic() - t0:.1f}s after `up`")
