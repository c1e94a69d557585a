"""deploy/grafana/reflexarc.json is a Grafana dashboard: its shape, its layout, and PromQL that parses.

The shape is checked against a pydantic model of the dashboard JSON model (the fields Grafana
reads from a provisioned dashboard); the queries through ``promtool check rules`` (Debian's
prometheus package), which parses every expression with Prometheus' own parser. Whether each
metric exists is checked against a real scrape in tests/integration/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "reflexarc.json"


class _M(BaseModel):
    model_config = ConfigDict(extra="allow")


class GridPos(_M):
    h: int = Field(ge=1)
    w: int = Field(ge=1, le=24)
    x: int = Field(ge=0, le=23)
    y: int = Field(ge=0)


class DataSourceRef(_M):
    type: Literal["prometheus"]
    uid: str


class Target(_M):
    expr: str = Field(min_length=1)
    refId: str = Field(pattern=r"^[A-Z]$")
    legendFormat: str
    datasource: DataSourceRef


class Panel(_M):
    id: int
    type: Literal["row", "timeseries", "stat", "heatmap", "table", "bargauge", "gauge"]
    title: str = Field(min_length=1)
    gridPos: GridPos
    datasource: DataSourceRef | None = None
    targets: list[Target] = Field(default_factory=list)
    collapsed: bool | None = None
    panels: list[Any] | None = None


class Variable(_M):
    name: str
    type: Literal["datasource", "query", "custom", "interval", "constant"]


class Templating(_M):
    list: list[Variable]


class Dashboard(_M):
    uid: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    title: str
    schemaVersion: int = Field(ge=30)
    version: int
    time: dict[str, str]
    refresh: str
    templating: Templating
    panels: list[Panel] = Field(min_length=1)


def load() -> Dashboard:
    return Dashboard.model_validate(json.loads(DASHBOARD.read_text()))


def test_the_dashboard_has_grafana_shape() -> None:
    d = load()
    ids = [p.id for p in d.panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v.name for v in d.templating.list}
    assert {"datasource", "job"} <= variables
    for p in d.panels:
        assert p.gridPos.x + p.gridPos.w <= 24, p.title
        if p.type == "row":
            assert not p.targets
            continue
        assert p.datasource is not None and p.datasource.uid == "${datasource}", p.title
        assert p.targets, p.title
        assert len({t.refId for t in p.targets}) == len(p.targets), p.title
        for t in p.targets:
            assert t.datasource.uid == "${datasource}"
            used = set(re.findall(r"\$(\w+)", t.expr))
            assert used <= variables, (p.title, used - variables)


def test_one_row_per_tier_and_no_overlap() -> None:
    d = load()
    rows = [p.title for p in d.panels if p.type == "row"]
    assert rows == ["Pipeline", "Edge agents", "Fog bridges", "Trigger engine", "HPC sites"]
    cells: set[tuple[int, int]] = set()
    for p in d.panels:
        g = p.gridPos
        mine = {(x, y) for x in range(g.x, g.x + g.w) for y in range(g.y, g.y + g.h)}
        assert not mine & cells, f"{p.title} overlaps another panel"
        cells |= mine
    # Each tier's row shows a rate, a latency histogram's quantiles and its dead letters.
    by_row: dict[str, list[str]] = {}
    current = ""
    for p in d.panels:
        if p.type == "row":
            current = p.title
        else:
            by_row.setdefault(current, []).extend(t.expr for t in p.targets)
    for row in rows[1:]:
        exprs = " ".join(by_row[row])
        assert "rate(" in exprs, row
        assert "histogram_quantile" in exprs, row
        assert "dead" in exprs, row


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (scripts/system-deps.sh)"
    d = load()
    rules = [
        {"record": f"reflexarc:panel{p.id}:{t.refId.lower()}", "expr": t.expr.replace("$job", ".*")}
        for p in d.panels
        for t in p.targets
    ]
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout, out.stdout
