"""Fog bridge throughput: MQTT -> Kafka messages/s through the bridge, next to its two baselines.

Measured in one run, on the same embedded brokers (Mosquitto + Tansu, loopback):

* raw MQTT: one publisher -> Mosquitto -> one subscriber process (QoS 1);
* raw Kafka: one producer process sending the same records (acks=all);
* bridge: one publisher -> Mosquitto -> ``reflexarc fog run`` process -> Kafka,
  timed from the first publish to the Kafka timestamp of the last record the
  bridge produced. Completion is detected by polling the bridge's metrics
  endpoint at 10 Hz and only then is every record read back from Kafka (checked:
  zero loss), so no verifying consumer competes for the CPU while the clock runs.
* bridge with Kafka paused (``--no-buffered`` skips it): Tansu is stopped
  (SIGSTOP) while the same messages are published, so the bridge takes them
  into its disk buffer; the intake rate is until every message is taken and
  acknowledged in MQTT (compared with raw MQTT), then Tansu continues
  (SIGCONT) and the drain rate is until the last record's Kafka timestamp
  (compared with raw Kafka). The steady-state runs also report whether the
  disk buffer ever engaged (it should not).

Each path has the same shape (the same pre-encoded MQTT 5 binary payloads,
QoS 1, the same publish window, the receiving side in its own process), so the
ratio bridge / min(raw MQTT, raw Kafka) shows what the bridge costs. Target:
>= 0.8 with zero loss. The three are measured in interleaved rounds and the
median round's ratio is reported with every round's: on a shared machine the
speed drifts by tens of percent within minutes, and only measurements taken
close together compare.

Next to the rates it prints the CPU time per message of every process in the
path (publisher, Mosquitto, receiver or bridge, Tansu), read from /proc: on a
2-core machine they share, that sum is what bounds the rate.

    python benchmarks/fog_throughput.py [--n 20000] [--sizes 200,1024] [--runs 5] [--profile DIR] [--no-buffered]

``--profile DIR`` records the bridge with py-spy (``pip install py-spy``) into
``DIR/fog-<size>.txt`` (collapsed stacks; summarise with ``--top``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reflexarc.brokers import EmbeddedBrokers
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.kafka import ensure_topics, make_consumer, make_producer
from reflexarc.mqtt import MqttClient
from reflexarc.process import ManagedProcess, free_port, freeze_startup_heap
from reflexarc.topics import Topics

T = Topics()
WINDOW = 1000  # unacknowledged publishes at once (both the publisher and the bridge)
_TICK = os.sysconf("SC_CLK_TCK")


def encoded(i: int, size: int, topics: Topics = T, devices: int = 20) -> tuple[str, bytes, list[tuple[str, str]], str]:
    """Event ``i`` as the edge publishes it: MQTT 5 binary CloudEvent with ~``size`` bytes of data."""
    device = f"d{i % devices}"
    env = Envelope.for_device(
        EventType.DATA, "bench", device, {"seq": i, "pad": "x" * max(0, size - 24)}, subject="load", id=f"e-{i}"
    )
    payload, props, ctype = env.to_mqtt(binary=True)
    return topics.mqtt_data("bench", device, "load"), payload, props, ctype


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class CpuMeter:
    """CPU seconds per named process between :meth:`start` and :meth:`stop` (this process via process_time)."""

    pids: dict[str, int | None]
    used: dict[str, float] = field(default_factory=dict)
    _t0: dict[str, float] = field(default_factory=dict)

    def _now(self) -> dict[str, float]:
        out = {"publisher": time.process_time()}
        out.update({name: proc_cpu(pid) for name, pid in self.pids.items()})
        return out

    def start(self) -> None:
        """Take the starting readings."""
        self._t0 = self._now()

    def stop(self) -> None:
        """Take the final readings."""
        now = self._now()
        self.used = {k: now[k] - self._t0[k] for k in now}

    def per_msg_us(self, n: int) -> dict[str, float]:
        """Microseconds of CPU per message, per process."""
        return {k: v / n * 1e6 for k, v in self.used.items()}


async def publish(
    mqtt: MqttSettings, msgs: list[tuple[str, bytes, list[tuple[str, str]], str]], client_id: str
) -> None:
    """Publish pre-encoded events QoS 1 with a window of unacknowledged publishes; all PUBACKed at return."""
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
        freeze_startup_heap()  # as every reflexarc service does once it is up (notify_ready)
        print("ready", flush=True)
        got = 0
        while got < n:
            await sub.messages.get()
            got += 1
        print(json.dumps({"last": time.time(), "got": got}), flush=True)


async def role_kafka_produce(kafka: KafkaSettings, n: int, size: int, topic: str) -> None:
    """Produce ``n`` bridge-shaped records as fast as acks=all allows; print the rate and CPU used."""
    records = []
    for i in range(n):
        env = Envelope.for_device(
            EventType.DATA,
            "bench",
            f"d{i % 20}",
            {"seq": i, "pad": "x" * max(0, size - 24)},
            subject="load",
            id=f"k-{i}",
        )
        records.append(env.to_kafka())
    producer = make_producer(kafka)
    await producer.start()
    freeze_startup_heap()
    try:
        t0 = time.perf_counter()
        c0 = time.process_time()
        futs = []
        for key, value, headers in records:
            futs.append(await producer.send(topic, value=value, key=key, headers=headers))
        await asyncio.gather(*futs)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
    finally:
        await producer.stop()
    print(json.dumps({"rate": n / dt, "cpu": cpu}), flush=True)


# ---- the three measurements -------------------------------------------------------
@dataclass
class Result:
    """One measured run: rate and CPU µs per message by process."""

    rate: float
    cpu_us: dict[str, float]
    lost: int = 0
    dups: int = 0
    #: the disk buffer's engagements during the run (0 in the steady state), and the drain rate when measured
    engaged: int = 0
    drain: float = 0.0


def _role(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )


async def raw_mqtt(brokers: EmbeddedBrokers, mqtt: MqttSettings, n: int, size: int) -> Result:
    """Messages/s publisher -> Mosquitto -> subscriber process."""
    msgs = [encoded(i, size) for i in range(n)]
    p = _role(["mqtt-sub", "--mqtt-port", str(mqtt.port), "--n", str(n)])
    try:
        assert p.stdout is not None and brokers.mqtt is not None
        line = await asyncio.to_thread(p.stdout.readline)
        assert line.strip() == "ready", line
        meter = CpuMeter({"mosquitto": brokers.mqtt.process.pid, "receiver": p.pid})
        # Payloads are encoded before the clock starts, in every run.
        meter.start()
        t0 = time.time()
        await publish(mqtt, msgs, f"bench-pub-{size}")
        out = json.loads(await asyncio.to_thread(p.stdout.readline))
        meter.stop()
        return Result(n / (out["last"] - t0), meter.per_msg_us(n))
    finally:
        p.kill()
        p.wait()


async def raw_kafka(brokers: EmbeddedBrokers, kafka: KafkaSettings, n: int, size: int) -> Result:
    """Records/s from one producer process (acks=all)."""
    topic = f"bench.raw.{size}"
    await ensure_topics(kafka, [topic])
    tansu = brokers.kafka.process.pid if brokers.kafka is not None else None
    c0 = proc_cpu(tansu)
    p = _role(
        ["kafka-produce", "--kafka", kafka.bootstrap_servers, "--n", str(n), "--size", str(size), "--topic", topic]
    )
    try:
        out, _ = await asyncio.to_thread(p.communicate, timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    res = json.loads(out.strip().splitlines()[-1])
    # Tansu's CPU includes the producer's start-up and encoding phase (idle for Tansu): a slight overestimate.
    return Result(float(res["rate"]), {"producer": res["cpu"] / n * 1e6, "tansu": (proc_cpu(tansu) - c0) / n * 1e6})


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def _metric(port: int, name: str, label: str = "") -> float:
    """One fog metric from the bridge's endpoint (``label``: e.g. 'topic="rx.data"'; 0 if absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r"^" + name + r"\{[^}]*" + re.escape(label) + r"[^}]*\} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _records_out(port: int, topic: str) -> float:
    return _metric(port, "rx_fog_records_out_total", f'topic="{topic}"')


def _taken_to_disk(port: int, n: int) -> bool:
    """True once the bridge took ``n`` data messages and acknowledged them all (they are in its disk buffer)."""
    return _metric(port, "rx_fog_messages_in_total", 'kind="data"') >= n and _metric(port, "rx_fog_mqtt_unacked") == 0


async def through_bridge(
    brokers: EmbeddedBrokers,
    mqtt: MqttSettings,
    kafka: KafkaSettings,
    n: int,
    size: int,
    tmp: Path,
    ns: str,
    profile: Path | None = None,
    kafka_paused: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Result:
    """Messages/s publisher -> Mosquitto -> fog bridge process -> Kafka, with loss and duplicate counts.

    ``kafka_paused``: Tansu is stopped (SIGSTOP) while the messages are published, so the bridge takes them
    into its disk buffer; the rate is then how fast it did (every message taken and acknowledged in MQTT),
    and ``drain`` how fast the buffer reached Kafka once Tansu continued (SIGCONT).
    ``overrides``: dotted fog.yaml keys set for this run (``--ab``).
    """
    topics = Topics(ns)
    msgs = [encoded(i, size, topics) for i in range(n)]
    metrics_port = free_port()
    conf = {
        "namespace": ns,
        "metrics_port": metrics_port,
        "mqtt": {"host": mqtt.host, "port": mqtt.port},
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
        "ingest": {
            "client_id": f"fog-bench-{ns}",
            "receive_maximum": WINDOW,
            "buffer": {"path": str(tmp / f"buffer-{ns}.db")},
        },
        "commands": {"enabled": False},
    }
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = conf
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp / f"fog-{ns}.yaml"
    path.write_text(yaml.safe_dump(conf))
    bridge = ManagedProcess(
        "fog",
        [sys.executable, "-m", "reflexarc.fog", "run", str(path)],
        tmp / f"fog-{ns}.log",
        env={**os.environ, "RX_LOG_LEVEL": os.environ.get("RX_LOG_LEVEL", "INFO")},
    )
    bridge.start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while "running" not in bridge.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline or not bridge.running():
                raise RuntimeError(f"fog bridge did not start:\n{bridge.log_tail()}")
            await asyncio.sleep(0.05)
        if profile is not None:
            spy = subprocess.Popen(
                [
                    _py_spy(),
                    "record",
                    "-p",
                    str(bridge.pid),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(profile / f"fog-{size}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)
        assert brokers.mqtt is not None and brokers.kafka is not None
        meter = CpuMeter(
            {"mosquitto": brokers.mqtt.process.pid, "bridge": bridge.pid, "tansu": brokers.kafka.process.pid}
        )
        tansu = brokers.kafka.process
        if kafka_paused:
            tansu.signal(signal.SIGSTOP)
        meter.start()
        t0 = time.time()
        resumed = 0.0
        try:
            await publish(MqttSettings(host=mqtt.host, port=mqtt.port), msgs, f"bench-pub-bridge-{size}")
            deadline = time.monotonic() + 300
            if kafka_paused:
                while not await asyncio.to_thread(_taken_to_disk, metrics_port, n):
                    if time.monotonic() > deadline or not bridge.running():
                        break
                    await asyncio.sleep(0.05)
                meter.stop()
                taken_at = time.time()
                resumed = time.time()
                tansu.signal(signal.SIGCONT)
            while await asyncio.to_thread(_records_out, metrics_port, topics.kafka_data) < n:
                if time.monotonic() > deadline or not bridge.running():
                    break
                await asyncio.sleep(0.1)
        finally:
            tansu.signal(signal.SIGCONT)
        if not kafka_paused:
            meter.stop()
        engaged = int(await asyncio.to_thread(_metric, metrics_port, "rx_fog_buffer_engagements_total"))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait, 30)
        # Read everything back (untimed): count loss and duplicates, and find when the last record was made.
        ids: list[bytes] = []
        last_ms = 0
        c = make_consumer(kafka, topics.kafka_data, group_id=None, auto_offset_reset="earliest")
        await c.start()
        try:
            deadline = time.monotonic() + 60
            while len(set(ids)) < n and time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=100, max_records=50_000)
                for recs in batch.values():
                    for r in recs:
                        ids.append(dict(r.headers)["ce_id"])
                        last_ms = max(last_ms, r.timestamp)
        finally:
            await c.stop()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        bridge.stop()
    unique = set(ids)
    lost, dups = n - len(unique), len(ids) - len(unique)
    if kafka_paused:
        drain = n / max(last_ms / 1000.0 - resumed, 1e-3)
        return Result(n / max(taken_at - t0, 1e-3), meter.per_msg_us(n), lost, dups, engaged, drain)
    # The record timestamp is taken by the bridge's producer when it appends the record, a few ms
    # before Kafka acknowledges it (linger_ms=5): a small, constant advantage over the raw runs.
    dt = max(last_ms / 1000.0 - t0, 1e-3)
    return Result(n / dt, meter.per_msg_us(n), lost, dups, engaged)


def _cpu_text(r: Result) -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in r.cpu_us.items()) + f" = {sum(r.cpu_us.values()):.0f}"


async def main(
    n: int,
    sizes: list[int],
    runs: int,
    profile: Path | None,
    buffered: bool = True,
    ab: dict[str, Any] | None = None,
) -> int:
    """Run every measurement and print the table; exit 1 on any loss.

    ``ab``: fog.yaml overrides for one more bridge run per round (an A/B of a setting, same rounds).
    """
    with (
        tempfile.TemporaryDirectory(prefix="fog-bench-") as tmp,
        EmbeddedBrokers(data_dir=Path(tmp) / "brokers", mqtt_flavour="mosquitto") as brokers,
    ):
        assert brokers.mqtt is not None
        mqtt = MqttSettings(host=brokers.mqtt.host, port=brokers.mqtt.port)
        kafka = KafkaSettings(bootstrap_servers=brokers.kafka_bootstrap)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        print(f"{n} messages per run, QoS 1, acks=all, window {WINDOW}; {runs} rounds of raw MQTT, raw Kafka, bridge")
        print(
            f"{'payload':>8} {'raw MQTT/s':>11} {'raw Kafka/s':>12} {'bridge/s':>9} {'ratio':>6} {'lost':>5} {'dups':>5}"
            "  ratio per round"
        )
        lost_any = False
        cpu_lines: list[str] = []
        buffer_lines: list[str] = []
        ab_lines: list[str] = []
        for size in sizes:
            # Interleaved rounds: each ratio compares measurements taken within seconds of each
            # other, so a shared machine that speeds up or slows down moves both sides together.
            rounds: list[tuple[Result, Result, Result]] = []
            paused: list[Result] = []
            variant: list[Result] = []
            for r in range(runs):
                m = await raw_mqtt(brokers, mqtt, n, size)
                k = await raw_kafka(brokers, kafka, n, size)
                b = await through_bridge(
                    brokers, mqtt, kafka, n, size, Path(tmp), f"b{size}r{r}", profile if r == 0 else None
                )
                rounds.append((m, k, b))
                if ab:
                    variant.append(
                        await through_bridge(brokers, mqtt, kafka, n, size, Path(tmp), f"v{size}r{r}", overrides=ab)
                    )
                if buffered:
                    paused.append(
                        await through_bridge(
                            brokers, mqtt, kafka, n, size, Path(tmp), f"p{size}r{r}", kafka_paused=True
                        )
                    )
            lost_any |= any(b.lost for _, _, b in rounds) or any(p.lost for p in paused)
            ratios = [b.rate / min(m.rate, k.rate) for m, k, b in rounds]
            # The round with the median ratio stands for the size (its rates and CPU costs).
            mid = sorted(range(runs), key=lambda i: ratios[i])[(runs - 1) // 2]
            m, k, b = rounds[mid]
            per_round = " ".join(f"{x:.2f}" for x in ratios)
            print(
                f"{size:>7}B {m.rate:>11.0f} {k.rate:>12.0f} {b.rate:>9.0f} {ratios[mid]:>6.2f} "
                f"{sum(x.lost for _, _, x in rounds):>5} {sum(x.dups for _, _, x in rounds):>5}  {per_round}",
                flush=True,
            )
            cpu_lines += [
                f"{size:>7}B raw MQTT:  {_cpu_text(m)}",
                f"{size:>7}B raw Kafka: {_cpu_text(k)}",
                f"{size:>7}B bridge:    {_cpu_text(b)}",
            ]
            if any(x.engaged for _, _, x in rounds):
                print(f"         (the disk buffer engaged in the steady state: {[x.engaged for _, _, x in rounds]})")
            if variant:
                # The variant against its own round's bridge run: the A/B ratio of the setting.
                vs = [v.rate / rounds[i][2].rate for i, v in enumerate(variant)]
                j = sorted(range(len(variant)), key=lambda i: vs[i])[(len(variant) - 1) // 2]
                lost_any |= any(v.lost for v in variant)
                ab_lines.append(
                    f"{size:>7}B {variant[j].rate:>9.0f}/s = {vs[j]:.2f} x bridge; "
                    f"{sum(v.lost for v in variant)} lost, {sum(v.dups for v in variant)} dups; "
                    f"CPU {_cpu_text(variant[j])}; per round " + " ".join(f"{x:.2f}" for x in vs)
                )
            if paused:
                # Each paused run against the raw MQTT (intake) and raw Kafka (drain) rates of its own round.
                intake = [p.rate / rounds[i][0].rate for i, p in enumerate(paused)]
                drain = [p.drain / rounds[i][1].rate for i, p in enumerate(paused)]
                j = sorted(range(len(paused)), key=lambda i: intake[i])[(len(paused) - 1) // 2]
                p = paused[j]
                buffer_lines.append(
                    f"{size:>7}B {p.rate:>11.0f} {intake[j]:>6.2f} {p.drain:>9.0f} {drain[j]:>6.2f} "
                    f"{sum(x.lost for x in paused):>5} {sum(x.dups for x in paused):>5}  "
                    + " ".join(f"{a:.2f}/{d:.2f}" for a, d in zip(intake, drain, strict=True))
                )
                cpu_lines.append(f"{size:>7}B buffering: {_cpu_text(p)}")
        print("ratio = bridge / min(raw MQTT, raw Kafka) of the median round; target >= 0.80 with zero loss")
        if buffer_lines:
            print("\nWith Kafka paused (SIGSTOP) while the messages are published: the bridge takes them into its disk")
            print("buffer (intake: all taken and acknowledged in MQTT), then Kafka continues (SIGCONT) and it drains.")
            print(
                f"{'payload':>8} {'intake/s':>11} {'/MQTT':>6} {'drain/s':>9} {'/Kafka':>6} {'lost':>5} {'dups':>5}"
                "  intake/drain ratios per round"
            )
            print("\n".join(buffer_lines))
            print(
                "intake ratio = vs raw MQTT, drain ratio = vs raw Kafka, of the same round (median intake round shown)"
            )
        if ab_lines:
            print(f"\nThe bridge with {ab} (same rounds):")
            print("\n".join(ab_lines))
        print("CPU µs per message by process (median round; 2 cores = 2e6/rate µs of CPU per message at most):")
        print("\n".join(cpu_lines))
    return 1 if lost_any else 0


def top(path: Path, limit: int = 30) -> None:
    """Summarise a py-spy raw profile: share of samples per function (self and total)."""
    self_c: collections.Counter[str] = collections.Counter()
    total_c: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = [re.sub(r" \(/.*/(site-packages|main)/", " (", f) for f in stack.split(";")]
        samples += k
        self_c[frames[-1]] += k
        for f in set(frames):
            total_c[f] += k
    print(f"{samples} samples; self %:")
    for f, k in self_c.most_common(limit):
        print(f"{100 * k / samples:6.1f} {f}")
    print("total %:")
    for f, k in total_c.most_common(limit):
        print(f"{100 * k / samples:6.1f} {f}")


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--sizes", default="200,1024")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds per size (the median round is reported)")
    ap.add_argument("--profile", type=Path, help="record the bridge with py-spy into this directory")
    ap.add_argument("--no-buffered", action="store_true", help="skip the runs with Kafka paused (disk buffer)")
    ap.add_argument("--top", type=Path, help="summarise a py-spy raw profile and exit")
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also run the bridge with this fog.yaml setting (dotted key, YAML value) in every round",
    )
    ap.add_argument("--role", choices=["mqtt-sub", "kafka-produce"], help=argparse.SUPPRESS)
    ap.add_argument("--mqtt-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kafka", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.top is not None:
        top(a.top)
    elif a.role == "mqtt-sub":
        asyncio.run(role_mqtt_sub(MqttSettings(port=a.mqtt_port), a.n))
    elif a.role == "kafka-produce":
        asyncio.run(role_kafka_produce(KafkaSettings(bootstrap_servers=a.kafka), a.n, a.size, a.topic))
    else:
        ab = {k: yaml.safe_load(v) for k, _, v in (x.partition("=") for x in a.ab)}
        sys.exit(asyncio.run(main(a.n, [int(s) for s in a.sizes.split(",")], a.runs, a.profile, not a.no_buffered, ab)))


if __name__ == "__main__":
    _cli()
