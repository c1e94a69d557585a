"""``reflexarc fog ...``: run and check a fog bridge. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Fog bridge: MQTT device traffic -> Kafka, Kafka commands -> devices.", no_args_is_help=True)


def _load(config: Path | None):  # type: ignore[no-untyped-def]
    from reflexarc.config import ConfigError
    from reflexarc.fog.config import FogConfig, load_config

    try:
        return load_config(config) if config is not None else FogConfig()
    except ConfigError as exc:
        typer.echo(f"invalid fog configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Path | None = typer.Argument(None, help="fog.yaml (omit for defaults from RX_* variables)"),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING (default RX_LOG_LEVEL or INFO)"),
) -> None:
    """Run a fog bridge until SIGTERM/SIGINT."""
    from reflexarc.aio import run_service
    from reflexarc.fog.bridge import FogBridge
    from reflexarc.log import setup_logging

    setup_logging(log_level, "fog")
    cfg = _load(config)

    try:
        run_service(FogBridge(cfg).run)
    except RuntimeError as exc:
        typer.echo(f"fog bridge: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def check(config: Path = typer.Argument(..., help="fog.yaml to validate")) -> None:
    """Validate fog.yaml (schemas, fields, shaping) without connecting to anything."""
    from reflexarc.fog.validation import build_validator

    cfg = _load(config)
    for s in cfg.streams:
        build_validator(s)
    share = cfg.share_group() or "off"
    typer.echo(
        f"{config}: ok — MQTT {cfg.mqtt.host}:{cfg.mqtt.port} v{cfg.mqtt.protocol} (shared group: {share}), "
        f"Kafka {cfg.kafka.bootstrap_servers}, {len(cfg.streams)} stream rule(s)"
    )
