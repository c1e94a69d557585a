"""A stand-in for the fog in edge tests: it confirms, by Receipt, only the events it really received.

It holds a persistent MQTT session subscribed to devices' data topics, like
the fog bridge, and every 100 ms sends each device one Receipt naming the
ids it received since the last one (repeats included: the fog confirms a
re-sent event it already has). It can go away and come back: its session
stays on the broker, which queues for it up to its limit (1000 messages on a
Mosquitto with packaged defaults) and drops the rest, after having
PUBACKed them to the device.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from reflexarc.config import MqttSettings
from reflexarc.envelope import Envelope
from reflexarc.events import Receipt
from reflexarc.mqtt import MqttClient, MqttError
from reflexarc.topics import Topics

T = Topics()


class ReceiptResponder:
    """The test's "fog": data in, receipts out, only for what arrived."""

    def __init__(
        self, settings: MqttSettings, client_id: str = "test-fog", topic_filter: str = "rx/+/+/data/#"
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.topic_filter = topic_filter
        self.received: Counter[str] = Counter()  # event id -> times received
        self.receipts_sent = 0
        self.client: MqttClient | None = None
        self._pending: dict[tuple[str, str], list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def distinct(self) -> int:
        """Distinct event ids received so far."""
        return len(self.received)

    async def start(self) -> None:
        """Connect (resuming the session if the broker kept it), subscribe, answer."""
        self.client = MqttClient(self.settings, self.client_id, clean_start=False, session_expiry=600)
        await self.client.connect()
        await self.client.subscribe([(self.topic_filter, 1)])
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._confirm_loop())]

    async def away(self) -> None:
        """Leave without a trace of what was not confirmed yet (as a crash would); the session stays."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pending.clear()
        if self.client is not None:
            await self.client.disconnect()
            self.client = None

    async def _pump(self) -> None:
        assert self.client is not None
        while True:
            m = await self.client.messages.get()
            topic = T.parse_mqtt(m.topic)
            env = Envelope.from_mqtt(m.payload, m.user_properties, m.content_type, topic)
            self.received[env.id] += 1
            self._pending.setdefault((topic.site, topic.device), []).append(env.id)

    async def _confirm_loop(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(0.1)  # batched, as the fog batches its receipts
            pending, self._pending = self._pending, {}
            for (site, device), ids in pending.items():
                payload, props, ctype = Receipt(site=site, device=device, ids=ids).to_envelope().to_mqtt()
                with contextlib.suppress(MqttError):  # a lost receipt: the device sends again
                    await self.client.publish(
                        T.mqtt_receipt(site, device), payload, 1, user_properties=props, content_type=ctype
                    )
                    self.receipts_sent += 1
