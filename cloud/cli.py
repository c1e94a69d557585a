"""CLI of the cloud tier: ``reflexarc cloud run`` and ``reflexarc triggers validate|test|schema``.

Imports stay light here (Kafka clients and the CEL engine load inside the commands),
because the main CLI imports this module at start-up.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Trigger engine: YAML triggers -> task requests and commands.", no_args_is_help=True)
triggers_app = typer.Typer(help="Validate, dry-run and describe trigger files.", no_args_is_help=True)


@app.callback()
def _cloud() -> None:
    """Trigger engine: YAML triggers -> task requests and commands."""


@triggers_app.callback()
def _triggers() -> None:
    """Validate, dry-run and describe trigger files."""


@app.command("run")
def run(file: Path = typer.Argument(..., help="triggers.yaml", exists=False)) -> None:
    """Run the trigger engine on Kafka until SIGTERM/Ctrl-C; the file is reloaded when it changes."""
    from reflexarc.cloud.worker import SigningKeyMissing, run_file
    from reflexarc.config import ConfigError
    from reflexarc.log import setup_logging

    setup_logging(name="cloud")
    try:
        run_file(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except SigningKeyMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@triggers_app.command("validate")
def validate(file: Path = typer.Argument(..., help="triggers.yaml")) -> None:
    """Check a triggers file: schema, CEL, apps on the listed sites, streams, windows."""
    from reflexarc.cloud.validate import load_triggers
    from reflexarc.config import ConfigError

    try:
        cfg = load_triggers(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        n = len(exc.problems)
        typer.echo(f"{file}: {n} problem{'s' if n != 1 else ''}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: OK, {len(cfg.triggers)} trigger(s): {', '.join(t.name for t in cfg.triggers)}")


@triggers_app.command("test")
def test(
    file: Path = typer.Argument(..., help="triggers.yaml"),
    events: Path = typer.Option(..., "--events", "-e", help="recorded events, one JSON object a line"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per firing"),
) -> None:
    """Dry run: which triggers fire on recorded events, with which task arguments. No broker needed."""
    from reflexarc.cloud.dryrun import DryRunError, dry_run
    from reflexarc.cloud.validate import load_triggers
    from reflexarc.config import ConfigError

    try:
        cfg = load_triggers(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    try:
        report = dry_run(cfg, events)
    except DryRunError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in report.lines(as_json):
        typer.echo(line)
    for line in report.problems:
        typer.echo(line, err=True)
    typer.echo(report.summary(), err=True)


@triggers_app.command("schema")
def schema(output: Path | None = typer.Option(None, "--output", "-o", help="write here instead of stdout")) -> None:
    """Print the JSON Schema of triggers.yaml (for editors: yaml-language-server)."""
    from reflexarc.cloud.schema import schema_json

    text = schema_json()
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)
