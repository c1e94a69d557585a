"""An asyncio MQTT client on paho-mqtt: awaited PUBACKs, a bounded in-flight window, manual acks.

paho's protocol engine runs on the asyncio event loop itself, with no network
thread: the socket is watched with ``loop.add_reader``, and paho's
``loop_read``/``loop_write``/``loop_misc`` are called from there and from a
one-second timer. Every paho callback therefore runs on the event-loop
thread and completes futures directly (no ``call_soon_threadsafe`` hop, no
GIL ping-pong between two threads), which is what makes one client keep up
with the broker.

* ``await publish(...)`` returns when the broker acknowledged (QoS 1/2), and
  at most ``max_inflight`` publishes are unacknowledged at once (paho cannot
  track more than 65,535).
* ``manual_ack=True`` leaves the PUBACK of received messages to the caller
  (:meth:`MqttClient.ack`), so a message is acknowledged only after the next
  hop took it. With MQTT 5, Receive Maximum tells the broker to stop sending
  when that many are unacknowledged: backpressure without unbounded buffers.
* Persistent sessions (``clean_start=False`` + session expiry) keep
  subscriptions and queued QoS 1 messages across disconnects; unacknowledged
  publishes are sent again after a reconnect.
* After the first successful connect, a lost connection is re-established in
  the background with exponential backoff plus random jitter (so a fleet
  whose broker restarts does not reconnect in lock-step).

The blocking parts of a connection (name lookup, TCP connect, TLS handshake)
run in a worker thread; the connected socket is then handed to paho on the
loop. The socket paho sees buffers reads (paho reads a packet a few bytes at
a time) and gathers writes into one ``send`` per loop pass, and MQTT 5
PUBLISH properties are packed directly (:func:`pack_publish_properties`)
instead of through paho's generic encoder.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from reflexarc.config import MqttSettings

log = logging.getLogger(__name__)

_READ_SIZE = 128 * 1024  # one recv() serves hundreds of small packets
_TLS_WRITE_CHUNK = 16 * 1024  # one TLS record; a retried SSL write must repeat the same bytes
_TICK_S = 1.0  # how often paho's keepalive bookkeeping (loop_misc) runs
_DIAL_TIMEOUT_S = 10.0  # TCP connect + TLS handshake of one attempt


class MqttError(RuntimeError):
    """The broker refused something (connect, publish, subscribe); the text says what."""


@dataclass(slots=True)
class MqttMessage:
    """A received message."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool = False
    dup: bool = False
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None


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


# ---- MQTT 5 PUBLISH properties, packed directly --------------------------------------
_U16 = struct.Struct("!H").pack
_PUBACK = struct.Struct("!BBH").pack  # fixed header, remaining length 2, packet id
_CONNECTED = paho._ConnectionState.MQTT_CS_CONNECTED
# b"\x26" + length + key for user-property keys seen before (CloudEvents reuse a dozen names).
_KEY_HEADS: dict[str, bytes] = {}


def pack_publish_properties(user_properties: Sequence[tuple[str, str]], content_type: str | None) -> bytes:
    """The MQTT 5 PUBLISH property block (content type + user properties), byte for byte as paho packs it."""
    body = bytearray()
    try:
        if content_type:
            raw = content_type.encode()
            body += b"\x03"
            body += _U16(len(raw))
            body += raw
        heads = _KEY_HEADS
        for key, value in user_properties:
            head = heads.get(key)
            if head is None:
                raw = key.encode()
                head = b"\x26" + _U16(len(raw)) + raw
                if len(heads) < 1024:
                    heads[key] = head
            raw = value.encode()
            body += head
            body += _U16(len(raw))
            body += raw
    except struct.error:
        too_long = [s for s in (content_type or "", *(x for kv in user_properties for x in kv)) if len(s.encode()) > 65535]
        raise ValueError(f"MQTT string longer than 65535 bytes: {too_long[0][:40]!r}...") from None
    n = len(body)
    out = bytearray()
    while True:  # the block's length as a variable byte integer
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            break
    out += body
    return bytes(out)


class PackedProperties:
    """Pre-packed PUBLISH properties: paho only calls ``pack()`` on what it is given.

    paho's generic ``Properties.pack`` costs about as much as the rest of a
    QoS 1 publish for a CloudEvent's dozen user properties; this does the same
    encoding directly (paho calls ``pack()`` again when it resends after a
    reconnect, which returns the same bytes).
    """

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        """The encoded property block."""
        return self._packed

    def __str__(self) -> str:
        return f"[{len(self._packed)} bytes of properties]"


# ---- the socket paho sees ----------------------------------------------------------
class _Conn:
    """A connected non-blocking socket with a read buffer and a gathered write buffer.

    paho reads each packet as 1 byte, then the length byte by byte, then the
    rest: three ``recv`` calls per PUBACK. Here one ``recv`` fills a buffer
    that serves them. paho's ``send`` calls only append to a buffer that
    :meth:`flush` writes with one ``send`` per loop pass, instead of a system
    call per packet. paho then believes a packet was written once it is in
    the buffer; that is safe because nothing in MQTT is acknowledged by the
    act of writing (QoS 1/2 wait for the broker's ack, QoS 0 promises
    nothing), and :meth:`close` tries to write what is left.
    """

    __slots__ = ("_rbuf", "_rpos", "_wbuf", "fd", "sock", "tls")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()

    # paho's SocketLike protocol
    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes; raises BlockingIOError (or ssl.SSLWantReadError) when none are there."""
        pos = self._rpos
        buf = self._rbuf
        if pos >= len(buf):
            buf = self.sock.recv(_READ_SIZE)
            if len(buf) <= bufsize:  # also b"" at end of stream
                self._rbuf, self._rpos = b"", 0
                return buf
            self._rbuf = buf
            pos = 0
        end = pos + bufsize
        if end >= len(buf):
            # The rest of the buffer (a packet may continue in the next recv).
            self._rbuf, self._rpos = b"", 0
            return buf[pos:] if pos else buf
        self._rpos = end
        return buf[pos:end]

    def send(self, data: bytes | bytearray) -> int:
        """Take all of ``data`` into the write buffer."""
        self._wbuf += data
        return len(data)

    def close(self) -> None:
        """Write what is buffered if the socket takes it now, then close."""
        with contextlib.suppress(OSError):
            self.flush()
        self.sock.close()

    def fileno(self) -> int:
        """The socket's file descriptor."""
        return self.fd

    def setblocking(self, flag: bool) -> None:
        """Passed to the socket (paho makes it non-blocking)."""
        self.sock.setblocking(flag)

    def pending(self) -> int:
        """Bytes already read from the network but not yet handed to paho."""
        return len(self._rbuf) - self._rpos + (self.sock.pending() if self.tls else 0)  # type: ignore[attr-defined]

    # our side
    def has_output(self) -> bool:
        """True while written bytes wait to be sent."""
        return bool(self._wbuf)

    def flush(self) -> bool:
        """Send buffered bytes until done (True) or the socket is full (False). OSError: connection broken."""
        buf = self._wbuf
        while buf:
            try:
                sent = self.sock.send(bytes(buf[:_TLS_WRITE_CHUNK]) if self.tls else buf)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del buf[:sent]
        return True

    def discard_output(self) -> None:
        """Forget unsent bytes (the connection is broken; QoS 1 publishes are resent after reconnect)."""
        self._wbuf.clear()


def _decode_publish(header: int, packet: bytes | bytearray, v5: bool) -> MqttMessage | None:
    """Decode a QoS 0/1 PUBLISH body straight into an :class:`MqttMessage`.

    paho's generic property decoder costs ~150 µs for a CloudEvent's dozen
    user properties, most of a received message's cost. This reads the two
    properties CloudEvents use (content type, user properties) directly and
    returns None for anything else (other properties, bad UTF-8, malformed
    lengths), which then goes through paho's own decoder and its errors.
    """
    try:
        packet = bytes(packet)  # bytes index and slice faster than paho's bytearray
        n = len(packet)
        tlen = (packet[0] << 8) | packet[1]
        pos = 2 + tlen
        if pos > n or (tlen == 0 and not v5):
            return None
        topic = packet[2:pos].decode()
        qos = (header & 0x06) >> 1
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        user: list[tuple[str, str]] = []
        ctype: str | None = None
        if v5:
            byte = packet[pos]  # property length: a variable byte integer
            pos += 1
            plen = byte & 0x7F
            shift = 7
            while byte & 0x80:
                if shift > 21:
                    return None
                byte = packet[pos]
                pos += 1
                plen |= (byte & 0x7F) << shift
                shift += 7
            end = pos + plen
            if end > n:
                return None
            append = user.append
            while pos < end:
                ident = packet[pos]
                kend = pos + 3 + ((packet[pos + 1] << 8) | packet[pos + 2])
                if ident == 0x26:
                    vend = kend + 2 + ((packet[kend] << 8) | packet[kend + 1])
                    append((packet[pos + 3 : kend].decode(), packet[kend + 2 : vend].decode()))
                    pos = vend
                elif ident == 0x03:
                    ctype = packet[pos + 3 : kend].decode()
                    pos = kend
                else:
                    return None
            if pos != end:  # a length ran past the property block: malformed
                return None
        return MqttMessage(topic, packet[pos:], qos, mid, bool(header & 0x01), bool(header & 0x08), user, ctype)
    except (IndexError, UnicodeDecodeError):
        return None


class _Paho(paho.Client):
    """paho's client, connected through a socket we dialled off the event loop."""

    rx_conn: _Conn | None = None
    # Where decoded QoS 0/1 messages go (MqttClient's delivery), bypassing paho's MQTTMessage.
    rx_deliver: Any = None
    # Called with the mid of each publish the broker acknowledged with success.
    rx_acked: Any = None
    # Called to have what was put into the connection's write buffer sent soon.
    rx_flush: Any = None

    def _send_puback(self, mid: int) -> MQTTErrorCode:
        # Every PUBACK (paho's automatic ones and manual acks) goes straight
        # into the connection's write buffer, so they leave in the order they
        # were made, as MQTT requires. paho's queue costs ~3 µs per ack (a
        # dict per packet, a pass of loop_write) on a path every message takes.
        conn = self._sock
        flush = self.rx_flush
        if type(conn) is not _Conn or flush is None or self._state != _CONNECTED:
            return super()._send_puback(mid)
        conn.send(_PUBACK(paho.PUBACK, 2, mid))
        flush()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _create_socket(self) -> Any:
        # paho's reconnect() calls this to connect (blocking); ours was
        # connected in a worker thread and is handed over here.
        conn, self.rx_conn = self.rx_conn, None
        if conn is None:
            raise ConnectionError("internal error: paho reconnected without a dialled socket")
        return conn

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        # A successful PUBACK in its short form (mid only, as Mosquitto sends
        # it) is settled here: paho's decoder builds a Properties and a
        # ReasonCode object per ack (~15 µs, the largest cost of a publish).
        # This is paho's _do_on_publish for that case, with no limit on
        # in-flight messages (so nothing queued to release) and nobody
        # waiting on the MQTTMessageInfo.
        packet = self._in_packet["packet"]
        acked = self.rx_acked
        if acked is not None and cmd == "PUBACK" and (len(packet) == 2 or not any(packet[2:])):
            mid = (packet[0] << 8) | packet[1]
            if self._out_messages.pop(mid, None) is not None:
                self._inflight_messages -= 1
                acked(mid)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _handle_publish(self) -> MQTTErrorCode:
        # paho's version decodes properties generically and builds an
        # MQTTMessage (with a threading.Condition) per message; QoS 0/1 with
        # the CloudEvents properties take this direct path, the rest paho's.
        header = self._in_packet["command"]
        deliver = self.rx_deliver
        if deliver is None or header & 0x06 == 0x04:
            return super()._handle_publish()
        msg = _decode_publish(header, self._in_packet["packet"], self._protocol == paho.MQTTv5)
        if msg is None:
            return super()._handle_publish()
        deliver(msg)
        if msg.qos == 1 and not self._manual_ack:
            return self._send_puback(msg.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


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
                    log.info("MQTT %s: broker %s:%s not reachable yet: %s",
                             self.client_id, self.settings.host, self.settings.port, exc)
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
            info = self._c.publish(topic, payload, qos, retain, self._properties(user_properties, content_type))  # type: ignore[arg-type]
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
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
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
        self._deliver(MqttMessage(topic, msg.payload, msg.qos, msg.mid, bool(msg.retain), bool(msg.dup), user, ctype))

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
