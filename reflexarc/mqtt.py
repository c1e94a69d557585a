"""An asyncio face for paho-mqtt: awaited PUBACKs, a bounded in-flight window, manual acks.

paho runs its network loop in its own thread; every callback hops onto the
asyncio loop with ``call_soon_threadsafe``, so all state here is touched by
the event-loop thread only (no locks, no callback racing ``publish``).

* ``await publish(...)`` returns when the broker acknowledged (QoS 1/2), and
  at most ``max_inflight`` publishes are unacknowledged at once (paho cannot
  track more than 65,535).
* ``manual_ack=True`` leaves the PUBACK of received messages to the caller
  (:meth:`MqttClient.ack`), so a message is acknowledged only after the next
  hop took it. With MQTT 5, Receive Maximum tells the broker to stop sending
  when that many are unacknowledged: backpressure without unbounded buffers.
* Persistent sessions (``clean_start=False`` + session expiry) keep
  subscriptions and queued QoS 1 messages across disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
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


class MqttClient:
    """One MQTT connection used from asyncio. Create it inside a running loop."""

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
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.v5 = settings.protocol == "5"
        self._loop = asyncio.get_running_loop()
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._inflight = asyncio.Semaphore(max_inflight)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._subs: list[tuple[str, int]] = []
        self.messages: asyncio.Queue[MqttMessage] = asyncio.Queue(queue_size)
        self.connected = asyncio.Event()
        self._first_connect: asyncio.Future[None] = self._loop.create_future()
        self.disconnects = 0

        proto = paho.MQTTv5 if self.v5 else paho.MQTTv311
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": client_id,
            "protocol": proto,
            "manual_ack": manual_ack,
        }
        if not self.v5:
            kwargs["clean_session"] = clean_start
        self._c = paho.Client(**kwargs)
        # paho's own limit on unacked publishes: ours (the semaphore) is the one
        # that applies, so lift paho's to the protocol maximum.
        self._c.max_inflight_messages_set(65535)
        self._c.max_queued_messages_set(0)
        self._c.reconnect_delay_set(min_delay=1, max_delay=15)
        password = settings.password()
        # amqtt only queues for persistent sessions that present a username.
        username = settings.username or (None if self.v5 else client_id)
        if username:
            self._c.username_pw_set(username, password)
        ctx = _tls_context(settings)
        if ctx is not None:
            self._c.tls_set_context(ctx)
            if settings.tls and settings.tls.insecure_skip_verify:
                self._c.tls_insecure_set(True)
        if will is not None:
            self._c.will_set(will.topic, will.payload, will.qos, will.retain)
        self._c.on_connect = self._on_connect
        self._c.on_disconnect = self._on_disconnect
        self._c.on_publish = self._on_publish
        self._c.on_message = self._on_message
        self._c.on_subscribe = self._on_subscribe
        self._sub_waiters: dict[int, asyncio.Future[list[int]]] = {}

    # ---- lifecycle ------------------------------------------------------------
    async def connect(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; paho reconnects by itself after that."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry
            props.ReceiveMaximum = self._receive_maximum
        try:
            await asyncio.to_thread(
                self._c.connect,
                self.settings.host,
                self.settings.port,
                self.settings.keepalive,
                clean_start=self._clean_start if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ssl.SSLError) as exc:
            raise MqttError(
                f"cannot reach the MQTT broker at {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self._c.loop_start()
        try:
            await asyncio.wait_for(asyncio.shield(self._first_connect), timeout)
        except TimeoutError:
            self._c.loop_stop()
            raise MqttError(
                f"no CONNACK from {self.settings.host}:{self.settings.port} within {timeout:.0f}s"
            ) from None
        except MqttError:
            self._c.loop_stop()
            raise

    async def disconnect(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        with contextlib.suppress(Exception):
            self._c.disconnect()
        await asyncio.to_thread(self._c.loop_stop)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(MqttError("client disconnected before the broker acknowledged"))
        self._pending.clear()

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    # ---- publish --------------------------------------------------------------
    def _properties(self, user_properties: Sequence[tuple[str, str]], content_type: str | None) -> Properties | None:
        if not self.v5 or (not user_properties and not content_type):
            return None
        props = Properties(PacketTypes.PUBLISH)
        if user_properties:
            props.UserProperty = list(user_properties)
        if content_type:
            props.ContentType = content_type
        return props

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
        Awaiting this coroutine itself waits only for window space.
        """
        await self._inflight.acquire()
        fut: asyncio.Future[None] = self._loop.create_future()
        try:
            info = self._c.publish(topic, payload, qos, retain, self._properties(user_properties, content_type))
        except Exception:
            self._inflight.release()
            raise
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._inflight.release()
            raise MqttError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            self._inflight.release()
            fut.set_result(None)
            return fut
        # The broker's ack arrives via call_soon_threadsafe, i.e. after this
        # synchronous section: registering here cannot miss it.
        self._pending[info.mid] = fut
        fut.add_done_callback(lambda _f: self._inflight.release())
        return fut

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._loop.call_soon_threadsafe(self._publish_done, mid, rc.value if rc is not None else 0, str(rc))

    def _publish_done(self, mid: int, code: int, text: str) -> None:
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
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
        granted = await asyncio.wait_for(fut, timeout)
        refused = [f for f, g in zip(filters, granted, strict=False) if g >= 0x80]
        if refused:
            raise MqttError(f"broker refused subscription to {[f for f, _ in refused]}")
        return granted

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        codes = [rc.value if hasattr(rc, "value") else int(rc) for rc in rcs]
        self._loop.call_soon_threadsafe(self._subscribe_done, mid, codes)

    def _subscribe_done(self, mid: int, codes: list[int]) -> None:
        fut = self._sub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = list(getattr(props, "UserProperty", []) or []) if props else []
        ctype = getattr(props, "ContentType", None) if props else None
        m = MqttMessage(msg.topic, msg.payload, msg.qos, msg.mid, bool(msg.retain), bool(msg.dup), user, ctype)
        self._loop.call_soon_threadsafe(self.messages.put_nowait, m)

    def ack(self, msg: MqttMessage) -> None:
        """Acknowledge a received message (only with ``manual_ack=True``)."""
        if msg.qos > 0:
            self._c.ack(msg.mid, msg.qos)

    # ---- connection events ----------------------------------------------------
    def _on_connect(self, _c: paho.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        self._loop.call_soon_threadsafe(
            self._connected, rc.value, str(rc), bool(getattr(flags, "session_present", False))
        )

    def _connected(self, code: int, text: str, session_present: bool) -> None:
        if code != 0:
            hint = _CONNACK_HINTS.get(code, "")
            err = MqttError(f"MQTT broker refused the connection: {text}" + (f" ({hint})" if hint else ""))
            if not self._first_connect.done():
                self._first_connect.set_exception(err)
            else:
                log.error("%s", err)
            return
        self.connected.set()
        if not self._first_connect.done():
            self._first_connect.set_result(None)
        if self._subs and not session_present:
            # A new session has no subscriptions: restore them.
            self._c.subscribe(list(self._subs))
        log.debug("MQTT %s connected (session_present=%s)", self.client_id, session_present)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._loop.call_soon_threadsafe(self._disconnected, str(rc))

    def _disconnected(self, text: str) -> None:
        self.connected.clear()
        self.disconnects += 1
        log.debug("MQTT %s disconnected: %s", self.client_id, text)

    @property
    def inflight(self) -> int:
        """Publishes waiting for the broker's acknowledgement."""
        return len(self._pending)
