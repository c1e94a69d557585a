"""Prometheus metrics of the trigger engine."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from reflexarc.metrics import CPU_BUCKETS

EVENTS = Counter("rx_triggers_events_total", "Instrument events evaluated by the trigger engine")
FIRINGS = Counter("rx_triggers_fired_total", "Trigger firings", ["trigger"])
TASKS = Counter("rx_triggers_tasks_sent_total", "Task requests sent to HPC sites", ["site"])
COMMANDS = Counter("rx_triggers_commands_sent_total", "Signed commands sent towards devices")
RESULTS = Counter("rx_triggers_results_total", "Task results read", ["status"])
DEADLETTERS = Counter("rx_triggers_deadletters_total", "Records sent to the dead-letter topic", ["stage"])
LATE = Counter("rx_triggers_late_events_total", "Events older than every open window (ignored by windows)")
REPLAYED = Counter("rx_triggers_replayed_total", "Redelivered events whose state change was already stored")
DUPLICATES = Counter(
    "rx_triggers_duplicates_total", "Copies of events a window had applied already (same id, same data), ignored"
)
ID_CONFLICTS = Counter(
    "rx_triggers_id_conflicts_total",
    "Events reusing the id of an applied event with other data (a device error), ignored and dead-lettered",
)
RELOADS = Counter("rx_triggers_reloads_total", "Triggers file reloads", ["outcome"])
ACTIVE = Gauge("rx_triggers_active", "Triggers currently loaded")
EVALUATION = Histogram(
    "rx_triggers_evaluation_seconds",
    "Evaluating one fetched batch of one partition's instrument events against every trigger",
    buckets=CPU_BUCKETS,
)
