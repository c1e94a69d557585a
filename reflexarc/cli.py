"""The ``reflexarc`` command: one sub-command group per tier, plus the daily verbs.

This module is the only place where tiers are assembled into one program;
each tier's own commands live in its ``cli.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from reflexarc import __version__
from reflexarc.aio import run_service

app = typer.Typer(
    help="reflexarc: close the loop between instruments and supercomputers.\n\n"
    "Instrument data flows edge -> MQTT -> fog -> Kafka -> triggers -> HPC analytics, and results "
    "flow back to actuators on the devices. Start with [bold]reflexarc demo[/].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)

# Tier command groups: (module, attribute, command name, help).
_TIERS: list[tuple[str, str, str, str]] = [
    ("reflexarc.edge.cli", "app", "edge", "Edge agent: instrument sources, spool, actuators."),
    ("reflexarc.fog.cli", "app", "fog", "Fog bridge: MQTT -> Kafka ingest and commands back down."),
    ("reflexarc.cloud.cli", "app", "cloud", "Trigger engine: YAML triggers (CEL, windows) -> task requests."),
    ("reflexarc.cloud.cli", "triggers_app", "triggers", "Validate, dry-run and describe trigger files."),
    ("reflexarc.hpc_bridge.cli", "site_app", "site", "HPC site agent: runs the apps triggers ask for."),
    ("reflexarc.hpc_bridge.cli", "jobs_app", "jobs", "Inspect and steer jobs at a site."),
    ("reflexarc.hpc_bridge.cli", "env_app", "env", "Pack and list app environments."),
    ("reflexarc.hpc_bridge.compose.cli", "app", "compose", "Compose and free machines from resource pools."),
    ("reflexarc.deploy.cli", "app", "deploy", "Deploy edge agents to a fleet through the Docker Engine API."),
]


def _mount_tiers() -> None:
    for module, attr, name, help_text in _TIERS:
        _mount_group(module, attr, name, help_text)


def _mount_group(module: str, attr: str, name: str, help_text: str | None = None) -> None:
    """Add the command group ``module.attr`` as ``name``; when its extra is not installed, a stand-in that says which."""
    from reflexarc.extras import install_hint

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return
        if install_hint(exc.name) is None:
            raise
        _mount_missing(name, help_text or name, exc)  # an edge-only install has no Kafka client, etc.
        return
    app.add_typer(getattr(mod, attr), name=name, help=help_text)


def _mount_missing(name: str, help_text: str, exc: ModuleNotFoundError) -> None:
    """A stand-in for a tier whose extra is missing: any use of it ends in the install advice."""

    def missing() -> None:
        raise exc  # the error boundary turns it into "pip install 'reflexarc[EXTRA]'"

    missing.__doc__ = f"{help_text} [not installed]"
    app.command(
        name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
    )(missing)


_mount_tiers()

brokers_app = typer.Typer(help="Embedded MQTT and Kafka-protocol brokers for development.", no_args_is_help=True)
results_app = typer.Typer(help="Read task results as they arrive.", no_args_is_help=True)
keys_app = typer.Typer(help="Command-signing keys (Ed25519).", no_args_is_help=True)
app.add_typer(brokers_app, name="brokers")
app.add_typer(results_app, name="results")
app.add_typer(keys_app, name="keys")

from reflexarc.schemacli import schema as _schema  # noqa: E402 - the verb lives in its own module

app.command("schema")(_schema)
app.command("status")(importlib.import_module("reflexarc.statuscli").status)
app.command("sites")(importlib.import_module("reflexarc.sitescli").sites)
_mount_group(
    "reflexarc.deadletterscli", "app", "deadletters", "Inspect dead letters and replay them once their cause is fixed."
)  # needs aiokafka (not on an edge)
_mount_group("reflexarc.datacli", "app", "data", "Objects stored by reference: list them, collect garbage.")

MqttOpt = Annotated[
    str | None,
    typer.Option("--mqtt", help="embedded MQTT broker: 'mosquitto' or 'amqtt' (default: mosquitto if installed)"),
]


def _flavour(value: str | None) -> Any:
    if value not in (None, "mosquitto", "amqtt"):
        raise typer.BadParameter("use 'mosquitto' or 'amqtt'", param_hint="--mqtt")
    return value


def _config_error(exc: Exception) -> None:
    typer.secho(str(exc), fg="red", err=True)
    raise typer.Exit(2)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        typer.echo(f"reflexarc {__version__}")
        raise typer.Exit()


@brokers_app.command("up")
def brokers_up(
    mqtt: MqttOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="where broker data lives (default: a temp dir)")] = None,
    s3: Annotated[
        bool, typer.Option("--s3", help="also an S3 store (SeaweedFS) with a bucket and throwaway keys")
    ] = False,
) -> None:
    """Start an MQTT broker and a Kafka-protocol broker on loopback until Ctrl-C.

    Prints the environment variables that point every tier at them.
    """
    from reflexarc.brokers import EmbeddedBrokers
    from reflexarc.log import setup_logging

    setup_logging()
    with EmbeddedBrokers(data_dir=data_dir, mqtt_flavour=_flavour(mqtt)) as b:
        assert b.mqtt is not None
        typer.echo(f"# MQTT: {b.mqtt.flavour} (MQTT {b.mqtt.protocol}) on {b.mqtt.host}:{b.mqtt.port}")
        typer.echo(f"# Kafka: Tansu on {b.kafka_bootstrap}")
        for k, v in b.env().items():
            typer.echo(f"export {k}={v}")
        store = None
        if s3:
            from reflexarc.s3store import start_s3

            assert b.data_dir is not None
            store = start_s3(b.data_dir / "s3")
            typer.echo(f"# S3: SeaweedFS on {store.endpoint_url}, bucket {store.url}")
            for k, v in store.env().items():
                typer.echo(f"export {k}={v}")
        try:
            _wait_for_signal()
        finally:
            if store is not None:
                store.stop()


def _wait_for_signal() -> None:
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: got.append(s))
    while not got:
        signal.pause()


@app.command()
def up(
    pipeline: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="pipeline.yaml naming the tier processes", exists=True, dir_okay=False),
    ],
    mqtt: MqttOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="logs, keys and broker data (default: a temp dir)")] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="the supervisor's: DEBUG, INFO, WARNING (default RX_LOG_LEVEL or INFO)"),
    ] = None,
) -> None:
    """Run every tier of a pipeline under one supervisor (embedded brokers if none are configured)."""
    from reflexarc.config import ConfigError
    from reflexarc.log import setup_logging
    from reflexarc.supervisor import Supervisor, load_pipeline

    setup_logging(log_level, name="up")
    try:
        cfg = load_pipeline(pipeline)
    except ConfigError as exc:
        _config_error(exc)
    sup = Supervisor(cfg, base_dir=pipeline.resolve().parent, run_dir=run_dir, mqtt_flavour=_flavour(mqtt))

    try:
        sup.start()
        typer.echo(f"pipeline {cfg.name!r} running; logs in {sup.run_dir}/logs; Ctrl-C stops it")
        for k in ("RX_MQTT_HOST", "RX_MQTT_PORT", "RX_KAFKA_BOOTSTRAP"):
            typer.echo(f"  {k}={sup.env[k]}")
        run_service(sup.run)
    finally:
        sup.stop()


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds of instrument data to stream", min=1)] = 20.0,
    drain_timeout: Annotated[float, typer.Option(help="seconds to wait afterwards for open loops to close")] = 60.0,
    mqtt: MqttOpt = None,
    scenario: Annotated[
        str,
        typer.Option(
            help="beamline: simulated detector and motor; epics: a caproto IOC scanned with Bluesky, "
            "the motor moved to the fitted peak over Channel Access"
        ),
    ] = "beamline",
) -> None:
    """Run the whole loop on embedded brokers with a simulated beamline, live.

    Exits 0 only when every triggered task's command reached the actuator
    (``--scenario epics``: and the motor's readback on the IOC is the fitted peak).
    """
    from reflexarc.demo import run_demo
    from reflexarc.log import setup_logging

    if scenario not in ("beamline", "epics"):
        raise typer.BadParameter(f"unknown scenario {scenario!r}: beamline or epics", param_hint="--scenario")
    setup_logging("WARNING")
    code, _stats = asyncio.run(run_demo(duration, drain_timeout, _flavour(mqtt), scenario=scenario))
    raise typer.Exit(code)


@results_app.command("subscribe")
def results_subscribe(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            help="YAML with a kafka: section (TLS, SASL; as in a tier's file) "
            "and namespace: (default: the RX_KAFKA_* and RX_NAMESPACE variables)",
            dir_okay=False,
        ),
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (overrides the file and $RX_KAFKA_BOOTSTRAP)")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="topic namespace (overrides the file and $RX_NAMESPACE)")
    ] = None,
    app_name: Annotated[str | None, typer.Option("--app", metavar="APP", help="only results of this app")] = None,
    start: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="WHEN",
            help="where to start: now, beginning, an ISO 8601 time or a duration ago (15m, 2h)",
        ),
    ] = "now",
    from_beginning: Annotated[bool, typer.Option(help="same as --from beginning")] = False,
    count: Annotated[int | None, typer.Option(help="stop after this many results")] = None,
) -> None:
    """Print task results as JSON lines (one per task) as they arrive."""
    from reflexarc.clientconfig import kafka_is_configured, load_client_config
    from reflexarc.events import TaskResult
    from reflexarc.kafka import event_of
    from reflexarc.kafkastart import parse_start, start_reader

    cfg = load_client_config(config, bootstrap, namespace)
    if not kafka_is_configured(config, bootstrap):
        typer.secho(
            f"note: no Kafka cluster configured (--config, --bootstrap or RX_KAFKA_BOOTSTRAP); "
            f"trying {cfg.kafka.bootstrap_servers}",
            err=True,
            fg="yellow",
        )
    try:
        position = "beginning" if from_beginning else parse_start(start)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from") from None
    topic = cfg.topics().kafka_results

    async def main() -> None:
        consumer = await start_reader(cfg.kafka, [topic], position)
        seen = 0
        try:
            async for rec in consumer:
                res = TaskResult.from_envelope(event_of(rec))
                if app_name and res.app != app_name:
                    continue
                sys.stdout.write(json.dumps(res.model_dump(mode="json")) + "\n")
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return
        finally:
            await consumer.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="where to write NAME.key (private, mode 0600) and NAME.pub")
    ],
    name: Annotated[str, typer.Option(help="file name stem")] = "pipeline",
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing key pair (every device must then get the new key)")
    ] = False,
) -> None:
    """Create an Ed25519 key pair: the cloud tier signs commands, edge agents verify them."""
    from reflexarc.signing import generate_keypair

    private, public = generate_keypair(directory, name, overwrite=force)
    typer.echo(f"private key: {private}  (give to the cloud tier: RX_SIGNING_KEY={private})")
    typer.echo(f"public key:  {public}  (give to edge agents: RX_VERIFY_KEYS={public})")


# Checks `reflexarc doctor` runs, in order: (module, function). Each function takes the pipeline's
# brokers (a supervisor.BrokerSpec; None when the pipeline starts embedded ones) and its namespace, and
# returns a report with .text(), .as_json() and .exit_code (see reflexarc.fog.brokercheck.CheckReport).
_DOCTOR_CHECKS: list[tuple[str, str]] = [
    ("reflexarc.fog.brokercheck", "doctor_check"),  # does the MQTT broker bound session queues?
]


@app.command()
def doctor(
    pipeline: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE",
            help="pipeline.yaml whose brokers to check (omit: the RX_MQTT_* variables)",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object for scripts")] = False,
) -> None:
    """Check that the brokers a pipeline uses keep reflexarc's delivery guarantees.

    Exits 0 when every check passed, 1 when one found a problem (it says what to set), 2 when one could not run.
    """
    import os

    from reflexarc.config import ConfigError, KafkaSettings, MqttSettings
    from reflexarc.supervisor import BrokerSpec, load_pipeline

    try:
        if pipeline is None:
            brokers: BrokerSpec | None = BrokerSpec(mqtt=MqttSettings.from_env(), kafka=KafkaSettings.from_env())
            namespace = os.environ.get("RX_NAMESPACE", "rx")
        else:
            cfg = load_pipeline(pipeline)
            brokers, namespace = cfg.brokers, cfg.namespace
    except (ConfigError, ValueError) as exc:
        _config_error(exc)
    reports = [getattr(importlib.import_module(m), f)(brokers, namespace) for m, f in _DOCTOR_CHECKS]
    code = max(r.exit_code for r in reports)
    if as_json:
        typer.echo(json.dumps({"exit_code": code, "checks": [r.as_json() for r in reports]}))
    else:
        typer.echo("\n\n".join(r.text() for r in reports))
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point: every command runs inside the error boundary (:mod:`reflexarc.errors`)."""
    from reflexarc.errors import report

    try:
        app()
    except SystemExit:
        raise
    except BaseException as exc:
        sys.exit(report(exc))


if __name__ == "__main__":
    main()
