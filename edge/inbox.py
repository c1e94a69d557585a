"""What the agent receives over MQTT, routed by topic: commands to the actuators, receipts to the publisher.

Both arrive on the agent's one persistent session (QoS 1, acknowledged by
hand). A receipt is acknowledged as soon as its ids are taken: the rows it
frees are deleted from the spool a moment later, and if the agent dies in
between, they are published again after the restart and the fog confirms
them again. A receipt that does not parse, or is addressed to another
device, is logged, counted and acknowledged; it frees nothing.
"""

from __future__ import annotations

import logging

from reflexarc.edge.actuators import CommandProcessor
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.publisher import Publisher
from reflexarc.edge.receipts import receipt_ids
from reflexarc.envelope import EnvelopeError
from reflexarc.mqtt import MqttClient, MqttMessage
from reflexarc.topics import Topics

log = logging.getLogger(__name__)


class Inbox:
    """Routes the messages of the agent's subscriptions; ``publisher`` is given with ``delivery: pipeline``."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        site: str,
        device: str,
        metrics: EdgeMetrics,
        commands: CommandProcessor | None,
        publisher: Publisher | None,
    ) -> None:
        self.client = client
        self.site = site
        self.device = device
        self.metrics = metrics
        self.commands = commands
        self.publisher = publisher
        self.cmd_topic = topics.mqtt_cmd(site, device)
        self.receipt_topic = topics.mqtt_receipt(site, device)
        # Off at shutdown: a command arriving then stays unacknowledged, and the broker redelivers it.
        self.take_commands = True

    def filters(self) -> list[tuple[str, int]]:
        """The subscriptions this inbox serves (QoS 1)."""
        out: list[tuple[str, int]] = []
        if self.publisher is not None:
            out.append((self.receipt_topic, 1))
        if self.commands is not None:
            out.append((self.cmd_topic, 1))
        return out

    async def run(self) -> None:
        """Take messages until cancelled."""
        client = self.client
        while True:
            msg = await client.messages.get()
            if msg.topic == self.receipt_topic and self.publisher is not None:
                self._receipt(msg)
            elif msg.topic == self.cmd_topic and self.commands is not None:
                if self.take_commands:
                    self.commands.submit(msg)
            else:
                log.warning("message on %s, which this agent does not serve: ignored", msg.topic)
                client.ack(msg)

    def _receipt(self, msg: MqttMessage) -> None:
        assert self.publisher is not None
        try:
            ids = receipt_ids(msg, self.site, self.device)
        except (EnvelopeError, ValueError) as exc:
            self.metrics.receipts.labels("invalid").inc()
            log.warning("receipt on %s ignored: %s", msg.topic, exc)
        else:
            self.metrics.receipts.labels("ok").inc()
            self.publisher.confirm(ids)
        self.client.ack(msg)
