"""Prometheus metrics of the site agent (one registry per process; every series is labelled by site)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TASKS_RECEIVED = Counter("rx_site_tasks_received_total", "Task requests recorded", ["site"])
TASKS_FINISHED = Counter("rx_site_tasks_finished_total", "Tasks that ended, by state", ["site", "status"])
TASKS_RUNNING = Gauge("rx_site_tasks_running", "Tasks handed to the engine", ["site"])
DEAD_LETTERS = Counter("rx_site_deadletters_total", "Requests that could not be read", ["site"])
EVENTS_PUBLISHED = Counter("rx_site_events_published_total", "Outbox events Kafka acknowledged", ["site"])
DB_BATCH = Histogram(
    "rx_site_db_batch_operations", "Job-store operations committed together in one transaction", ["site"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
