"""Persistence of devices, machines, allocations and the audit log (SQLAlchemy 2 Core).

The invariant "a device belongs to at most one live machine" is enforced by
the database, not by Python locks: ``compose_allocations.device_id`` is the
primary key, so a second insert for a taken device fails with an
IntegrityError in whichever process or thread loses the race. That holds
for SQLite shared by several processes as well as for a server database.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import OperationalError

from .model import AuditEntry, CompositionSpec, Device, Machine, MachineState, PoolRow

metadata = MetaData()

# Table names carry a prefix: the database may be shared with other parts of
# reflexarc (the site agent keeps task state in SQLite too).
devices_t = Table(
    "compose_devices",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("rack", String(200), nullable=False),
    Column("fabric", String(200), nullable=False),
    Column("data", JSON, nullable=False),
    # A device dropped from the pools file stays (old machines refer to it)
    # but is never placed again.
    Column("present", Boolean, nullable=False, default=True),
)

machines_t = Table(
    "compose_machines",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(100), index=True),
    Column("owner", String(200), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("driver", String(64), nullable=False),
    Column("realisation", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("freed_at", DateTime(timezone=True)),
    Column("error", Text),
)

# History: which devices a machine was given (kept after free, for export).
assignments_t = Table(
    "compose_assignments",
    metadata,
    Column("machine_id", String(64), ForeignKey("compose_machines.id"), primary_key=True),
    Column("device_id", String(200), ForeignKey("compose_devices.id"), primary_key=True),
    Column("position", Integer, nullable=False),
)

# Live ownership: one row per taken device. The primary key on device_id IS
# the double-booking guard.
allocations_t = Table(
    "compose_allocations",
    metadata,
    Column("device_id", String(200), ForeignKey("compose_devices.id"), primary_key=True),
    Column("machine_id", String(64), ForeignKey("compose_machines.id"), nullable=False, index=True),
    Column("allocated_at", DateTime(timezone=True), nullable=False),
)

# Live names: a user-chosen name maps to at most one live machine (same trick
# as allocations, portable where partial unique indexes are not).
names_t = Table(
    "compose_names",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("machine_id", String(64), ForeignKey("compose_machines.id"), nullable=False),
)

audit_t = Table(
    "compose_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user", String(200), nullable=False),
    Column("action", String(32), nullable=False),
    Column("machine_id", String(64), index=True),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=False, default=""),
)


def now() -> datetime:
    """Timezone-aware UTC now."""
    return datetime.now(UTC)


@overload
def _utc(value: datetime) -> datetime: ...


@overload
def _utc(value: datetime | None) -> datetime | None: ...


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def normalise_url(db: str | Path) -> str:
    """Accept a SQLAlchemy URL or a plain file path (taken as SQLite)."""
    text = str(db)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _setup_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL + busy timeout + explicit BEGIN (IMMEDIATE for writers).

    pysqlite's own implicit transactions start late and in DEFERRED mode, so
    two writers that both read first would fail with "database is locked"
    instead of waiting. We switch it off and emit BEGIN ourselves; writers ask
    for BEGIN IMMEDIATE, which takes the write lock up front and waits up to
    the busy timeout for it.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("rx_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Store:
    """Database access for the composer. Thread-safe; one per process is enough."""

    def __init__(self, url: str | Path, *, busy_timeout_s: float = 60.0) -> None:
        """Open (and create if needed) the database at ``url`` (URL or file path)."""
        self.url = normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            # The busy timeout is also the Python-level sqlite3 timeout.
            kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        self.engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _setup_sqlite(self.engine, int(busy_timeout_s * 1000))
        self._create_schema()

    def _create_schema(self) -> None:
        """Create tables; several processes may race here on a fresh file."""
        for attempt in range(3):
            try:
                with self.write() as conn:
                    metadata.create_all(conn)
                return
            except OperationalError:
                # "table already exists" from a racing creator on a non-SQLite
                # database (SQLite serialises us with BEGIN IMMEDIATE).
                if attempt == 2:
                    raise

    def close(self) -> None:
        """Dispose of pooled connections."""
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (its transaction is rolled back at the end)."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed on success (BEGIN IMMEDIATE on SQLite)."""
        with self.engine.connect() as conn:
            conn.execution_options(rx_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    # -- devices ---------------------------------------------------------

    def sync_devices(self, conn: Connection, devices: Sequence[Device]) -> None:
        """Make the devices table match the pools file (insert, update, retire)."""
        existing = {r.id: r for r in conn.execute(select(devices_t.c.id, devices_t.c.data))}
        wanted = {d.id for d in devices}
        for d in devices:
            row = {
                "kind": d.kind,
                "rack": d.rack,
                "fabric": d.fabric,
                "data": d.model_dump(mode="json"),
                "present": True,
            }
            if d.id in existing:
                conn.execute(update(devices_t).where(devices_t.c.id == d.id).values(**row))
            else:
                conn.execute(insert(devices_t).values(id=d.id, **row))
        gone = set(existing) - wanted
        if gone:
            conn.execute(update(devices_t).where(devices_t.c.id.in_(gone)).values(present=False))

    def devices(self, conn: Connection, *, present_only: bool = True) -> list[Device]:
        """All devices (in the pools file, unless ``present_only`` is False)."""
        q = select(devices_t.c.data).order_by(devices_t.c.id)
        if present_only:
            q = q.where(devices_t.c.present.is_(True))
        return [Device.model_validate(r.data) for r in conn.execute(q)]

    def free_devices(self, conn: Connection) -> list[Device]:
        """Present devices that no live machine holds."""
        taken = select(allocations_t.c.device_id)
        q = (
            select(devices_t.c.data)
            .where(devices_t.c.present.is_(True), devices_t.c.id.not_in(taken))
            .order_by(devices_t.c.id)
        )
        return [Device.model_validate(r.data) for r in conn.execute(q)]

    def pool_rows(self, conn: Connection) -> list[PoolRow]:
        """Free/used per rack and kind, with core/GB capacity.

        Devices dropped from the pools file are left out unless a live machine
        still holds one (then it shows as used until that machine is freed).
        """
        used_ids = {r.device_id for r in conn.execute(select(allocations_t.c.device_id))}
        groups: dict[tuple[str, str, str, str], PoolRow] = {}
        q = select(devices_t.c.data).where(
            devices_t.c.present.is_(True) | devices_t.c.id.in_(select(allocations_t.c.device_id))
        )
        for d in (Device.model_validate(r.data) for r in conn.execute(q)):
            model = (d.model or "") if d.kind == "gpu" else ""  # GPUs of one rack by model: users ask for one
            key = (d.rack, d.fabric, d.kind, model)
            row = groups.setdefault(
                key, PoolRow(rack=d.rack, fabric=d.fabric, kind=d.kind, model=model or None, total=0, used=0)
            )
            cap = d.cores if d.kind == "cpu" else d.capacity_gb if d.is_storage else 0
            row.total += 1
            row.capacity_total += cap or 0
            if d.id in used_ids:
                row.used += 1
            else:
                row.capacity_free += cap or 0
        return [groups[k] for k in sorted(groups)]

    # -- machines --------------------------------------------------------

    def insert_machine(self, conn: Connection, machine: Machine) -> None:
        """Insert a machine with its live allocations and its name.

        Raises IntegrityError if a device (or the name) is already taken.
        """
        conn.execute(
            insert(machines_t).values(
                id=machine.id,
                name=machine.name,
                owner=machine.owner,
                spec=machine.spec.model_dump(mode="json"),
                state=machine.state.value,
                driver=machine.driver,
                realisation=machine.realisation,
                created_at=machine.created_at,
                freed_at=None,
                error=None,
            )
        )
        if machine.name:
            conn.execute(insert(names_t).values(name=machine.name, machine_id=machine.id))
        conn.execute(
            insert(assignments_t),
            [{"machine_id": machine.id, "device_id": d.id, "position": i} for i, d in enumerate(machine.devices)],
        )
        conn.execute(
            insert(allocations_t),
            [
                {"device_id": d.id, "machine_id": machine.id, "allocated_at": machine.created_at}
                for d in machine.devices
            ],
        )

    def set_state(
        self,
        conn: Connection,
        machine_id: str,
        *,
        expect: Iterable[MachineState],
        state: MachineState,
        **values: Any,
    ) -> bool:
        """Compare-and-set the state; False if the machine was not in ``expect``."""
        result = conn.execute(
            update(machines_t)
            .where(
                machines_t.c.id == machine_id,
                machines_t.c.state.in_([s.value for s in expect]),
            )
            .values(state=state.value, **values)
        )
        return result.rowcount == 1

    def release(self, conn: Connection, machine_id: str) -> None:
        """Give the machine's devices and name back."""
        conn.execute(delete(allocations_t).where(allocations_t.c.machine_id == machine_id))
        conn.execute(delete(names_t).where(names_t.c.machine_id == machine_id))

    def _machines(self, conn: Connection, where: Any = None) -> list[Machine]:
        """Load machines with their devices (in assignment order)."""
        q = select(machines_t).order_by(machines_t.c.created_at, machines_t.c.id)
        if where is not None:
            q = q.where(where)
        rows = conn.execute(q).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        devs: dict[str, list[Device]] = {i: [] for i in ids}
        dq = (
            select(assignments_t.c.machine_id, devices_t.c.data)
            .join(devices_t, devices_t.c.id == assignments_t.c.device_id)
            .where(assignments_t.c.machine_id.in_(ids))
            .order_by(assignments_t.c.machine_id, assignments_t.c.position)
        )
        for r in conn.execute(dq):
            devs[r.machine_id].append(Device.model_validate(r.data))
        return [
            Machine(
                id=r.id,
                name=r.name,
                owner=r.owner,
                spec=CompositionSpec.model_validate(r.spec),
                devices=devs[r.id],
                state=MachineState(r.state),
                driver=r.driver,
                realisation=r.realisation or {},
                created_at=_utc(r.created_at),
                freed_at=_utc(r.freed_at),
                error=r.error,
            )
            for r in rows
        ]

    def machines(self, conn: Connection, states: Iterable[MachineState] | None = None) -> list[Machine]:
        """Machines, optionally only those in ``states``, oldest first."""
        where = None
        if states is not None:
            where = machines_t.c.state.in_([s.value for s in states])
        return self._machines(conn, where)

    def machine(self, conn: Connection, key: str) -> Machine | None:
        """A machine by id, else by live name, else the newest with that name."""
        found = self._machines(conn, machines_t.c.id == key)
        if found:
            return found[0]
        live = conn.execute(select(names_t.c.machine_id).where(names_t.c.name == key)).first()
        if live:
            return self._machines(conn, machines_t.c.id == live.machine_id)[0]
        named = self._machines(conn, machines_t.c.name == key)
        return named[-1] if named else None

    def live_machine_id(self, conn: Connection, name: str) -> str | None:
        """Id of the live machine holding ``name``."""
        row = conn.execute(select(names_t.c.machine_id).where(names_t.c.name == name)).first()
        return row.machine_id if row else None

    def allocation_count(self, conn: Connection) -> int:
        """Number of taken devices."""
        return conn.execute(select(func.count()).select_from(allocations_t)).scalar_one()

    # -- audit -----------------------------------------------------------

    def add_audit(
        self,
        conn: Connection,
        *,
        user: str,
        action: str,
        machine_id: str | None,
        outcome: str,
        detail: str = "",
    ) -> None:
        """Append one audit row."""
        conn.execute(
            insert(audit_t).values(
                at=now(),
                user=user,
                action=action,
                machine_id=machine_id,
                outcome=outcome,
                detail=detail,
            )
        )

    def audit(self, conn: Connection, *, limit: int | None = None, machine_id: str | None = None) -> list[AuditEntry]:
        """Audit rows, oldest first (the newest ``limit`` if given)."""
        q = select(audit_t).order_by(audit_t.c.id.desc())
        if machine_id:
            q = q.where(audit_t.c.machine_id == machine_id)
        if limit:
            q = q.limit(limit)
        rows = list(conn.execute(q))[::-1]
        return [
            AuditEntry(
                id=r.id,
                at=_utc(r.at),
                user=r.user,
                action=r.action,
                machine_id=r.machine_id,
                outcome=r.outcome,
                detail=r.detail or "",
            )
            for r in rows
        ]
