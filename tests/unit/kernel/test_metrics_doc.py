"""docs/metrics.md lists every metric the tiers register, under the name Prometheus scrapes."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry

# Every module that defines metrics (grep the tree for Counter/Gauge/Histogram when adding one):
# imported here, so the check does not depend on what else the test session imported.
import reflexarc.cloud.metrics
import reflexarc.fog.metrics
import reflexarc.hpc_bridge.allocations
import reflexarc.hpc_bridge.metrics  # noqa: F401
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.sources.epics import EpicsMetrics


def edge_registry() -> CollectorRegistry:
    """An agent's registry with the epics sources' metrics, as an agent with an epics source has."""
    m = EdgeMetrics()
    EpicsMetrics(m.registry)
    return m.registry


DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Metric names as scraped: counters with ``_total``, info with ``_info``."""
    names = set()
    for fam in registry.collect():
        if not fam.name.startswith(("rx_", "reflexarc_")):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(fam.type, "")
        names.add(fam.name + suffix)
    return names


def test_every_metric_is_in_the_doc() -> None:
    names = exposed_names(REGISTRY) | exposed_names(edge_registry())
    assert len(names) > 50
    text = DOC.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in text and f"`{n}{{" not in text)
    assert not missing, f"add to docs/metrics.md: {missing}"


def test_names_follow_prometheus_conventions() -> None:
    for fam in [*REGISTRY.collect(), *edge_registry().collect()]:
        if not fam.name.startswith("rx_"):
            continue
        if fam.type == "histogram" and fam.name != "rx_site_db_batch_operations":
            assert fam.name.endswith("_seconds"), fam.name  # durations in the base unit
        assert not fam.name.endswith(("_ms", "_milliseconds", "_kb", "_mb")), fam.name
