"""Loop latency of the demo scenario, next to a bare MQTT round trip on the same broker.

Runs the bundled beamline scenario (embedded Mosquitto + Tansu, the four
tiers as processes) for ``--duration`` seconds and reports, from the loop
observer, the loop latency (triggering event's time -> actuator's ack) p50 and
p99 and the instrument events/s. In the same run, on the same broker, it
measures the baseline: one MQTT 5 QoS 1 publish -> subscribe round trip
(p50/p99 over ``--rtt-samples`` sequential messages), and prints how many
bare round trips one closed loop costs, then the loop broken down per hop
(edge -> Kafka, trigger decision, queued, running, done, result, command,
actuator ack; see ``reflexarc.observer.HOPS``).

    python benchmarks/loop_latency.py [--duration 30] [--rate 20]

Not a test: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from reflexarc.config import KafkaSettings
from reflexarc.demo import hpc_sites, prepare_scenario
from reflexarc.mqtt import MqttClient
from reflexarc.observer import HOPS, LoopObserver, percentile
from reflexarc.supervisor import Supervisor, load_pipeline
from reflexarc.topics import Topics


async def mqtt_round_trips(sup: Supervisor, samples: int) -> list[float]:
    """Sequential QoS 1 publish -> receive times on the pipeline's own broker."""
    settings = sup.mqtt_settings()
    sub = MqttClient(settings, "bench-rtt-sub")
    pub = MqttClient(settings, "bench-rtt-pub")
    await sub.connect()
    await pub.connect()
    topic = Topics().mqtt_data("bench", "rtt", "ping")
    await sub.subscribe([(topic, 1)])
    out = []
    try:
        for i in range(samples):
            t0 = time.perf_counter()
            await pub.publish(topic, str(i).encode(), qos=1)
            msg = await asyncio.wait_for(sub.messages.get(), 10)
            assert msg.payload == str(i).encode()
            out.append(time.perf_counter() - t0)
    finally:
        await pub.disconnect()
        await sub.disconnect()
    return out


async def main(duration: float, rate: float, rtt_samples: int, fetch_wait_ms: int | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="rx-bench-loop-"))
    pipeline_file, expected = prepare_scenario(work / "scenario", duration)
    if fetch_wait_ms is not None:
        # Every tier's consumers (RX_KAFKA_FETCH_WAIT_MS) and the trigger worker's own (worker.fetch_wait).
        os.environ["RX_KAFKA_FETCH_WAIT_MS"] = str(fetch_wait_ms)
        triggers = pipeline_file.parent / "triggers.yaml"
        doc = yaml.safe_load(triggers.read_text())
        doc.setdefault("worker", {})["fetch_wait"] = f"{fetch_wait_ms}ms"
        triggers.write_text(yaml.safe_dump(doc, sort_keys=False))
    if rate:
        agent = pipeline_file.parent / "agent.yaml"
        doc = yaml.safe_load(agent.read_text())
        for src in doc["sources"]:
            src["rate_hz"] = rate
            src["count"] = int(rate * duration)
        expected = sum(s["count"] for s in doc["sources"])
        agent.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_pipeline(pipeline_file)
    sup = Supervisor(cfg, base_dir=pipeline_file.parent, run_dir=work / "run")
    # The tiers' own (RX_KAFKA_FETCH_WAIT_MS, set above for --fetch-wait-ms, else the default).
    fetch_wait = KafkaSettings.from_env().fetch_max_wait_ms
    t_start = time.perf_counter()
    await asyncio.to_thread(sup.start)
    startup = time.perf_counter() - t_start
    try:
        baseline = await mqtt_round_trips(sup, rtt_samples)
        observer = LoopObserver(
            sup.kafka_settings(), Topics(cfg.namespace), hpc_sites(pipeline_file.parent, pipeline_file)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(observer.run(stop))
        stats = observer.stats
        deadline = time.monotonic() + duration + 90
        while time.monotonic() < deadline:
            if stats.events >= expected and stats.tasks and not stats.open_loops():
                break
            await asyncio.sleep(0.25)
        stop.set()
        await task
    finally:
        await asyncio.to_thread(sup.stop)
        shutil.rmtree(work, ignore_errors=True)

    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    l50, l99 = stats.latency(50), stats.latency(99)
    print(f"pipeline start-up (brokers + 4 tiers ready): {startup:.1f} s")
    # Tansu looks for new records when a fetch arrives and then only when its wait ends: a record
    # produced meanwhile waits for the end, so each Kafka hop pays about half of this on average.
    print(f"consumers' fetch wait: {fetch_wait} ms (each of the loop's four consumer hops pays ~half of it on Tansu)")
    print(
        f"events: {stats.events} at {stats.event_rate():.1f}/s; loops closed: {len(stats.tasks) - len(stats.open_loops())}/{len(stats.tasks)}"
    )
    print(
        f"baseline  MQTT 5 QoS 1 publish->subscribe round trip: p50 {b50 * 1e3:.2f} ms  p99 {b99 * 1e3:.2f} ms  (n={len(baseline)})"
    )
    if l50 is None or l99 is None:
        print("loop latency: no loop closed")
        return
    print(
        f"loop      event -> trigger -> task -> result -> command -> actuator ack: p50 {l50 * 1e3:.1f} ms  p99 {l99 * 1e3:.1f} ms  (n={len(stats.latencies)})"
    )
    print(f"ratio     loop / bare MQTT round trip: p50 {l50 / b50:.0f}x  p99 {l99 / b99:.0f}x")
    print(f"\nper hop (n={len(stats.hops['trigger'])} loops with every time stamp; times of the tiers' hosts):")
    print(f"  {'hop':<17} {'p50 ms':>8} {'p99 ms':>8}  what")
    for name, what in HOPS.items():
        h50, h99 = stats.hop(name, 50), stats.hop(name, 99)
        if h50 is None or h99 is None:
            continue
        print(f"  {name:<17} {h50 * 1e3:8.1f} {h99 * 1e3:8.1f}  {what}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of instrument data")
    p.add_argument("--rate", type=float, default=0.0, help="events/s of the detector (default: the scenario's)")
    p.add_argument("--rtt-samples", type=int, default=500)
    p.add_argument(
        "--fetch-wait-ms", type=int, default=None, help="consumers' fetch wait (default: each tier's setting)"
    )
    a = p.parse_args()
    asyncio.run(main(a.duration, a.rate, a.rtt_samples, a.fetch_wait_ms))
