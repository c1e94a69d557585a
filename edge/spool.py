"""The disk spool: every event is committed to SQLite (WAL) before it is published.

Rows leave the spool only when they are delivered: with ``delivery:
pipeline`` when the fog's receipt says Kafka holds them, with ``delivery:
broker`` when the broker acknowledged them (QoS 1 PUBACK). So neither an
outage nor ``kill -9`` of the agent loses an event the spool accepted. Source checkpoints are written in the same transaction as
the events they produced, so a restarted source resumes exactly after what
the spool holds.

:class:`Spool` is the synchronous SQLite part and is used from one thread
only; :class:`AsyncSpool` runs it on a dedicated thread (never blocking the
event loop) and batches writes from many sources into few transactions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    event_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    props TEXT,
    ctype TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    error TEXT NOT NULL,
    origin TEXT NOT NULL,
    payload BLOB NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    signature TEXT,
    answer BLOB,
    updated REAL NOT NULL
);
"""


class SpoolError(RuntimeError):
    """The spool file cannot be used; the text says what to do."""


@dataclass(frozen=True, slots=True)
class SpoolItem:
    """An event ready to publish: the encoded MQTT message."""

    stream: str
    event_id: str
    topic: str
    payload: bytes
    props: list[tuple[str, str]] | None
    ctype: str | None

    @property
    def size(self) -> int:
        """Bytes the spool accounts for this event."""
        return len(self.payload)


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A stored event with its position in the spool."""

    seq: int
    item: SpoolItem


class Spool:
    """SQLite spool; not thread-safe: use it from one thread (see :class:`AsyncSpool`)."""

    def __init__(self, path: Path, sync: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc} (check the path and permissions)") from exc
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events").fetchone()
        self.depth: int = int(row[0])
        #: when the oldest event of the last delete was spooled (time.time(); None: none was there)
        self.freed_oldest: float | None = None
        self.bytes: int = int(row[1])

    def close(self) -> None:
        """Close the database (the WAL is checkpointed by SQLite)."""
        self.db.close()

    # ---- events ---------------------------------------------------------------
    def append(
        self,
        items: Sequence[SpoolItem],
        checkpoints: dict[str, str],
        drop_before: int = 0,
        max_events: int | None = None,
        max_bytes: int | None = None,
    ) -> tuple[int, int]:
        """Insert ``items`` and store ``checkpoints`` in one transaction.

        With ``max_events``/``max_bytes`` set (the drop_oldest policy), the
        oldest rows not yet handed to the broker (``seq > drop_before``) are
        deleted to make room. Returns ``(last seq, rows dropped)``.
        """
        now = time.time()
        dropped = 0
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if max_events is not None or max_bytes is not None:
                dropped = self._make_room(items, drop_before, max_events, max_bytes)
            cur = db.executemany(
                "INSERT INTO events (stream, event_id, topic, payload, props, ctype, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        i.stream,
                        i.event_id,
                        i.topic,
                        i.payload,
                        json.dumps(i.props) if i.props is not None else None,
                        i.ctype,
                        now,
                    )
                    for i in items
                ],
            )
            del cur
            if checkpoints:
                db.executemany(
                    "INSERT INTO checkpoints (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    list(checkpoints.items()),
                )
            self._bump(accepted=len(items), dropped=dropped)
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.depth += len(items)
        self.bytes += sum(i.size for i in items)
        return (int(last[0]) if last else 0), dropped

    def _make_room(
        self,
        items: Sequence[SpoolItem],
        drop_before: int,
        max_events: int | None,
        max_bytes: int | None,
    ) -> int:
        need_events = self.depth + len(items) - max_events if max_events is not None else 0
        need_bytes = self.bytes + sum(i.size for i in items) - max_bytes if max_bytes is not None else 0
        if need_events <= 0 and need_bytes <= 0:
            return 0
        dropped = 0
        freed_bytes = 0
        # Oldest first, but never rows already handed to the broker: they may be delivered any moment
        # (PUBACK, or the fog's receipt), and an unconfirmed one may already be in Kafka. Those are
        # bounded (publish.inflight / publish.unconfirmed_max), so the overshoot is too.
        rows = self.db.execute("SELECT seq, LENGTH(payload) FROM events WHERE seq > ? ORDER BY seq", (drop_before,))
        victims: list[int] = []
        for seq, size in rows:
            if dropped >= need_events and freed_bytes >= need_bytes:
                break
            victims.append(seq)
            dropped += 1
            freed_bytes += size
        if victims:
            self.db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in victims])
            self.depth -= dropped
            self.bytes -= freed_bytes
        return dropped

    def read_after(self, seq: int, limit: int) -> list[SpoolRow]:
        """Up to ``limit`` events after ``seq``, in spool order."""
        rows = self.db.execute(
            "SELECT seq, stream, event_id, topic, payload, props, ctype FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def read_seqs(self, seqs: Sequence[int]) -> list[SpoolRow]:
        """The events with these sequence numbers that are still in the spool, in spool order."""
        rows: list[Any] = []
        for chunk in _chunks(list(seqs), 500):
            marks = ",".join("?" * len(chunk))
            rows += self.db.execute(
                f"SELECT seq, stream, event_id, topic, payload, props, ctype FROM events WHERE seq IN ({marks})",
                chunk,
            ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [_row(r) for r in rows]

    def delete(self, seqs: Iterable[int], counter: str = "published") -> int:
        """Remove delivered (or dead-lettered) events; returns how many were still there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = 0
            freed = 0
            oldest = None
            for chunk in _chunks(seqs, 500):
                marks = ",".join("?" * len(chunk))
                row = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(created) "
                    f"FROM events WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)
                removed += int(row[0])
                freed += int(row[1])
                if row[2] is not None and (oldest is None or row[2] < oldest):
                    oldest = row[2]
            self._bump(**{counter: removed})
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.depth -= removed
        self.bytes -= freed
        self.freed_oldest = oldest
        return removed

    def stream_depths(self) -> dict[str, int]:
        """Events waiting per stream."""
        return dict(self.db.execute("SELECT stream, COUNT(*) FROM events GROUP BY stream").fetchall())

    def oldest_age(self) -> float | None:
        """Seconds the oldest waiting event has been in the spool."""
        row = self.db.execute("SELECT MIN(created) FROM events").fetchone()
        return time.time() - row[0] if row and row[0] is not None else None

    # ---- checkpoints, counters, dead letters ----------------------------------
    def checkpoint(self, key: str) -> str | None:
        """The last stored checkpoint of a source."""
        row = self.db.execute("SELECT value FROM checkpoints WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _bump(self, **deltas: int) -> None:
        self.db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in deltas.items() if v],
        )

    def counters(self) -> dict[str, int]:
        """Lifetime totals kept in the spool: accepted, published, dropped, dead."""
        return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    def add_dead(self, error: str, origin: str, payload: bytes) -> None:
        """Keep something that could not become (or be published as) an event, with the reason."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO dead (error, origin, payload, at) VALUES (?, ?, ?, ?)",
                (error, origin, payload, time.time()),
            )
            self._bump(dead=1)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters."""
        rows = self.db.execute(
            "SELECT id, error, origin, LENGTH(payload), at FROM dead ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [{"id": r[0], "error": r[1], "origin": r[2], "size": r[3], "at": r[4]} for r in rows]

    # ---- commands (exactly-once answers) --------------------------------------
    def command(self, command_id: str) -> tuple[str, str | None, bytes | None] | None:
        """``(state, signature, answer)`` of a command seen before, else None."""
        row = self.db.execute(
            "SELECT state, signature, answer FROM commands WHERE command_id = ?", (command_id,)
        ).fetchone()
        return (row[0], row[1], bytes(row[2]) if row[2] is not None else None) if row else None

    def set_command(self, command_id: str, state: str, signature: str | None, answer: bytes | None) -> None:
        """Record a command's state (``running``, ``answered``, ``done``) durably."""
        self.db.execute(
            "INSERT INTO commands (command_id, state, signature, answer, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(command_id) DO UPDATE SET state = excluded.state, "
            "signature = COALESCE(excluded.signature, signature), "
            "answer = COALESCE(excluded.answer, answer), updated = excluded.updated",
            (command_id, state, signature, answer, time.time()),
        )


def _row(r: Sequence[Any]) -> SpoolRow:
    props = [tuple(p) for p in json.loads(r[5])] if r[5] else None
    return SpoolRow(r[0], SpoolItem(r[1], r[2], r[3], bytes(r[4]), props, r[6]))


def _chunks(seq: list[int], n: int) -> Iterable[list[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class AsyncSpool:
    """The spool used from asyncio: one dedicated thread, batched writes, backpressure.

    :meth:`submit` queues an event (waiting while the write buffer is full);
    a writer task commits buffered events in batches. With the ``block``
    policy the writer stops taking events while the spool is full, so the
    buffer fills and sources block; with ``drop_oldest`` it deletes the
    oldest unsent events to make room and counts them.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int,
        max_bytes: int,
        policy: Literal["block", "drop_oldest"] = "block",
        sync: Literal["normal", "full"] = "normal",
        batch: int = 512,
        buffer: int | None = None,
    ) -> None:
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="rx-spool")
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.policy = policy
        self.batch = batch
        self._buffer_max = buffer or max(batch * 2, 64)
        self._sync = sync
        self.spool: Spool | None = None
        self._pending: deque[tuple[SpoolItem, str | None, str | None]] = deque()
        self._room = asyncio.Condition()
        self._work = asyncio.Event()
        self._space = asyncio.Event()
        self.new_data = asyncio.Event()
        self.last_seq = 0
        self.read_cursor = 0  # highest seq handed to the publisher (drop_oldest never drops those)
        self.dropped = 0
        self.blocked_s = 0.0
        self.waiting = 0  # sources blocked in submit() right now
        self.full = False
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.on_commit: list[Any] = []  # callables(n_accepted, n_dropped)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the spool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def open(self) -> None:
        """Open the database and start the writer."""
        self.spool = await self.call(Spool, self.path, self._sync)
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    @property
    def depth(self) -> int:
        """Events in the spool (committed, not yet delivered)."""
        return self.spool.depth if self.spool else 0

    @property
    def buffered(self) -> int:
        """Events submitted but not yet committed."""
        return len(self._pending)

    async def submit(self, item: SpoolItem, checkpoint_key: str | None, checkpoint: str | None) -> None:
        """Queue one event for the spool; waits while the write buffer is full (backpressure)."""
        if len(self._pending) >= self._buffer_max:
            t0 = time.monotonic()
            self.waiting += 1
            try:
                async with self._room:
                    await self._room.wait_for(lambda: len(self._pending) < self._buffer_max or self._closing)
            finally:
                self.waiting -= 1
                self.blocked_s += time.monotonic() - t0
        self._pending.append((item, checkpoint_key, checkpoint))
        self._work.set()

    def _has_space(self) -> bool:
        assert self.spool is not None
        return self.spool.depth < self.max_events and self.spool.bytes < self.max_bytes

    async def _write_loop(self) -> None:
        assert self.spool is not None
        while True:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                if self.policy == "block" and not self._has_space():
                    if not self.full:
                        log.warning(
                            "spool full (%d events, %d bytes): blocking the sources until the broker takes events",
                            self.spool.depth,
                            self.spool.bytes,
                        )
                    self.full = True
                    self._space.clear()
                    await self._space.wait()
                    continue
                room = min(self.max_events - self.spool.depth, self.batch) if self.policy == "block" else self.batch
                take = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                items = [t[0] for t in take]
                checkpoints = {k: v for _, k, v in take if k is not None and v is not None}
                limits = (self.max_events, self.max_bytes) if self.policy == "drop_oldest" else (None, None)
                try:
                    last, dropped = await self.call(self.spool.append, items, checkpoints, self.read_cursor, *limits)
                except sqlite3.Error as exc:
                    # Keep the events buffered and retry: losing them is not an option.
                    log.error("spool write failed (%s); retrying in 1 s", exc)
                    self._pending.extendleft(reversed(take))
                    await asyncio.sleep(1.0)
                    continue
                self.full = self.policy == "block" and not self._has_space()
                if dropped:
                    self.dropped += dropped
                    log.warning(
                        "spool full: dropped the %d oldest unsent event(s) (policy drop_oldest, %d in total)",
                        dropped,
                        self.dropped,
                    )
                self.last_seq = last
                for cb in self.on_commit:
                    cb(len(items), dropped)
                self.new_data.set()
                async with self._room:
                    self._room.notify_all()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is committed (or the spool is full and blocking)."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline and not (self.full and self.policy == "block"):
            await asyncio.sleep(0.01)

    async def read_after(self, seq: int, limit: int) -> list[SpoolRow]:
        """Committed events after ``seq``."""
        assert self.spool is not None
        return await self.call(self.spool.read_after, seq, limit)

    async def read_seqs(self, seqs: list[int]) -> list[SpoolRow]:
        """The committed events with these sequence numbers still in the spool, in spool order."""
        assert self.spool is not None
        return await self.call(self.spool.read_seqs, seqs)

    async def delete(self, seqs: list[int], counter: str = "published") -> int:
        """Remove delivered events and wake a blocked writer."""
        assert self.spool is not None
        removed = await self.call(self.spool.delete, seqs, counter)
        self._space.set()
        return removed

    async def close(self) -> None:
        """Stop the writer (after committing what it can) and close the database."""
        await self.flush(timeout=5.0)
        self._closing = True
        if self._writer:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        async with self._room:
            self._room.notify_all()
        if self.spool:
            await self.call(self.spool.close)
        self._exec.shutdown(wait=True)
