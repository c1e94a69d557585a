"""pipeline.yaml: what `reflexarc up` runs, checked before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reflexarc.config import ConfigError
from reflexarc.demo import prepare_scenario, scenario_dir
from reflexarc.process import notify_ready
from reflexarc.supervisor import load_pipeline


def test_bundled_scenario_is_valid_and_sized_by_duration(tmp_path: Path) -> None:
    pipeline, events = prepare_scenario(tmp_path / "s", duration=7)
    cfg = load_pipeline(pipeline)
    assert [p.tier for p in cfg.processes] == ["site", "cloud", "fog", "edge"]
    assert [p.name for p in cfg.processes] == ["site-1", "cloud-1", "fog-1", "edge-1"]
    assert events == 140  # 20 Hz x 7 s
    assert (scenario_dir() / "pipeline.yaml").exists()


def test_missing_tier_config_is_named(tmp_path: Path) -> None:
    f = tmp_path / "pipeline.yaml"
    f.write_text("processes:\n  - {tier: fog, config: nope.yaml}\n")
    with pytest.raises(ConfigError, match=r"processes\[0\]\.config: file not found"):
        load_pipeline(f)


def test_unknown_tier_and_duplicate_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("{}\n")
    f = tmp_path / "pipeline.yaml"
    f.write_text("processes:\n  - {tier: gateway, config: a.yaml}\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:2:\d+: processes\[0\]\.tier"):
        load_pipeline(f)
    f.write_text("processes:\n  - {tier: fog, config: a.yaml, name: x}\n  - {tier: edge, config: a.yaml, name: x}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_pipeline(f)


def test_notify_ready_writes_the_file_only_under_a_supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It also freezes the heap: not this test process's.
    monkeypatch.setattr("reflexarc.process.freeze_startup_heap", lambda: None)
    monkeypatch.delenv("RX_READY_FILE", raising=False)
    notify_ready("x")  # no supervisor: nothing happens
    ready = tmp_path / "ready" / "fog-1"
    monkeypatch.setenv("RX_READY_FILE", str(ready))
    notify_ready("subscribed")
    assert ready.read_text().split()[1] == "subscribed"


def test_notify_ready_freezes_the_start_up_heap_and_later_garbage_is_still_collected() -> None:
    code = """
import gc, weakref
from reflexarc.process import notify_ready
assert gc.get_freeze_count() == 0
class Node: pass
def cycle():
    a = Node(); a.self = a
    return weakref.ref(a)
early = cycle()  # start-up garbage: collected before the freeze
notify_ready()
frozen = gc.get_freeze_count()
late = cycle()   # made after the freeze: the collector still sees it
gc.collect()
print(frozen, early() is None, late() is None, gc.get_threshold()[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    frozen, early_gone, late_gone, middle = out.stdout.split()
    assert int(frozen) > 10_000  # the imports and everything else alive at start-up
    assert (early_gone, late_gone) == ("True", "True")
    assert middle == "100"
