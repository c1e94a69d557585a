"""The fog's disk buffer: Kafka records that Kafka could not take yet, durable in SQLite, in order, bounded.

Like EMQX's replayq for its Kafka bridge: while Kafka is slow or away the
bridge keeps taking MQTT traffic, writes each record here and acknowledges
the MQTT message once the row is committed, so the broker's bounded session
queue never overflows. :mod:`reflexarc.fog.spill` decides when records come
here and forwards the rows to Kafka in order when it takes records again;
a row is deleted only when Kafka acknowledged it.

:class:`BufferStore` is the synchronous SQLite part (WAL), used from one
thread only. :class:`DiskBuffer` runs it on a dedicated thread (never on the
event loop) and commits in groups: everything put while the previous
transaction ran goes into the next one, deletes included, so a busy buffer
costs one commit per few milliseconds, not one per message. Rows are
numbered by the bridge (``seq``) when they are put, so a record's row is
known before it is written, and every operation on the file runs in the
order it was asked for (one lock, one thread): a delete never overtakes the
insert of its row, and a read sees every put and delete made before it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from reflexarc.aio import cancel_and_wait
from reflexarc.fog.sender import Confirm, Record

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    receipts BLOB NOT NULL
);
"""

_LEN = struct.Struct("<I")


class BufferFileError(RuntimeError):
    """The buffer file cannot be used; the text says what to do."""


# ---- row encoding (headers and receipts: length-prefixed fields, no pickle) ----------
def pack_fields(fields: Iterable[bytes]) -> bytes:
    """Length-prefixed concatenation of ``fields``."""
    out = bytearray()
    for f in fields:
        out += _LEN.pack(len(f))
        out += f
    return bytes(out)


def unpack_fields(data: bytes) -> list[bytes]:
    """The fields :func:`pack_fields` joined; raises ValueError on a malformed blob."""
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated field length")
        (n,) = _LEN.unpack_from(data, pos)
        pos += 4
        if pos + n > end:
            raise ValueError("truncated field")
        out.append(data[pos : pos + n])
        pos += n
    return out


def pack_headers(headers: Sequence[tuple[str, bytes]]) -> bytes:
    """Kafka headers as one blob."""
    return pack_fields(x for name, value in headers for x in (name.encode(), value))


def unpack_headers(blob: bytes) -> list[tuple[str, bytes]]:
    """The headers :func:`pack_headers` stored."""
    f = unpack_fields(blob)
    return [(f[i].decode(), f[i + 1]) for i in range(0, len(f) - 1, 2)]


def pack_receipts(receipts: Sequence[Confirm]) -> bytes:
    """Receipt entries as one blob (a missing dedupe key is stored empty)."""
    return pack_fields(x.encode() for site, device, eid, key in receipts for x in (site, device, eid, key or ""))


def unpack_receipts(blob: bytes) -> list[Confirm]:
    """The receipt entries :func:`pack_receipts` stored."""
    f = [x.decode() for x in unpack_fields(blob)]
    return [(f[i], f[i + 1], f[i + 2], f[i + 3] or None) for i in range(0, len(f) - 3, 4)]


#: The last header of a stored record whose value is null (an event without data): the column is NOT NULL.
_NULL_VALUE = ("\x00rx-null-value", b"")


def _record(seq: int, topic: str, key: bytes | None, value: bytes, headers: bytes, receipts: bytes) -> Record:
    """A stored row as the record it was (no tickets: its message was acknowledged)."""
    fields = unpack_headers(bytes(headers))
    data: bytes | None = bytes(value)
    if fields and fields[-1] == _NULL_VALUE:
        fields.pop()
        data = None
    return Record(
        topic,
        bytes(key) if key is not None else None,
        data,
        fields,
        receipts=unpack_receipts(bytes(receipts)),
        seq=int(seq),
    )


def record_size(rec: Record) -> int:
    """Bytes a record accounts for in the buffer (key, value, headers)."""
    n = (len(rec.value) if rec.value else 0) + (len(rec.key) if rec.key else 0)
    for name, value in rec.headers:
        n += len(name) + len(value)
    return n


class BufferStore:
    """The SQLite file; not thread-safe: use it from one thread (see :class:`DiskBuffer`)."""

    def __init__(self, path: Path, sync: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Before the table exists: lets a drained buffer give its pages back (incremental_vacuum).
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            # The WAL is truncated back to this after checkpoints (it grows while a backlog is written).
            self.db.execute("PRAGMA journal_size_limit=67108864")
            self.db.executescript(SCHEMA)
            row = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM records"
            ).fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise BufferFileError(
                f"cannot open the fog's disk buffer {self.path}: {exc} (check ingest.buffer.path and permissions)"
            ) from exc
        self.depth = int(row[0])
        self.bytes = int(row[1])
        self.last_seq = int(row[2])
        self.oldest: float | None = None
        self._update_oldest()

    def close(self) -> None:
        """Close the database (SQLite checkpoints the WAL)."""
        self.db.close()

    def _update_oldest(self) -> None:
        row = self.db.execute("SELECT created FROM records ORDER BY seq LIMIT 1").fetchone()
        self.oldest = float(row[0]) if row else None

    def apply(self, inserts: Sequence[Record], deletes: Sequence[int]) -> None:
        """Insert ``inserts`` (rows numbered by their ``seq``), then delete ``deletes``, in one transaction."""
        db = self.db
        now = time.time()
        rows = [
            (
                r.seq,
                now,
                record_size(r),
                r.topic,
                r.key,
                b"" if r.value is None else r.value,
                pack_headers(r.headers if r.value is not None else [*r.headers, _NULL_VALUE]),
                pack_receipts(r.receipts),
            )
            for r in inserts
        ]
        db.execute("BEGIN IMMEDIATE")
        try:
            added = freed = removed = 0
            if rows:
                db.executemany(
                    "INSERT INTO records (seq, created, size, topic, key, value, headers, receipts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                added = sum(r[2] for r in rows)
            for i in range(0, len(deletes), 500):
                chunk = deletes[i : i + 500]
                marks = ",".join("?" * len(chunk))
                got = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE seq IN ({marks})", chunk
                ).fetchone()
                db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
                removed += int(got[0])
                freed += int(got[1])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.depth += len(rows) - removed
        self.bytes += added - freed
        if rows:
            self.last_seq = max(self.last_seq, rows[-1][0])
        if removed or (rows and self.oldest is None):
            self._update_oldest()
        if removed and self.depth == 0:
            # Drained: give the space back, so a past outage does not keep its size on disk.
            db.execute("PRAGMA incremental_vacuum")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` rows after ``after``, in order, as records (no tickets: their messages were acknowledged)."""
        rows = self.db.execute(
            "SELECT seq, topic, key, value, headers, receipts FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [_record(*row) for row in rows]

    def recent_keys(self, limit: int) -> list[tuple[str, float]]:
        """Dedupe keys of the newest ``limit`` rows with their age in seconds, oldest first."""
        now = time.time()
        rows = self.db.execute("SELECT receipts, created FROM records ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        out: list[tuple[str, float]] = []
        for blob, created in reversed(rows):
            for _site, _device, _eid, key in unpack_receipts(bytes(blob)):
                if key:
                    out.append((key, now - float(created)))
        return out


class DiskBuffer:
    """The buffer used from asyncio: one dedicated thread, group commits, bounded by ``max_events``/``max_bytes``.

    :meth:`put` numbers a record and queues its insert; once the row is
    committed, ``on_durable`` is called with the records (their MQTT
    messages may then be acknowledged). :meth:`delete` queues the deletion
    of rows Kafka acknowledged. :meth:`read` returns rows in order, after
    every put and delete asked for before it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int,
        max_bytes: int,
        sync: Literal["normal", "full"] = "normal",
        on_durable: Callable[[list[Record]], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.sync = sync
        self.on_durable = on_durable
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="rx-fog-buffer")
        self.store: BufferStore | None = None
        self._ins: list[Record] = []
        self._del: list[int] = []
        self._lock = asyncio.Lock()
        self._work = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._writer: asyncio.Task[None] | None = None
        #: rows stored or queued, minus queued deletes (what the bounds apply to)
        self.depth = 0
        self.bytes = 0
        #: highest seq given to a record; highest seq committed
        self.last_seq = 0
        self.committed_seq = 0
        #: a transaction is running on the buffer's thread
        self.flushing = False
        #: set when rows were committed since the last read
        self.changed = asyncio.Event()
        self.spilled = 0
        self.deleted = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the buffer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def open(self) -> None:
        """Open (or create) the file and start the writer."""
        self.store = await self.call(BufferStore, self.path, self.sync)
        self.depth = self.store.depth
        self.bytes = self.store.bytes
        self.last_seq = self.committed_seq = self.store.last_seq
        self._update_space()
        self._writer = asyncio.create_task(self._write_loop(), name="fog-buffer-writer")

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the file (rows stay for the next start)."""
        if self._writer is not None:
            await cancel_and_wait([self._writer])
            self._writer = None
        if self.store is not None:
            async with self._lock:
                await self._flush()
            await self.call(self.store.close)
            self.store = None
        self._exec.shutdown(wait=True)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The writer task (the bridge stops if it fails)."""
        return [self._writer] if self._writer is not None else []

    # ---- state -----------------------------------------------------------------
    def full(self) -> bool:
        """True when the buffer holds ``max_events`` records or ``max_bytes`` bytes."""
        return self.depth >= self.max_events or self.bytes >= self.max_bytes

    def oldest_age(self) -> float:
        """Seconds the oldest committed row has waited (0 when empty)."""
        st = self.store
        if st is None or st.oldest is None:
            return 0.0
        return max(0.0, time.time() - st.oldest)

    def _update_space(self) -> None:
        if self.full():
            self._space.clear()
        else:
            self._space.set()

    async def wait_space(self) -> None:
        """Wait until the buffer can take a record."""
        await self._space.wait()

    # ---- writes ----------------------------------------------------------------
    def put(self, rec: Record) -> int:
        """Give ``rec`` the next row number and queue its insert; returns the number.

        The bounds are the caller's to check (:meth:`full`): records whose
        MQTT messages are already taken must be written whatever the bounds
        (at most a receive window of them).
        """
        self.last_seq += 1
        rec.seq = self.last_seq
        self._ins.append(rec)
        self.depth += 1
        self.bytes += record_size(rec)
        self.spilled += 1
        if self.full():
            self._space.clear()
        self._work.set()
        return rec.seq

    def delete(self, recs: Iterable[Record]) -> None:
        """Queue the deletion of the rows of ``recs`` (Kafka has them)."""
        n = 0
        for r in recs:
            self._del.append(r.seq)
            self.bytes -= record_size(r)
            n += 1
        self.depth -= n
        self.deleted += n
        self._update_space()
        self._work.set()

    @property
    def unwritten(self) -> list[Record]:
        """The records put but not yet handed to the thread (read-only: see :meth:`take_unwritten`)."""
        return self._ins

    def take_unwritten(self) -> list[Record]:
        """Remove and return the records put but not yet handed to the thread (their seq reset to 0).

        For switching back to the direct path: they go to Kafka from memory,
        and their MQTT messages are acknowledged when Kafka has them.
        """
        recs, self._ins = self._ins, []
        for r in recs:
            r.seq = 0
            self.bytes -= record_size(r)
        self.depth -= len(recs)
        self.spilled -= len(recs)
        self._update_space()
        return recs

    async def _write_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            async with self._lock:
                await self._flush()

    async def _flush(self) -> None:
        """Commit the queued inserts and deletes in one transaction (the caller holds the lock)."""
        assert self.store is not None
        ins, dels = self._ins, self._del
        if not ins and not dels:
            return
        self._ins, self._del = [], []
        self.flushing = True
        try:
            await self.call(self.store.apply, ins, dels)
        except sqlite3.Error as exc:
            # Keep them queued and try again: the messages stay unacknowledged meanwhile.
            log.error("the fog's disk buffer %s could not commit (%s); retrying in 1 s", self.path, exc)
            self._ins[:0] = ins
            self._del[:0] = dels
            await asyncio.sleep(1.0)
            self._work.set()
            return
        finally:
            self.flushing = False
        if ins:
            self.committed_seq = max(self.committed_seq, ins[-1].seq)
            self.changed.set()
            if self.on_durable is not None:
                self.on_durable(ins)

    # ---- reads -----------------------------------------------------------------
    async def read(self, after: int, limit: int) -> tuple[list[Record], int]:
        """Up to ``limit`` records after row ``after``, in order, and the highest row committed when they were read.

        Everything put or deleted before the call is committed first. When
        fewer than ``limit`` records come back, no row up to the returned
        number is left unread.
        """
        assert self.store is not None
        async with self._lock:
            await self._flush()
            self.changed.clear()
            upto = self.committed_seq
            return await self.call(self.store.read, after, limit), upto

    async def recent_keys(self, limit: int) -> list[tuple[str, float]]:
        """Dedupe keys of the newest ``limit`` rows and their ages, oldest first (to seed the dedupe window)."""
        assert self.store is not None
        async with self._lock:
            return await self.call(self.store.recent_keys, limit)
