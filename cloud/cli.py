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
def run(
    file: Path = typer.Argument(..., metavar="FILE", help="triggers.yaml", exists=False),
    log_level: str | None = typer.Option(
        None, "--log-level", help="DEBUG, INFO, WARNING (default RX_LOG_LEVEL or INFO)"
    ),
) -> None:
    """Run the trigger engine on Kafka until SIGTERM/Ctrl-C; the file is reloaded when it changes."""
    from reflexarc.cloud.worker import SigningKeyMissing, run_file
    from reflexarc.config import ConfigError
    from reflexarc.log import setup_logging

    setup_logging(log_level, name="cloud")
    try:
        run_file(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except SigningKeyMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@triggers_app.command("validate")
def validate(
    file: Path = typer.Argument(..., metavar="FILE", help="triggers.yaml"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (ok, problems, triggers)"),
) -> None:
    """Check a triggers file: schema, CEL, aggregates, apps on the listed sites, streams, signing key.

    Lists every problem in one run. Exit 0: OK; 1: problems found; 2: the file cannot be read.
    """
    from reflexarc.checkcli import finish, require_file
    from reflexarc.cloud.validate import validate_file

    require_file(file)
    cfg, problems = validate_file(file)
    names = [t.name for t in cfg.triggers] if cfg is not None else []
    finish(file, problems, f"{file}: OK, {len(names)} trigger(s): {', '.join(names)}", as_json, triggers=names)


@triggers_app.command("test")
def test(
    file: Path = typer.Argument(..., metavar="FILE", help="triggers.yaml"),
    events: Path = typer.Option(..., "--events", "-e", metavar="FILE", help="recorded events, one JSON object a line"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per firing"),
    strict: bool = typer.Option(
        True, "--strict/--no-strict", help="exit 1 when the dry run reports problems (--no-strict: exit 0 anyway)"
    ),
) -> None:
    """Dry run: which triggers fire on recorded events, with which task arguments. No broker needed.

    Exit 0: no problems; 1: the file is invalid or the run reported problems (unless --no-strict);
    2: a file cannot be read.
    """
    from reflexarc.checkcli import require_file
    from reflexarc.cloud.dryrun import DryRunError, dry_run
    from reflexarc.cloud.validate import load_triggers
    from reflexarc.config import ConfigError

    require_file(file)
    require_file(events)
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
    if strict and report.problems:
        raise typer.Exit(1)


@triggers_app.command("schema")
def schema(
    output: Path | None = typer.Option(None, "--output", "-o", metavar="FILE", help="write here instead of stdout"),
) -> None:
    """Print the JSON Schema of triggers.yaml (for editors: yaml-language-server)."""
    from reflexarc.schemas import schema_text

    text = schema_text("triggers")  # the same as `reflexarc schema triggers`
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)
