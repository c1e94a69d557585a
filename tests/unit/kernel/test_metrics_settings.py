"""``metrics: {host, port}`` in every tier's config, the old ``metrics_port`` still working, and the histograms."""

from __future__ import annotations

import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reflexarc import __version__
from reflexarc.cloud.model import TriggersFile
from reflexarc.config import ConfigError, load_yaml
from reflexarc.edge.config import AgentConfig
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.envelope import utcnow
from reflexarc.events import Cause, Command
from reflexarc.fog.config import FogConfig
from reflexarc.hpc_bridge import metrics as site_metrics
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.metrics import register_build_info, serve_metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.mark.parametrize(
    ("model", "base"),
    [
        (AgentConfig, {"site": "bl1", "device": "det1"}),
        (SiteConfig, {"site": "local"}),
        (FogConfig, {}),
    ],
)
def test_every_tier_takes_metrics_host_and_port_and_the_old_port(model: type, base: dict[str, object]) -> None:
    new = model.model_validate({**base, "metrics": {"host": "0.0.0.0", "port": 9400}})
    assert (new.metrics.host, new.metrics.port, new.metrics_port) == ("0.0.0.0", 9400, 9400)
    old = model.model_validate({**base, "metrics_port": 9401})
    assert (old.metrics.host, old.metrics.port) == ("127.0.0.1", 9401)
    default = model.model_validate(base)
    assert (default.metrics.host, default.metrics.port) == ("127.0.0.1", None)
    with pytest.raises(ValueError, match="disagree"):
        model.model_validate({**base, "metrics_port": 1, "metrics": {"port": 2}})
    with pytest.raises(ValueError):
        model.model_validate({**base, "metrics": {"hots": "0.0.0.0"}})


def test_triggers_file_takes_metrics_under_pipeline() -> None:
    tf = TriggersFile.model_validate({"pipeline": {"metrics": {"host": "0.0.0.0", "port": 0}}, "triggers": []})
    assert (tf.pipeline.metrics.host, tf.pipeline.metrics.port) == ("0.0.0.0", 0)


def test_a_typo_in_metrics_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("site: a\ndevice: b\nmetrics: {prot: 1}\n")
    with pytest.raises(ConfigError, match="metrics"):
        load_yaml(f, AgentConfig)


def test_serve_metrics_binds_the_host_and_shows_build_info() -> None:
    port = serve_metrics(0, "127.0.0.1")
    assert port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    s = samples(text)
    key = [k for k in s if k[0] == "reflexarc_build_info"]
    assert len(key) == 1 and ("version", __version__) in key[0][1] and s[key[0]] == 1.0
    assert serve_metrics(None) is None


def test_build_info_registered_once_per_registry() -> None:
    r = CollectorRegistry()
    register_build_info(r)
    register_build_info(r)  # a second tier in the same process must not raise "Duplicated timeseries"
    assert b"reflexarc_build_info{" in generate_latest(r)


def test_edge_loop_latency_and_spool_age() -> None:
    m = EdgeMetrics()
    cause = Cause(event_ids=["e1"], time=utcnow() - timedelta(seconds=0.3))
    m.observe_loop(Command(command_id="c1", site="bl1", device="det1", actuator="motor", cause=cause))
    m.observe_loop(Command(command_id="c2", site="bl1", device="det1", actuator="motor"))  # no cause: not a loop
    m.observe_spool_age(time.time() - 2.0)
    m.observe_spool_age(None)
    s = samples(generate_latest(m.registry).decode())
    assert s[("rx_edge_loop_latency_seconds_count", (("actuator", "motor"),))] == 1
    latency = s[("rx_edge_loop_latency_seconds_sum", (("actuator", "motor"),))]
    assert 0.3 <= latency < 5
    assert s[("rx_edge_loop_latency_seconds_bucket", (("actuator", "motor"), ("le", "0.25")))] == 0
    assert s[("rx_edge_loop_latency_seconds_bucket", (("actuator", "motor"), ("le", "0.5")))] == 1
    assert s[("rx_edge_spool_age_seconds_count", ())] == 1
    assert 2.0 <= s[("rx_edge_spool_age_seconds_sum", ())] < 10
    assert (
        "reflexarc_build_info",
        (("python", __import__("platform").python_version()), ("version", __version__)),
    ) in s


def test_site_task_durations() -> None:
    t0 = utcnow()
    site_metrics.observe_task("unit-site", "fit", t0, t0 + timedelta(seconds=2), t0 + timedelta(seconds=7))
    site_metrics.observe_task("unit-site", "fit", t0, None, None)  # never started: neither observed
    assert site_metrics.TASK_QUEUE.labels("unit-site", "fit")._sum.get() == pytest.approx(2.0)
    assert site_metrics.TASK_RUN.labels("unit-site", "fit")._sum.get() == pytest.approx(5.0)
