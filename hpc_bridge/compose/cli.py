"""``reflexarc compose ...``: compose machines from pooled devices on the command line.

Mounted into the main CLI as a typer sub-app. Every command takes ``--db``
and ``--pools`` (or ``$RX_COMPOSE_DB`` / ``$RX_COMPOSE_POOLS``); commands
that change something identify the caller by ``$RX_COMPOSE_TOKEN``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .settings import DB_ENV, POOLS_ENV, TOKEN_ENV

if TYPE_CHECKING:
    from .composer import Composer
    from .drivers import Driver

# The composer (SQLAlchemy) is imported inside the commands: every `reflexarc`
# process imports this module at start-up, edge agents on devices included.

app = typer.Typer(
    help=(
        "Compose machines (cores + GPUs + NVMe + NICs) from disaggregated device pools, "
        "free them after, and keep the record.\n\n"
        f"The database is --db or ${DB_ENV}; the pools file (racks, devices, hashed tokens) "
        f"is --pools or ${POOLS_ENV}. Commands that change things identify you by the "
        f"token in ${TOKEN_ENV}."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

_out = Console()
_err = Console(stderr=True)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        metavar="URL",
        help="SQLAlchemy URL or SQLite file (default: ~/.local/share/reflexarc/compose.db).",
    ),
]
PoolsOpt = Annotated[
    Path | None,
    typer.Option(
        "--pools", envvar=POOLS_ENV, metavar="FILE", help="Pools YAML: racks, devices, fabric domains, hashed tokens."
    ),
]
DriverOpt = Annotated[
    str,
    typer.Option(
        "--driver",
        metavar="NAME",
        help="How machines are realised: 'inventory' (logical) or 'slurm' (a Slurm allocation; uses $SLURM_CONF).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _driver(name: str) -> Driver:
    """The driver called ``name``."""
    from .drivers import InventoryDriver, SlurmDriver

    drivers: dict[str, Callable[[], Driver]] = {"inventory": InventoryDriver, "slurm": SlurmDriver}
    if name not in drivers:
        raise typer.BadParameter(f"unknown driver {name!r}; choose from {', '.join(drivers)}")
    return drivers[name]()


@contextmanager
def _composer(db: str | None, pools: Path | None, driver: str = "inventory") -> Iterator[Composer]:
    """Open a composer and turn the library's errors into one red line + exit 1."""
    from .composer import Composer
    from .drivers import DriverError
    from .placement import PlacementError

    try:
        with Composer(db, pools, _driver(driver)) as composer:
            yield composer
    except (PlacementError, PermissionError, ValueError, KeyError, DriverError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        _err.print(f"[red]error:[/] {message}", highlight=False)
        raise typer.Exit(1) from None


def _print_json(data: Any) -> None:
    """JSON to stdout (plain, so it pipes into jq)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command("list")
def list_cmd(
    db: DbOpt = None,
    pools: PoolsOpt = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include freed and failed machines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List live machines (composing, composed, freeing)."""
    from .model import machines_table

    with _composer(db, pools) as c:
        machines = c.list(all=all_)
    if as_json:
        _print_json([m.model_dump(mode="json") for m in machines])
    else:
        _out.print(machines_table(machines))


@app.command()
def show(
    machine: Annotated[str, typer.Argument(metavar="MACHINE", help="Machine id or name.")],
    db: DbOpt = None,
    pools: PoolsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one machine: spec, devices, state and how the driver realised it."""
    with _composer(db, pools) as c:
        m = c.show(machine)
    if as_json:
        _print_json(m.model_dump(mode="json"))
    else:
        _out.print(m)


@app.command("create")
@app.command("compose", hidden=True)  # the old name, kept working
def compose_cmd(
    cpus: Annotated[int, typer.Option(help="Cores of the compute node.")] = 1,
    gpus: Annotated[int, typer.Option(help="Number of GPUs.")] = 0,
    gpu_model: Annotated[str | None, typer.Option(help="GPU model, e.g. A100 (any if unset).")] = None,
    memory_gb: Annotated[int, typer.Option(help="Memory of the compute node, GB.")] = 0,
    storage_gb: Annotated[int, typer.Option(help="NVMe/storage capacity, GB.")] = 0,
    nics: Annotated[int, typer.Option(help="Number of NICs.")] = 0,
    rack: Annotated[str | None, typer.Option(help="Preferred rack (others are used if it lacks something).")] = None,
    name: Annotated[str | None, typer.Option(help="A unique name for the machine.")] = None,
    db: DbOpt = None,
    pools: PoolsOpt = None,
    driver: DriverOpt = "inventory",
    as_json: JsonOpt = False,
) -> None:
    """Compose a machine, e.g. [bold]--cpus 32 --gpus 2 --gpu-model A100 --storage-gb 1000[/]."""
    from .model import CompositionSpec

    spec = CompositionSpec(
        cpus=cpus, gpus=gpus, gpu_model=gpu_model, memory_gb=memory_gb, storage_gb=storage_gb, nics=nics, rack=rack
    )
    with _composer(db, pools, driver) as c:
        m = c.compose(spec, c.identity_from_env(), name=name)
    if as_json:
        _print_json(m.model_dump(mode="json"))
    else:
        _out.print(m)


@app.command()
def free(
    machine: Annotated[str, typer.Argument(metavar="MACHINE", help="Machine id or name.")],
    force: Annotated[bool, typer.Option(help="Also free a machine stuck in composing/freeing.")] = False,
    db: DbOpt = None,
    pools: PoolsOpt = None,
    driver: DriverOpt = "inventory",
) -> None:
    """Free a machine (owner or admin only) and return its devices to the pools."""
    with _composer(db, pools, driver) as c:
        m = c.free(machine, c.identity_from_env(), force=force)
    _out.print(f"freed {m.name or m.id}: {', '.join(m.device_ids)}", highlight=False)


@app.command()
def export(
    machine: Annotated[str, typer.Argument(metavar="MACHINE", help="Machine id or name.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout.")] = None,
    db: DbOpt = None,
    pools: PoolsOpt = None,
) -> None:
    """Print a compositions YAML that recomposes the machine with [bold]apply[/]."""
    with _composer(db, pools) as c:
        text = c.export(machine)
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def apply(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="Compositions YAML (see 'export').", exists=True, dir_okay=False)
    ],
    prune: Annotated[bool, typer.Option(help="Free your named machines that the file does not list.")] = False,
    db: DbOpt = None,
    pools: PoolsOpt = None,
    driver: DriverOpt = "inventory",
    as_json: JsonOpt = False,
) -> None:
    """Make the named machines of a file exist (idempotent: re-running changes nothing)."""
    with _composer(db, pools, driver) as c:
        results = c.apply(file, c.identity_from_env(), prune=prune)
    if as_json:
        _print_json([r.model_dump() for r in results])
        return
    table = Table(title="apply", title_justify="left")
    for col in ("name", "action", "machine"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.action, r.machine_id)
    _out.print(table)


@app.command("pools")
def pools_cmd(db: DbOpt = None, pools: PoolsOpt = None, as_json: JsonOpt = False) -> None:
    """Show free and used devices per rack and kind."""
    with _composer(db, pools) as c:
        view = c.pools()
    if as_json:
        _print_json([{**r.model_dump(), "free": r.free} for r in view.rows])
    else:
        _out.print(view)


@app.command()
def audit(
    limit: Annotated[int, typer.Option(help="Show the newest N entries.")] = 50,
    machine: Annotated[str | None, typer.Option(help="Only entries of this machine id.")] = None,
    db: DbOpt = None,
    pools: PoolsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the audit log: who composed, freed, applied or was refused, and when."""
    with _composer(db, pools) as c:
        entries = c.audit(limit=limit, machine_id=machine)
    if as_json:
        _print_json([e.model_dump(mode="json") for e in entries])
        return
    table = Table(title="audit", title_justify="left")
    for col in ("when", "user", "action", "machine", "outcome", "detail"):
        table.add_column(col)
    colours = {"ok": "green", "refused": "red", "failed": "yellow"}
    for e in entries:
        table.add_row(
            e.at.isoformat(timespec="seconds"),
            e.user,
            e.action,
            e.machine_id or "",
            f"[{colours[e.outcome]}]{e.outcome}[/]",
            e.detail,
        )
    _out.print(table)
