"""``reflexarc data ls|gc``: what is stored by reference, and removing what retention or orphaning frees.

``ls URL`` lists the objects under a store root (a claim-check or results
URL) with size and age; ``--kafka`` marks those no event references.
``gc URL`` removes objects older than ``--retention`` and unreferenced ones
older than ``--grace``; ``--dry-run`` only prints the plan. References are
read from the pipeline's data and results topics (see :mod:`reflexarc.datagc`).
Store credentials and endpoint come from the environment (``RX_S3_ENDPOINT_URL``,
``AWS_*``), never from the command line.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from reflexarc.datagc import StoredObject, list_objects, parse_duration, plan_gc, referenced_urls, remove
from reflexarc.deadletterscli import BootstrapOpt, ConfigOpt  # the same Kafka client options

app = typer.Typer(help="Objects stored by reference: list them, collect garbage.", no_args_is_help=True)


def _referenced(root: str, config: Path | None, bootstrap: str | None, timeout: float) -> set[str]:
    from reflexarc.clientconfig import load_client_config
    from reflexarc.kafka import event_of, read_to_end

    cfg = load_client_config(config, bootstrap, None)
    topics = cfg.topics()

    async def read() -> set[str]:
        found: set[str] = set()
        for topic in (topics.kafka_data, topics.kafka_results):
            records = await read_to_end(cfg.kafka, topic, timeout)
            found |= referenced_urls((event_of(r).data for r in records), root)
        return found

    return asyncio.run(read())


def _age(obj: StoredObject, now: datetime) -> str:
    secs = int((now - obj.modified).total_seconds())
    return f"{secs // 86400}d" if secs >= 86400 else f"{secs // 3600}h" if secs >= 3600 else f"{secs}s"


@app.command("ls")
def ls(
    url: Annotated[str, typer.Argument(help="store root, e.g. s3://bucket/claims or file:///shared/claims")],
    kafka: Annotated[bool, typer.Option("--kafka", help="mark objects no event references (reads the topics)")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to read each topic to its end")] = 30.0,
) -> None:
    """List stored objects: size, age, and (with --kafka) whether any event references them."""
    objects = list_objects(url)
    refs = _referenced(url, config, bootstrap, timeout) if kafka else None
    now = datetime.now(UTC)
    for obj in objects:
        mark = "" if refs is None else ("  referenced" if obj.url in refs else "  orphan")
        typer.echo(f"{obj.size:>12}  {_age(obj, now):>5}  {obj.url}{mark}")
    typer.echo(f"# {len(objects)} objects, {sum(o.size for o in objects)} bytes")


@app.command("gc")
def gc(
    url: Annotated[str, typer.Argument(help="store root, e.g. s3://bucket/claims")],
    retention: Annotated[str, typer.Option(help="remove anything older than this (e.g. 7d)")] = "7d",
    grace: Annotated[
        str, typer.Option(help="remove unreferenced objects older than this (uploads in flight are younger)")
    ] = "10m",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be removed, remove nothing")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to read each topic to its end")] = 30.0,
) -> None:
    """Remove expired objects and orphans (objects no event references)."""
    try:
        keep_for, orphan_after = parse_duration(retention), parse_duration(grace)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    objects = list_objects(url)
    plan = plan_gc(objects, _referenced(url, config, bootstrap, timeout), keep_for, orphan_after)
    for r in plan:
        typer.echo(f"{'would remove' if dry_run else 'remove'} {r.obj.url} ({r.reason}, {r.obj.size} bytes)")
    if not dry_run:
        remove(plan)
    typer.echo(
        f"# {len(plan)} of {len(objects)} objects {'to remove' if dry_run else 'removed'}, "
        f"{sum(r.obj.size for r in plan)} bytes"
    )
