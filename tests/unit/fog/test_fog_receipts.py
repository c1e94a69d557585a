"""Unit tests of receipts (grouping per device, batching, duplicates) and of the dedupe window's confirmed state."""

from __future__ import annotations

import asyncio
from typing import Any

from reflexarc.envelope import Envelope
from reflexarc.events import Receipt
from reflexarc.fog.config import ReceiptSettings
from reflexarc.fog.dedupe import DedupeWindow, dedupe_key
from reflexarc.fog.metrics import BridgeMetrics, value
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import Record
from reflexarc.topics import Topics


class FakeClient:
    """Stands in for the ingest's MqttClient: records what is published (the broker acks at once)."""

    def __init__(self, v5: bool = True) -> None:
        self.v5 = v5
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, Receipt, int]] = []
        self.got = asyncio.Event()

    async def publish_start(
        self, topic: str, payload: bytes, qos: int, retain: bool, props: Any, ctype: str
    ) -> asyncio.Future[None]:
        env = Envelope.from_mqtt(payload, props, ctype)
        self.published.append((topic, Receipt.from_envelope(env), qos))
        self.got.set()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def record(site: str, device: str, *ids: str, dedupe: bool = True) -> Record:
    src = f"/sites/{site}/devices/{device}"
    return Record(
        "rx.data", b"k", b"v", [], receipts=[(site, device, i, dedupe_key(src, i) if dedupe else None) for i in ids]
    )


# ---- the dedupe window's confirmed state -----------------------------------------
def test_fog_dedupe_pending_until_confirmed() -> None:
    now = [0.0]
    w = DedupeWindow(size=3, max_age_s=10, clock=lambda: now[0])
    assert not w.seen("a")
    assert w.seen("a") and not w.confirmed("a") and w.pending == 1
    w.confirm("a")
    assert w.confirmed("a") and w.pending == 0
    w.confirm("never-seen")  # a key not in the window stays unknown
    assert not w.confirmed("never-seen")
    for k in ("b", "c", "d"):
        w.seen(k)
    assert not w.confirmed("a") and w.pending == 3, "evicted with the window; pending ids evicted too"
    now[0] = 100.0
    assert not w.seen("b") and w.pending == 1, "expired ones leave the pending set"
    w.forget("b")
    assert w.pending == 0


def test_fog_dedupe_seed_confirmed_and_pending_with_ages() -> None:
    now = [1000.0]
    w = DedupeWindow(size=10, max_age_s=60, clock=lambda: now[0])
    assert w.seed([("old", 120.0), ("p1", 30.0), ("p2", 5.0)], confirmed=False) == 2
    assert w.seen("p1") and not w.confirmed("p1")
    assert not w.seen("old"), "older than the window: not seeded"
    # The data topic's tail says Kafka has p1 and k1: p1 becomes confirmed, k1 is new and confirmed.
    w.seed([("k1", 50.0), ("p1", 30.0)], confirmed=True)
    assert w.confirmed("p1") and w.confirmed("k1") and not w.confirmed("p2")
    now[0] += 11.0
    assert not w.confirmed("k1") and not w.seen("k1"), "a seeded id expires by its age in Kafka"


# ---- receipts ----------------------------------------------------------------------
async def test_fog_receipts_grouped_per_device_in_order_and_chunked() -> None:
    dedupe = DedupeWindow(100, 60)
    for i in range(7):
        dedupe.seen(dedupe_key("/sites/s1/devices/d1", f"a{i}"))
    client = FakeClient()
    r = Receipts(ReceiptSettings(max_ids=3, interval_ms=60_000), Topics(), BridgeMetrics("unit-rcpt-1"), dedupe)
    r.client = client  # type: ignore[assignment]
    r.confirmed([record("s1", "d1", "a0", "a1"), record("s1", "d2", "b0")])
    r.confirmed([record("s1", "d1", "a2", "a3", "a4", "a5", "a6")])
    assert all(dedupe.confirmed(dedupe_key("/sites/s1/devices/d1", f"a{i}")) for i in range(7))
    assert r.waiting == 8
    await r.flush()
    got = [(t, rc.site, rc.device, rc.ids, q) for t, rc, q in client.published]
    assert got == [
        ("rx/s1/d1/receipt", "s1", "d1", ["a0", "a1", "a2"], 1),
        ("rx/s1/d1/receipt", "s1", "d1", ["a3", "a4", "a5"], 1),
        ("rx/s1/d1/receipt", "s1", "d1", ["a6"], 1),
        ("rx/s1/d2/receipt", "s1", "d2", ["b0"], 1),
    ]
    assert r.waiting == 0 and value(r.metrics.receipted) == 8 and value(r.metrics.receipts) == 4
    await r.flush()
    assert len(client.published) == 4, "nothing twice"


async def test_fog_receipts_published_by_interval_and_at_once_when_a_device_has_max_ids() -> None:
    client = FakeClient(v5=False)
    r = Receipts(ReceiptSettings(max_ids=5, interval_ms=60_000, qos=0), Topics("ns"), BridgeMetrics("unit-rcpt-2"))
    r.start(client)  # type: ignore[arg-type]
    try:
        r.confirmed([record("s", "d", "1", "2")])
        await asyncio.sleep(0.05)
        assert client.published == [], "below max_ids: waits for the interval (one minute here)"
        r.confirmed([record("s", "d", "3", "4", "5")])
        await asyncio.wait_for(client.got.wait(), 5)
        ((topic, rc, qos),) = client.published
        assert topic == "ns/s/d/receipt" and rc.ids == ["1", "2", "3", "4", "5"] and qos == 0
    finally:
        await r.stop()
    fast = Receipts(ReceiptSettings(interval_ms=10), Topics(), BridgeMetrics("unit-rcpt-3"))
    c2 = FakeClient()
    fast.start(c2)  # type: ignore[arg-type]
    try:
        fast.again(("s", "d", "x", None))
        await asyncio.wait_for(c2.got.wait(), 5)
        assert c2.published[0][1].ids == ["x"]
    finally:
        await fast.stop()


async def test_fog_receipts_disabled_still_confirm_dedupe_and_bounded_when_unpublished() -> None:
    dedupe = DedupeWindow(10, 60)
    key = dedupe_key("/sites/s/devices/d", "e1")
    dedupe.seen(key)
    off = Receipts(ReceiptSettings(enabled=False), Topics(), BridgeMetrics("unit-rcpt-4"), dedupe)
    off.confirmed([record("s", "d", "e1")])
    off.again(("s", "d", "e1", key))
    assert dedupe.confirmed(key) and off.waiting == 0
    # No connection to publish on: ids wait, up to a bound; beyond it they are dropped and counted.
    capped = Receipts(ReceiptSettings(), Topics(), BridgeMetrics("unit-rcpt-5"), max_pending=3)
    capped.confirmed([record("s", "d", "1", "2", "3", "4", "5", dedupe=False)])
    assert capped.waiting == 3 and value(capped.metrics.receipts_dropped) == 2
    # Downsampled events are confirmed when dropped.
    k2 = dedupe_key("/sites/s/devices/d", "e2")
    dedupe.seen(k2)
    capped.dedupe = dedupe
    capped.consumed(("s", "d", "e2", k2))
    assert dedupe.confirmed(k2)


def test_fog_tail_keys_of_plain_and_batch_records() -> None:
    import json

    from reflexarc.fog.shaping import BATCH_TYPE
    from reflexarc.fog.tail import record_keys

    src = b"/sites/s1/devices/d1"
    plain = [("ce_id", b"e-1"), ("ce_source", src), ("ce_type", b"io.reflexarc.data")]
    assert record_keys(plain, b"{}") == [dedupe_key(src.decode(), "e-1")]
    batch = [("ce_id", b"batch-id"), ("ce_source", src), ("ce_type", BATCH_TYPE.encode())]
    value = json.dumps({"stream": "t", "count": 2, "events": [{"id": "a"}, {"id": "b"}]}).encode()
    assert record_keys(batch, value) == [dedupe_key(src.decode(), "a"), dedupe_key(src.decode(), "b")]
    assert record_keys(batch, b"not json") == []
    assert record_keys([("rx-error", b"x")], b"dead letter") == []
