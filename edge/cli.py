"""``reflexarc edge ...``: run an edge agent, read its status, print a device's broker ACL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the CLI imports the agent's modules only when a command runs
    from reflexarc.edge.config import AgentConfig

app = typer.Typer(help="Edge agent: instrument sources, disk spool, actuators.", no_args_is_help=True)


def _load(config: Path) -> AgentConfig:
    from reflexarc.config import ConfigError
    from reflexarc.edge.config import load_agent_config

    try:
        return load_agent_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[Path, typer.Argument(metavar="FILE", help="agent.yaml")],
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING (default RX_LOG_LEVEL or INFO)")
    ] = None,
) -> None:
    """Run the agent until SIGTERM/Ctrl-C: sources -> spool -> MQTT, commands -> actuators."""
    from reflexarc.aio import run_service
    from reflexarc.edge.agent import AgentError, run_agent
    from reflexarc.log import setup_logging
    from reflexarc.mqtt import MqttError
    from reflexarc.signing import KeyFileError

    setup_logging(log_level, name="edge")
    cfg = _load(config)

    try:
        run_service(lambda stop: run_agent(cfg, stop))
    except (AgentError, MqttError, KeyFileError, ValueError) as exc:
        typer.echo(f"edge agent: {exc}", err=True)
        raise typer.Exit(1) from None


from reflexarc.edge.checkcli import check  # noqa: E402 - the verb lives in its own module

app.command("check")(check)


@app.command()
def status(
    config: Annotated[Path, typer.Argument(metavar="FILE", help="agent.yaml of the agent to inspect")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a (running) agent's state: connection, spool depth per stream, events awaiting receipts, dead letters."""
    import json

    from reflexarc.edge.status import read_status

    cfg = _load(config)
    info = read_status(cfg.status_path(), cfg.spool_path())
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    agent = info.get("agent") or {}
    spool = info["spool"]
    typer.echo(f"agent {cfg.site}/{cfg.device}: {info['state']}")
    if agent:
        typer.echo(
            f"  broker {agent.get('broker')} (MQTT {agent.get('protocol')}): "
            f"{'connected' if agent.get('connected') else 'disconnected'}"
        )
        ev = agent.get("events", {})
        delivered = "confirmed" if agent.get("delivery") == "pipeline" else "published"
        typer.echo(
            f"  events: read {ev.get('read', 0)}, spooled {ev.get('spooled', 0)}, "
            f"{delivered} {ev.get('published', 0)}, in flight {ev.get('inflight', 0)}"
        )
        if agent.get("delivery") == "pipeline":
            oldest = ev.get("oldest_unconfirmed_s")
            typer.echo(
                f"  awaiting the fog's receipt: {ev.get('unconfirmed', 0)}"
                + (f", oldest for {oldest:.1f} s" if oldest is not None else "")
                + f"; sent again {ev.get('resent', 0)}"
            )
        elif agent.get("delivery") == "broker":
            typer.echo("  delivery: broker (an event leaves the spool on the broker's PUBACK; no receipts)")
        sp = agent.get("spool", {})
        typer.echo(
            f"  spool: {sp.get('depth', 0)} waiting, {sp.get('bytes', 0)} bytes, "
            f"policy {sp.get('policy')}{' (FULL)' if sp.get('full') else ''}, dropped {sp.get('dropped', 0)}"
        )
        if agent.get("metrics_port"):
            typer.echo(f"  metrics: http://127.0.0.1:{agent['metrics_port']}/metrics")
        if agent.get("last_command"):
            typer.echo(f"  last command: {agent['last_command']}")
    if spool.get("exists"):
        for stream, n in sorted(spool["streams"].items()):
            typer.echo(f"  waiting on stream {stream}: {n}")
        typer.echo(f"  lifetime: {spool['counters']}")
        for d in spool["recent_dead_letters"]:
            typer.echo(f"  dead letter from {d['origin']}: {d['error']}")
    else:
        typer.echo(f"  no spool at {cfg.spool_path()}")


@app.command()
def acl(
    site: Annotated[str, typer.Option(help="site of the device")],
    device: Annotated[str, typer.Option(help="device name")],
    username: Annotated[str | None, typer.Option(help="broker user of the device (default SITE-DEVICE)")] = None,
    namespace: Annotated[str, typer.Option(help="topic namespace")] = "rx",
) -> None:
    """Print the Mosquitto ACL block that confines one device to its own topics."""
    from reflexarc.edge.acl import device_acl
    from reflexarc.topics import Topics

    typer.echo(device_acl(Topics(namespace), site, device, username), nl=False)
