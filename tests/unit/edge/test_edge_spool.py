"""The SQLite spool: order, atomic checkpoints, bounds, persistence across reopen."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from reflexarc.edge.spool import AsyncSpool, Spool, SpoolItem


def _item(i: int, stream: str = "s", size: int = 10) -> SpoolItem:
    return SpoolItem(stream, f"id-{i}", f"rx/a/b/data/{stream}", b"x" * size, [("id", f"id-{i}")], "application/json")


def test_append_read_delete_in_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    last, dropped = sp.append([_item(i) for i in range(10)], {"src": "10"})
    assert (last, dropped) == (10, 0)
    rows = sp.read_after(0, 100)
    assert [r.item.event_id for r in rows] == [f"id-{i}" for i in range(10)]
    assert rows[0].item.props == [("id", "id-0")]
    assert [r.seq for r in sp.read_after(5, 2)] == [6, 7]
    assert sp.delete([1, 2, 3]) == 3
    assert sp.depth == 7 and sp.bytes == 70
    sp.close()
    again = Spool(tmp_path / "s.db")
    assert again.depth == 7 and again.checkpoint("src") == "10"
    assert again.counters() == {"accepted": 10, "published": 3}
    # Sequence numbers keep growing after a restart (AUTOINCREMENT), so order is kept.
    assert again.append([_item(99)], {})[0] == 11


def test_drop_oldest_spares_rows_handed_to_the_broker(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    sp.append([_item(i) for i in range(10)], {})
    # Rows 1..3 are in flight; making room for 5 more within 10 must drop 4..8.
    _, dropped = sp.append([_item(i) for i in range(10, 15)], {}, drop_before=3, max_events=10)
    assert dropped == 5
    assert [r.seq for r in sp.read_after(0, 100)] == [1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    assert sp.counters()["dropped"] == 5


def test_failed_transaction_keeps_nothing(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    bad = SpoolItem("s", "id", "t", None, None, None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        sp.append([_item(1), bad], {"src": "2"})
    assert sp.depth == 0 and sp.checkpoint("src") is None and sp.read_after(0, 10) == []


def test_commands_and_dead_letters(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db")
    sp.set_command("c1", "running", "sig", None)
    sp.set_command("c1", "answered", None, b"{}")
    assert sp.command("c1") == ("answered", "sig", b"{}")
    sp.add_dead("bad line", "file:3", b"junk")
    assert sp.dead_letters()[0]["error"] == "bad line"


async def test_block_policy_backpressure(tmp_path: Path) -> None:
    spool = AsyncSpool(tmp_path / "s.db", max_events=20, max_bytes=1 << 20, policy="block", batch=8, buffer=8)
    await spool.open()
    try:

        async def produce() -> None:
            for i in range(100):
                await spool.submit(_item(i), "src", str(i + 1))

        task = asyncio.create_task(produce())
        for _ in range(200):
            if spool.full and spool.waiting:
                break
            await asyncio.sleep(0.01)
        assert spool.full and spool.waiting == 1 and spool.depth == 20
        assert not task.done()
        # Acknowledge everything stored so far: the producer resumes, nothing is lost.
        while not task.done() or spool.buffered or spool.depth:
            rows = await spool.read_after(0, 100)
            if rows:
                await spool.delete([r.seq for r in rows])
            await asyncio.sleep(0.01)
        assert spool.spool is not None
        assert spool.spool.counters()["accepted"] == 100
        assert spool.spool.checkpoint("src") == "100"
        assert spool.dropped == 0 and spool.blocked_s > 0
    finally:
        await spool.close()
