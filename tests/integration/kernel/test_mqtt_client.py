"""The kernel MQTT client against real brokers: acks, windows, backpressure, reconnects, wills, errors.

Every test talks to a real Mosquitto (the ``mosquitto`` fixture) or a real
amqtt broker process on a loopback port; the broker is stopped, restarted,
paused (SIGSTOP) and the client processes killed (SIGKILL) for real.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reflexarc.brokers import MqttBroker, start_mqtt
from reflexarc.config import MqttSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.mqtt import MqttClient, MqttError, MqttMessage, Will
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
T = Topics()
SITE, DEVICE = "kt", "dev1"


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def take(client: MqttClient, n: int, timeout: float = 10.0) -> list[MqttMessage]:
    """The next ``n`` received messages (fails if they do not arrive in time)."""
    return [await asyncio.wait_for(client.messages.get(), timeout) for _ in range(n)]


def event(i: int, stream: str = "load") -> tuple[str, bytes, list[tuple[str, str]], str]:
    """Event ``i`` as a device publishes it (binary CloudEvent, MQTT 5)."""
    env = Envelope.for_device(EventType.DATA, SITE, DEVICE, {"seq": i, "v": "é" * 20}, subject=stream, id=f"e-{i}")
    payload, props, ctype = env.to_mqtt(binary=True)
    return T.mqtt_data(SITE, DEVICE, stream), payload, props, ctype


def data_filter() -> str:
    """The subscription filter that matches :func:`event` topics."""
    return T.mqtt_ingest_filters(SITE, DEVICE)[0]


def ids(messages: list[MqttMessage]) -> list[str]:
    """CloudEvent ids of received binary-mode messages."""
    return [dict(m.user_properties)["id"] for m in messages]


# ---- publish ------------------------------------------------------------------------
async def test_publish_acks_in_order_and_delivers_properties(mqtt_settings: MqttSettings) -> None:
    n = 2000
    async with MqttClient(mqtt_settings, "kt-sub") as sub, MqttClient(mqtt_settings, "kt-pub", max_inflight=100) as pub:
        await sub.subscribe([(data_filter(), 1)])
        done: list[int] = []
        futs = []
        sent = [event(i) for i in range(n)]
        for i, (topic, payload, props, ctype) in enumerate(sent):
            fut = await pub.publish_start(topic, payload, 1, False, props, ctype)
            assert pub.inflight <= 100
            fut.add_done_callback(lambda f, i=i: done.append(i) if f.exception() is None else None)
            futs.append(fut)
        await asyncio.wait_for(asyncio.gather(*futs), 30)
        await asyncio.sleep(0)  # done callbacks run one loop pass after the futures complete
        assert done == list(range(n)), "PUBACKs must complete the publishes in order"
        assert pub.inflight == 0
        got = await take(sub, n)
        assert ids(got) == [f"e-{i}" for i in range(n)]
        assert [(m.topic, m.payload, m.user_properties, m.content_type) for m in got] == sent
        first = got[0]
        env = Envelope.from_mqtt(first.payload, first.user_properties, first.content_type)
        assert env.id == "e-0" and env.data == {"seq": 0, "v": "é" * 20}
        # publish() returns only once the broker acknowledged.
        await pub.publish(*event(n)[:2])
        assert pub.inflight == 0


async def test_inflight_window_bounds_unacknowledged_publishes(
    mosquitto: MqttBroker, mqtt_settings: MqttSettings
) -> None:
    async with MqttClient(mqtt_settings, "kt-window", max_inflight=5) as pub:
        mosquitto.process.signal(signal.SIGSTOP)  # no PUBACKs while the broker is paused
        try:
            futs: list[asyncio.Future[None]] = []

            async def producer() -> None:
                for i in range(8):
                    futs.append(await pub.publish_start(*event(i)[:2]))

            task = asyncio.create_task(producer())
            await wait_until(lambda: len(futs) == 5, 5, "5 publishes in flight")
            await asyncio.sleep(0.3)
            assert len(futs) == 5 and pub.inflight == 5 and not task.done(), "the 6th publish must wait for room"
        finally:
            mosquitto.process.signal(signal.SIGCONT)
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert len(futs) == 8 and pub.inflight == 0


# ---- receive ------------------------------------------------------------------------
async def test_manual_ack_and_receive_maximum_hold_the_broker_back(mqtt_settings: MqttSettings) -> None:
    kw = {"manual_ack": True, "receive_maximum": 3, "clean_start": False, "session_expiry": 300}
    sub = MqttClient(mqtt_settings, "kt-slow", **kw)  # type: ignore[arg-type]
    await sub.connect()
    await sub.subscribe([(data_filter(), 1)])
    async with MqttClient(mqtt_settings, "kt-fast") as pub:
        for i in range(10):
            await pub.publish(*event(i)[:2], user_properties=event(i)[2])
    first = await take(sub, 3)
    await asyncio.sleep(0.5)
    assert sub.messages.qsize() == 0, "the broker must stop at Receive Maximum unacknowledged messages"
    sub.ack(first[0])
    (fourth,) = await take(sub, 1)
    assert ids([*first, fourth]) == ["e-0", "e-1", "e-2", "e-3"]
    await asyncio.sleep(0.3)
    assert sub.messages.qsize() == 0
    # Leave e-1..e-3 unacknowledged: the persistent session redelivers them.
    await sub.disconnect()
    again = MqttClient(mqtt_settings, "kt-slow", **kw)  # type: ignore[arg-type]
    await again.connect()
    try:
        seen: list[MqttMessage] = []
        while len({*ids(seen)}) < 9:
            (m,) = await take(again, 1)
            seen.append(m)
            again.ack(m)
        assert ids(seen) == [f"e-{i}" for i in range(1, 10)]
        assert all(m.dup for m in seen[:3]), "redelivered messages carry the DUP flag"
    finally:
        await again.disconnect()


async def test_bounded_queue_pauses_reading_and_loses_nothing(mqtt_settings: MqttSettings) -> None:
    n = 500
    async with MqttClient(mqtt_settings, "kt-bounded", queue_size=2) as sub:
        await sub.subscribe([(data_filter(), 1)])
        async with MqttClient(mqtt_settings, "kt-burst") as pub:
            futs = [await pub.publish_start(*event(i)[:2], user_properties=event(i)[2]) for i in range(n)]
            await asyncio.wait_for(asyncio.gather(*futs), 20)
        got: list[MqttMessage] = []
        while len(got) < n:
            got.append(await asyncio.wait_for(sub.messages.get(), 10))
            assert sub.messages.qsize() <= 2
            if len(got) % 50 == 0:
                await asyncio.sleep(0.05)  # a slow consumer: the client must stop reading, not drop
        assert ids(got) == [f"e-{i}" for i in range(n)]


async def test_an_error_while_reading_reconnects_and_the_message_comes_again(mqtt_settings: MqttSettings) -> None:
    sub = MqttClient(mqtt_settings, "kt-fragile", clean_start=False, session_expiry=300, reconnect_min_s=0.1)
    await sub.connect()
    try:
        await sub.subscribe([(data_filter(), 1)])
        deliver = sub._c.rx_deliver
        calls: list[MqttMessage] = []

        def fails_once(m: MqttMessage) -> None:
            calls.append(m)
            if len(calls) == 1:
                raise RuntimeError("a bug in the receive path")
            deliver(m)

        sub._c.rx_deliver = fails_once
        async with MqttClient(mqtt_settings, "kt-pub-fragile") as pub:
            await pub.publish(*event(0)[:2], user_properties=event(0)[2])
        (m,) = await take(sub, 1)
        assert ids([m]) == ["e-0"] and m.dup, "not acknowledged, so redelivered after the reconnect"
        assert sub.disconnects >= 1 and sub.connected.is_set()
    finally:
        await sub.disconnect()


# ---- connection loss ----------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_reconnect_after_broker_restart_loses_nothing(mosquitto: MqttBroker, mqtt_settings: MqttSettings) -> None:
    n = 3000
    fast = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    durable = MqttClient(mqtt_settings, "kt-durable", clean_start=False, session_expiry=600, manual_ack=True, **fast)
    fresh = MqttClient(mqtt_settings, "kt-fresh", **fast)  # clean session: must re-subscribe itself
    # A persistent session with a shared subscription: Mosquitto 2.0 restores the session from
    # its persistence file but not its $share subscriptions, so the client must subscribe again.
    shared = MqttClient(mqtt_settings, "kt-shared", clean_start=False, session_expiry=600, **fast)
    pub = MqttClient(mqtt_settings, "kt-restart-pub", max_inflight=200, **fast)
    clients = (durable, fresh, shared, pub)
    for c in clients:
        await c.connect()
    try:
        await durable.subscribe([(data_filter(), 1)])
        await fresh.subscribe([(T.mqtt_status(SITE, DEVICE), 1)])
        await shared.subscribe([(T.mqtt_shared("kt-group", T.mqtt_status(SITE, DEVICE)), 1)])
        received: list[str] = []

        async def drain() -> None:
            while True:
                m = await durable.messages.get()
                received.append(dict(m.user_properties)["id"])
                durable.ack(m)

        pump = asyncio.create_task(drain())
        futs: list[asyncio.Future[None]] = []

        async def produce() -> None:
            for i in range(n):
                topic, payload, props, ctype = event(i)
                futs.append(await pub.publish_start(topic, payload, 1, False, props, ctype))
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # a steady stream, so the restart lands mid-way

        producer = asyncio.create_task(produce())
        await wait_until(lambda: len(futs) > n // 4, 20, "a quarter of the stream published")
        await asyncio.to_thread(mosquitto.process.stop)
        await wait_until(lambda: not pub.connected.is_set() and not durable.connected.is_set(), 10, "the loss noticed")
        assert pub.disconnects >= 1 and durable.disconnects >= 1
        await asyncio.sleep(0.5)  # publishes keep being accepted (and wait) while the broker is away
        await asyncio.to_thread(mosquitto.restart)
        await wait_until(lambda: all(c.connected.is_set() for c in clients), 15, "all reconnected")
        await asyncio.wait_for(producer, 60)
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        await wait_until(lambda: len(set(received)) >= n, 30, f"{n} distinct events at the subscriber")
        assert set(received) == {f"e-{i}" for i in range(n)}
        pump.cancel()
        # The clean-session client re-subscribed by itself after the restart.
        status = T.mqtt_status(SITE, DEVICE)
        deadline = time.monotonic() + 10
        while fresh.messages.empty():
            assert time.monotonic() < deadline, "the clean-session client did not re-subscribe"
            await pub.publish(status, b"probe", 1)
            await asyncio.sleep(0.1)
        assert (await fresh.messages.get()).payload == b"probe"
        # The resumed persistent session got its shared subscription back.
        assert shared.session_present
        assert (await asyncio.wait_for(shared.messages.get(), 10)).payload == b"probe"
    finally:
        for c in clients:
            await c.disconnect()


@pytest.mark.timeout(90)
async def test_keepalive_pings_idle_connections_and_detects_a_silent_broker(
    mosquitto: MqttBroker, mqtt_settings: MqttSettings
) -> None:
    settings = mqtt_settings.model_copy(update={"keepalive": 5})
    async with MqttClient(settings, "kt-idle", reconnect_min_s=0.2, reconnect_max_s=1.0) as c:
        # Mosquitto drops a client silent for 1.5 x keepalive (7.5 s): only our PINGREQs keep it.
        await asyncio.sleep(8.5)
        assert c.connected.is_set() and c.disconnects == 0
        await c.publish(*event(0)[:2])
        mosquitto.process.signal(signal.SIGSTOP)
        try:
            # No PINGRESP within the keepalive: the client gives the connection up.
            await wait_until(lambda: not c.connected.is_set(), 20, "the silent broker detected")
        finally:
            mosquitto.process.signal(signal.SIGCONT)
        await wait_until(c.connected.is_set, 15, "the reconnect after the broker woke up")
        await c.publish(*event(1)[:2])


# ---- last will ------------------------------------------------------------------------
_WILL_CLIENT = """
import asyncio, sys
from reflexarc.config import MqttSettings
from reflexarc.mqtt import MqttClient, Will

async def main() -> None:
    c = MqttClient(MqttSettings(port=int(sys.argv[1])), "kt-doomed", will=Will(sys.argv[2], b"gone", 1, False))
    await c.connect()
    print("connected", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_last_will_on_crash_but_not_on_clean_disconnect(mqtt_settings: MqttSettings) -> None:
    status = T.mqtt_status(SITE, DEVICE)
    async with MqttClient(mqtt_settings, "kt-watch") as watch:
        await watch.subscribe([(status, 1)])
        clean = MqttClient(mqtt_settings, "kt-polite", will=Will(status, b"polite-gone", 1, False))
        await clean.connect()
        await clean.disconnect()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WILL_CLIENT, str(mqtt_settings.port), status],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert line.strip() == "connected"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(10)
        (m,) = await take(watch, 1)
        assert m.payload == b"gone", "only the crashed client's will is published"
        assert watch.messages.empty()


# ---- connecting -----------------------------------------------------------------------
async def test_connect_errors_say_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "right"], check=True)
    broker = start_mqtt(tmp_path / "mq", flavour="mosquitto", extra_conf=f"password_file {pwfile}", anonymous=False)
    try:
        monkeypatch.setenv("KT_MQTT_PASSWORD", "wrong")
        bad = MqttSettings(port=broker.port, username="alice", password_env="KT_MQTT_PASSWORD")
        with pytest.raises(MqttError, match=r"(?i)(not authorized|bad user name or password).*KT_MQTT_PASSWORD"):
            await MqttClient(bad, "kt-bad").connect(timeout=10)
        monkeypatch.setenv("KT_MQTT_PASSWORD", "right")
        async with MqttClient(bad, "kt-good") as good:
            assert good.connected.is_set()
    finally:
        broker.process.stop()
    # Nothing listens on the port any more.
    with pytest.raises(MqttError, match=f"cannot reach the MQTT broker at 127.0.0.1:{broker.port}"):
        await MqttClient(MqttSettings(port=broker.port), "kt-nobody").connect(timeout=5)


async def test_connect_does_not_block_the_event_loop() -> None:
    # A socket that accepts TCP connections (kernel backlog) but never speaks MQTT.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    try:
        port = mute.getsockname()[1]
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        with pytest.raises(MqttError, match="no CONNACK"):
            await MqttClient(MqttSettings(port=port), "kt-mute").connect(timeout=1.0)
        t.cancel()
        assert len(gaps) > 20 and max(gaps) < 0.5, f"the loop stalled for {max(gaps):.2f}s"
    finally:
        mute.close()


async def test_structured_cloudevents_over_amqtt(tmp_path: Path) -> None:
    broker = start_mqtt(tmp_path / "amqtt", flavour="amqtt")
    try:
        settings = MqttSettings(port=broker.port, protocol=broker.protocol)
        assert broker.protocol == "3.1.1"
        env = Envelope.for_device(EventType.DATA, SITE, DEVICE, {"seq": 1}, subject="load", id="amqtt-1")
        async with (
            MqttClient(settings, "kt-a-sub", clean_start=False, manual_ack=True) as sub,
            MqttClient(settings, "kt-a-pub") as pub,
        ):
            assert not pub.v5
            await sub.subscribe([(data_filter(), 1)])
            payload, props, ctype = env.to_mqtt(binary=pub.v5)
            futs = [await pub.publish_start(T.mqtt_data(SITE, DEVICE, "load"), payload, 1, False, props, ctype)]
            for i in range(2, 201):
                e = Envelope.for_device(EventType.DATA, SITE, DEVICE, {"seq": i}, subject="load", id=f"amqtt-{i}")
                p, pr, ct = e.to_mqtt(binary=False)
                futs.append(await pub.publish_start(T.mqtt_data(SITE, DEVICE, "load"), p, 1, False, pr, ct))
            await asyncio.wait_for(asyncio.gather(*futs), 20)
            got = await take(sub, 200)
            for m in got:
                sub.ack(m)
            assert (got[0].user_properties, got[0].content_type) == ([], None)
            back = [Envelope.from_mqtt(m.payload, m.user_properties, m.content_type) for m in got]
            assert [e.id for e in back] == [f"amqtt-{i}" for i in range(1, 201)]
            assert back[0].data == {"seq": 1} and back[0].type == EventType.DATA
        # amqtt speaks MQTT 3.1.1 only: an MQTT 5 client gets an error, not a hang.
        with pytest.raises(MqttError, match=r"MQTT 5 \(amqtt speaks only 3\.1\.1"):
            await MqttClient(MqttSettings(port=broker.port, protocol="5"), "kt-v5").connect(timeout=2)
    finally:
        broker.process.stop()
