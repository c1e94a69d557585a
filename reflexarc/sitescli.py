"""``reflexarc sites``: every site of the federation as its agent announces it (live, stale or stopped)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def sites(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            dir_okay=False,
            help="YAML with kafka: (TLS, SASL) and namespace:, as a tier's (default: RX_KAFKA_*, RX_NAMESPACE)",
        ),
    ] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers (overrides the file)")] = None,
    namespace: Annotated[str | None, typer.Option(help="topic namespace (overrides the file)")] = None,
    missed: Annotated[int, typer.Option(min=1, help="heartbeats a site may miss before it is stale")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document, for scripts")] = False,
) -> None:
    """List every site from its heartbeats on {ns}.sites: state, age, backlog, free slots and apps."""
    from rich.console import Console
    from rich.table import Table

    from reflexarc.clientconfig import load_client_config
    from reflexarc.sites import read_sites

    cfg = load_client_config(config, bootstrap, namespace)
    views = asyncio.run(read_sites(cfg.kafka, cfg.topics(), missed=missed))
    if as_json:
        typer.echo(json.dumps({"sites": [v.to_json() for v in views]}, indent=2))
        return
    if not views:
        typer.echo(
            f"no site has announced itself on {cfg.topics().kafka_sites} yet "
            "(site agents publish a heartbeat every presence.interval_s)"
        )
        return
    table = Table("SITE", "STATE", "AGE", "ENGINE", "QUEUED", "RUNNING", "FREE/SLOTS", "APPS", box=None)
    colour = {"live": "green", "stale": "yellow", "stopped": "dim"}
    for v in views:
        s = v.status
        table.add_row(
            s.site,
            f"[{colour[v.state]}]{v.state}[/]",
            f"{v.age_s:.0f}s",
            s.engine,
            str(s.queued),
            str(s.running),
            f"{s.free_slots}/{s.slots}",
            ", ".join(s.apps) or "-",
        )
    Console().print(table)
