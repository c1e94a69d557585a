"""Unit tests of the fog's disk buffer: order, round trip, bounds, group commits, and a SIGKILLed writer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reflexarc.fog.buffer import (
    DiskBuffer,
    pack_headers,
    pack_receipts,
    record_size,
    unpack_fields,
    unpack_headers,
    unpack_receipts,
)
from reflexarc.fog.sender import AckQueue, Record
from reflexarc.mqtt import MqttMessage


def rec(i: int, size: int = 100, key: bytes | None = b"s1/d1") -> Record:
    """A data record like the ingest makes, carrying event ``e-{i}``."""
    headers = [("ce_id", f"e-{i}".encode()), ("ce_source", b"/sites/s1/devices/d1"), ("ce_subject", "ü".encode())]
    value = f"{i:06d}".encode() + b"x" * size
    return Record("rx.data", key, value, headers, receipts=[("s1", "d1", f"e-{i}", f"/sites/s1/devices/d1\x1fe-{i}")])


def test_fog_buffer_codec_round_trip() -> None:
    headers = [("ce_id", b"a"), ("empty", b""), ("bin", bytes(range(256))), ("ünï", b"\x00\x1f")]
    assert unpack_headers(pack_headers(headers)) == headers
    entries = [("s", "d", "id-1", "src\x1fid-1"), ("s", "d", "ïd\x1f2", None)]
    assert unpack_receipts(pack_receipts(entries)) == entries
    assert unpack_receipts(pack_receipts([])) == []
    with pytest.raises(ValueError):
        unpack_fields(pack_headers(headers)[:-3])


async def test_fog_buffer_keeps_order_and_round_trips_records(tmp_path: Path) -> None:
    durable: list[int] = []
    buf = DiskBuffer(
        tmp_path / "b.db",
        max_events=10_000,
        max_bytes=10 << 20,
        on_durable=lambda recs: durable.extend(r.seq for r in recs),
    )
    await buf.open()
    try:
        originals = [rec(i, key=None if i == 3 else b"s1/d1") for i in range(1, 1001)]
        originals[4].value = None  # an event without data: a null value, kept null (not b"")
        originals[5].value = b""  # and an empty one stays empty
        for r in originals:
            buf.put(r)
        assert [r.seq for r in originals] == list(range(1, 1001)), "rows numbered in put order"
        assert buf.depth == 1000 and buf.bytes == sum(record_size(r) for r in originals)
        got, upto = await buf.read(0, 10_000)
        assert upto == 1000 and durable == list(range(1, 1001)), "every row committed (and reported) before a read"
        assert [r.seq for r in got] == list(range(1, 1001))
        for a, b in zip(originals, got, strict=True):
            assert (a.topic, a.key, a.value, a.headers, list(a.receipts)) == (
                b.topic,
                b.key,
                b.value,
                b.headers,
                list(b.receipts),
            )
            assert b.tickets == ()
        # Reads continue after a row; deleted rows are gone, the rest keep their order.
        buf.delete([r for r in originals if r.seq % 2 == 0])
        got, _ = await buf.read(500, 10_000)
        assert [r.seq for r in got] == list(range(501, 1001, 2))
        assert buf.depth == 500 and buf.store is not None and buf.store.depth == 500
    finally:
        await buf.close()


async def test_fog_buffer_delete_before_the_insert_is_committed(tmp_path: Path) -> None:
    """A record Kafka acknowledged before its copy reached the disk: insert and delete cancel out."""
    buf = DiskBuffer(tmp_path / "b.db", max_events=100, max_bytes=1 << 20)
    await buf.open()
    try:
        a, b = rec(1), rec(2)
        buf.put(a)
        buf.put(b)
        buf.delete([a])  # same transaction as the inserts (the writer has not run yet)
        got, _ = await buf.read(0, 10)
        assert [r.seq for r in got] == [b.seq]
        assert buf.depth == 1 and buf.store is not None and buf.store.depth == 1
    finally:
        await buf.close()


async def test_fog_buffer_is_bounded_and_frees_space_on_delete(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path / "b.db", max_events=5, max_bytes=1 << 20)
    await buf.open()
    try:
        recs = [rec(i) for i in range(5)]
        for r in recs[:4]:
            buf.put(r)
        assert not buf.full()
        buf.put(recs[4])
        assert buf.full()
        waiter = asyncio.ensure_future(buf.wait_space())
        await asyncio.sleep(0)
        assert not waiter.done(), "no room until rows are deleted"
        buf.delete(recs[:1])
        await asyncio.wait_for(waiter, 5)
        assert not buf.full()
        # By bytes as well.
        small = DiskBuffer(tmp_path / "s.db", max_events=1000, max_bytes=3 * record_size(rec(0, size=1000)))
        await small.open()
        try:
            for i in range(3):
                assert not small.full()
                small.put(rec(i, size=1000))
            assert small.full()
        finally:
            await small.close()
    finally:
        await buf.close()


async def test_fog_buffer_releases_mqtt_tickets_only_once_on_disk(tmp_path: Path) -> None:
    acked: list[int] = []
    aq = AckQueue(lambda m: acked.append(m.mid))

    def durable(recs: list[Record]) -> None:
        # What the spill does: the rows are on disk, the MQTT messages may be acknowledged.
        for r in recs:
            for t in r.tickets:
                t.holds -= 1
            r.tickets = ()
        aq.settle()

    buf = DiskBuffer(tmp_path / "b.db", max_events=100, max_bytes=1 << 20, on_durable=durable)
    await buf.open()
    try:
        for i in range(1, 11):
            t = aq.new(MqttMessage("t", b"", 1, i))
            r = rec(i)
            r.tickets = (t,)  # the record's hold is the handling hold, released at commit
            buf.put(r)
            assert acked == [], "nothing acknowledged before the commit"
        await buf.read(0, 1)
        assert acked == list(range(1, 11))
    finally:
        await buf.close()


async def test_fog_buffer_take_unwritten_returns_uncommitted_records(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path / "b.db", max_events=100, max_bytes=1 << 20)
    await buf.open()
    try:
        buf.put(rec(1))
        await buf.read(0, 1)  # committed
        later = [rec(2), rec(3)]
        for r in later:
            buf.put(r)
        taken = buf.take_unwritten()
        assert taken == later and all(r.seq == 0 for r in taken)
        assert buf.depth == 1
        got, upto = await buf.read(0, 10)
        assert [r.value[:6] for r in got] == [b"000001"] and upto == 1
    finally:
        await buf.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[2])
    from test_fog_buffer import rec
    from reflexarc.fog.buffer import DiskBuffer

    async def main():
        buf = DiskBuffer(sys.argv[1], max_events=1_000_000, max_bytes=1 << 30)
        await buf.open()
        n = 0
        committed = 0
        while True:
            for _ in range(50):
                n += 1
                buf.put(rec(n))
            await buf.read(n, 1)  # everything put so far is committed once this returns
            committed = n
            if committed == 2000:
                print("committed", committed, flush=True)  # the parent kills us from here on
    asyncio.run(main())
""")


async def test_fog_buffer_survives_sigkill_of_its_writer(tmp_path: Path) -> None:
    """A writer killed while it keeps committing: every row it reported committed is there, in order, readable."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "crash.db"
    p = subprocess.Popen(
        [sys.executable, str(script), str(path), str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 60)
        assert line.startswith("committed"), line
        await asyncio.sleep(0.2)  # let it write more, mid-transaction when the kill lands
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    buf = DiskBuffer(path, max_events=1_000_000, max_bytes=1 << 30)
    await buf.open()
    try:
        assert buf.depth >= 2000
        got, upto = await buf.read(0, 1_000_000)
        assert [r.seq for r in got] == list(range(1, len(got) + 1)) and upto == len(got) == buf.depth
        assert [int(r.value[:6]) for r in got] == list(range(1, len(got) + 1))
        assert got[-1].receipts == [("s1", "d1", f"e-{len(got)}", f"/sites/s1/devices/d1\x1fe-{len(got)}")]
        # A reopened buffer numbers new rows after the old ones.
        assert buf.put(rec(0)) == len(got) + 1
    finally:
        await buf.close()


def test_fog_buffer_path_from_fog_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexarc.fog.config import load_config

    monkeypatch.delenv("RX_STATE_DIR", raising=False)
    conf = tmp_path / "conf" / "fog.yaml"
    conf.parent.mkdir()
    conf.write_text("ingest:\n  client_id: fog-a\n  buffer: {path: data/buf.db, spill_after_ms: 250}\n")
    cfg = load_config(conf)
    assert cfg.buffer_path() == conf.parent / "data" / "buf.db", "relative to fog.yaml"
    assert cfg.ingest.buffer.spill_after_ms == 250 and cfg.ingest.receipts.enabled and cfg.ingest.buffer.enabled
    conf.write_text("ingest: {client_id: fog-b}\n")
    assert load_config(conf).buffer_path() == Path.home() / ".local/state/reflexarc/fog/rx/fog-b/buffer.db"
    monkeypatch.setenv("RX_STATE_DIR", str(tmp_path / "state"))
    assert load_config(conf).buffer_path() == tmp_path / "state" / "fog-fog-b" / "buffer.db"
