"""``site.yaml``: one HPC site — its name, apps, engine, database and resources.

Only ``site`` and ``apps`` are read by other tiers (the trigger engine checks
that a trigger names a known app); everything else is the site agent's.
See ``docs/hpc_bridge.md`` for every field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from reflexarc.config import HasMetrics, KafkaSettings, StrictModel, load_yaml
from reflexarc.hpc_bridge.apps import AppSpec, SiteResources
from reflexarc.topics import check_name


def _default_namespace() -> str:
    return os.environ.get("RX_NAMESPACE", "rx")


def mpi_layout_problem(
    ranks: int, ranks_per_node: int | None, cpus_per_rank: int, pilot: PilotSettings
) -> tuple[str, str] | None:
    """``(field, why)`` when ``ranks`` MPI ranks cannot fit one allocation of ``pilot`` (``None``: they fit)."""
    per_node = pilot.slots_per_node // max(1, cpus_per_rank)
    if per_node < 1:
        return "ranks", f"one rank needs {cpus_per_rank} core(s), more than the {pilot.slots_per_node} of one node"
    if ranks_per_node is not None and ranks_per_node > per_node:
        return (
            "ranks_per_node",
            f"{ranks_per_node} ranks x {cpus_per_rank} core(s) is more than the "
            f"{pilot.slots_per_node} slot(s) of one node",
        )
    rpn = ranks_per_node or per_node
    nodes = -(-ranks // rpn)
    if nodes > pilot.nodes_per_allocation:
        return ("ranks", f"{ranks} ranks ({rpn} per node) need {nodes} node(s): larger than the allocation")
    return None


class LocalEngineSettings(StrictModel):
    """The ``local`` engine: a pool of worker processes on this machine."""

    max_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class AdaptSettings(StrictModel):
    """Elastic pilot workers: scale between ``minimum`` and ``maximum`` with the backlog."""

    minimum: int = Field(0, ge=0)
    maximum: int = Field(4, ge=1)
    idle_timeout_s: float = Field(30.0, gt=0, description="retire a worker idle this long")
    interval_s: float = Field(1.0, gt=0, description="how often to re-evaluate the target")

    @model_validator(mode="after")
    def _order(self) -> AdaptSettings:
        if self.minimum > self.maximum:
            raise ValueError(f"minimum ({self.minimum}) is larger than maximum ({self.maximum})")
        return self


_WALLTIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")


def walltime_seconds(text: str) -> int:
    """Seconds in a batch wall time written ``[D-]HH:MM:SS`` (raises ``ValueError`` otherwise)."""
    m = _WALLTIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"walltime {text!r} is not [D-]HH:MM:SS (e.g. 01:30:00)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    if minutes > 59 or seconds > 59:
        raise ValueError(f"walltime {text!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"walltime {text!r} must be longer than zero")
    return total


class PilotSettings(StrictModel):
    """Elastic, wall-time-aware allocations (pilot jobs) whose workers run the site's tasks.

    Shared by the dask-jobqueue and Parsl engines; see ``docs/hpc_bridge.md`` (Pilots).
    """

    scheduler: Literal["slurm"] = Field("slurm", description="batch scheduler holding the allocations")
    min_allocations: int = Field(0, ge=0, description="allocations kept even when idle")
    max_allocations: int = Field(2, ge=1, description="allocations accepting tasks at once")
    nodes_per_allocation: int = Field(1, ge=1)
    cores_per_node: int = Field(1, ge=1, description="cores asked for on each node; one task slot per core")
    memory_per_node: str | None = Field(None, description="memory asked for on each node, e.g. 8GB")
    gpus_per_node: int = Field(0, ge=0, description="GPUs asked for on each node (--gres=gpu:N)")
    walltime: str = Field("01:00:00", description="wall time of each allocation, [D-]HH:MM:SS")
    idle_timeout_s: float = Field(300.0, gt=0, description="release an allocation idle this long")
    walltime_margin_s: float = Field(
        10.0, ge=0, description="a task starts only where wall time left >= its timeout + this margin"
    )
    drain_s: float = Field(60.0, ge=0, description="no new task on an allocation with less wall time left")
    connect_timeout_s: float = Field(
        300.0, gt=0, description="release a running allocation whose workers have not connected by then"
    )
    partition: str | None = None
    account: str | None = None
    job_directives: list[str] = Field(default_factory=list, description="extra #SBATCH options, e.g. --qos=high")
    worker_init: list[str] = Field(
        default_factory=list, description="shell lines run before the workers start (module load ...)"
    )
    address: str | None = Field(
        None, description="address of this host that workers connect back to (default: interface, then 127.0.0.1)"
    )
    interface: str | None = Field(None, description="network interface whose address workers connect to (ib0, hsn0)")
    python: str | None = Field(None, description="Python on the compute nodes (default: this one)")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment for scheduler commands (e.g. SLURM_CONF)"
    )
    poll_interval_s: float = Field(0.5, gt=0, description="how often the manager re-plans")
    queue_poll_s: float = Field(10.0, gt=0, description="how often the scheduler's queue is read")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        walltime_seconds(v)
        return v

    @model_validator(mode="after")
    def _pilot_order(self) -> PilotSettings:
        if self.min_allocations > self.max_allocations:
            raise ValueError(
                f"min_allocations ({self.min_allocations}) is larger than max_allocations ({self.max_allocations})"
            )
        if self.address and self.interface:
            raise ValueError("give either 'address' or 'interface', not both")
        return self

    @property
    def walltime_s(self) -> int:
        """The allocation wall time in seconds."""
        return walltime_seconds(self.walltime)

    @property
    def slots_per_node(self) -> int:
        """Task slots on each node of an allocation."""
        return self.cores_per_node

    @property
    def slots_per_allocation(self) -> int:
        """Task slots in one allocation."""
        return self.slots_per_node * self.nodes_per_allocation


# dask-jobqueue's own names for the fields of a jobqueue cluster, accepted as aliases.
_JOBQUEUE_ALIASES = {
    "cores": "cores_per_node",
    "queue": "partition",
    "memory": "memory_per_node",
    "job_extra_directives": "job_directives",
}


class JobqueueSettings(PilotSettings):
    """dask-jobqueue pilots: each allocation runs Dask workers that connect to the agent's scheduler."""

    processes: int | None = Field(
        None, ge=1, description="Dask worker processes per node (default: one per core, one thread each)"
    )
    port: int = Field(0, ge=0, le=65535, description="scheduler port workers connect to (0: any free port)")
    death_timeout_s: float = Field(60.0, gt=0, description="a worker without its scheduler this long exits")
    local_directory: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: object) -> object:
        if isinstance(data, dict):
            for old, new in _JOBQUEUE_ALIASES.items():
                if old in data and new not in data:
                    data = {**data, new: data[old]}
                    del data[old]
        return data

    @model_validator(mode="after")
    def _processes(self) -> JobqueueSettings:
        if self.processes is not None and self.cores_per_node % self.processes:
            raise ValueError(
                f"cores_per_node ({self.cores_per_node}) is not a multiple of processes ({self.processes})"
            )
        return self


class ParslEngineSettings(PilotSettings):
    """Parsl HighThroughputExecutor pilots: one executor (interchange) per allocation, workers pull tasks."""

    launcher: Literal["srun", "single"] = Field("srun", description="how a block starts its worker pools")
    cores_per_worker: float = Field(1.0, gt=0, description="cores per Parsl worker process")
    worker_port_range: tuple[int, int] = Field(
        (54000, 55000), description="ports the interchanges listen on for workers (open them to compute nodes)"
    )
    heartbeat_s: int = Field(
        5, ge=1, description="worker<->interchange heartbeat; also how soon a killed worker process is replaced"
    )
    max_running: int | None = Field(None, ge=1, description="tasks handed to the engine at once (default: all slots)")

    @model_validator(mode="after")
    def _ports(self) -> ParslEngineSettings:
        low, high = self.worker_port_range
        if not 0 < low <= high <= 65535:
            raise ValueError(f"worker_port_range {list(self.worker_port_range)} is not a port range")
        if self.launcher == "single" and self.nodes_per_allocation > 1:
            raise ValueError("launcher: single starts workers on the first node only; use srun for several nodes")
        return self

    @property
    def slots_per_node(self) -> int:
        """Parsl worker processes on each node."""
        return max(1, int(self.cores_per_node // self.cores_per_worker))


class DaskEngineSettings(StrictModel):
    """The ``dask`` engine: a ``distributed`` client on one of three kinds of cluster."""

    cluster: Literal["local", "address", "jobqueue"] = "local"
    address: str | None = Field(None, description="scheduler address for cluster: address")
    n_workers: int = Field(2, ge=0, description="LocalCluster workers (ignored with adapt)")
    threads_per_worker: int = Field(1, ge=1)
    jobqueue: JobqueueSettings | None = None
    adapt: AdaptSettings | None = None
    max_running: int = Field(64, ge=1, description="tasks handed to Dask at once")

    @model_validator(mode="after")
    def _needs(self) -> DaskEngineSettings:
        if self.cluster == "address" and not self.address:
            raise ValueError("cluster: address needs 'address' (e.g. tcp://127.0.0.1:8786)")
        if self.jobqueue is not None and "cluster" not in self.model_fields_set:
            # `dask: {jobqueue: {...}}` alone means a jobqueue cluster.
            self.cluster = "jobqueue"
        if self.cluster == "jobqueue" and self.jobqueue is None:
            self.jobqueue = JobqueueSettings()
        if self.cluster == "jobqueue" and self.adapt is not None:
            raise ValueError(
                "adapt applies to cluster: local; jobqueue pilots scale with "
                "jobqueue.min_allocations, max_allocations and idle_timeout_s"
            )
        return self


class BatchEngineSettings(StrictModel):
    """The ``batch`` engine: one batch job per task through PSI/J."""

    scheduler: Literal["slurm", "pbs", "lsf", "local"] = "slurm"
    queue: str | None = None
    account: str | None = None
    poll_interval_s: float = Field(1.0, gt=0, description="how often the scheduler is asked")
    max_running: int = Field(32, ge=1, description="jobs in the scheduler at once")
    python: str | None = Field(None, description="Python on the compute nodes (default: this one)")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment for scheduler commands (e.g. SLURM_CONF)"
    )


class EngineSettings(StrictModel):
    """Which engine runs the tasks, and its settings."""

    kind: Literal["local", "dask", "batch", "parsl"] = "local"
    local: LocalEngineSettings = Field(default_factory=LocalEngineSettings)
    dask: DaskEngineSettings = Field(default_factory=DaskEngineSettings)
    batch: BatchEngineSettings = Field(default_factory=BatchEngineSettings)
    parsl: ParslEngineSettings = Field(default_factory=ParslEngineSettings)

    @property
    def pilot(self) -> PilotSettings | None:
        """The pilot (allocation) settings of the engine in use, if it holds allocations."""
        if self.kind == "parsl":
            return self.parsl
        if self.kind == "dask" and self.dask.cluster == "jobqueue":
            return self.dask.jobqueue
        return None

    def pilot_field(self) -> str:
        """Where the pilot settings are in site.yaml (for error messages)."""
        return "engine.parsl" if self.kind == "parsl" else "engine.dask.jobqueue"


class ResultSettings(StrictModel):
    """How results travel: small inline, large by reference (claim check)."""

    inline_max_bytes: int = Field(64 * 1024, ge=0, description="larger results go by reference")
    store: str | None = Field(None, description="directory for large results (default: STATE/results)")


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ComposeSlurmSettings(StrictModel):
    """How the ``slurm`` compose driver reaches the scheduler."""

    env: dict[str, str] = Field(default_factory=dict, description="environment for Slurm commands (e.g. SLURM_CONF)")
    partition: str | None = None
    account: str | None = None
    start_timeout_s: float = Field(60.0, gt=0, description="give up on a holder job not running after this")


class ComposeSettings(StrictModel):
    """Elastic composed machines for tasks whose resources exceed what the site offers."""

    pools: str = Field(description="pools file (racks, devices, token digests); relative to site.yaml")
    database: str | None = Field(
        None, description="composer database: SQLAlchemy URL or SQLite path (default: STATE/compose.db)"
    )
    driver: Literal["inventory", "slurm"] = Field(
        "inventory", description="inventory: logical, tasks run on the site engine; slurm: inside the allocation"
    )
    token_env: str = Field("RX_COMPOSE_TOKEN", description="environment variable holding the agent's compose token")
    idle_timeout_s: float = Field(300.0, gt=0, description="free a composed machine idle this long")
    max_machines: int = Field(4, ge=1, description="composed machines this site holds at once")
    rack: str | None = Field(None, description="preferred rack for placement")
    free_on_stop: bool = Field(True, description="free idle machines when the agent stops cleanly")
    slurm: ComposeSlurmSettings = Field(default_factory=ComposeSlurmSettings)

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME_RE.match(v):
            raise ValueError(f"{v!r} is not an environment variable name (the token itself never goes in YAML)")
        return v


class PresenceSettings(StrictModel):
    """The site's heartbeat on ``{ns}.sites``: what it offers, its backlog and free capacity."""

    enabled: bool = True
    interval_s: float = Field(5.0, gt=0, description="seconds between heartbeats (3 missed: the site is stale)")


class SiteConfig(HasMetrics):
    """A whole ``site.yaml``."""

    site: str = Field(description="the site's name; tasks arrive on rx.tasks.<site>")
    apps: dict[str, AppSpec] = Field(default_factory=dict)
    modules: list[str] = Field(default_factory=list, description="Python modules whose @app functions become apps")
    namespace: str = Field(default_factory=_default_namespace)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings.from_env)
    database: str | None = Field(
        None, description="SQLAlchemy URL (default: sqlite under state_dir); postgresql://... works"
    )
    state_dir: str | None = Field(None, description="work dirs, results, envs (default: .rx/site-<site>)")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    resources: SiteResources = Field(
        default_factory=lambda: SiteResources(cpus=os.cpu_count() or 1),
        description="what the site offers one task (chooses @implement variants)",
    )
    results: ResultSettings = Field(default_factory=ResultSettings)
    env_cache: str | None = Field(None, description="packed-environment tarballs (default: STATE/envs)")
    max_backlog: int = Field(10000, ge=1, description="stop taking requests above this many waiting jobs")
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    compose: ComposeSettings | None = Field(
        None, description="compose machines for tasks that need more than `resources` (see docs/compose.md)"
    )

    # Where the YAML file was, so relative paths mean "next to site.yaml".
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Folder relative paths are resolved against (the site file's)."""
        return self._base_dir

    @base_dir.setter
    def base_dir(self, value: Path) -> None:
        self._base_dir = Path(value)

    @field_validator("site")
    @classmethod
    def _site_name(cls, v: str) -> str:
        return check_name(v, "site")

    @field_validator("apps")
    @classmethod
    def _app_names(cls, v: dict[str, AppSpec]) -> dict[str, AppSpec]:
        for name in v:
            check_name(name, "app name")
        return v

    @model_validator(mode="after")
    def _mpi_fits_allocation(self) -> SiteConfig:
        # An MPI app on a pilot engine reserves its ranks inside one allocation: say so now
        # rather than leave its tasks waiting for an allocation that can never hold them.
        pilot = self.engine.pilot
        if pilot is None:
            return self
        where = self.engine.pilot_field()
        for name, spec in self.apps.items():
            if spec.mpi is None:
                continue
            problem = mpi_layout_problem(spec.mpi.ranks, spec.mpi.ranks_per_node, spec.cpus, pilot)
            if problem:
                field, why = problem
                raise ValueError(
                    f"apps.{name}.mpi.{field}: {why} ({where}: {pilot.nodes_per_allocation} "
                    f"node(s) x {pilot.slots_per_node} slot(s) per allocation)"
                )
        return self

    def path(self, value: str | None, default: str) -> Path:
        """Resolve ``value`` (or ``default``) relative to the site file's folder."""
        p = Path(os.path.expanduser(value or default))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def state_path(self) -> Path:
        """Folder for job work dirs, results and the default database."""
        return self.path(self.state_dir, f".rx/site-{self.site}")

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the job database."""
        if self.database:
            return self.database
        return f"sqlite:///{self.state_path / 'jobs.db'}"

    @property
    def results_path(self) -> Path:
        """Where large results are stored."""
        return self.path(self.results.store, str(self.state_path / "results"))

    @property
    def env_cache_path(self) -> Path:
        """Where packed environments are cached."""
        return self.path(self.env_cache, str(self.state_path / "envs"))

    @property
    def compose_pools_path(self) -> Path | None:
        """The composer's pools file, if ``compose`` is configured."""
        return self.path(self.compose.pools, "pools.yaml") if self.compose else None

    @property
    def compose_database(self) -> str | None:
        """The composer's database (URL or SQLite path), if ``compose`` is configured."""
        if self.compose is None:
            return None
        db = self.compose.database
        if db and "://" in db:
            return db
        return str(self.path(db, str(self.state_path / "compose.db")))


def load_site(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate ``site.yaml``; errors name the file, line and field."""
    p = Path(path)
    cfg = load_yaml(p, SiteConfig)
    cfg.base_dir = p.resolve().parent
    return cfg
