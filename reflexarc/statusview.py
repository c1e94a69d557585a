"""The terminal view of ``reflexarc status``: one panel per tier, and ``--watch`` as a live ``rich`` view."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from reflexarc.status import StatusSources, collect


def _ok(flag: object) -> str:
    return "[green]reachable[/]" if flag else "[red]unreachable[/]"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def render(report: dict[str, Any], subtitle: str = "") -> Panel:
    """The whole report as one panel: brokers, edge, fog, triggers, sites, the loop."""
    k, m = report["brokers"]["kafka"], report["brokers"]["mqtt"]
    brokers = Table.grid(padding=(0, 2))
    brokers.add_row("[bold cyan]MQTT[/]", m.get("address", ""), _ok(m.get("reachable")), m.get("error", ""))
    brokers.add_row("[bold cyan]Kafka[/]", k.get("bootstrap", ""), _ok(k.get("reachable")), k.get("error", ""))

    edge = Table("device", "state", "since / reason", box=None, header_style="bold")
    for d in report.get("devices", []):
        if d["kind"] != "device":
            continue
        colour = "green" if d["state"] == "online" else "red"
        edge.add_row(
            f"{d['site']}/{d['device']}", f"[{colour}]{d['state']}[/]", d.get("since") or d.get("reason") or ""
        )
    if not edge.rows:
        edge.add_row("[dim]no device has published a status[/]", "", "")

    lag = Table("group", "topic", "partition", "lag", box=None, header_style="bold")
    for r in report.get("lag", []):
        style = "bold red" if r["lag"] else ""
        lag.add_row(r["group"], r["topic"], str(r["partition"]), f"[{style}]{r['lag']}[/]" if style else "0")
    if not lag.rows:
        lag.add_row("[dim]no consumer group has committed yet[/]", "", "", "")

    c, dl = report.get("commands", {}), report.get("dead_letters", {})
    fog = Table.grid(padding=(0, 2))
    fog.add_row(
        "[bold cyan]commands (1 h)[/]",
        f"issued {c.get('issued', 0)} · pending {c.get('pending', 0)} · delivered {c.get('delivered', 0)} · "
        f"rejected {c.get('rejected', 0)} · expired {c.get('expired', 0)}",
    )
    stages = ", ".join(f"{s} {n}" for s, n in dl.get("by_stage", {}).items()) or "none"
    fog.add_row("[bold cyan]dead letters (1 h)[/]", f"{dl.get('total', 0)}: {stages}")

    sites = Table(
        "site",
        "state",
        "backlog (requests not taken)",
        "queued · running · free/slots",
        "consumer groups",
        box=None,
        header_style="bold",
    )
    colours = {"live": "green", "stale": "yellow", "stopped": "dim"}
    for name, s in sorted(report.get("sites", {}).items()):
        backlog = f"[bold red]{s['backlog']}[/]" if s["backlog"] else "0"
        state = s.get("state")
        shown = (
            f"[{colours[state]}]{state}[/] [dim]{s['age_s']:.0f}s[/]" if state in colours else "[dim]no heartbeat[/]"
        )
        work = f"{s['queued']} · {s['running']} · {s['free_slots']}/{s['slots']}" if state else ""
        sites.add_row(name, shown, backlog, work, ", ".join(s["groups"]) or "[red]none[/]")
    if not sites.rows:
        sites.add_row("[dim]no task topic yet[/]", "", "", "", "")

    loop = report.get("loop", {})
    lp = Table.grid(padding=(0, 2))
    lp.add_row(
        "[bold cyan]loop p50[/]",
        _secs(loop.get("p50_s")),
        "[bold cyan]p99[/]",
        _secs(loop.get("p99_s")),
        f"[dim]{loop.get('loops', 0)} loops in {loop.get('window_s', 0) / 60:.0f} min[/]",
    )

    parts = [
        Panel(brokers, title="brokers", border_style="dim"),
        Panel(
            edge,
            title=f"edge · {report.get('online', 0)} online, {report.get('offline', 0)} offline",
            border_style="dim",
        ),
        Panel(Group(fog, lag), title="fog · triggers · consumer lag", border_style="dim"),
        Panel(sites, title="HPC sites", border_style="dim"),
        Panel(lp, title="the loop (event -> actuator ack)", border_style="dim"),
    ]
    return Panel(
        Group(*parts),
        title=f"[bold]reflexarc status[/] — {report.get('namespace')}",
        subtitle=subtitle or report.get("at", ""),
    )


async def watch(src: StatusSources, interval: float, console: Console, timeout: float = 10.0) -> None:
    """Refresh the view every ``interval`` seconds until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with Live(
            Panel("[dim]reading the pipeline...[/]", title="[bold]reflexarc status[/]"),
            console=console,
            refresh_per_second=4,
            screen=False,
        ) as live:
            while not stop.is_set():
                t0 = time.monotonic()
                task = asyncio.ensure_future(collect(src, timeout=timeout))
                done, _ = await asyncio.wait(
                    {task, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
                )
                if task not in done:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    break
                report = task.result()
                took = time.monotonic() - t0
                live.update(render(report, f"{report['at']} · read in {took:.1f}s · Ctrl-C quits"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, interval - took))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
