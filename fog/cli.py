"""``reflexarc fog ...``: run and check a fog bridge. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # the CLI imports the bridge's modules only when a command runs
    from reflexarc.fog.config import FogConfig

app = typer.Typer(help="Fog bridge: MQTT device traffic -> Kafka, Kafka commands -> devices.", no_args_is_help=True)


def _load(config: Path | None) -> FogConfig:
    from reflexarc.config import ConfigError
    from reflexarc.fog.config import FogConfig, load_config

    try:
        return load_config(config) if config is not None else FogConfig()
    except ConfigError as exc:
        typer.echo(f"invalid fog configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Path | None = typer.Argument(None, metavar="FILE", help="fog.yaml (omit for defaults from RX_* variables)"),
    log_level: str | None = typer.Option(
        None, "--log-level", help="DEBUG, INFO, WARNING (default RX_LOG_LEVEL or INFO)"
    ),
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
def check(
    config: Path | None = typer.Argument(
        None,
        metavar="FILE",
        help="fog.yaml (with --broker it may be omitted: the broker then comes from RX_MQTT_* variables)",
    ),
    broker: bool = typer.Option(
        False, "--broker", help="probe the configured MQTT broker for a bounded session queue (publishes test messages)"
    ),
    messages: int = typer.Option(
        3000, "--messages", min=1, max=200_000, help="with --broker: QoS 1 messages queued for the offline probe"
    ),
    payload_bytes: int = typer.Option(200, "--payload-bytes", min=32, max=262_144, help="with --broker: message size"),
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="with --broker: seconds the probe may take"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
) -> None:
    """Validate fog.yaml (schemas, fields, shaping) without connecting; or, with --broker, probe the broker.

    Without --broker: every problem in one run; exits 0 when the file is fine, 1 when problems were
    found, 2 when it cannot be read. --broker exits 0 when the broker kept every queued message (no bound found), 1 when it dropped some
    (a bound: what to set is printed), 2 when it cannot be checked (unreachable, refused, bad usage).
    """
    if broker:
        _check_broker(config, messages, payload_bytes, timeout, as_json)
        return
    if config is None:
        raise typer.BadParameter(
            "give the fog.yaml to validate, or --broker to probe the MQTT broker", param_hint="CONFIG"
        )
    _check_file(config, as_json)


def _check_file(config: Path, as_json: bool) -> None:
    """``fog check FILE``: every problem of the file in one run; exit 0 ok, 1 problems, 2 unreadable."""
    from reflexarc.checkcli import finish, load_checked, problem_at
    from reflexarc.config import Problem
    from reflexarc.fog.config import load_config
    from reflexarc.fog.validation import build_validator

    cfg, marks = load_checked(config, load_config, as_json)
    problems: list[Problem] = []
    for i, s in enumerate(cfg.streams):
        try:
            build_validator(s)
        except Exception as exc:  # a schema or model a stream names may fail in any way
            problems.append(problem_at(config, marks, ("streams", i), f"streams[{i}]", str(exc).splitlines()[0]))
    share = cfg.share_group() or "off"
    finish(
        config,
        problems,
        f"{config}: ok — MQTT {cfg.mqtt.host}:{cfg.mqtt.port} v{cfg.mqtt.protocol} (shared group: {share}), "
        f"Kafka {cfg.kafka.bootstrap_servers}, {len(cfg.streams)} stream rule(s)",
        as_json,
        streams=len(cfg.streams),
    )


def _check_broker(config: Path | None, messages: int, payload_bytes: int, timeout: float, as_json: bool) -> None:
    """``fog check --broker``: the fog's own MQTT settings (TLS, credentials) and namespace, one probe."""
    import json

    from reflexarc.fog.brokercheck import check_broker

    try:
        cfg = _load(config)
    except ValueError as exc:  # RX_MQTT_PORT / RX_MQTT_PROTOCOL that are not a port / a version
        from reflexarc.errors import explain

        text = explain(exc) or str(exc).splitlines()[0]
        typer.echo(f"invalid MQTT settings in the environment (RX_MQTT_*): {text}", err=True)
        raise typer.Exit(2) from None
    rep = check_broker(cfg.mqtt, cfg.namespace, messages=messages, payload_bytes=payload_bytes, timeout_s=timeout)
    if as_json:
        typer.echo(json.dumps(rep.as_json()))
    elif rep.status == "error":
        typer.echo(rep.text(), err=True)
    else:
        typer.echo(rep.text())
    raise typer.Exit(rep.exit_code)
