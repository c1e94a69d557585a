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

from reflexarc.config import KafkaSettings, StrictModel, load_yaml
from reflexarc.hpc_bridge.apps import AppSpec, SiteResources
from reflexarc.topics import check_name


def _default_namespace() -> str:
    return os.environ.get("RX_NAMESPACE", "rx")


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


class JobqueueSettings(StrictModel):
    """A dask-jobqueue cluster: pilot jobs on a batch scheduler, many tasks per allocation."""

    scheduler: Literal["slurm", "pbs", "lsf"] = "slurm"
    cores: int = Field(1, ge=1)
    processes: int = Field(1, ge=1)
    memory: str = "1GB"
    walltime: str = "00:30:00"
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    local_directory: str | None = None


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
        if self.cluster == "jobqueue" and self.jobqueue is None:
            self.jobqueue = JobqueueSettings()
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

    kind: Literal["local", "dask", "batch"] = "local"
    local: LocalEngineSettings = Field(default_factory=LocalEngineSettings)
    dask: DaskEngineSettings = Field(default_factory=DaskEngineSettings)
    batch: BatchEngineSettings = Field(default_factory=BatchEngineSettings)


class ResultSettings(StrictModel):
    """How results travel: small inline, large by reference (claim check)."""

    inline_max_bytes: int = Field(64 * 1024, ge=0, description="larger results go by reference")
    store: str | None = Field(None, description="directory for large results (default: STATE/results)")


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ComposeSlurmSettings(StrictModel):
    """How the ``slurm`` compose driver reaches the scheduler."""

    env: dict[str, str] = Field(
        default_factory=dict, description="environment for Slurm commands (e.g. SLURM_CONF)"
    )
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
    token_env: str = Field(
        "RX_COMPOSE_TOKEN", description="environment variable holding the agent's compose token"
    )
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


class SiteConfig(StrictModel):
    """A whole ``site.yaml``."""

    site: str = Field(description="the site's name; tasks arrive on rx.tasks.<site>")
    apps: dict[str, AppSpec] = Field(default_factory=dict)
    modules: list[str] = Field(
        default_factory=list, description="Python modules whose @app functions become apps"
    )
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
