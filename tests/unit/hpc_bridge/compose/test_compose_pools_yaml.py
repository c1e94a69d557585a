"""The pools file: expansion, fabric defaults, and errors that name the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from compose_testkit import pools_doc, write_pools

from reflexarc.hpc_bridge.compose import Composer, load_pools


def test_count_expands_and_fabric_defaults_to_rack(tmp_path: Path) -> None:
    cfg = load_pools(write_pools(tmp_path / "pools.yaml"))
    devices = {d["id"]: d for d in cfg.devices()}
    assert {"r2-a100-1", "r2-a100-2"} <= set(devices)
    assert devices["r1-n1"]["fabric"] == "r1"
    assert devices["r4-v100-1"]["fabric"] == "f34"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["racks"]["r1"]["devices"][1].pop("model"),
            r"\d+:\d+: racks\.r1\.devices\[1\]: a gpu device needs 'model'",
        ),
        (
            lambda d: d["racks"]["r1"]["devices"][0].update(cores="many"),
            r"\d+:\d+: racks\.r1\.devices\[0\]\.cores: Input should be a valid integer",
        ),
        (
            lambda d: d["racks"]["r2"]["devices"][0].update(kind="tpu"),
            r"\d+:\d+: racks\.r2\.devices\[0\]\.kind: Input should be",
        ),
        (
            lambda d: d["racks"]["r3"]["devices"].append({"id": "r1-n1", "kind": "nic"}),
            r"1:1: device id 'r1-n1' appears in rack 'r1' and 'r3'",
        ),
        (
            lambda d: d["tokens"][0].update(sha256="abc"),
            r"\d+:\d+: tokens\[0\]\.sha256: must be the sha256 hex digest",
        ),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, mutate: Callable[[dict], object], expected: str) -> None:
    doc = pools_doc()
    mutate(doc)
    path = write_pools(tmp_path / "bad-pools.yaml", doc)
    with pytest.raises(ValueError, match=r"bad-pools\.yaml:" + expected):
        load_pools(path)


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("racks: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml:\d+:\d+: not valid YAML"):
        load_pools(path)


def test_removed_device_stays_for_history_but_is_not_placed(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with Composer(db, write_pools(tmp_path / "p.yaml")) as c:
        assert c.pools().total("cpu") == 3
    doc = pools_doc()
    doc["racks"]["r3"]["devices"] = []
    with Composer(db, write_pools(tmp_path / "p.yaml", doc)) as c:
        assert c.pools().free("cpu") == 2
