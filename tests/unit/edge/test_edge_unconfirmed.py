"""Receipts (delivery: pipeline): the confirmation bookkeeping, and the publisher with a real spool.

The MQTT client is a stand-in here (a unit test); the integration tests in
tests/integration/edge/test_edge_receipts.py runs the agent against Mosquitto.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reflexarc.config import ConfigError
from reflexarc.edge.config import parse_agent_config
from reflexarc.edge.inbox import Inbox
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.publisher import Publisher
from reflexarc.edge.receipts import Unconfirmed, receipt_ids
from reflexarc.edge.spool import AsyncSpool, SpoolItem
from reflexarc.envelope import EnvelopeError
from reflexarc.events import CommandAck, Receipt
from reflexarc.mqtt import MqttError, MqttMessage
from reflexarc.topics import Topics

PREFIX = "rx/bl1/det1"


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_bounds_what_is_out_and_a_receipt_frees_it() -> None:
    u = Unconfirmed(3, 5.0, 40.0, clock=Clock())
    for seq in (1, 2, 3):
        u.sent(f"e{seq}", seq)
    assert u.full and len(u) == 3
    assert u.confirm(["e2"]) == [2]
    assert not u.full and len(u) == 2 and "e2" not in u
    assert u.confirmed == 1


def test_unknown_and_repeated_ids_are_ignored() -> None:
    u = Unconfirmed(10, 5.0, 40.0, clock=Clock())
    u.sent("e1", 1)
    assert u.confirm(["e1", "from-an-earlier-run"]) == [1]
    # A repeated receipt (QoS 1 redelivery, or the fog confirming a re-send again) frees nothing twice.
    assert u.confirm(["e1"]) == []
    assert u.unknown == 2 and u.confirmed == 1


def test_timer_starts_at_the_pubAck_and_resends_go_in_spool_order() -> None:
    clock = Clock()
    u = Unconfirmed(100, 5.0, 40.0, clock=clock)
    for seq in range(1, 9):
        u.sent(f"e{seq}", seq)
    # PUBACKs arrive out of order; e8 never gets one (MQTT itself re-sends it after a reconnect).
    for seq in (2, 1, 4, 3, 6, 5, 7):
        u.acked(f"e{seq}", seq)
    clock.now += 4.9
    assert u.due() == []
    u.confirm(["e3", "e6"])  # the fog is there: these were lost on the way
    clock.now += 0.2
    assert u.due() == [(1, "e1"), (2, "e2"), (4, "e4"), (5, "e5"), (7, "e7")]
    assert u.resent == 5 and not u.probing
    # Re-sent events wait for their new PUBACK before their timer runs again.
    clock.now += 100
    assert u.due() == []


def test_unanswered_rounds_back_off_and_probe_with_the_oldest() -> None:
    clock = Clock()
    u = Unconfirmed(100, 2.0, 8.0, probe=2, clock=clock)
    for seq in range(1, 7):
        u.sent(f"e{seq}", seq)
        u.acked(f"e{seq}", seq)

    def round_() -> list[int]:
        got = [seq for seq, _ in u.due()]
        for seq in got:
            u.acked(f"e{seq}", seq)  # the broker took the re-send again
        return got

    clock.now += 2.0
    # Nothing was ever confirmed: the fog may be away. Only the oldest two go, as a probe.
    assert round_() == [1, 2] and u.probing
    # Unanswered: the next round waits twice as long (4 s), then 8 s (the cap), and probes again.
    clock.now += 3.9
    assert round_() == []
    clock.now += 0.1
    assert round_() == [1, 2] and u.timeout == 8.0
    clock.now += 7.9
    assert round_() == []
    clock.now += 0.1
    assert round_() == [1, 2]
    clock.now += 8.0
    assert round_() == [1, 2] and u.timeout == 8.0  # capped
    # The fog is back and confirms the probe: everything overdue goes at once, at the base timeout.
    assert u.confirm(["e1", "e2"]) == [1, 2]
    assert u.timeout == 2.0
    assert round_() == [3, 4, 5, 6] and not u.probing


def test_rows_sharing_an_id_are_freed_together() -> None:
    u = Unconfirmed(10, 5.0, 40.0, clock=Clock())
    u.sent("dup", 1)
    u.sent("dup", 4)  # a device that reused an id: one event for the fog
    u.sent("other", 2)
    assert len(u) == 2
    assert sorted(u.confirm(["dup"])) == [1, 4]
    u.forget("other", 2)
    assert len(u) == 0


def test_oldest_age_counts_from_the_first_send() -> None:
    clock = Clock()
    u = Unconfirmed(10, 1.0, 4.0, clock=clock)
    assert u.oldest_age() is None
    u.sent("a", 1)
    u.acked("a", 1)
    clock.now += 3.0
    u.sent("b", 2)
    u.due()  # "a" is re-sent: its age still counts from its first send
    clock.now += 1.0
    assert u.oldest_age() == pytest.approx(4.0)


def _message(payload: bytes, props: list[tuple[str, str]], ctype: str) -> MqttMessage:
    return MqttMessage(f"{PREFIX}/receipt", payload, 1, 1, user_properties=props, content_type=ctype)


def test_receipt_message_is_read_and_checked() -> None:
    env = Receipt(site="bl1", device="det1", ids=["a", "b"]).to_envelope()
    assert receipt_ids(_message(*env.to_mqtt(binary=True)), "bl1", "det1") == ["a", "b"]
    assert receipt_ids(_message(*env.to_mqtt(binary=False)), "bl1", "det1") == ["a", "b"]  # MQTT 3.1.1
    with pytest.raises(EnvelopeError, match="not bl1/det2"):
        receipt_ids(_message(*env.to_mqtt()), "bl1", "det2")
    ack = CommandAck(command_id="c", site="bl1", device="det1", actuator="m", ok=True).to_envelope()
    with pytest.raises(EnvelopeError, match=r"expected a io\.reflexarc\.receipt"):
        receipt_ids(_message(*ack.to_mqtt()), "bl1", "det1")


def test_delivery_settings_are_validated() -> None:
    cfg = parse_agent_config("site: s\ndevice: d\n")
    assert cfg.delivery == "pipeline"
    assert cfg.publish.unconfirmed_max == 5000 and cfg.publish.confirm_timeout_s == 10.0
    assert parse_agent_config("site: s\ndevice: d\ndelivery: broker\n").delivery == "broker"
    with pytest.raises(ConfigError, match="delivery"):
        parse_agent_config("site: s\ndevice: d\ndelivery: kafka\n")
    with pytest.raises(ConfigError, match="confirm_timeout_max_s must be >= confirm_timeout_s"):
        parse_agent_config("site: s\ndevice: d\npublish: {confirm_timeout_s: 20, confirm_timeout_max_s: 10}\n")
    with pytest.raises(ConfigError, match="unconfirmed_max"):
        parse_agent_config("site: s\ndevice: d\npublish: {unconfirmed_max: 0}\n")


# ---- the publisher with a real spool ---------------------------------------------------
class FakeClient:
    """Stands in for MqttClient: records what is published and PUBACKs it (or refuses it)."""

    v5 = True

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.refuse: set[str] = set()
        self.connected = asyncio.Event()
        self.connected.set()

    async def publish_start(self, topic: str, payload: bytes, qos: int, **kw: Any) -> asyncio.Future[None]:
        eid = dict(kw["user_properties"])["id"]
        self.sent.append(eid)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if eid in self.refuse:
            fut.get_loop().call_soon(fut.set_exception, MqttError("broker refused the publish: Not authorized"))
        else:
            fut.get_loop().call_soon(fut.set_result, None)
        return fut


def _item(i: int) -> SpoolItem:
    stream = "ab"[i % 2]
    eid = f"e{i:03d}"
    return SpoolItem(stream, eid, f"{PREFIX}/data/{stream}", b'{"i": %d}' % i, [("id", eid)], "application/json")


async def until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for an in-process condition (the loop keeps running)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def _spool(path: Path, **kw: Any) -> AsyncSpool:
    spool = AsyncSpool(path, max_events=kw.pop("max_events", 10_000), max_bytes=1 << 24, batch=8, **kw)
    await spool.open()
    return spool


async def _fill(spool: AsyncSpool, items: range) -> None:
    for i in items:
        await spool.submit(_item(i), None, None)
    await spool.flush()


def _publisher(spool: AsyncSpool, client: FakeClient, u: Unconfirmed) -> tuple[Publisher, asyncio.Task[None]]:
    pub = Publisher(spool, client, EdgeMetrics(), PREFIX, 100, u, f"{PREFIX}/receipt")  # type: ignore[arg-type]
    return pub, asyncio.create_task(pub.run())


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_receipt_frees_rows_puback_does_not_and_a_full_window_waits(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    pub, task = _publisher(spool, client, Unconfirmed(5, 30.0, 60.0))
    try:
        await _fill(spool, range(20))
        await until(lambda: len(client.sent) == 5)
        await asyncio.sleep(0.05)
        assert client.sent == [f"e{i:03d}" for i in range(5)], "publishing waits while the window is full"
        assert spool.depth == 20, "a PUBACK frees nothing"
        assert pub.confirm(["e001", "e003", "nobody-knows"]) == 2
        await until(lambda: len(client.sent) == 7 and spool.depth == 18)
        rows = await spool.read_after(0, 100)
        assert "e001" not in {r.item.event_id for r in rows} and "e003" not in {r.item.event_id for r in rows}
        assert pub.metrics.receipt_ids_unknown._value.get() == 1
        assert pub.metrics.events_published._value.get() == 2
    finally:
        await _stop(task)
        await spool.close()


async def test_timeout_resends_the_unconfirmed_oldest_first(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    clock = Clock()  # decides what is due; the publisher looks every 0.05 s (a quarter of the timeout)
    pub, task = _publisher(spool, client, Unconfirmed(100, 0.2, 0.4, probe=2, clock=clock))
    try:
        await _fill(spool, range(10))
        await until(lambda: len(client.sent) == 10)
        clock.now += 0.1
        pub.confirm(["e002", "e003", "e007"])  # the fog is there; the others were lost on the way
        await asyncio.sleep(0.1)
        assert len(client.sent) == 10, "nothing is due before the timeout"
        clock.now += 0.1
        await until(lambda: len(client.sent) >= 17)
        # Re-sent from the oldest unconfirmed onward, in spool order (so in order per stream).
        assert client.sent[10:] == ["e000", "e001", "e004", "e005", "e006", "e008", "e009"]
        assert pub.resent == 7
        # Nothing confirmed for a whole (doubled) timeout now: the next round only probes with the oldest two.
        clock.now += 0.4
        await until(lambda: len(client.sent) > 17)
        await asyncio.sleep(0.1)
        assert client.sent[17:] == ["e000", "e001"]
        assert pub.metrics.events_resent._value.get() == 9
        pub.confirm([f"e{i:03d}" for i in range(10)])
        await until(lambda: spool.depth == 0)
    finally:
        await _stop(task)
        await spool.close()


async def test_restart_rebuilds_the_window_from_the_spool(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    pub, task = _publisher(spool, client, Unconfirmed(100, 30.0, 60.0))
    await _fill(spool, range(10))
    await until(lambda: len(client.sent) == 10)
    pub.confirm(["e000", "e004", "e005"])
    await until(lambda: spool.depth == 7)
    await _stop(task)  # the agent dies: what it knew in memory is gone
    await spool.close()

    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    u = Unconfirmed(100, 30.0, 60.0)
    pub, task = _publisher(spool, client, u)
    try:
        # Everything left in the spool is unconfirmed and is published again, in spool order.
        want = [f"e{i:03d}" for i in (1, 2, 3, 6, 7, 8, 9)]
        await until(lambda: len(client.sent) == 7)
        assert client.sent == want and sorted(u._pending) == want
        assert pub.confirm(["e000", "e004"]) == 0, "receipts of an earlier run free nothing"
        assert pub.confirm(want) == 7
        await until(lambda: spool.depth == 0)
        assert spool.spool is not None and spool.spool.counters()["published"] == 10
    finally:
        await _stop(task)
        await spool.close()


async def test_drop_oldest_never_drops_unconfirmed_rows(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db", max_events=10, policy="drop_oldest")
    client = FakeClient()
    pub, task = _publisher(spool, client, Unconfirmed(4, 30.0, 60.0))
    try:
        await _fill(spool, range(4))
        await until(lambda: len(client.sent) == 4)
        await _fill(spool, range(4, 30))  # the fog is away: the window stays full, the spool overflows
        await until(lambda: spool.dropped == 20)
        ids = [r.item.event_id for r in await spool.read_after(0, 100)]
        # The four handed out stay (they may be in Kafka already); the oldest unsent ones went.
        assert ids == ["e000", "e001", "e002", "e003"] + [f"e{i:03d}" for i in range(24, 30)]
        pub.confirm(["e000", "e001", "e002", "e003"])
        await until(lambda: client.sent[4:8] == ["e024", "e025", "e026", "e027"])
    finally:
        await _stop(task)
        await spool.close()


async def test_refused_publish_becomes_a_dead_letter_and_leaves_the_window(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    client.refuse.add("e001")
    u = Unconfirmed(2, 30.0, 60.0)
    _pub, task = _publisher(spool, client, u)
    try:
        await _fill(spool, range(4))
        await until(lambda: len(client.sent) == 3)  # e001's refusal freed its place in the window
        await until(lambda: spool.depth == 3)
        assert spool.spool is not None and spool.spool.dead_letters()[0]["error"].endswith("Not authorized")
        assert "e001" not in u and len(u) == 2
    finally:
        await _stop(task)
        await spool.close()


async def test_inbox_frees_rows_on_receipts_and_acks_every_receipt(tmp_path: Path) -> None:
    spool = await _spool(tmp_path / "s.db")
    client = FakeClient()
    client.messages = asyncio.Queue()  # type: ignore[attr-defined]
    acked: list[int] = []
    client.ack = lambda msg: acked.append(msg.mid)  # type: ignore[attr-defined]
    pub, task = _publisher(spool, client, Unconfirmed(100, 30.0, 60.0))
    inbox = Inbox(client, Topics(), "bl1", "det1", pub.metrics, None, pub)  # type: ignore[arg-type]
    assert inbox.filters() == [(f"{PREFIX}/receipt", 1)]
    runner = asyncio.create_task(inbox.run())
    try:
        await _fill(spool, range(3))
        await until(lambda: len(client.sent) == 3)
        ok = Receipt(site="bl1", device="det1", ids=["e000", "e002", "e999"]).to_envelope().to_mqtt()
        other = Receipt(site="bl1", device="det2", ids=["e001"]).to_envelope().to_mqtt()
        for mid, (payload, props, ctype) in enumerate([ok, other], 1):
            client.messages.put_nowait(  # type: ignore[attr-defined]
                MqttMessage(f"{PREFIX}/receipt", payload, 1, mid, user_properties=props, content_type=ctype)
            )
        await until(lambda: acked == [1, 2] and spool.depth == 1)
        m = pub.metrics
        assert m.receipts.labels("ok")._value.get() == 1 and m.receipts.labels("invalid")._value.get() == 1
        assert m.receipt_ids_unknown._value.get() == 1
        assert [r.item.event_id for r in await spool.read_after(0, 10)] == ["e001"], "det2's receipt freed nothing"
    finally:
        await _stop(runner)
        await _stop(task)
        await spool.close()
