"""The ``compose:`` section of site.yaml, the notebook API and reprs, and how workers name the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from reflexarc.config import ConfigError
from reflexarc.hpc_bridge.compose import Composer, Identity, MachineList
from reflexarc.hpc_bridge.engines import outcome_from_worker
from reflexarc.hpc_bridge.site_config import load_site
from reflexarc.hpc_bridge.worker import RunSpec, execute_json


def test_compose_section_defaults_and_paths(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("site: hpc\ncompose:\n  pools: pools.yaml\n")
    cfg = load_site(p)
    assert cfg.compose is not None
    c = cfg.compose
    assert (c.driver, c.token_env, c.idle_timeout_s, c.max_machines, c.free_on_stop) == (
        "inventory",
        "RX_COMPOSE_TOKEN",
        300.0,
        4,
        True,
    )
    assert cfg.compose_pools_path == tmp_path / "pools.yaml"  # relative to site.yaml
    assert cfg.compose_database == str(tmp_path / ".rx" / "site-hpc" / "compose.db")
    p.write_text("site: hpc\ncompose: {pools: /x/pools.yaml, database: 'postgresql+psycopg://db/rx'}\n")
    assert load_site(p).compose_database == "postgresql+psycopg://db/rx"
    p.write_text("site: hpc\n")
    assert load_site(p).compose is None and load_site(p).compose_database is None


def test_compose_section_errors_name_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text(
        "site: hpc\n"
        "compose:\n"
        "  pools: pools.yaml\n"
        "  driver: redfish\n"
        "  token_env: 'my token'\n"
        "  idle_timeout_s: 0\n"
        "  token: abc\n"
    )
    with pytest.raises(ConfigError) as err:
        load_site(p)
    text = str(err.value)
    assert f"{p}:4:" in text and "compose.driver" in text and "'inventory' or 'slurm'" in text
    assert f"{p}:5:" in text and "not an environment variable name" in text
    assert f"{p}:6:" in text and "compose.idle_timeout_s" in text
    assert f"{p}:7:" in text and "compose.token: unknown field" in text
    p.write_text("site: hpc\ncompose: {driver: slurm}\n")
    with pytest.raises(ConfigError, match=r"compose\.pools: Field required"):
        load_site(p)


def test_notebook_module_and_rich_reprs(tmp_path: Path) -> None:
    import reflexarc.hpc_bridge as hb
    from reflexarc.hpc_bridge import compose as rc

    assert hb.compose is rc and rc.compose.__module__ == "reflexarc.hpc_bridge.compose.api"
    pools = tmp_path / "pools.yaml"
    pools.write_text(
        yaml.safe_dump(
            {
                "racks": {
                    "r1": {
                        "devices": [
                            {"id": "n1", "kind": "cpu", "cores": 8},
                            {"id": "g", "kind": "gpu", "model": "A100", "count": 2},
                        ]
                    }
                }
            }
        )
    )
    rc.configure(db=tmp_path / "c.db", pools=pools)
    try:
        m = rc.compose(gpus=2, name="nb-box", identity=Identity(user="me"))
        listed = rc.list_machines()
        assert isinstance(listed, MachineList) and [x.id for x in listed] == [m.id]

        class Printer:  # what IPython hands to _repr_pretty_
            def __init__(self) -> None:
                self.out = ""

            def text(self, s: str) -> None:
                self.out += s

        for obj, expected in (
            (m, ["nb-box", "g-1", "gpu A100"]),
            (rc.pools(), ["free", "0/8 cores"]),
            (listed, [m.id, "n1, g-1, g-2"]),
        ):
            html = obj._repr_html_()
            assert html.startswith("<pre") and all(e in html for e in expected)
            printer = Printer()
            obj._repr_pretty_(printer, False)
            assert all(e in printer.out for e in expected) and "\x1b[" not in printer.out
        rc.free("nb-box", identity=Identity(user="me"))
        assert rc.pools().used() == 0
    finally:
        rc.default_composer().close()


def test_worker_names_the_composed_machine_and_isolates_for_dask(tmp_path: Path) -> None:
    spec = RunSpec(
        task_id="t",
        attempt=1,
        kind="python",
        workdir=str(tmp_path / "w"),
        result_path=str(tmp_path / "w" / "outcome.json"),
        function="reflexarc.hpc_bridge.examples.apps:devices",
        environment={"RX_MACHINE": "m-123", "CUDA_VISIBLE_DEVICES": "0,1"},
        isolate=True,
    )
    # In a shared (Dask) process the variables only apply in a child process: isolate runs one.
    data = execute_json(spec.to_json())
    assert data["ok"], data
    assert data["result"]["machine"] == "m-123" and data["result"]["cuda_visible_devices"] == ["0", "1"]
    assert data["result"]["pid"] != os.getpid() and os.environ.get("RX_MACHINE") is None
    assert outcome_from_worker(data).machine == "m-123"
    assert json.loads(Path(spec.result_path).read_text())["machine"] == "m-123"
    # Without a composed machine the outcome names the host, as before.
    plain = outcome_from_worker({"ok": True, "result": {}, "host": "node7"})
    assert plain.machine == "node7"


def test_composer_database_is_shared_with_the_cli(tmp_path: Path) -> None:
    """What the agent composes is visible to `reflexarc compose list --db` (same database)."""
    from typer.testing import CliRunner

    from reflexarc.hpc_bridge.compose.cli import app

    pools = tmp_path / "pools.yaml"
    pools.write_text(yaml.safe_dump({"racks": {"r1": {"devices": [{"id": "n1", "kind": "cpu", "cores": 4}]}}}))
    with Composer(tmp_path / "c.db", pools) as c:
        m = c.compose({"cpus": 2}, Identity(user="site-agent"), name="rx-hpc-abc123-0001")
    out = CliRunner().invoke(app, ["list", "--db", str(tmp_path / "c.db")], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert m.id in out.output and "site-agent" in out.output


def test_site_run_without_the_compose_token_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from reflexarc.hpc_bridge.cli import site_app

    monkeypatch.delenv("RX_SITE_TOKEN", raising=False)
    (tmp_path / "pools.yaml").write_text(
        yaml.safe_dump({"racks": {}, "tokens": [{"user": "agent", "sha256": "0" * 64}]})
    )
    site = tmp_path / "site.yaml"
    # No broker at this address: the token check must come first and end the run.
    site.write_text(
        "site: hpc\nkafka: {bootstrap_servers: '127.0.0.1:1'}\ncompose: {pools: pools.yaml, token_env: RX_SITE_TOKEN}\n"
    )
    out = CliRunner().invoke(site_app, ["run", str(site)])
    assert out.exit_code == 2
    assert "set RX_SITE_TOKEN to your compose token" in out.output and "'tokens'" in out.output
    monkeypatch.setenv("RX_SITE_TOKEN", "wrong")
    out = CliRunner().invoke(site_app, ["run", str(site)])
    assert out.exit_code == 2 and "token not recognised" in out.output
