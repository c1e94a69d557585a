"""The asyncio MQTT client: connect, publish with awaited PUBACKs, subscribe, receive with manual acks.

See :mod:`reflexarc.mqtt` for what it guarantees; the wire codec is in
:mod:`reflexarc.mqtt.wire`, the paho integration in :mod:`reflexarc.mqtt._paho`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from reflexarc.config import MqttSettings
from reflexarc.mqtt._paho import _Conn, _Paho
from reflexarc.mqtt.wire import MqttMessage, PackedProperties, pack_publish_properties

log = logging.getLogger(__name__)

_TICK_S = 1.0  # how often paho's keepalive bookkeeping (loop_misc) runs
_DIAL_TIMEOUT_S = 10.0  # TCP connect + TLS handshake of one attempt


class MqttError(RuntimeError):
    """The broker refused something (connect, publish, subscribe); the text says what."""


@dataclass(slots=True)
class Will:
    """Last will: published by the broker if the client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


_CONNACK_HINTS = {
    134: "bad user name or password: check username and the variable named by password_env",
    135: "not authorized: the broker's ACL or auth refused this client",
    4: "bad user name or password: check username and the variable named by password_env",
    5: "not authorized: the broker's ACL or auth refused this client",
}


def _tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _reason(rc: Any) -> tuple[int, str]:
    if rc is None:
        return 0, "Success"
    return (rc.value if hasattr(rc, "value") else int(rc)), str(rc)


class MqttClient:
    """One MQTT connection used from asyncio. Create it inside a running loop.

    ``reconnect_min_s``/``reconnect_max_s`` bound the backoff between
    reconnect attempts after a lost connection (it doubles each failed
    attempt and resets on success); each wait adds a random ``0 ..
    reconnect_jitter`` times the backoff.
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        clean_start: bool = True,
        session_expiry: int = 0,
        manual_ack: bool = False,
        max_inflight: int = 1000,
        receive_maximum: int = 1000,
        will: Will | None = None,
        queue_size: int = 0,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 15.0,
        reconnect_jitter: float = 0.5,
    ) -> None:
        if not 1 <= max_inflight <= 65535:
            raise ValueError(f"max_inflight must be 1..65535 (MQTT packet ids), not {max_inflight}")
        if not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1..65535 (MQTT 5), not {receive_maximum}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("reconnect delays must satisfy 0 < reconnect_min_s <= reconnect_max_s")
        self.settings = settings
        self.client_id = client_id
        self.v5 = settings.protocol == "5"
        self._loop = asyncio.get_running_loop()
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._window = max_inflight
        self._inflight = asyncio.Semaphore(max_inflight)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._subs: list[tuple[str, int]] = []
        self._sub_waiters: dict[int, asyncio.Future[list[int]]] = {}
        self.messages: asyncio.Queue[MqttMessage] = asyncio.Queue(queue_size)
        self.connected = asyncio.Event()
        self.disconnects = 0
        #: Whether the broker resumed a stored session at the last accepted CONNACK.
        self.session_present = False
        self._tls = _tls_context(settings)
        self._reconnect_min = reconnect_min_s
        self._reconnect_max = reconnect_max_s
        self._jitter = reconnect_jitter
        self._rng = random.Random()
        self._backoff: float | None = None

        # Connection state, all touched on the event-loop thread only.
        self._conn: _Conn | None = None
        self._closing = False
        self._established = False  # a CONNACK was accepted once: losses are reconnected
        self._first: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._writer_on = False
        # Received messages the bounded queue had no room for: reading pauses until it drains.
        self._overflow: collections.deque[MqttMessage] = collections.deque()
        # manual_ack: messages handed out and not acknowledged yet, and those
        # received beyond Receive Maximum that wait for room.
        self._manual_ack = manual_ack
        self._unacked = 0
        self._held: collections.deque[MqttMessage] = collections.deque()
        self._paused = False
        # Reading paused because the broker sent a Receive Maximum more than asked (see _deliver).
        self._held_paused = False

        proto = paho.MQTTv5 if self.v5 else paho.MQTTv311
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": client_id,
            "protocol": proto,
            "manual_ack": manual_ack,
            # Reconnecting is ours; paho would otherwise reconnect (blocking) from inside a read.
            "reconnect_on_failure": False,
        }
        if not self.v5:
            kwargs["clean_session"] = clean_start
        self._c = _Paho(**kwargs)
        # paho's own limit on unacked publishes: ours (the semaphore) is the one
        # that applies. 0 (unlimited) rather than 65535: with a limit set, paho
        # scans every unacknowledged message on each PUBACK (O(window) per ack).
        self._c.max_inflight_messages_set(0)
        self._c.max_queued_messages_set(0)
        password = settings.password()
        # amqtt only queues for persistent sessions that present a username.
        username = settings.username or (None if self.v5 else client_id)
        if username:
            self._c.username_pw_set(username, password)
        if will is not None:
            self._c.will_set(will.topic, will.payload, will.qos, will.retain)
        c = self._c
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._no_write
        c.rx_deliver = self._deliver
        c.rx_acked = self._acked
        c.rx_flush = self._flush_soon

    # ---- lifecycle ------------------------------------------------------------
    async def connect(self, timeout: float = 15.0) -> None:
        """Connect and wait for the broker's CONNACK; from then on, lost connections are re-established.

        Raises :class:`MqttError` if the broker cannot be reached, refuses
        the connection (the text says why), or does not answer within
        ``timeout`` seconds. ``connect`` may be called again after a failure.
        """
        if self.connected.is_set():
            return
        self._closing = False
        self._lost.clear()
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry
            props.ReceiveMaximum = self._receive_maximum
        where = f"{self.settings.host}:{self.settings.port}"
        self._c.connect_async(
            self.settings.host,
            self.settings.port,
            self.settings.keepalive,
            clean_start=self._clean_start if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        first: asyncio.Future[None] = self._loop.create_future()
        self._first = first
        try:
            async with asyncio.timeout(timeout):
                try:
                    await self._open(min(timeout, _DIAL_TIMEOUT_S))
                except (OSError, ssl.SSLError) as exc:
                    raise MqttError(f"cannot reach the MQTT broker at {where}: {exc}") from exc
                await first
        except TimeoutError:
            self._abort()
            raise MqttError(
                f"no CONNACK from {where} within {timeout:.0f}s: is it an MQTT broker that speaks MQTT "
                f"{self.settings.protocol} (amqtt speaks only 3.1.1: set protocol), and is it overloaded?"
            ) from None
        except BaseException:
            self._abort()
            raise
        finally:
            self._first = None
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = self._loop.create_task(self._supervise(), name=f"mqtt-reconnect-{self.client_id}")
        if self._tick_handle is None:
            self._tick_handle = self._loop.call_later(_TICK_S, self._tick)

    async def disconnect(self) -> None:
        """Disconnect cleanly (the broker does not publish the last will) and stop reconnecting.

        Publishes still waiting for the broker's acknowledgement fail with
        :class:`MqttError`.
        """
        self._closing = True
        self._established = False
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not asyncio.current_task():
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sup
        conn = self._conn
        if conn is not None:
            # Let queued packets go out first, so that the DISCONNECT reaches
            # the broker (if it did not, the broker would publish our will).
            deadline = self._loop.time() + 2.0
            while self._conn is conn and (self._c.want_write() or conn.has_output()):
                if self._loop.time() > deadline:
                    break
                self._flush()
                await asyncio.sleep(0.002)
        with contextlib.suppress(Exception):
            self._c.disconnect()
        # Writes the DISCONNECT now; paho then closes the socket.
        self._flush()
        if self._conn is not None:
            self._abort()
        self.connected.clear()
        err = MqttError("client disconnected before the broker acknowledged")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
                # Nobody may be awaiting it any more: mark the exception as seen.
                fut.exception()
            self._inflight.release()
        self._pending.clear()
        for waiter in self._sub_waiters.values():
            if not waiter.done():
                waiter.set_exception(MqttError("client disconnected before the broker answered the subscribe"))
        self._sub_waiters.clear()

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    def _abort(self) -> None:
        """Drop the socket without a DISCONNECT (a failed connect, or one that could not be sent)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._c._sock_close()  # paho's own close: socket callbacks, then close
        self._conn = None

    async def _dial(self, timeout: float) -> _Conn:
        """Connect TCP (and TLS) in a worker thread: name lookup, connect and handshake block."""
        host, port, ctx = self.settings.host, self.settings.port, self._tls

        def dial() -> _Conn:
            raw = socket.create_connection((host, port), timeout=timeout)
            try:
                # Writes are gathered per loop pass already; Nagle would only add latency.
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = raw if ctx is None else ctx.wrap_socket(raw, server_hostname=host)
                sock.setblocking(False)
                return _Conn(sock)
            except BaseException:
                raw.close()
                raise

        fut = self._loop.run_in_executor(None, dial)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped; close its socket when it is done.
            fut.add_done_callback(_close_dialled)
            raise

    async def _open(self, dial_timeout: float = _DIAL_TIMEOUT_S) -> None:
        """Dial, then let paho send CONNECT on that socket (the CONNACK arrives in ``_on_connect``)."""
        conn = await self._dial(dial_timeout)
        if self._closing:
            conn.close()
            return
        self._c.rx_conn = conn
        try:
            self._c.reconnect()
        except BaseException:
            self._c.rx_conn = None
            if self._conn is None:
                conn.close()
            raise

    async def _supervise(self) -> None:
        """Re-establish lost connections with exponential backoff and jitter, until disconnect()."""
        while not self._closing:
            await self._lost.wait()
            self._lost.clear()
            while not self._closing and self._conn is None:
                delay = self._next_delay()
                log.debug("MQTT %s reconnecting in %.2f s", self.client_id, delay)
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    await self._open()
                except (OSError, ssl.SSLError) as exc:
                    log.info(
                        "MQTT %s: broker %s:%s not reachable yet: %s",
                        self.client_id,
                        self.settings.host,
                        self.settings.port,
                        exc,
                    )
                except Exception:
                    log.exception("MQTT %s: reconnect attempt failed", self.client_id)

    def _next_delay(self) -> float:
        base = self._reconnect_min if self._backoff is None else min(self._backoff * 2, self._reconnect_max)
        self._backoff = base
        return base + self._rng.uniform(0.0, self._jitter * base)

    def _tick(self) -> None:
        # paho's keepalive: PINGREQ when idle, drop the connection if the broker went silent.
        self._tick_handle = None
        if self._closing:
            return
        if self._conn is not None:
            try:
                self._c.loop_misc()
            except Exception:
                log.exception("MQTT %s: keepalive check failed", self.client_id)
        self._tick_handle = self._loop.call_later(_TICK_S, self._tick)

    # ---- socket events (paho's external-loop callbacks) -------------------------
    def _sock_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._conn = sock
        self._writer_on = False
        if self._held_paused:
            # A new connection must be read (its CONNACK); a resumed session sends the held messages again.
            self._held_paused = False
            self._paused = bool(self._overflow)
        if not self._paused:
            self._loop.add_reader(sock.fd, self._readable)

    def _sock_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        if self._conn is sock:
            self._conn = None
        if self._loop.is_closed():
            return
        self._loop.remove_reader(sock.fd)
        self._loop.remove_writer(sock.fd)
        self._writer_on = False

    def _want_write(self, _c: paho.Client, _u: Any, _sock: Any) -> None:
        # Called for the first packet paho queues since its last write.
        self._flush_soon()

    def _flush_soon(self) -> None:
        # Flush once, after the current callback, so packets queued together go out in one send.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _no_write(self, _c: paho.Client, _u: Any, _sock: Any) -> None:
        # Our writer watches the connection's own buffer, not paho's queue.
        return

    def _flush(self) -> None:
        self._flush_scheduled = False
        c = self._c
        if c.want_write():
            c.loop_write()  # paho's queue -> the connection's buffer (and DISCONNECT closes)
        conn = self._conn
        if conn is not None and conn.has_output():
            self._send(conn)

    def _send(self, conn: _Conn) -> None:
        try:
            done = conn.flush()
        except OSError as exc:
            # The reader sees the broken connection too and paho closes it; QoS 1 resends later.
            log.debug("MQTT %s: send failed: %s", self.client_id, exc)
            conn.discard_output()
            done = True
        if done:
            if self._writer_on:
                self._loop.remove_writer(conn.fd)
                self._writer_on = False
        elif not self._writer_on:
            self._loop.add_writer(conn.fd, self._writable)
            self._writer_on = True

    def _writable(self) -> None:
        conn = self._conn
        if conn is not None:
            self._send(conn)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        c = self._c
        try:
            rc = c.loop_read()
            # loop_read stops after a handful of packets; the rest may already be
            # in our buffer, where the selector cannot see it.
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._conn is conn and not self._paused and conn.pending():
                rc = c.loop_read()
        except Exception:
            # paho may be mid-packet now: drop the connection; the reconnect
            # resynchronises and the broker redelivers what was not acknowledged.
            log.exception("MQTT %s: error while reading; reconnecting", self.client_id)
            if self._conn is conn:
                c._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)

    # ---- publish --------------------------------------------------------------
    def _properties(
        self, user_properties: Sequence[tuple[str, str]], content_type: str | None
    ) -> PackedProperties | None:
        if not self.v5 or (not user_properties and not content_type):
            return None
        return PackedProperties(pack_publish_properties(user_properties, content_type))

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1/2)."""
        fut = await self.publish_start(topic, payload, qos, retain, user_properties, content_type)
        await fut

    async def publish_start(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> asyncio.Future[None]:
        """Hand a message to the client once the in-flight window has room.

        Returns a future that completes when the broker acknowledged it, so a
        caller can keep many publishes in flight and still know which landed.
        Awaiting this coroutine itself waits only for window space. While
        the connection is down, messages wait in the client and go out after
        the reconnect.
        """
        await self._inflight.acquire()
        try:
            info = self._c.publish(topic, payload, qos, retain, self._properties(user_properties, content_type))  # type: ignore[arg-type]  # PackedProperties quacks like paho's Properties
        except BaseException:
            self._inflight.release()
            raise
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._inflight.release()
            raise MqttError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        if qos == 0:
            self._inflight.release()
            fut.set_result(None)
            return fut
        # paho only writes from a later loop callback and the PUBACK comes from
        # the reader: registering here cannot miss it.
        self._pending[info.mid] = fut
        return fut

    def _acked(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is None:
            return
        self._inflight.release()
        if not fut.done():
            fut.set_result(None)

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        fut = self._pending.pop(mid, None)
        if fut is None:
            return
        # The window slot frees when the broker answered, whatever the caller did with the future.
        self._inflight.release()
        if fut.done():
            return
        code, text = _reason(rc)
        if code >= 0x80:
            fut.set_exception(MqttError(f"broker refused the publish: {text}"))
        else:
            fut.set_result(None)

    # ---- subscribe / receive --------------------------------------------------
    async def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        """Subscribe (and re-subscribe after every reconnect); return the granted QoS per filter."""
        for f in filters:
            if f not in self._subs:
                self._subs.append(f)
        rc, mid = self._c.subscribe(list(filters))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:  # paho gives no mid only on failure
            raise MqttError(f"subscribe failed: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._sub_waiters[mid] = fut
        try:
            granted = await asyncio.wait_for(fut, timeout)
        finally:
            self._sub_waiters.pop(mid, None)
        refused = [f for f, g in zip(filters, granted, strict=False) if g >= 0x80]
        if refused:
            raise MqttError(f"broker refused subscription to {[f for f, _ in refused]}")
        return granted

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        fut = self._sub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([_reason(rc)[0] for rc in rcs])

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = list(getattr(props, "UserProperty", []) or []) if props else []
        ctype = getattr(props, "ContentType", None) if props else None
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # Brokers reject such topics; if one arrives anyway, pass it on so
            # the consumer dead-letters it instead of it vanishing here.
            topic = msg._topic.decode("utf-8", "replace")
        self._deliver(
            MqttMessage(topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain), bool(msg.dup), user, ctype)
        )

    def _deliver(self, m: MqttMessage) -> None:
        if self._manual_ack and m.qos:
            if self._held or self._unacked >= self._receive_maximum:
                # The broker sent more than Receive Maximum unacknowledged
                # messages (Mosquitto 2.0.11 does, when acks come in order while
                # messages queue): keep them back, so the application never
                # holds more than it asked for (which bounds what a crash can
                # duplicate downstream).
                self._held.append(m)
                if len(self._held) >= self._receive_maximum and not self._paused:
                    # Bound them too: stop reading (TCP pushes back on the broker) until acks make room.
                    # A bridge that acknowledges fast (e.g. into a disk buffer) otherwise holds the
                    # broker's whole backlog in memory.
                    self._held_paused = self._paused = True
                    if self._conn is not None:
                        self._loop.remove_reader(self._conn.fd)
                return
            self._unacked += 1
        self._enqueue(m)

    def _enqueue(self, m: MqttMessage) -> None:
        if self._overflow or self.messages.full():
            self._overflow.append(m)
            self._pause()
        else:
            self.messages.put_nowait(m)

    def _pause(self) -> None:
        # A bounded queue is full: stop reading (TCP pushes back to the
        # broker) until the consumer made room for what is already here.
        if self._paused:
            return
        self._paused = True
        if self._conn is not None:
            self._loop.remove_reader(self._conn.fd)
        self._loop.create_task(self._drain_overflow(), name=f"mqtt-overflow-{self.client_id}")

    async def _drain_overflow(self) -> None:
        while self._overflow:
            await self.messages.put(self._overflow[0])
            self._overflow.popleft()
        if self._held_paused:
            return  # ack() resumes reading once the held messages are down
        self._paused = False
        conn = self._conn
        if conn is not None:
            self._loop.add_reader(conn.fd, self._readable)
            if conn.pending():
                self._readable()

    def ack(self, msg: MqttMessage) -> None:
        """Acknowledge a received message (only with ``manual_ack=True``)."""
        if msg.qos > 0:
            self._c.ack(msg.mid, msg.qos)
            if self._manual_ack:
                self._unacked = max(0, self._unacked - 1)
                held = self._held
                while held and self._unacked < self._receive_maximum:
                    self._unacked += 1
                    self._enqueue(held.popleft())
                if self._held_paused and len(held) < self._receive_maximum // 2:
                    self._held_paused = False
                    conn = self._conn
                    if not self._overflow and conn is not None:
                        self._paused = False
                        self._loop.add_reader(conn.fd, self._readable)
                        if conn.pending():
                            self._loop.call_soon(self._readable)

    # ---- connection events ----------------------------------------------------
    def _on_connect(self, _c: paho.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        code, text = _reason(rc)
        self._connected(code, text, bool(getattr(flags, "session_present", False)))

    def _connected(self, code: int, text: str, session_present: bool) -> None:
        if code != 0:
            hint = _CONNACK_HINTS.get(code, "")
            if code in (5, 135) and self.settings.username:
                # Mosquitto answers a wrong password with "not authorized", not "bad password".
                hint += (
                    f"; if the password is wrong: check username {self.settings.username!r} and the password "
                    f"in ${self.settings.password_env} (password_env)"
                )
            err = MqttError(f"MQTT broker refused the connection: {text}" + (f" ({hint})" if hint else ""))
            if self._first is not None and not self._first.done():
                self._first.set_exception(err)
            else:
                log.error("%s; retrying with backoff", err)
            return
        self._backoff = None
        self.session_present = session_present
        # From the first accepted CONNACK on, a lost connection is re-established.
        self._established = not self._closing
        self.connected.set()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if session_present and self._held:
            # The resumed session sends the unacknowledged messages again.
            self._held.clear()
        if self._subs:
            # Always subscribe again, also to a resumed session: a new session has no
            # subscriptions, and Mosquitto 2.0 restores a persisted session without its
            # shared ($share/...) subscriptions. Subscribing again is harmless (MQTT
            # replaces an existing subscription; retained messages may come again).
            self._c.subscribe(list(self._subs))
        log.debug("MQTT %s connected (session_present=%s)", self.client_id, session_present)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connected.clear()
        self.disconnects += 1
        text = _reason(rc)[1]
        if self._first is not None and not self._first.done():
            self._first.set_exception(
                MqttError(
                    f"the MQTT broker at {self.settings.host}:{self.settings.port} closed the connection "
                    f"before accepting it ({text}): check the protocol version (amqtt speaks only 3.1.1), "
                    "TLS settings and credentials"
                )
            )
        elif self._established and not self._closing:
            self._lost.set()
        log.debug("MQTT %s disconnected: %s", self.client_id, text)

    @property
    def inflight(self) -> int:
        """Publishes waiting for the broker's acknowledgement."""
        return len(self._pending)


def _close_dialled(fut: asyncio.Future[_Conn]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()
