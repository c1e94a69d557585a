"""Prometheus metrics of the fog bridge, labelled by bridge (its MQTT client id).

Metrics live in the default registry once per process; several bridges in one
process (tests, ``reflexarc up``) are told apart by the ``bridge`` label.
Children are resolved once per bridge. Per-message counters (messages in,
records out) are summed in plain ints on the hot path and moved into
Prometheus by :meth:`BridgeMetrics.flush`, which a collector registered
ahead of them runs at every scrape, so a scrape is always exact; gauges that
follow a length are read at scrape time (``set_function``). A Prometheus
update takes a lock, and at ~10k messages/s a handful of them per message
was a measurable share of the bridge's CPU.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from reflexarc.metrics import HOP_BUCKETS

_LIVE: weakref.WeakSet[BridgeMetrics] = weakref.WeakSet()


class _FlushAtScrape:
    """Collects nothing; registered before the fog counters, so a scrape first flushes every bridge's counts."""

    def collect(self) -> Iterator[Metric]:
        """Flush the pending hot-path counts of every live bridge."""
        for m in list(_LIVE):
            m.flush()
        return iter(())


REGISTRY.register(_FlushAtScrape())

MESSAGES_IN = Counter("rx_fog_messages_in", "MQTT messages taken by the fog bridge", ["bridge", "kind"])
RECORDS_OUT = Counter("rx_fog_records_out", "Kafka records the cluster acknowledged", ["bridge", "topic"])
DEADLETTERED = Counter("rx_fog_deadlettered", "messages sent to the dead-letter topic", ["bridge", "stage"])
DUPLICATES = Counter("rx_fog_duplicates", "events dropped as duplicates (same id in window)", ["bridge"])
DOWNSAMPLED = Counter("rx_fog_downsampled", "events dropped by downsampling", ["bridge"])
KAFKA_RETRIES = Counter("rx_fog_kafka_retries", "Kafka records re-sent after a failure", ["bridge"])
KAFKA_INFLIGHT = Gauge("rx_fog_kafka_inflight", "Kafka records sent and not yet acknowledged", ["bridge"])
MQTT_UNACKED = Gauge("rx_fog_mqtt_unacked", "MQTT messages received and not yet acknowledged (ingest lag)", ["bridge"])
BACKPRESSURE = Gauge(
    "rx_fog_backpressure",
    "1 while Kafka does not take records (the intake waits, or the disk buffer takes them)",
    ["bridge"],
)
COMMANDS = Counter("rx_fog_commands", "commands by outcome", ["bridge", "status"])
COMMANDS_PUBLISHED = Counter("rx_fog_command_publishes", "command publishes (incl. retries)", ["bridge"])
COMMANDS_PENDING = Gauge("rx_fog_commands_pending", "commands awaiting the device's answer", ["bridge"])
COMMANDS_LAG = Gauge("rx_fog_commands_lag", "records in the commands topic not yet consumed", ["bridge"])
RECEIPTS = Counter("rx_fog_receipts", "receipts published to devices (one message names many ids)", ["bridge"])
RECEIPTED = Counter("rx_fog_receipted_ids", "event ids confirmed to devices in receipts", ["bridge"])
RECEIPTS_DROPPED = Counter(
    "rx_fog_receipts_dropped_ids", "ids not receipted because too many waited (the device re-sends them)", ["bridge"]
)
BUFFER_ENGAGED = Gauge("rx_fog_buffer_engaged", "1 while records go through the disk buffer", ["bridge"])
BUFFER_DEPTH = Gauge("rx_fog_buffer_depth", "records in the disk buffer", ["bridge"])
BUFFER_BYTES = Gauge("rx_fog_buffer_bytes", "record bytes in the disk buffer", ["bridge"])
BUFFER_OLDEST = Gauge("rx_fog_buffer_oldest_age_seconds", "age of the oldest record in the disk buffer", ["bridge"])
BUFFER_SPILLED = Counter("rx_fog_buffer_spilled", "records written to the disk buffer", ["bridge"])
BUFFER_DRAINED = Counter("rx_fog_buffer_drained", "buffered records Kafka acknowledged (rows deleted)", ["bridge"])
KAFKA_LATENCY = Histogram(
    "rx_fog_kafka_latency_seconds",
    "MQTT -> Kafka: from the record's making at the fog to Kafka's ack, for the oldest record of each batch",
    ["bridge"],
    buckets=HOP_BUCKETS,
)
BUFFER_ENGAGEMENTS = Counter(
    "rx_fog_buffer_engagements", "times the disk buffer took over from the direct path", ["bridge"]
)


class BridgeMetrics:
    """The metric children of one bridge."""

    def __init__(self, bridge: str) -> None:
        self.bridge = bridge
        self.in_data = MESSAGES_IN.labels(bridge, "data")
        # Hot-path totals, written only by the event loop; flush() adds what is new since the last flush.
        #: data messages taken (reaches ``in_data`` at the next :meth:`flush`)
        self.in_data_total = 0
        self._out_total: dict[str, int] = {}
        self._flushed: dict[str, int] = {}
        self._flush_lock = threading.Lock()
        _LIVE.add(self)
        self.in_ack = MESSAGES_IN.labels(bridge, "ack")
        self.in_other = MESSAGES_IN.labels(bridge, "other")
        self._out: dict[str, Counter] = {}
        self._dead: dict[str, Counter] = {}
        self.duplicates = DUPLICATES.labels(bridge)
        self.downsampled = DOWNSAMPLED.labels(bridge)
        self.kafka_retries = KAFKA_RETRIES.labels(bridge)
        self.kafka_inflight = KAFKA_INFLIGHT.labels(bridge)
        self.mqtt_unacked = MQTT_UNACKED.labels(bridge)
        self.backpressure = BACKPRESSURE.labels(bridge)
        self._commands: dict[str, Counter] = {}
        self.command_publishes = COMMANDS_PUBLISHED.labels(bridge)
        self.commands_pending = COMMANDS_PENDING.labels(bridge)
        self.commands_lag = COMMANDS_LAG.labels(bridge)
        self.receipts = RECEIPTS.labels(bridge)
        self.receipted = RECEIPTED.labels(bridge)
        self.receipts_dropped = RECEIPTS_DROPPED.labels(bridge)
        self.buffer_engaged = BUFFER_ENGAGED.labels(bridge)
        self.buffer_depth = BUFFER_DEPTH.labels(bridge)
        self.buffer_bytes = BUFFER_BYTES.labels(bridge)
        self.buffer_oldest = BUFFER_OLDEST.labels(bridge)
        self.buffer_spilled = BUFFER_SPILLED.labels(bridge)
        self.buffer_drained = BUFFER_DRAINED.labels(bridge)
        self.buffer_engagements = BUFFER_ENGAGEMENTS.labels(bridge)
        self.kafka_latency = KAFKA_LATENCY.labels(bridge)

    def out(self, topic: str) -> Counter:
        """Counter of records acknowledged on ``topic``."""
        c = self._out.get(topic)
        if c is None:
            c = self._out[topic] = RECORDS_OUT.labels(self.bridge, topic)
        return c

    def count_out(self, topic: str, n: int = 1) -> None:
        """Count ``n`` records acknowledged on ``topic`` (reaches Prometheus at the next :meth:`flush`)."""
        totals = self._out_total
        totals[topic] = totals.get(topic, 0) + n

    def flush(self) -> None:
        """Move the counts summed on the hot path into the Prometheus counters (any thread)."""
        # Scrapes run in the metrics server's thread: totals are only read here, never reset,
        # so a concurrent increment on the loop is never lost, and the lock stops double counting.
        with self._flush_lock:
            flushed = self._flushed
            new = [("\x00in", self.in_data_total), *list(self._out_total.items())]
            for name, total in new:
                d = total - flushed.get(name, 0)
                if d:
                    flushed[name] = total
                    (self.in_data if name == "\x00in" else self.out(name)).inc(d)

    def deadlettered(self, stage: str) -> Counter:
        """Counter of dead letters from ``stage``."""
        c = self._dead.get(stage)
        if c is None:
            c = self._dead[stage] = DEADLETTERED.labels(self.bridge, stage)
        return c

    def command(self, status: str) -> Counter:
        """Counter of commands that ended in ``status``."""
        c = self._commands.get(status)
        if c is None:
            c = self._commands[status] = COMMANDS.labels(self.bridge, status)
        return c


def value(metric: Counter | Gauge) -> float:
    """Current value of a metric child (for tests and logs)."""
    return float(metric._value.get())
