"""The ``reflexarc status`` verb (registered in :mod:`reflexarc.cli`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def status(
    pipeline: Annotated[
        Path | None,
        typer.Argument(
            help="pipeline.yaml (its brokers: section); default: the RX_* environment variables",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="a live view, refreshed until Ctrl-C")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document, for scripts")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch", min=0.5)] = 2.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each broker", min=0.5)] = 10.0,
) -> None:
    """Show a running pipeline: brokers, consumer lag, devices, sites' backlog, commands, dead letters, loop latency.

    Reads only what the pipeline publishes (Kafka groups and topics, retained MQTT statuses); joins no
    group. For a pipeline `reflexarc up` runs on embedded brokers, export the RX_* lines it prints.
    Exit code: 0 when both brokers answered, 1 otherwise.
    """
    from rich.console import Console

    from reflexarc.status import collect, healthy, sources_of
    from reflexarc.statusview import render
    from reflexarc.statusview import watch as watch_view

    src = sources_of(pipeline)
    if watch:
        asyncio.run(watch_view(src, interval, Console(), timeout=timeout))
        return
    report = asyncio.run(collect(src, timeout=timeout))
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        Console().print(render(report))
    raise typer.Exit(0 if healthy(report) else 1)
