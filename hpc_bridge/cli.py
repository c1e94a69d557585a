"""``reflexarc site|jobs|env``: the HPC bridge's commands.

Module-level imports stay light: the main CLI imports this file at start-up,
so the agent, SQLAlchemy, Dask and PSI/J are imported inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

site_app = typer.Typer(help="HPC site agent: runs the apps triggers ask for.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and steer jobs at a site (the reason for every state).", no_args_is_help=True)
env_app = typer.Typer(help="Pack and list app environments.", no_args_is_help=True)

SiteFile = Annotated[Path, typer.Argument(metavar="FILE", help="the site's YAML file (site.yaml)")]
SiteOpt = Annotated[
    Path,
    typer.Option("--site-file", "--site", "-s", metavar="FILE", help="the site's YAML file", envvar="RX_SITE_FILE"),
]
TaskArg = Annotated[str, typer.Argument(metavar="TASK", help="the task id")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _load(path: Path) -> Any:
    from reflexarc.config import ConfigError
    from reflexarc.hpc_bridge.site_config import load_site

    try:
        return load_site(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _store(path: Path, create: bool = True) -> Any:
    """The site's job store; with ``create=False`` None when its SQLite database does not exist yet.

    Reading verbs (``jobs list``/``show``) pass ``create=False``: looking must not leave an empty
    database (and a state directory) behind, e.g. after a typo in the site file's path.
    """
    from reflexarc.hpc_bridge.store import JobStore
    from reflexarc.topics import Topics

    cfg = _load(path)
    url = cfg.database_url
    if not create and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    return JobStore(url, cfg.site, Topics(cfg.namespace))


@site_app.command("run")
def site_run(
    file: SiteFile,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the site agent: take task requests from Kafka, run them, publish results (stop: SIGTERM)."""

    from reflexarc.hpc_bridge.agent import SiteAgent
    from reflexarc.hpc_bridge.apps import AppError
    from reflexarc.log import setup_logging
    from reflexarc.metrics import serve_metrics

    setup_logging(log_level, name="site")
    cfg = _load(file)
    try:
        agent = SiteAgent(cfg)
    except AppError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2) from None
    serve_metrics(cfg.metrics.port, cfg.metrics.host)

    from reflexarc.aio import run_service
    from reflexarc.hpc_bridge.engines import EngineError
    from reflexarc.hpc_bridge.machines import MachinesError

    try:
        run_service(agent.run)
    except (MachinesError, EngineError) as exc:
        # e.g. a pilot walltime above the partition's MaxTime, an address not of this host
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2) from None


@site_app.command("check")
def site_check(
    file: SiteFile,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (ok, problems, apps)")] = False,
) -> None:
    """Validate site.yaml and import every app (the same checks the agent does at start-up).

    Lists every problem in one run. Exit 0: OK; 1: problems found; 2: the file cannot be read.
    """
    import importlib

    from reflexarc.checkcli import finish, load_checked, problem_at
    from reflexarc.config import Problem
    from reflexarc.hpc_bridge.apps import REGISTRY, AppError, choose_implementation, merge_with_decorator
    from reflexarc.hpc_bridge.site_config import load_site

    cfg, marks = load_checked(file, load_site, as_json)
    problems: list[Problem] = []

    def problem(path: tuple[Any, ...], field: str, message: str) -> None:
        problems.append(problem_at(file, marks, path, field, message))

    # The registry's resolution, one module and one app at a time, so that every broken one is listed.
    apps: dict[str, Any] = {}
    for i, mod in enumerate(cfg.modules):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            problem(("modules", i), f"modules[{i}]", f"cannot import {mod!r}: {exc}")
            continue
        apps.update({n: sp for n, sp in REGISTRY.items() if sp.function and sp.function.split(":", 1)[0] == mod})
    for name, spec in cfg.apps.items():
        try:
            apps[name] = merge_with_decorator(spec, import_code=True)
        except AppError as exc:
            problem(("apps", name), f"apps.{name}", str(exc))
    described: dict[str, str] = {}
    for name, spec in apps.items():
        try:
            impl = choose_implementation(name, spec, cfg.resources) if spec.kind == "python" else None
        except AppError as exc:
            problem(("apps", name), f"apps.{name}", str(exc))
            continue
        described[name] = f"{spec.kind} {impl.function if impl else ' '.join(spec.argv or [])}"
    pilots = ""
    if cfg.engine.pilot is not None:
        # The pilot engines' start-up checks: the workers' address, the walltime against the partition.
        import asyncio

        from reflexarc.hpc_bridge.engines import EngineError, make_engine
        from reflexarc.hpc_bridge.engines.pilot import PilotEngine

        engine = make_engine(cfg.engine, str(cfg.state_path / "work"), cfg.site)
        assert isinstance(engine, PilotEngine)
        try:
            address = asyncio.run(engine.preflight())
            p = cfg.engine.pilot
            pilots = (
                f"pilots: {p.min_allocations}..{p.max_allocations} allocation(s) of {p.nodes_per_allocation} "
                f"node(s) x {p.slots_per_node} slot(s), walltime {p.walltime}; workers connect to {address}\n"
            )
        except EngineError as exc:
            problem(("engine", "pilot"), "engine.pilot", str(exc))
    listing = "".join(f"{n}: {d}\n" for n, d in described.items())
    finish(
        file,
        problems,
        f"{listing}{pilots}{file}: site {cfg.site!r} OK, {len(apps)} app(s), engine {cfg.engine.kind}",
        as_json,
        site=cfg.site,
        apps=described,
        engine=cfg.engine.kind,
    )


@site_app.command("status")
def site_status(
    file: SiteFile,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Allocations the site holds (pilot engines): state, Slurm job id, nodes, wall time left, workers, tasks."""
    import json
    import os
    import time

    from reflexarc.hpc_bridge.allocations import read_status

    cfg = _load(file)
    data = read_status(cfg.state_path) or {"site": cfg.site, "engine": cfg.engine.kind, "allocations": []}
    now = time.time()
    data["as_of"] = data.get("updated")
    pid = data.get("pid")
    alive = False
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except OSError:
            alive = False
    data["agent_running"] = alive
    for a in data["allocations"]:
        # Wall time left as of now, not as of the file's last write.
        end = a.get("end_at")
        if a.get("state") != "released" and isinstance(end, (int, float)):
            a["walltime_left_s"] = max(0.0, end - now)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    if not data["allocations"]:
        typer.echo(f"site {cfg.site}: engine {cfg.engine.kind} holds no allocations")
        return
    table = Table("allocation", "state", "job", "nodes", "left", "workers", "tasks", "reason", box=None)
    for a in data["allocations"]:
        left = a.get("walltime_left_s")
        table.add_row(
            a["name"],
            a["state"],
            str(a.get("job_id") or "-"),
            a.get("node_list") or str(a.get("nodes")),
            "-" if left is None else f"{left:.0f}s",
            str(a.get("workers", 0)),
            str(a.get("tasks_running", 0)),
            a.get("pending_reason") or a.get("reason") or "",
        )
    Console(width=200).print(table)
    age = now - float(data.get("updated") or now)
    typer.echo(
        f"{data.get('waiting_tasks', 0)} task(s) waiting, {data.get('free_slots', 0)} free slot(s); "
        f"as of {age:.0f}s ago" + ("" if alive else " (the site agent is not running)")
    )


@jobs_app.command("list")
def jobs_list(
    site: SiteOpt = Path("site.yaml"),
    status: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Jobs, most recently changed first, each with the reason for its state."""
    from rich.console import Console
    from rich.table import Table

    store = _store(site, create=False)
    if store is None:
        jobs, counts = [], {}
    else:
        try:
            jobs = store.list_jobs(status, limit)
            counts = store.counts()
        finally:
            store.close()
    if as_json:
        typer.echo(json.dumps({"jobs": [_job_json(j) for j in jobs], "counts": counts}))
        return
    table = Table("task", "app", "state", "attempt", "updated", "reason", box=None)
    for j in jobs:
        table.add_row(
            j.task_id,
            j.app,
            j.status.value,
            f"{j.attempt}/{j.max_retries + 1}",
            j.updated_at.strftime("%H:%M:%S"),
            j.reason,
        )
    Console(width=200).print(table)
    typer.echo("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no jobs")


def _job_json(job: Any) -> dict[str, Any]:
    return {
        "task_id": job.task_id,
        "app": job.app,
        "state": job.status.value,
        "reason": job.reason,
        "attempt": job.attempt,
        "max_attempts": job.max_retries + 1,
        "on_failure": job.on_failure.value,
        "updated_at": job.updated_at.isoformat(),
        "engine": job.engine,
        "native_id": job.native_id,
        "machine": job.machine,
        "depends_on": list(job.depends_on or []),
        "error": job.error,
        "workdir": job.workdir,
    }


@jobs_app.command("show")
def jobs_show(task_id: TaskArg, site: SiteOpt = Path("site.yaml"), as_json: JsonOpt = False) -> None:
    """One job: its request, every transition with its reason, and its output's tail."""
    store = _store(site, create=False)
    job = None
    try:
        job = store.get(task_id) if store is not None else None
        if job is None:
            typer.echo(f"no job {task_id!r} at this site (see: reflexarc jobs list)", err=True)
            raise typer.Exit(1)
        transitions = store.transitions(task_id)
    finally:
        if store is not None:
            store.close()
    log = Path(job.workdir) / "task.log" if job.workdir else None
    tail = log.read_text(errors="replace").splitlines()[-20:] if log is not None and log.exists() else []
    if as_json:
        typer.echo(
            json.dumps(
                {
                    **_job_json(job),
                    "args": job.request.args,
                    "transitions": [
                        {
                            "seq": t.seq,
                            "previous": t.previous,
                            "state": t.state,
                            "attempt": t.attempt,
                            "reason": t.reason,
                            "at": t.at.isoformat(),
                        }
                        for t in transitions
                    ],
                    "output_tail": tail,
                },
                default=str,
            )
        )
        return
    typer.echo(f"task      {job.task_id}\napp       {job.app}\nstate     {job.status.value}: {job.reason}")
    typer.echo(f"attempt   {job.attempt} of at most {job.max_retries + 1} (on_failure={job.on_failure.value})")
    typer.echo(f"engine    {job.engine or '-'} {job.native_id or ''}\nmachine   {job.machine or '-'}")
    if job.depends_on:
        typer.echo(f"needs     {', '.join(job.depends_on)}")
    if job.error:
        typer.echo(f"error     {job.error}")
    typer.echo(f"args      {job.request.args}")
    typer.echo("history:")
    for t in transitions:
        typer.echo(
            f"  {t.at:%Y-%m-%d %H:%M:%S}  #{t.seq} {t.previous or '-':>9} -> {t.state:<9} "
            f"(attempt {t.attempt}) {t.reason}"
        )
    if tail:
        typer.echo(f"output ({log}):")
        for line in tail:
            typer.echo(f"  {line}")


@jobs_app.command("cancel")
def jobs_cancel(task_id: TaskArg, site: SiteOpt = Path("site.yaml")) -> None:
    """Cancel a job (a running one is stopped by the site agent within a second or two)."""
    store = _store(site)
    try:
        state = store.request_cancel(task_id, "cancelled by user (reflexarc jobs cancel)")
    except KeyError:
        typer.echo(f"no job {task_id!r} at this site", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if state.value == "cancelled":
        typer.echo(f"{task_id}: cancelled")
    elif state.finished:
        typer.echo(f"{task_id}: already {state.value}; nothing to cancel")
    else:
        typer.echo(f"{task_id}: cancel requested; the site agent stops it (state now {state.value})")


@jobs_app.command("retry")
def jobs_retry(task_id: TaskArg, site: SiteOpt = Path("site.yaml")) -> None:
    """Queue a failed, timed-out or cancelled job again."""
    from reflexarc.hpc_bridge.states import TransitionError

    store = _store(site)
    try:
        store.retry(task_id, "retried by user (reflexarc jobs retry)")
    except KeyError:
        typer.echo(f"no job {task_id!r} at this site", err=True)
        raise typer.Exit(1) from None
    except TransitionError as exc:
        typer.echo(f"{task_id}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    typer.echo(f"{task_id}: queued again")


@env_app.command("pack")
def env_pack(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="app name from site.yaml")],
    site: SiteOpt = Path("site.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Build (or reuse) the packed environment of an app and print its tarball."""
    import time

    from reflexarc.hpc_bridge.apps import AppError
    from reflexarc.hpc_bridge.envpack import EnvError, EnvManager
    from reflexarc.hpc_bridge.registry import resolve_apps

    cfg = _load(site)
    try:
        apps = resolve_apps(cfg, import_code=False)
        if app_name not in apps:
            typer.echo(f"unknown app {app_name!r}; known: {', '.join(sorted(apps)) or 'none'}", err=True)
            raise typer.Exit(1)
        mgr = EnvManager(cfg.env_cache_path)
        t0 = time.monotonic()
        packed = _with_progress(
            f"packing {app_name} (creating the environment, installing, archiving)",
            lambda: mgr.pack(app_name, apps[app_name]),
            quiet=as_json,
        )
    except (AppError, EnvError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "app": app_name,
                    "tarball": str(packed.tarball),
                    "cached": packed.cached,
                    "seconds": round(time.monotonic() - t0, 3),
                    "requirements": list(packed.spec.requirements),
                }
            )
        )
        return
    how = "reused cached" if packed.cached else "built"
    typer.echo(f"{how} {packed.tarball} in {time.monotonic() - t0:.2f}s")
    for req in packed.spec.requirements:
        typer.echo(f"  {req}")


def _with_progress(what: str, work: Any, quiet: bool = False) -> Any:
    """Run ``work()`` with a live spinner and elapsed time on stderr when it is a terminal (packing takes minutes)."""
    if quiet or not sys.stderr.isatty():
        return work()
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        progress.add_task(what, total=None)
        return work()


@env_app.command("list")
def env_list(site: SiteOpt = Path("site.yaml"), as_json: JsonOpt = False) -> None:
    """Packed environments in the site's cache."""
    from reflexarc.hpc_bridge.envpack import EnvManager

    cfg = _load(site)
    envs = EnvManager(cfg.env_cache_path).list()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "hash": e.hash,
                        "size_bytes": e.size,
                        "created": e.created.isoformat(),
                        "apps": list(e.apps),
                        "requirements": list(e.requirements),
                    }
                    for e in envs
                ]
            )
        )
        return
    if not envs:
        typer.echo(f"no packed environments in {cfg.env_cache_path}")
    for e in envs:
        typer.echo(
            f"{e.hash[:16]}  {e.size / 1e6:7.1f} MB  {e.created:%Y-%m-%d %H:%M}  "
            f"{', '.join(e.apps) or '-'}  {' '.join(e.requirements)}"
        )


def main() -> None:
    """``python -m reflexarc.hpc_bridge`` entry: site, jobs and env verbs in one Typer app."""
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(site_app, name="site")
    root.add_typer(jobs_app, name="jobs")
    root.add_typer(env_app, name="env")
    root(args=sys.argv[1:])
