"""Prometheus metrics of the site agent (one registry per process; every series is labelled by site)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

from reflexarc.metrics import TASK_BUCKETS

TASKS_RECEIVED = Counter("rx_site_tasks_received_total", "Task requests recorded", ["site"])
TASKS_FINISHED = Counter("rx_site_tasks_finished_total", "Tasks that ended, by state", ["site", "status"])
TASKS_RUNNING = Gauge("rx_site_tasks_running", "Tasks handed to the engine", ["site"])
DEAD_LETTERS = Counter("rx_site_deadletters_total", "Requests that could not be read", ["site"])
EVENTS_PUBLISHED = Counter("rx_site_events_published_total", "Outbox events Kafka acknowledged", ["site"])
DB_BATCH = Histogram(
    "rx_site_db_batch_operations",
    "Job-store operations committed together in one transaction",
    ["site"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
TASK_QUEUE = Histogram(
    "rx_site_task_queue_seconds",
    "A task's wait: recorded as queued at the site -> started by the engine",
    ["site", "app"],
    buckets=TASK_BUCKETS,
)
TASK_RUN = Histogram(
    "rx_site_task_run_seconds",
    "A task's last attempt: started by the engine -> finished",
    ["site", "app"],
    buckets=TASK_BUCKETS,
)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def observe_task(
    site: str, app: str, queued_at: datetime, started_at: datetime | None, finished_at: datetime | None
) -> None:
    """Observe a finished task's queue and run durations (a task that never started has neither)."""
    if started_at is None:
        return
    TASK_QUEUE.labels(site, app).observe(max(0.0, (_utc(started_at) - _utc(queued_at)).total_seconds()))
    if finished_at is not None:
        TASK_RUN.labels(site, app).observe(max(0.0, (_utc(finished_at) - _utc(started_at)).total_seconds()))
