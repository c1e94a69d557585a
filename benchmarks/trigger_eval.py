"""Events per second through the trigger engine with 1, 10 and 100 triggers.

    /work/venv/bin/python benchmarks/trigger_eval.py [--events 20000] [--triggers 1,10,100]

Starts Tansu on a free loopback port, fills ``rx.data`` with instrument
events, then measures in the same run:

* the raw aiokafka consume rate of that topic (the baseline);
* the pure engine (no broker: ``TriggerEngine.process`` over the same events);
* the faust worker (``TriggerWorker``: consume, evaluate, keep window state in
  the changelog-backed table), from its first to its last event.

Every trigger listens to every event (the worst case). One in ten has a
sliding window with two aggregates (state written to the table on each
event); the others are thresholds with a filter. Thresholds are set so that
about 1 % of events fire one trigger.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reflexarc.brokers import start_kafka
from reflexarc.cloud.engine import TriggerEngine
from reflexarc.cloud.validate import compile_text
from reflexarc.cloud.worker import TriggerWorker
from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.kafka import ensure_topics, make_consumer, make_producer, send_event
from reflexarc.topics import Topics

SITE = "site: bench\napps:\n  fit: {function: 'pkg.mod:fit'}\n"


def triggers_yaml(n: int, bootstrap: str, app_id: str) -> str:
    """A triggers file with ``n`` triggers that all select every event."""
    out = [
        "sites: [site.yaml]",
        f"kafka: {{bootstrap_servers: '{bootstrap}'}}",
        f"worker: {{app_id: {app_id}, reload: false, session_timeout: 6s}}",
        "triggers:",
    ]
    for i in range(n):
        out.append(f"  - name: t{i}")
        out.append("    on: bench/+/counts")
        if i % 10 == 9:
            out.append("    window: {type: sliding, size: 2s, aggregates: "
                       "{m: {op: mean, of: double(event.data.value)}, n: {op: count}}}")
            out.append(f"    when: agg.n >= 5 && agg.m > {990.0 + i / 1000:.3f}")
            out.append("    cooldown: 10s")
        else:
            out.append("    filter: has(event.data.value)")
            out.append(f"    when: event.data.value > {989 + (i % 10)} && event.data.value % {n} == {i}")
        out.append("    then: [{task: {app: fit, args: {v: event.data.value}}}]")
    return "\n".join(out) + "\n"


def make_events(n: int) -> list[Envelope]:
    """``n`` events from 8 devices, 10 ms apart in event time."""
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    return [
        Envelope.for_device(EventType.DATA, "bench", f"det{i % 8}", {"value": (i * 7919) % 1000, "frame": i},
                            subject="counts", id=f"ev{i}", time=t0 + timedelta(milliseconds=10 * i))
        for i in range(n)
    ]


async def fill(settings: KafkaSettings, events: list[Envelope]) -> None:
    """Produce the events to the data topic."""
    topics = Topics()
    await ensure_topics(settings, [*topics.kafka_core(), topics.kafka_tasks("bench")])
    producer = make_producer(settings)
    await producer.start()
    futs = [await send_event(producer, topics.kafka_data, e) for e in events]
    await asyncio.gather(*futs)
    await producer.stop()


async def raw_consume_rate(settings: KafkaSettings, n: int) -> float:
    """aiokafka: read all ``n`` records of the data topic; records per second."""
    consumer = make_consumer(settings, Topics().kafka_data, group_id=None)
    await consumer.start()
    got = 0
    t0 = time.perf_counter()
    try:
        while got < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for recs in batch.values():
                got += len(recs)
        return n / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


def engine_rate(text: str, base: Path, events: list[Envelope]) -> float:
    """The pure engine over the events (state in a dict); events per second."""
    eng = TriggerEngine(compile_text(text, str(base / "t.yaml"), base))
    store: dict[str, dict] = {}
    t0 = time.perf_counter()
    for pos, e in enumerate(events):
        out = eng.process(e, store, position=pos)
        store.update(out.states)
    return len(events) / (time.perf_counter() - t0)


async def worker_rate(text: str, base: Path, n: int, timeout: float) -> tuple[float, int]:
    """The faust worker from its first to its ``n``-th event; (events/s, events done)."""
    path = base / "t.yaml"
    path.write_text(text)
    from reflexarc.cloud.validate import load_triggers

    worker = TriggerWorker(load_triggers(path))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while worker.processed == 0 and loop.time() < deadline:
            await asyncio.sleep(0.005)
        t0, c0 = time.perf_counter(), worker.processed
        while worker.processed < n and loop.time() < deadline:
            await asyncio.sleep(0.01)
        done = worker.processed
        return (done - c0) / (time.perf_counter() - t0), done
    finally:
        stop.set()
        await task


async def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--triggers", default="1,10,100")
    ap.add_argument("--timeout", type=float, default=240.0, help="per worker run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = [int(x) for x in args.triggers.split(",")]
    with tempfile.TemporaryDirectory(prefix="rx-bench-") as tmp:
        base = Path(tmp)
        (base / "site.yaml").write_text(SITE)
        broker = start_kafka(base / "tansu")
        try:
            settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            events = make_events(args.events)
            await fill(settings, events)
            raw = await raw_consume_rate(settings, args.events)
            print(f"{args.events} events on {broker.bootstrap_servers} (Tansu, 4 partitions)")
            print(f"raw aiokafka consume: {raw:,.0f} events/s (baseline)")
            print(f"{'triggers':>8} {'engine only ev/s':>17} {'faust worker ev/s':>18} {'worker/raw':>11}")
            for k in counts:
                text = triggers_yaml(k, broker.bootstrap_servers, f"bench-{k}")
                eng = engine_rate(text, base, events)
                rate, done = await worker_rate(text, base, args.events, args.timeout)
                note = "" if done >= args.events else f"  (only {done} events within {args.timeout:.0f}s)"
                print(f"{k:>8} {eng:17,.0f} {rate:18,.0f} {rate / raw:10.3f}x{note}")
        finally:
            broker.process.stop()


if __name__ == "__main__":
    asyncio.run(main())
