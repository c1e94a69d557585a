"""Prometheus metrics of one edge agent (its own registry, so several agents can share a process)."""

from __future__ import annotations

import time
from datetime import UTC

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from reflexarc.envelope import utcnow
from reflexarc.events import Command
from reflexarc.metrics import LOOP_BUCKETS, SPOOL_BUCKETS, register_build_info


class EdgeMetrics:
    """Counters and gauges an agent exposes on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_read = Counter("rx_edge_events_read", "Readings produced by sources", ["stream"], registry=r)
        self.events_spooled = Counter("rx_edge_events_spooled", "Events committed to the spool", registry=r)
        self.events_published = Counter(
            "rx_edge_events_published",
            "Events delivered and removed from the spool (delivery: pipeline: confirmed by the fog's receipt; "
            "broker: acknowledged by the broker)",
            registry=r,
        )
        self.events_dropped = Counter(
            "rx_edge_events_dropped", "Events dropped by the drop_oldest spool policy", registry=r
        )
        self.events_dead = Counter(
            "rx_edge_events_dead",
            "Inputs kept as dead letters on the device (bad input, refused publish)",
            registry=r,
        )
        self.spool_depth = Gauge("rx_edge_spool_depth", "Events waiting in the spool", registry=r)
        self.spool_bytes = Gauge("rx_edge_spool_bytes", "Payload bytes waiting in the spool", registry=r)
        self.spool_full = Gauge("rx_edge_spool_full", "1 while the spool is full", registry=r)
        self.source_blocked = Counter(
            "rx_edge_source_blocked_seconds", "Time sources waited for spool space", registry=r
        )
        self.sources_blocked = Gauge("rx_edge_sources_blocked", "Sources waiting for spool space right now", registry=r)
        self.inflight = Gauge("rx_edge_inflight", "Publishes awaiting the broker's ack", registry=r)
        self.unconfirmed = Gauge(
            "rx_edge_unconfirmed_events", "Published events awaiting the fog's receipt (delivery: pipeline)", registry=r
        )
        self.unconfirmed_oldest = Gauge(
            "rx_edge_unconfirmed_oldest_age_seconds",
            "How long the oldest event awaiting the fog's receipt has been out (0: none)",
            registry=r,
        )
        self.events_resent = Counter(
            "rx_edge_events_resent", "Events sent again because no receipt confirmed them in time", registry=r
        )
        self.receipts = Counter(
            "rx_edge_receipts", "Receipt messages from the fog, by result (ok, invalid)", ["result"], registry=r
        )
        self.receipt_ids_unknown = Counter(
            "rx_edge_receipt_ids_unknown",
            "Ids in receipts that await no confirmation (freed already, or from an earlier run): ignored",
            registry=r,
        )
        self.connected = Gauge("rx_edge_connected", "1 while connected to the broker", registry=r)
        self.reconnects = Counter("rx_edge_reconnects", "Connections lost", registry=r)
        self.commands_ok = Counter("rx_edge_commands_ok", "Commands executed successfully", ["actuator"], registry=r)
        self.commands_failed = Counter(
            "rx_edge_commands_failed", "Commands whose handler failed", ["actuator"], registry=r
        )
        self.commands_rejected = Counter(
            "rx_edge_commands_rejected", "Commands refused before any handler ran", ["reason"], registry=r
        )
        self.commands_duplicate = Counter(
            "rx_edge_commands_duplicate", "Redelivered commands answered again without running", registry=r
        )
        self.loop_latency = Histogram(
            "rx_edge_loop_latency_seconds",
            "The loop's latency at the actuator's ack: the triggering event's time -> the command done",
            ["actuator"],
            registry=r,
            buckets=LOOP_BUCKETS,
        )
        self.spool_age = Histogram(
            "rx_edge_spool_age_seconds",
            "Time in the spool of the oldest event of each batch freed after delivery",
            registry=r,
            buckets=SPOOL_BUCKETS,
        )
        register_build_info(r)

    def observe_spool_age(self, spooled_at: float | None) -> None:
        """Observe how long the oldest event of a delivered batch stayed in the spool (``time.time()`` it came)."""
        if spooled_at is not None:
            self.spool_age.observe(max(0.0, time.time() - spooled_at))

    def observe_loop(self, cmd: Command) -> None:
        """Observe a command's loop latency at its ack (only commands a triggering event caused)."""
        t = cmd.cause.time if cmd.cause is not None else None
        if t is None:
            return
        if t.tzinfo is None:  # a peer's naive time is UTC, as every reflexarc time is
            t = t.replace(tzinfo=UTC)
        self.loop_latency.labels(cmd.actuator).observe(max(0.0, (utcnow() - t).total_seconds()))

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[object, int]:
        """Start the HTTP endpoint; returns ``(server, port)``."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_address[1])
