"""The pools file: racks of devices, fabric domains and (hashed) tokens.

Example (``pools.yaml``)::

    racks:
      r1:
        fabric: f1                 # optional; a rack is its own domain by default
        devices:
          - {id: r1-n1, kind: cpu, cores: 64, memory_gb: 512, node: node001}
          - {id: r1-gpu, kind: gpu, model: A100, count: 4}   # r1-gpu-1 .. r1-gpu-4
          - {id: r1-nvme1, kind: nvme, capacity_gb: 1000}
          - {id: r1-nic1, kind: nic, speed_gbps: 100}
    tokens:
      - {user: alice, sha256: 2bd806c9...}   # sha256 of alice's token
      - {user: ops, sha256: 5e884898..., admin: true}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model import DeviceKind, TokenEntry


class DeviceEntry(BaseModel):
    """A device (or ``count`` identical devices) as written in a rack."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    kind: DeviceKind
    count: int = Field(default=1, ge=1, description="expand to id-1 .. id-N")
    fabric: str | None = None
    cores: int | None = Field(default=None, gt=0)
    memory_gb: int | None = Field(default=None, ge=0)
    node: str | None = None
    model: str | None = None
    gres_type: str | None = None
    capacity_gb: int | None = Field(default=None, gt=0)
    speed_gbps: int | None = Field(default=None, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> DeviceEntry:
        """Check kind-specific fields here so the error points at the YAML entry."""
        if self.kind == "cpu" and self.cores is None:
            raise ValueError("a cpu device needs 'cores'")
        if self.kind == "gpu" and not self.model:
            raise ValueError("a gpu device needs 'model'")
        if self.kind in ("nvme", "storage") and self.capacity_gb is None:
            raise ValueError(f"a {self.kind} device needs 'capacity_gb'")
        if self.node is not None and self.count > 1:
            raise ValueError("'node' names one scheduler node; it cannot be used with 'count'")
        return self


class RackEntry(BaseModel):
    """A rack: its default fabric domain and its devices."""

    model_config = ConfigDict(extra="forbid")

    fabric: str | None = None
    devices: list[DeviceEntry] = Field(default_factory=list)


class PoolsConfig(BaseModel):
    """The whole pools file."""

    model_config = ConfigDict(extra="forbid")

    racks: dict[str, RackEntry] = Field(default_factory=dict)
    tokens: list[TokenEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> PoolsConfig:
        """Device ids are database keys: they must be unique across all racks."""
        seen: dict[str, str] = {}
        for rack, device_id in self._expanded_ids():
            if device_id in seen:
                raise ValueError(f"device id {device_id!r} appears in rack {seen[device_id]!r} and {rack!r}")
            seen[device_id] = rack
        return self

    def _expanded_ids(self) -> list[tuple[str, str]]:
        """(rack, device id) after ``count`` expansion."""
        out: list[tuple[str, str]] = []
        for rack_name, rack in self.racks.items():
            for entry in rack.devices:
                out.extend((rack_name, i) for i in _ids(entry))
        return out

    def devices(self) -> list[dict[str, Any]]:
        """Flat device records (``Device`` fields) with rack and fabric filled in."""
        out: list[dict[str, Any]] = []
        for rack_name, rack in self.racks.items():
            for entry in rack.devices:
                fields = entry.model_dump(exclude={"id", "count", "fabric"}, exclude_none=True)
                fabric = entry.fabric or rack.fabric or rack_name
                for device_id in _ids(entry):
                    out.append({"id": device_id, "rack": rack_name, "fabric": fabric, **fields})
        return out

    def token_map(self) -> dict[str, TokenEntry]:
        """sha256 digest -> token entry."""
        return {t.sha256: t for t in self.tokens}


def _ids(entry: DeviceEntry) -> list[str]:
    """Ids of an entry: the id itself, or id-1..id-N when ``count`` > 1."""
    if entry.count == 1:
        return [entry.id]
    return [f"{entry.id}-{i}" for i in range(1, entry.count + 1)]


def hash_token(token: str) -> str:
    """The sha256 hex digest stored in the pools file for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def format_validation_error(source: str, error: ValidationError) -> str:
    """``source: a.b.2.c: message`` lines, one per pydantic error, in plain words."""
    from reflexarc.config import plain_message

    lines = []
    for err in error.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {path}: {plain_message(err)}")
    return "\n".join(lines)


def parse_pools(data: Any, source: str = "<pools>") -> PoolsConfig:
    """Validate already-parsed YAML data; ValueError names ``source`` and the field path."""
    if data is None:
        data = {}
    try:
        return PoolsConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(source, exc)) from None


def load_pools(path: str | Path) -> PoolsConfig:
    """Read and validate a pools YAML file; errors (a ``ConfigError``) name ``file:line:col``, the field, and say why."""
    from reflexarc.config import ConfigError, Problem, parse_yaml_text, validation_problems

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read pools file: {exc.strerror}") from None
    try:
        data, marks = parse_yaml_text(text, str(path))
    except ConfigError as exc:
        raise ConfigError(
            [
                Problem(p.file, p.line, p.column, p.field, p.message.replace("invalid YAML", "not valid YAML"))
                for p in exc.problems
            ]
        ) from None
    try:
        return PoolsConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, str(path), marks, PoolsConfig)) from None
