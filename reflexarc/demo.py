"""``reflexarc demo``: the whole loop on embedded brokers, with a live terminal view.

The bundled scenario is a simulated beamline: a detector publishes counts
with occasional spikes; a trigger fires on a spike and asks the local HPC
site to fit the peak; the result becomes a command that moves a motor on the
same device. The demo runs the scenario for ``--duration`` seconds, waits for
every loop in flight to close, prints a summary, and exits 0 only if every
triggered task's command reached the actuator.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from reflexarc.brokers import MqttFlavour
from reflexarc.observer import LoopObserver, LoopStats, fmt_ms
from reflexarc.supervisor import Supervisor, load_pipeline
from reflexarc.topics import Topics


def scenario_dir(name: str = "beamline") -> Path:
    """Folder of a bundled scenario."""
    return Path(str(resources.files("reflexarc") / "scenarios" / name))


def prepare_scenario(target: Path, duration: float, name: str = "beamline") -> tuple[Path, int]:
    """Copy a bundled scenario into ``target`` and size its sources for ``duration`` seconds.

    Returns the pipeline file and the number of events the sources will emit.
    """
    shutil.copytree(
        scenario_dir(name), target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py")
    )
    agent = target / "agent.yaml"
    doc = yaml.safe_load(agent.read_text())
    total = 0
    for src in doc.get("sources", []):
        rate = float(src.get("rate_hz", 10))
        src["count"] = max(1, int(rate * duration))
        total += src["count"]
    agent.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target / "pipeline.yaml", total


def hpc_sites(base: Path, pipeline_file: Path) -> list[str]:
    """HPC site names of a pipeline (read from its site configs), for the observer."""
    cfg = load_pipeline(pipeline_file)
    sites = []
    for p in cfg.processes:
        if p.tier == "site":
            doc = yaml.safe_load((base / p.config).read_text()) or {}
            if isinstance(doc.get("site"), str):
                sites.append(doc["site"])
    return sites


def render(stats: LoopStats, phase: str, elapsed: float, title: str) -> Panel:
    """The live view: counters, latency and the latest happenings."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan", justify="right")
    t.add_column()
    t.add_column(style="bold cyan", justify="right")
    t.add_column()
    t.add_row("events in", f"{stats.events}  ({stats.event_rate():.0f}/s)", "dead-lettered", str(stats.deadletters))
    t.add_row("triggers fired", str(len(stats.tasks)), "tasks running", str(stats.running()))
    t.add_row("tasks done", str(stats.done()), "tasks failed", str(stats.failed()))
    t.add_row(
        "commands sent", str(len(stats.commands)), "delivered", f"{stats.delivered()}  (refused {stats.rejected()})"
    )
    t.add_row("loop p50", fmt_ms(stats.latency(50)), "loop p99", fmt_ms(stats.latency(99)))
    recent = "\n".join(stats.recent) or "[dim]waiting for the first trigger...[/]"
    return Panel(
        Group(t, Panel(recent, title="latest", border_style="dim")),
        title=f"[bold]reflexarc demo[/] — {title}",
        subtitle=f"{phase} · {elapsed:.0f}s",
    )


def summary_table(stats: LoopStats) -> Table:
    """The end-of-run summary."""
    t = Table(title="reflexarc demo — summary", show_header=False)
    for k, v in stats.summary().items():
        t.add_row(k.replace("_", " "), "-" if v is None else str(v))
    return t


async def run_demo(
    duration: float = 20.0,
    drain_timeout: float = 60.0,
    mqtt_flavour: MqttFlavour | None = None,
    console: Console | None = None,
    live: bool = True,
    scenario: str = "beamline",
) -> tuple[int, LoopStats]:
    """Run a bundled scenario (``beamline`` or ``epics``); return the exit code and what was observed."""
    if scenario == "epics":
        # A caproto IOC, a Bluesky scan and the epics actuator: see reflexarc/scenarios/epics/demo.py.
        from reflexarc.scenarios.epics.demo import run_epics_demo

        return await run_epics_demo(drain_timeout, mqtt_flavour, console, live)
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="reflexarc-demo-"))
    pipeline_file, expected_events = prepare_scenario(work / "scenario", duration)
    cfg = load_pipeline(pipeline_file)
    sup = Supervisor(cfg, base_dir=pipeline_file.parent, run_dir=work / "run", mqtt_flavour=mqtt_flavour)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ok = False
    console.print(f"[bold]reflexarc demo[/]: work dir {work}")
    with console.status("starting an MQTT broker, a Kafka broker and 4 tiers (about 10 s)..."):
        await asyncio.to_thread(sup.start)
    broker_note = (
        "Mosquitto (MQTT 5)"
        if sup.brokers and sup.brokers.mqtt and sup.brokers.mqtt.flavour == "mosquitto"
        else "amqtt (MQTT 3.1.1)"
    )
    title = f"simulated beamline on {broker_note} + Tansu"
    observer = LoopObserver(sup.kafka_settings(), Topics(cfg.namespace), hpc_sites(pipeline_file.parent, pipeline_file))
    tasks = [asyncio.create_task(observer.run(stop)), asyncio.create_task(sup.run(stop))]
    started = time.monotonic()
    drained_at = 0.0
    startup_slack = 60.0
    stats = observer.stats
    try:
        with Live(
            render(stats, "starting", 0, title),
            console=console,
            refresh_per_second=4,
            transient=False,
            auto_refresh=live,
        ) as view:
            while not stop.is_set():
                elapsed = time.monotonic() - started
                # Streaming lasts until every event the source will emit has
                # arrived (tiers take a few seconds to start), then open loops close.
                in_data = stats.events < expected_events and elapsed < duration + startup_slack
                phase = "streaming" if in_data else "closing open loops"
                if not in_data:
                    drained_at = drained_at or elapsed
                    quiet = stats.running() == 0 and not stats.open_loops()
                    if (stats.tasks and quiet) or elapsed > drained_at + drain_timeout:
                        break
                view.update(render(stats, phase, elapsed, title))
                for t in tasks:
                    if t.done() and (exc := t.exception()) is not None:
                        raise exc
                await asyncio.sleep(0.25)
            view.update(render(stats, "done", time.monotonic() - started, title))
        ok = stats.all_closed() and stats.events > 0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not ok:
            keep = Path(tempfile.mkdtemp(prefix="reflexarc-demo-logs-"))
            shutil.copytree(work / "run" / "logs", keep, dirs_exist_ok=True)
        await asyncio.to_thread(sup.stop)
        shutil.rmtree(work, ignore_errors=True)
    console.print()
    console.print(summary_table(stats))
    if ok:
        console.print(
            f"[green]every triggered task's command reached the actuator[/] ({len(stats.tasks)} loops closed)"
        )
        return 0, stats
    missing = stats.open_loops()
    if not stats.tasks:
        console.print("[red]no trigger fired[/]: the detector's spikes never crossed the threshold in time")
    else:
        console.print(
            f"[red]{len(missing)} of {len(stats.tasks)} loops did not close[/]: {', '.join(m[:8] for m in missing[:10])}"
        )
    console.print(f"tier logs kept in {keep}")
    return 1, stats
