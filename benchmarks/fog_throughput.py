"""Fog bridge throughput: MQTT -> Kafka messages/s through the bridge, next to its two baselines.

Measured in one run, on the same embedded brokers (Mosquitto + Tansu, loopback):

* raw MQTT: one publisher -> Mosquitto -> one subscriber process (QoS 1);
* raw Kafka: one producer process sending the same records (acks=all);
* bridge: one publisher -> Mosquitto -> ``reflexarc fog run`` process -> Kafka,
  timed until every event is readable in Kafka (and checked: zero loss).

Each path has the same shape (the publisher here, the receiving side in its
own process), so the ratio bridge / min(raw MQTT, raw Kafka) shows what the
bridge costs. Target: >= 0.8 with zero loss.

    python benchmarks/fog_throughput.py [--n 20000] [--sizes 200,1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from reflexarc.brokers import EmbeddedBrokers
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.kafka import ensure_topics, make_consumer, make_producer
from reflexarc.mqtt import MqttClient
from reflexarc.process import ManagedProcess
from reflexarc.topics import Topics

T = Topics()
WINDOW = 1000  # unacknowledged publishes at once (both the publisher and the bridge)


def encoded(i: int, size: int, topics: Topics = T, devices: int = 20) -> tuple[str, bytes, list[tuple[str, str]], str]:
    """Event ``i`` as the edge publishes it: MQTT 5 binary CloudEvent with ~``size`` bytes of data."""
    device = f"d{i % devices}"
    env = Envelope.for_device(
        EventType.DATA, "bench", device, {"seq": i, "pad": "x" * max(0, size - 24)}, subject="load", id=f"e-{i}"
    )
    payload, props, ctype = env.to_mqtt(binary=True)
    return topics.mqtt_data("bench", device, "load"), payload, props, ctype


async def publish(mqtt: MqttSettings, n: int, size: int, client_id: str, topics: Topics = T) -> None:
    """Publish ``n`` events QoS 1 with a window of unacknowledged publishes; all PUBACKed at return."""
    msgs = [encoded(i, size, topics) for i in range(n)]
    async with MqttClient(mqtt, client_id, max_inflight=WINDOW) as pub:
        futs = []
        for topic, payload, props, ctype in msgs:
            futs.append(await pub.publish_start(topic, payload, 1, False, props, ctype))
        await asyncio.gather(*futs)


# ---- roles run in their own process ----------------------------------------------
async def role_mqtt_sub(mqtt: MqttSettings, n: int) -> None:
    """Subscribe, print 'ready', receive ``n`` messages, print the wall time of the last one."""
    async with MqttClient(mqtt, "bench-sub", receive_maximum=WINDOW) as sub:
        await sub.subscribe([(T.mqtt_ingest_filters()[0], 1)])
        print("ready", flush=True)
        got = 0
        while got < n:
            await sub.messages.get()
            got += 1
        print(json.dumps({"last": time.time(), "got": got}), flush=True)


async def role_kafka_produce(kafka: KafkaSettings, n: int, size: int, topic: str) -> None:
    """Produce ``n`` bridge-shaped records as fast as acks=all allows; print the rate."""
    records = []
    for i in range(n):
        env = Envelope.for_device(
            EventType.DATA, "bench", f"d{i % 20}", {"seq": i, "pad": "x" * max(0, size - 24)},
            subject="load", id=f"k-{i}",
        )
        records.append(env.to_kafka())
    producer = make_producer(kafka)
    await producer.start()
    try:
        t0 = time.perf_counter()
        futs = []
        for key, value, headers in records:
            futs.append(await producer.send(topic, value=value, key=key, headers=headers))
        await asyncio.gather(*futs)
        dt = time.perf_counter() - t0
    finally:
        await producer.stop()
    print(json.dumps({"rate": n / dt}), flush=True)


# ---- the three measurements -------------------------------------------------------
def _role(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )


async def raw_mqtt(mqtt: MqttSettings, n: int, size: int) -> float:
    """Messages/s publisher -> Mosquitto -> subscriber process."""
    p = _role(["mqtt-sub", "--mqtt-port", str(mqtt.port), "--n", str(n)])
    try:
        assert p.stdout is not None
        line = await asyncio.to_thread(p.stdout.readline)
        assert line.strip() == "ready", line
        # Encoding happens before the clock starts in the other runs too (both publishers
        # pre-encode), so t0 is taken when the first message can go out.
        t0 = time.time()
        await publish(mqtt, n, size, f"bench-pub-{size}")
        out = json.loads(await asyncio.to_thread(p.stdout.readline))
        return n / (out["last"] - t0)
    finally:
        p.kill()
        p.wait()


async def raw_kafka(kafka: KafkaSettings, n: int, size: int) -> float:
    """Records/s from one producer process (acks=all)."""
    topic = f"bench.raw.{size}"
    await ensure_topics(kafka, [topic])
    p = _role(["kafka-produce", "--kafka", kafka.bootstrap_servers, "--n", str(n), "--size", str(size),
               "--topic", topic])
    try:
        out, _ = await asyncio.to_thread(p.communicate, timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return float(json.loads(out.strip().splitlines()[-1])["rate"])


async def through_bridge(
    brokers: EmbeddedBrokers, mqtt: MqttSettings, kafka: KafkaSettings, n: int, size: int, tmp: Path, ns: str
) -> tuple[float, int, int]:
    """Messages/s publisher -> Mosquitto -> fog bridge process -> Kafka; (rate, missing, duplicates)."""
    conf = {
        "namespace": ns,
        "mqtt": {"host": mqtt.host, "port": mqtt.port},
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
        "ingest": {"client_id": f"fog-bench-{ns}", "receive_maximum": WINDOW},
        "commands": {"enabled": False},
    }
    path = tmp / f"fog-{ns}.yaml"
    path.write_text(yaml.safe_dump(conf))
    bridge = ManagedProcess(
        "fog", [sys.executable, "-m", "reflexarc.fog", "run", str(path)], tmp / f"fog-{ns}.log",
        env={**os.environ, "RX_LOG_LEVEL": os.environ.get("RX_LOG_LEVEL", "INFO")},
    )
    bridge.start()
    try:
        deadline = time.monotonic() + 30
        while "running" not in bridge.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline or not bridge.running():
                raise RuntimeError(f"fog bridge did not start:\n{bridge.log_tail()}")
            await asyncio.sleep(0.05)
        topics = Topics(ns)
        mqtt_ns = MqttSettings(host=mqtt.host, port=mqtt.port)
        t0 = time.perf_counter()
        pub = asyncio.create_task(publish(mqtt_ns, n, size, f"bench-pub-bridge-{size}", topics))
        ids: list[bytes] = []
        c = make_consumer(kafka, topics.kafka_data, group_id=None, auto_offset_reset="earliest")
        await c.start()
        try:
            deadline = time.monotonic() + 300
            while len(set(ids)) < n and time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=100, max_records=50_000)
                for recs in batch.values():
                    ids.extend(dict(r.headers)["ce_id"] for r in recs)
            dt = time.perf_counter() - t0
        finally:
            await c.stop()
        await pub
    finally:
        bridge.stop()
    unique = set(ids)
    return n / dt, n - len(unique), len(ids) - len(unique)


async def main(n: int, sizes: list[int]) -> int:
    """Run every measurement and print the table; exit 1 on any loss."""
    with tempfile.TemporaryDirectory(prefix="fog-bench-") as tmp, EmbeddedBrokers(
        data_dir=Path(tmp) / "brokers", mqtt_flavour="mosquitto"
    ) as brokers:
        assert brokers.mqtt is not None
        mqtt = MqttSettings(host=brokers.mqtt.host, port=brokers.mqtt.port)
        kafka = KafkaSettings(bootstrap_servers=brokers.kafka_bootstrap)
        print(f"{n} messages per run, QoS 1, acks=all, window {WINDOW}; 2 runs each, best kept")
        print(f"{'payload':>8} {'raw MQTT/s':>11} {'raw Kafka/s':>12} {'bridge/s':>9} {'ratio':>6} {'lost':>5} {'dups':>5}")
        lost_any = False
        for size in sizes:
            m = max([await raw_mqtt(mqtt, n, size) for _ in range(2)])
            k = max([await raw_kafka(kafka, n, size) for _ in range(2)])
            runs = [await through_bridge(brokers, mqtt, kafka, n, size, Path(tmp), f"b{size}r{r}") for r in range(2)]
            b, lost, dups = max(runs)
            lost_any |= any(r[1] for r in runs)
            ratio = b / min(m, k)
            print(f"{size:>7}B {m:>11.0f} {k:>12.0f} {b:>9.0f} {ratio:>6.2f} {lost:>5} {dups:>5}")
        print("ratio = bridge / min(raw MQTT, raw Kafka); target >= 0.80 with zero loss")
    return 1 if lost_any else 0


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--sizes", default="200,1024")
    ap.add_argument("--role", choices=["mqtt-sub", "kafka-produce"], help=argparse.SUPPRESS)
    ap.add_argument("--mqtt-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kafka", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "mqtt-sub":
        asyncio.run(role_mqtt_sub(MqttSettings(port=a.mqtt_port), a.n))
    elif a.role == "kafka-produce":
        asyncio.run(role_kafka_produce(KafkaSettings(bootstrap_servers=a.kafka), a.n, a.size, a.topic))
    else:
        sys.exit(asyncio.run(main(a.n, [int(s) for s in a.sizes.split(",")])))


if __name__ == "__main__":
    _cli()
