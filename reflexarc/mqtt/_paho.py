"""paho-mqtt's client driven from asyncio: the socket paho sees, and the paho methods reflexarc replaces.

:class:`_Paho` overrides private methods of paho 2.2's ``Client`` (hence the
pin in pyproject.toml) on the paths every message takes: PUBACKs go straight
into the write buffer, short-form PUBACKs settle without paho's generic
decoder, and QoS 0/1 PUBLISHes are decoded by :func:`reflexarc.mqtt.wire._decode_publish`.
Everything else stays paho's. :class:`_Conn` is the connected socket handed
to paho: buffered reads, gathered writes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState

from reflexarc.mqtt.wire import _decode_publish

_READ_SIZE = 128 * 1024  # one recv() serves hundreds of small packets
_TLS_WRITE_CHUNK = 16 * 1024  # one TLS record; a retried SSL write must repeat the same bytes
_PUBACK = struct.Struct("!BBH").pack  # fixed header, remaining length 2, packet id
_CONNECTED = _ConnectionState.MQTT_CS_CONNECTED


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
        return len(self._rbuf) - self._rpos + (self.sock.pending() if self.tls else 0)  # type: ignore[attr-defined]  # an SSLSocket when tls

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
