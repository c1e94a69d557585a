"""Data model of composable resources: devices in racks, specs, machines, identities.

Everything here is a pydantic v2 model so that the pools file, the
compositions file and the database rows are all validated by the same code.
"""

from __future__ import annotations

import io
import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

# How rich itself renders into Jupyter output cells.
_HTML_FORMAT = (
    '<pre style="white-space:pre;overflow-x:auto;line-height:normal;'
    "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">{code}</pre>"
)


def render_text(renderable: Any, width: int = 110) -> str:
    """Plain text of a rich renderable (no colour codes): for terminals and IPython's text repr."""
    text = io.StringIO()
    console = Console(file=text, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return text.getvalue().rstrip("\n")


def render_html(renderable: Any, width: int = 110) -> str:
    """HTML of a rich renderable (inline styles), as a notebook output cell shows it."""
    console = Console(file=io.StringIO(), record=True, width=width, color_system="truecolor", force_jupyter=False)
    console.print(renderable)
    return console.export_html(inline_styles=True, code_format=_HTML_FORMAT)


class NotebookRepr:
    """Mixin: objects with ``__rich__`` display as their table in Jupyter/IPython.

    Jupyter asks for ``_repr_html_`` (rich's table as HTML), the IPython terminal
    for ``_repr_pretty_`` (the table as text); a rich console uses ``__rich__``.
    """

    def _repr_html_(self) -> str:
        return render_html(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"<{type(self).__name__}>" if cycle else render_text(self))


#: Device kinds. ``nvme`` and ``storage`` are both storage (they add up to
#: ``storage_gb``); the two names exist because inventories say either.
DeviceKind = Literal["cpu", "gpu", "nvme", "storage", "nic"]
STORAGE_KINDS: frozenset[str] = frozenset({"nvme", "storage"})

#: A machine name is used as a key in files and on the command line, so keep
#: it to characters that need no quoting anywhere.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    """Base: unknown keys are errors (a typo in YAML must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


class Device(_Strict):
    """One disaggregated device in a pool.

    Kind-specific attributes are optional fields rather than a union of
    classes so that the YAML stays flat and errors name one obvious field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    kind: DeviceKind
    rack: str
    #: Devices can only be combined inside one fabric domain (a PCIe/CXL
    #: switch fabric). Defaults to the rack's domain, which defaults to the rack.
    fabric: str
    cores: int | None = Field(default=None, gt=0, description="cpu: core count")
    memory_gb: int | None = Field(default=None, ge=0, description="cpu: memory of the node")
    node: str | None = Field(default=None, description="cpu: scheduler node name (Slurm)")
    model: str | None = Field(default=None, description="gpu: model string, e.g. A100")
    gres_type: str | None = Field(default=None, description="gpu: Slurm GRES type, e.g. a100")
    capacity_gb: int | None = Field(default=None, gt=0, description="nvme/storage: capacity")
    speed_gbps: int | None = Field(default=None, gt=0, description="nic: link speed")
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> Device:
        """Each kind must carry the attribute placement depends on."""
        if self.kind == "cpu" and self.cores is None:
            raise ValueError("a cpu device needs 'cores'")
        if self.kind == "gpu" and not self.model:
            raise ValueError("a gpu device needs 'model'")
        if self.kind in STORAGE_KINDS and self.capacity_gb is None:
            raise ValueError(f"a {self.kind} device needs 'capacity_gb'")
        return self

    @property
    def is_storage(self) -> bool:
        """True for nvme and storage devices."""
        return self.kind in STORAGE_KINDS

    @property
    def node_name(self) -> str:
        """The scheduler node name of a compute device (its id unless set)."""
        return self.node or self.id

    def summary(self) -> str:
        """A short human description, e.g. ``gpu A100`` or ``nvme 1000 GB``."""
        if self.kind == "cpu":
            mem = f", {self.memory_gb} GB" if self.memory_gb else ""
            return f"cpu {self.cores} cores{mem}"
        if self.kind == "gpu":
            return f"gpu {self.model}"
        if self.is_storage:
            return f"{self.kind} {self.capacity_gb} GB"
        return f"nic {self.speed_gbps} Gb/s" if self.speed_gbps else "nic"


class CompositionSpec(_Strict):
    """What a machine needs. A machine always has exactly one compute node."""

    cpus: int = Field(default=1, ge=1, description="cores of the compute node")
    gpus: int = Field(default=0, ge=0)
    gpu_model: str | None = Field(default=None, description="required GPU model, any if unset")
    memory_gb: int = Field(default=0, ge=0, description="memory of the compute node")
    storage_gb: int = Field(default=0, ge=0, description="total nvme/storage capacity")
    nics: int = Field(default=0, ge=0)
    rack: str | None = Field(default=None, description="preferred rack (falls back to others)")

    def describe(self) -> str:
        """One line, e.g. ``32 cores, 2 gpu(model=A100), 1000 GB storage``."""
        parts = [f"{self.cpus} cores"]
        if self.memory_gb:
            parts.append(f"{self.memory_gb} GB memory")
        if self.gpus:
            model = f"(model={self.gpu_model})" if self.gpu_model else ""
            parts.append(f"{self.gpus} gpu{model}")
        if self.storage_gb:
            parts.append(f"{self.storage_gb} GB storage")
        if self.nics:
            parts.append(f"{self.nics} nic")
        if self.rack:
            parts.append(f"rack {self.rack} preferred")
        return ", ".join(parts)


class MachineState(StrEnum):
    """Lifecycle of a machine.

    ``composing``/``freeing`` exist because the driver runs outside the
    database transaction (a Slurm allocation takes seconds and must not hold
    the write lock); a machine seen in them after a crash needs a manual free.
    """

    COMPOSING = "composing"
    COMPOSED = "composed"
    FREEING = "freeing"
    FREED = "freed"
    FAILED = "failed"


class Machine(NotebookRepr, BaseModel):
    """A composed machine: the devices it holds and how the driver realised it."""

    id: str
    name: str | None = None
    owner: str
    spec: CompositionSpec
    devices: list[Device]
    state: MachineState
    driver: str
    realisation: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    freed_at: datetime | None = None
    error: str | None = None

    @property
    def device_ids(self) -> list[str]:
        """Ids of the assigned devices, compute node first."""
        return [d.id for d in self.devices]

    @property
    def node(self) -> Device | None:
        """The compute node of this machine."""
        return next((d for d in self.devices if d.kind == "cpu"), None)

    def __rich__(self) -> Table:
        """Render as a two-column table (for notebooks and the CLI)."""
        title = f"machine {self.name or self.id}"
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        table.add_row("id", self.id)
        if self.name:
            table.add_row("name", self.name)
        table.add_row("owner", self.owner)
        table.add_row("state", self.state.value)
        table.add_row("spec", self.spec.describe())
        table.add_row("driver", self.driver)
        table.add_row("created", self.created_at.isoformat(timespec="seconds"))
        if self.freed_at:
            table.add_row("freed", self.freed_at.isoformat(timespec="seconds"))
        for dev in self.devices:
            table.add_row(dev.id, f"{dev.summary()}  [rack {dev.rack}, fabric {dev.fabric}]")
        for key, value in self.realisation.items():
            table.add_row(f"{self.driver}.{key}", str(value))
        if self.error:
            table.add_row("error", self.error)
        return table


class Identity(BaseModel):
    """Who asks. Resolved from a token (see ``Composer.identity_from_token``)."""

    model_config = ConfigDict(frozen=True)

    user: str = Field(min_length=1)
    is_admin: bool = False


class TokenEntry(_Strict):
    """A token in the pools file: only its sha256 is stored, never the token."""

    user: str = Field(min_length=1)
    sha256: str
    admin: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        """Accept only a lowercase hex sha256 digest (64 characters)."""
        value = value.strip().lower()
        if not _SHA256.match(value):
            raise ValueError("must be the sha256 hex digest of the token (64 hex characters)")
        return value


class AuditEntry(BaseModel):
    """One row of the audit log."""

    id: int
    at: datetime
    user: str
    action: str
    machine_id: str | None
    outcome: Literal["ok", "refused", "failed"]
    detail: str = ""


class PoolRow(BaseModel):
    """Free/used devices of one kind in one rack."""

    rack: str
    fabric: str
    kind: str
    #: the GPU model of a gpu row (GPUs are counted per model); None for other kinds.
    model: str | None = None
    total: int
    used: int
    #: cores for cpu, GB for storage; 0 where it does not apply.
    capacity_total: int = 0
    capacity_free: int = 0

    @property
    def free(self) -> int:
        """Devices not assigned to any machine."""
        return self.total - self.used


class PoolsView(NotebookRepr, BaseModel):
    """What ``Composer.pools()`` returns: one row per rack and kind."""

    rows: list[PoolRow]

    def free(self, kind: str, rack: str | None = None) -> int:
        """Free device count of a kind (storage kinds together), optionally in one rack."""
        kinds = STORAGE_KINDS if kind in STORAGE_KINDS else {kind}
        return sum(r.free for r in self.rows if r.kind in kinds and rack in (None, r.rack))

    def used(self, kind: str | None = None) -> int:
        """Used device count, of one kind or of all."""
        return sum(r.used for r in self.rows if kind in (None, r.kind))

    def total(self, kind: str | None = None) -> int:
        """Device count, of one kind or of all."""
        return sum(r.total for r in self.rows if kind in (None, r.kind))

    def __rich__(self) -> Table:
        """Render as a table: rack, fabric, kind, free/total, capacity."""
        table = Table(title="pools", title_justify="left")
        for col in ("rack", "fabric", "kind", "model", "free", "used", "total", "capacity free/total"):
            table.add_column(col, justify="right" if col in ("free", "used", "total") else "left")
        for r in self.rows:
            unit = {"cpu": " cores", "nvme": " GB", "storage": " GB"}.get(r.kind)
            cap = f"{r.capacity_free}/{r.capacity_total}{unit}" if unit else ""
            free_style = "green" if r.free else "red"
            table.add_row(
                r.rack, r.fabric, r.kind, r.model or "", f"[{free_style}]{r.free}[/]", str(r.used), str(r.total), cap
            )
        return table


class NamedComposition(_Strict):
    """One entry of a compositions file: a user-chosen name and a spec."""

    name: str = Field(pattern=NAME_PATTERN)
    spec: CompositionSpec
    #: Devices to reuse when they are all free (what ``export`` writes);
    #: otherwise an equivalent placement is made.
    devices: list[str] = Field(default_factory=list)


class CompositionsFile(_Strict):
    """The declarative file read by ``apply`` and written by ``export``."""

    version: Literal[1] = 1
    kind: Literal["Compositions"] = "Compositions"
    machines: list[NamedComposition] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> CompositionsFile:
        """A name may appear once: the file describes a set of machines."""
        seen: set[str] = set()
        for m in self.machines:
            if m.name in seen:
                raise ValueError(f"machine name {m.name!r} appears twice")
            seen.add(m.name)
        return self


class ApplyResult(BaseModel):
    """What ``apply`` did for one named composition."""

    name: str
    action: Literal["created", "unchanged", "replaced", "pruned"]
    machine_id: str


def machines_table(machines: list[Machine], title: str = "machines") -> Table:
    """A rich table of several machines (one line each)."""
    table = Table(title=title, title_justify="left")
    for col in ("id", "name", "owner", "state", "spec", "devices", "created"):
        table.add_column(col)
    for m in machines:
        table.add_row(
            m.id,
            m.name or "",
            m.owner,
            m.state.value,
            m.spec.describe(),
            ", ".join(m.device_ids),
            m.created_at.isoformat(timespec="seconds"),
        )
    return table


class MachineList(NotebookRepr, list[Machine]):
    """A list of machines that displays as one table (``list_machines()`` in a notebook)."""

    def __rich__(self) -> Table:
        """One line per machine."""
        return machines_table(list(self))
