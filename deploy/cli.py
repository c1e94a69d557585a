"""``reflexarc deploy ...``: roll edge agents out to a fleet of Docker engines from a fleet file.

Module-level imports stay light (typer only): the main CLI imports this at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Deploy edge agents to a fleet of devices through the Docker Engine API (see docs/deploy.md).",
    no_args_is_help=True,
)
image_app = typer.Typer(help="The edge agent image.", no_args_is_help=True)
app.add_typer(image_app, name="image")

FleetArg = Annotated[Path, typer.Argument(metavar="FILE", help="fleet.yaml")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]
DeviceOpt = Annotated[list[str] | None, typer.Option("--device", "-d", help="only these devices (repeatable)")]

# Exit codes: 0 all done, 1 a device failed or was rolled back, 2 bad fleet file, 3 some devices unreachable.
EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE = 1, 2, 3

_ACTION_STYLE = {
    "create": "green",
    "replace": "yellow",
    "remove": "red",
    "recover": "magenta",
    "unchanged": "dim",
    "unreachable": "bold red",
    "error": "bold red",
}
_RESULT_STYLE = {
    "created": "green",
    "replaced": "green",
    "recovered": "green",
    "unchanged": "dim",
    "removed": "yellow",
    "rolled back": "bold yellow",
    "failed": "bold red",
    "skipped": "yellow",
    "unreachable": "bold red",
    "error": "bold red",
}


def _console() -> Any:
    from rich.console import Console

    return Console()


def _plan(fleet_path: Path, devices: list[str] | None) -> Any:
    """Load the fleet file and make the plan; config problems exit 2 with the file's messages."""
    import asyncio

    from reflexarc.config import ConfigError
    from reflexarc.deploy.fleet import load_fleet
    from reflexarc.deploy.planner import make_plan

    try:
        fleet = load_fleet(fleet_path)
        return asyncio.run(make_plan(fleet, devices, str(fleet_path)))
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ValueError as exc:
        typer.echo(f"deploy: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"fleet {plan.fleet.fleet}: plan")
    for col in ("device", "endpoint", "action", "why"):
        table.add_column(col)
    for d in plan.devices:
        style = _ACTION_STYLE.get(d.action.value, "")
        table.add_row(d.device, d.endpoint, f"[{style}]{d.action.value}[/]", d.reason)
    console.print(table)
    changes = plan.changes()
    down = sum(d.action.value in ("unreachable", "error") for d in plan.devices)
    if down:
        console.print(f"[bold red]{down} device(s) unreachable or in error: they are skipped[/]")
    if not changes:
        console.print("nothing to do" + (" on the other devices" if down else ""))
    else:
        counts: dict[str, int] = {}
        for d in changes:
            counts[d.action.value] = counts.get(d.action.value, 0) + 1
        console.print("to do: " + ", ".join(f"{n} {a}" for a, n in counts.items()))


@app.command()
def plan(fleet: FleetArg, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
    """Show what apply would change per device: create, replace, remove, unchanged (or unreachable)."""
    import json

    p = _plan(fleet, device)
    try:
        if as_json:
            typer.echo(json.dumps({"fleet": p.fleet.fleet, "devices": [d.as_dict() for d in p.devices]}, indent=2))
        else:
            _print_plan(p)
    finally:
        p.close()
    if any(d.action.value in ("unreachable", "error") for d in p.devices):
        raise typer.Exit(EXIT_UNREACHABLE)


@app.command()
def apply(fleet: FleetArg, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
    """Make every device run what the fleet file says: rolling, health-checked, rolled back on failure."""
    import asyncio
    import json

    from rich.table import Table

    from reflexarc.deploy.rollout import DeployError, Result, apply_plan

    p = _plan(fleet, device)
    console = _console()
    if not as_json:
        _print_plan(p)

    def progress(dev: str, text: str) -> None:
        if not as_json:
            console.log(f"[bold]{dev}[/]: {text}")

    try:
        with console.status("rolling out...", spinner="dots") if not as_json else _null():
            outcomes = asyncio.run(apply_plan(p, progress))
    except DeployError as exc:
        typer.echo(f"deploy: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        p.close()
    if as_json:
        typer.echo(json.dumps({"fleet": p.fleet.fleet, "devices": [o.as_dict() for o in outcomes]}, indent=2))
    else:
        table = Table(title=f"fleet {p.fleet.fleet}: apply")
        for col in ("device", "endpoint", "result", "seconds", "detail"):
            table.add_column(col)
        for o in outcomes:
            style = _RESULT_STYLE.get(o.result.value, "")
            table.add_row(o.device, o.endpoint, f"[{style}]{o.result.value}[/]", f"{o.seconds:.1f}", o.detail)
        console.print(table)
    if any(o.result in (Result.FAILED, Result.ROLLED_BACK, Result.ERROR, Result.SKIPPED) for o in outcomes):
        raise typer.Exit(EXIT_FAILED)
    if any(o.result is Result.UNREACHABLE for o in outcomes):
        raise typer.Exit(EXIT_UNREACHABLE)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@app.command()
def status(fleet: FleetArg, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
    """Show each device's agent container: state, health, and whether it matches the fleet file."""
    import asyncio
    import json

    from rich.table import Table

    from reflexarc.deploy.status import fleet_status

    p = _plan(fleet, device)
    try:
        rows = asyncio.run(fleet_status(p))
    finally:
        p.close()
    if as_json:
        typer.echo(json.dumps({"fleet": p.fleet.fleet, "devices": rows}, indent=2, default=str))
        if any(r["config"] in ("unreachable", "error") for r in rows):
            raise typer.Exit(EXIT_UNREACHABLE)
        return
    table = Table(title=f"fleet {p.fleet.fleet}: status")
    for col in ("device", "endpoint", "state", "health", "config", "container", "started", "detail"):
        table.add_column(col)
    for r in rows:
        state = r.get("state") or ""
        style = "green" if state == "running" else "bold red"
        table.add_row(
            r["device"],
            r["endpoint"],
            f"[{style}]{state}[/]",
            r.get("health") or "",
            r["config"],
            f"{r['container']} {r.get('id', '')}",
            (r.get("started_at") or "")[:19],
            r.get("detail", ""),
        )
    _console().print(table)
    if any(r["config"] in ("unreachable", "error") for r in rows):
        raise typer.Exit(EXIT_UNREACHABLE)


@app.command()
def logs(
    fleet: FleetArg,
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="device name in the fleet file")],
    tail: Annotated[int, typer.Option(help="lines from the end")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
) -> None:
    """Print a device's agent log."""
    from docker.errors import NotFound

    from reflexarc.deploy.containers import container_name

    p = _plan(fleet, [device])
    try:
        dp = p.devices[0]
        client = p.clients.get(dp.endpoint)
        if client is None:
            typer.echo(f"deploy: {device}: {dp.reason}", err=True)
            raise typer.Exit(EXIT_UNREACHABLE)
        try:
            c = client.containers.get(container_name(p.fleet.fleet, device))
        except NotFound:
            typer.echo(f"deploy: {device} has no agent on {dp.endpoint} (run apply)", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        if follow:
            for chunk in c.logs(stream=True, follow=True, tail=tail):
                typer.echo(chunk.decode(errors="replace"), nl=False)
        else:
            typer.echo(c.logs(tail=tail).decode(errors="replace"), nl=False)
    finally:
        p.close()


@app.command()
def remove(
    fleet: FleetArg,
    device: DeviceOpt = None,
    purge_state: Annotated[
        bool, typer.Option("--purge-state", help="also delete the state volume (unsent spooled events are lost)")
    ] = False,
) -> None:
    """Stop and remove the agents of the fleet (or of the named devices); state volumes are kept unless purged."""
    import asyncio

    from reflexarc.deploy.containers import volume_name
    from reflexarc.deploy.rollout import remove_device

    p = _plan(fleet, device)
    unreachable = False
    try:

        async def main() -> None:
            nonlocal unreachable
            for dp in p.devices:
                client = p.clients.get(dp.endpoint)
                if client is None:
                    typer.echo(f"{dp.device}: skipped, {dp.reason}")
                    unreachable = True
                    continue
                n = await asyncio.to_thread(remove_device, client, p.fleet.fleet, dp.device, 15)
                msg = f"{dp.device}: removed {n} container(s)"
                if purge_state:
                    from docker.errors import NotFound

                    try:
                        vol = await asyncio.to_thread(client.volumes.get, volume_name(p.fleet.fleet, dp.device))
                        await asyncio.to_thread(vol.remove)
                        msg += ", state volume deleted"
                    except NotFound:
                        pass
                typer.echo(msg)

        asyncio.run(main())
    finally:
        p.close()
    if unreachable:
        raise typer.Exit(EXIT_UNREACHABLE)


@image_app.command("build")
def image_build(
    base: Annotated[str, typer.Option(help="base image on the engine (Debian-like with python3 and python3-venv)")],
    tag: Annotated[str, typer.Option(help="tag of the agent image")] = "reflexarc/edge-agent:latest",
    endpoint: Annotated[
        list[str] | None, typer.Option(help="engine URL (repeatable); default $DOCKER_HOST or the local socket")
    ] = None,
    fleet: Annotated[Path | None, typer.Option(help="build on every endpoint of this fleet file")] = None,
    source: Annotated[Path | None, typer.Option(help="reflexarc source tree (default: this checkout)")] = None,
    wheel: Annotated[Path | None, typer.Option(help="a prebuilt reflexarc wheel instead of --source")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show the build output")] = False,
) -> None:
    """Build the edge agent image from the shipped Containerfile (offline: wheels are built here)."""
    import os

    from reflexarc.deploy.endpoints import Unreachable, connect
    from reflexarc.deploy.fleet import Endpoint, load_fleet
    from reflexarc.deploy.image import ImageBuildError, build_image

    targets: list[Endpoint] = []
    if fleet is not None:
        from reflexarc.config import ConfigError

        try:
            ff = load_fleet(fleet)
        except ConfigError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        seen = set()
        for d in ff.devices.values():
            ep = ff.endpoints[d.endpoint] if "://" not in d.endpoint else Endpoint(url=d.endpoint)
            if ep.url not in seen:
                seen.add(ep.url)
                targets.append(ep)
    for url in endpoint or []:
        targets.append(Endpoint(url=url, allow_insecure_tcp=True))
    if not targets:
        targets.append(
            Endpoint(url=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"), allow_insecure_tcp=True)
        )
    console = _console()
    failed = False
    for ep in targets:
        try:
            client = connect(ep)
        except Unreachable as exc:
            console.print(f"[bold red]{ep.url}: unreachable[/] ({exc})")
            failed = True
            continue
        try:
            with console.status(f"building {tag} on {ep.url}..."):
                res = build_image(client, base, tag, source=source, wheel=wheel,
                                  log=(console.log if verbose else lambda _l: None))  # fmt: skip
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.steps.items())
            console.print(f"[green]{ep.url}: built {res.tag}[/] {res.image_id[:19]} in {res.seconds:.1f} s ({steps})")
        except ImageBuildError as exc:
            console.print(f"[bold red]{ep.url}: {exc}[/]")
            failed = True
        finally:
            client.close()
    if failed:
        raise typer.Exit(EXIT_FAILED)
