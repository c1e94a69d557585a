"""The composer: place, persist, realise, free, audit.

Flow of ``compose``: one short write transaction places the spec on the free
devices and inserts the machine with its allocations (state ``composing``);
then the driver realises it outside any transaction (it may take seconds);
then a second short transaction marks it ``composed``. ``free`` mirrors it.
Keeping the driver out of the transaction means a slow scheduler never holds
the database write lock that other composers are waiting for.
"""

from __future__ import annotations

import asyncio
import builtins  # Composer.list (the verb) shadows the type in the class body
import hmac
import os
import random
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from .drivers import Driver, DriverError, InventoryDriver
from .inventory import PoolsConfig, format_validation_error, hash_token, load_pools
from .model import (
    NAME_PATTERN,
    ApplyResult,
    AuditEntry,
    CompositionsFile,
    CompositionSpec,
    Device,
    Identity,
    Machine,
    MachineState,
    NamedComposition,
    PoolsView,
)
from .placement import PlacementError, place, satisfies
from .settings import DB_ENV, POOLS_ENV, TOKEN_ENV
from .store import Store, now


def default_db() -> str:
    """``$RX_COMPOSE_DB``, else a SQLite file under the user's data directory."""
    if os.environ.get(DB_ENV):
        return os.environ[DB_ENV]
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(base / "reflexarc" / "compose.db")


def _spec(spec: CompositionSpec | Mapping[str, Any]) -> CompositionSpec:
    """Accept a spec model or a plain dict (notebooks, YAML)."""
    if isinstance(spec, CompositionSpec):
        return spec
    try:
        return CompositionSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise ValueError(format_validation_error("spec", exc)) from None


def load_compositions(file_or_text: str | Path) -> CompositionsFile:
    """Parse a compositions file, given as a path or as YAML text."""
    source = "<text>"
    # A one-line string that names an existing file, or ends in .yaml/.yml, is
    # a path; anything else is YAML text.
    if isinstance(file_or_text, Path) or (
        "\n" not in file_or_text and (Path(file_or_text).is_file() or file_or_text.strip().endswith((".yaml", ".yml")))
    ):
        path = Path(file_or_text)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read compositions file: {exc.strerror}") from None
    else:
        text = str(file_or_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    try:
        return CompositionsFile.model_validate(data or {})
    except ValidationError as exc:
        raise ValueError(format_validation_error(source, exc)) from None


class Composer:
    """Compose machines from disaggregated pools, persistently and audited.

    ``db`` is a SQLAlchemy URL or a SQLite file path; ``pools`` a pools YAML
    path or a ``PoolsConfig`` (its devices are synced into the database and
    its hashed tokens resolve identities); ``driver`` realises machines
    (default: ``InventoryDriver``). Many composers, in many processes, may
    share one database.
    """

    def __init__(
        self,
        db: str | Path | None = None,
        pools: str | Path | PoolsConfig | None = None,
        driver: Driver | None = None,
        *,
        max_attempts: int = 50,
    ) -> None:
        """Open the database and, if given, load the pools file."""
        self.store = Store(db if db is not None else default_db())
        self.driver: Driver = driver or InventoryDriver()
        self.max_attempts = max_attempts
        self.pools_config: PoolsConfig | None = None
        self._tokens: dict[str, Any] = {}
        if pools is not None:
            self.load_pools(pools)

    def close(self) -> None:
        """Release database connections."""
        self.store.close()

    def __enter__(self) -> Composer:
        """Use as a context manager; closes the database at the end."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the database."""
        self.close()

    # -- pools and identities ---------------------------------------------

    def load_pools(self, pools: str | Path | PoolsConfig) -> None:
        """Sync the devices of a pools file into the database and take its tokens."""
        cfg = pools if isinstance(pools, PoolsConfig) else load_pools(pools)
        devices = [Device.model_validate(d) for d in cfg.devices()]
        with self.store.write() as conn:
            self.store.sync_devices(conn, devices)
        self.pools_config = cfg
        self._tokens = cfg.token_map()

    def identity_from_token(self, token: str) -> Identity:
        """Resolve a token against the sha256 digests of the pools file."""
        if self.pools_config is None:
            raise PermissionError(
                f"no pools file loaded: its hashed tokens identify callers (pass --pools or set {POOLS_ENV})"
            )
        if not self._tokens:
            raise PermissionError("no tokens are configured (the pools file has no 'tokens')")
        digest = hash_token(token)
        match = None
        # Compare against every entry in constant time per entry: no early
        # exit that would leak how many leading characters matched.
        for known, entry in self._tokens.items():
            if hmac.compare_digest(known, digest):
                match = entry
        if match is None:
            self._audit("<unknown>", "auth", None, "refused", "token not recognised")
            raise PermissionError("token not recognised by the pools file")
        return Identity(user=match.user, is_admin=match.admin)

    def identity_from_env(self, var: str = TOKEN_ENV) -> Identity:
        """Resolve the token in ``$RX_COMPOSE_TOKEN``."""
        token = os.environ.get(var, "").strip()
        if not token:
            raise PermissionError(f"set {var} to your compose token to identify yourself")
        return self.identity_from_token(token)

    # -- audit -------------------------------------------------------------

    def _audit(self, user: str, action: str, machine_id: str | None, outcome: str, detail: str = "") -> None:
        """Record one audit row in its own transaction (survives a failed operation)."""
        with self.store.write() as conn:
            self.store.add_audit(
                conn,
                user=user,
                action=action,
                machine_id=machine_id,
                outcome=outcome,
                detail=detail,
            )

    def audit(self, *, limit: int | None = None, machine_id: str | None = None) -> list[AuditEntry]:
        """The audit log, oldest first (optionally the newest ``limit`` rows)."""
        with self.store.read() as conn:
            return self.store.audit(conn, limit=limit, machine_id=machine_id)

    # -- reading -----------------------------------------------------------

    def list(self, *, all: bool = False) -> list[Machine]:
        """Live machines (composing/composed/freeing), or every machine with ``all``."""
        states = None if all else [MachineState.COMPOSING, MachineState.COMPOSED, MachineState.FREEING]
        with self.store.read() as conn:
            return self.store.machines(conn, states)

    def show(self, key: str) -> Machine:
        """A machine by id or name (KeyError if unknown)."""
        with self.store.read() as conn:
            machine = self.store.machine(conn, key)
        if machine is None:
            raise KeyError(f"no machine with id or name {key!r}")
        return machine

    def pools(self) -> PoolsView:
        """Free/used devices per rack and kind."""
        with self.store.read() as conn:
            return PoolsView(rows=self.store.pool_rows(conn))

    # -- compose -----------------------------------------------------------

    def compose(
        self,
        spec: CompositionSpec | Mapping[str, Any],
        identity: Identity,
        *,
        name: str | None = None,
        devices: builtins.list[str] | None = None,
    ) -> Machine:
        """Place, persist and realise a machine for ``identity``.

        ``name`` is a user-chosen unique name among live machines; ``devices``
        are device ids to reuse if they are all free and still fit the spec
        (else an equivalent placement is made). Raises ``PlacementError`` when
        nothing fits.
        """
        spec = _spec(spec)
        if name is not None and not re.match(NAME_PATTERN, name):
            raise ValueError(f"invalid machine name {name!r} (letters, digits, '.', '_', '-')")
        machine_id = f"m-{uuid.uuid4().hex[:12]}"
        try:
            machine = self._allocate(machine_id, spec, identity, name, devices or [])
        except (PlacementError, ValueError) as exc:
            self._audit(identity.user, "compose", None, "failed", f"{name or '-'}: {spec.describe()}: {exc}")
            raise
        try:
            realisation = self.driver.realise(machine)
        except Exception as exc:
            # Give the devices back at once: a failed realisation holds nothing.
            with self.store.write() as conn:
                self.store.set_state(
                    conn,
                    machine.id,
                    expect=[MachineState.COMPOSING],
                    state=MachineState.FAILED,
                    error=str(exc),
                    freed_at=now(),
                )
                self.store.release(conn, machine.id)
                self.store.add_audit(
                    conn, user=identity.user, action="compose", machine_id=machine.id, outcome="failed", detail=str(exc)
                )
            raise
        with self.store.write() as conn:
            self.store.set_state(
                conn, machine.id, expect=[MachineState.COMPOSING], state=MachineState.COMPOSED, realisation=realisation
            )
            self.store.add_audit(
                conn,
                user=identity.user,
                action="compose",
                machine_id=machine.id,
                outcome="ok",
                detail=f"{name or '-'}: {spec.describe()} -> {', '.join(machine.device_ids)}",
            )
        return machine.model_copy(update={"state": MachineState.COMPOSED, "realisation": realisation})

    def _allocate(
        self,
        machine_id: str,
        spec: CompositionSpec,
        identity: Identity,
        name: str | None,
        pinned: builtins.list[str],
    ) -> Machine:
        """Place and insert in one transaction; retry when a race is lost.

        On SQLite, BEGIN IMMEDIATE serialises writers so the free list read
        here is exact. On a server database two composers can read the same
        free list; the loser's allocation insert hits the unique key, rolls
        back, and places again on the fresh state.
        """
        for attempt in range(self.max_attempts):
            try:
                with self.store.write() as conn:
                    if name:
                        holder = self.store.live_machine_id(conn, name)
                        if holder:
                            raise ValueError(f"a machine named {name!r} already exists ({holder})")
                    free = self.store.free_devices(conn)
                    chosen = self._pinned(spec, pinned, free) or place(spec, free)
                    machine = Machine(
                        id=machine_id,
                        name=name,
                        owner=identity.user,
                        spec=spec,
                        devices=chosen,
                        state=MachineState.COMPOSING,
                        driver=self.driver.name,
                        created_at=now(),
                    )
                    self.store.insert_machine(conn, machine)
                return machine
            except IntegrityError:
                # Someone took one of "our" devices first: back off and re-place.
                time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))
        raise PlacementError(f"gave up after {self.max_attempts} attempts: devices kept being taken concurrently")

    @staticmethod
    def _pinned(
        spec: CompositionSpec, pinned: builtins.list[str], free: builtins.list[Device]
    ) -> builtins.list[Device]:
        """The pinned devices if all are free and still make the spec, else []."""
        if not pinned:
            return []
        by_id = {d.id: d for d in free}
        if not all(p in by_id for p in pinned):
            return []
        chosen = [by_id[p] for p in pinned]
        return chosen if satisfies(spec, chosen) else []

    # -- free --------------------------------------------------------------

    def _check_owner(self, machine: Machine, identity: Identity, action: str) -> None:
        """Only the owner or an admin may change a machine; refusals are audited."""
        if identity.is_admin or identity.user == machine.owner:
            return
        message = (
            f"{identity.user} may not {action} machine {machine.name or machine.id} owned by "
            f"{machine.owner}: only its owner or an admin can"
        )
        self._audit(identity.user, action, machine.id, "refused", message)
        raise PermissionError(message)

    def free(self, key: str, identity: Identity, *, force: bool = False) -> Machine:
        """Release a machine (by id or name) and return its devices to the pools.

        Freeing a freed machine is a no-op. ``force`` also frees a machine
        stuck in ``composing``/``freeing`` (e.g. after a crash).
        """
        machine = self.show(key)
        self._check_owner(machine, identity, "free")
        if machine.state in (MachineState.FREED, MachineState.FAILED):
            return machine
        if machine.driver != self.driver.name:
            # Releasing through the wrong driver would leave e.g. a Slurm job behind.
            raise DriverError(
                f"machine {machine.id} was realised by the {machine.driver!r} driver; "
                f"free it with a composer using that driver (this one uses {self.driver.name!r})"
            )
        expect = [MachineState.COMPOSED]
        if force:
            expect += [MachineState.COMPOSING, MachineState.FREEING]
        with self.store.write() as conn:
            claimed = self.store.set_state(conn, machine.id, expect=expect, state=MachineState.FREEING)
        if not claimed:
            current = self.show(machine.id)
            if current.state == MachineState.FREED:
                return current  # a concurrent free won; the result is the same
            raise ValueError(f"machine {machine.id} is {current.state.value}; use force=True to free it anyway")
        try:
            self.driver.release(machine)
        except Exception as exc:
            with self.store.write() as conn:
                self.store.set_state(conn, machine.id, expect=[MachineState.FREEING], state=MachineState.COMPOSED)
                self.store.add_audit(
                    conn, user=identity.user, action="free", machine_id=machine.id, outcome="failed", detail=str(exc)
                )
            raise
        freed_at = now()
        with self.store.write() as conn:
            self.store.set_state(
                conn, machine.id, expect=[MachineState.FREEING], state=MachineState.FREED, freed_at=freed_at
            )
            self.store.release(conn, machine.id)
            self.store.add_audit(
                conn,
                user=identity.user,
                action="free",
                machine_id=machine.id,
                outcome="ok",
                detail=", ".join(machine.device_ids),
            )
        return machine.model_copy(update={"state": MachineState.FREED, "freed_at": freed_at})

    # -- declarative -------------------------------------------------------

    def export(self, key: str) -> str:
        """A compositions file (YAML) that recomposes this machine with ``apply``."""
        m = self.show(key)
        doc = CompositionsFile(machines=[NamedComposition(name=m.name or m.id, spec=m.spec, devices=m.device_ids)])
        header = (
            f"# exported from machine {m.id} (owner {m.owner}, {m.state.value}) "
            f"at {now().isoformat(timespec='seconds')}\n"
            "# `reflexarc compose apply` reuses these devices when free, "
            "else places an equivalent machine.\n"
        )
        body = yaml.safe_dump(doc.model_dump(mode="json", exclude_none=True), sort_keys=False)
        return header + body

    def apply(self, file_or_text: str | Path, identity: Identity, *, prune: bool = False) -> builtins.list[ApplyResult]:
        """Make the named compositions of a file exist (idempotent).

        A live machine with the same name and spec is left alone; one with a
        different spec is freed and recomposed (owner or admin only). With
        ``prune``, the caller's other named live machines are freed.
        """
        doc = load_compositions(file_or_text)
        results: builtins.list[ApplyResult] = []
        for item in doc.machines:
            with self.store.read() as conn:
                live_id = self.store.live_machine_id(conn, item.name)
            existing = self.show(live_id) if live_id else None
            if existing is not None:
                self._check_owner(existing, identity, "change")
                if existing.spec == item.spec:
                    results.append(ApplyResult(name=item.name, action="unchanged", machine_id=existing.id))
                    continue
                self.free(existing.id, identity)
            machine = self.compose(item.spec, identity, name=item.name, devices=item.devices)
            action: Literal["replaced", "created"] = "replaced" if existing is not None else "created"
            results.append(ApplyResult(name=item.name, action=action, machine_id=machine.id))
            self._audit(identity.user, "apply", machine.id, "ok", f"{item.name}: {action}")
        if prune:
            wanted = {item.name for item in doc.machines}
            for m in self.list():
                if m.name and m.name not in wanted and m.owner == identity.user:
                    self.free(m.id, identity)
                    results.append(ApplyResult(name=m.name, action="pruned", machine_id=m.id))
                    self._audit(identity.user, "apply", m.id, "ok", f"{m.name}: pruned")
        return results

    # -- async wrappers ----------------------------------------------------

    async def acompose(self, spec: CompositionSpec | Mapping[str, Any], identity: Identity, **kwargs: Any) -> Machine:
        """``compose`` in a worker thread (drivers and SQLite calls block)."""
        return await asyncio.to_thread(self.compose, spec, identity, **kwargs)

    async def afree(self, key: str, identity: Identity, **kwargs: Any) -> Machine:
        """``free`` in a worker thread."""
        return await asyncio.to_thread(self.free, key, identity, **kwargs)
