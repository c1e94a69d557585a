"""Edge publish throughput: the agent with its disk spool, with and without receipts, vs raw paho.

Starts a Mosquitto on loopback and a receipt responder process subscribed to
every data topic, then measures, in interleaved rounds (the order rotates
each round):

* raw paho: one client publishing N 1 KiB messages at QoS 1 with the same
  in-flight window as the agent, until every PUBACK arrived;
* the agent, ``delivery: broker``: N 1 KiB events emitted as fast as a source
  can, each committed to the SQLite spool, published at QoS 1 and deleted
  after its PUBACK, until the spool is empty;
* the agent, ``delivery: pipeline`` (receipts on, the default): the same, but
  a row is deleted only when a receipt names it, until the spool is empty.

The receipts come from a MINIMAL RECEIPT RESPONDER in this script (its own
process, ``--role responder``), not from the fog bridge: it answers every
event it receives with a :class:`~reflexarc.events.Receipt` to its device,
batched per 100 ms or per 1000 ids (as the fog batches), without Kafka. It
measures what receipts cost the edge agent (the window, the receipt
subscription, freeing rows by id), not the fog's or Kafka's latency. The
responder is subscribed during every measurement, so the broker delivers each
message to one subscriber in all three. It decodes and confirms the events of
both agent runs (the broker-mode agent just does not listen), while raw
paho's payloads are no events and cost it nothing: the raw baseline has the
two cores more to itself.

Prints the median of each across rounds and the median per-round ratios
agent/raw (target for pipeline >= 0.8), and the CPU time this process used
per event (the agent with its spool thread, or paho with its network
thread): on a shared, noisy machine the steadier figure for what receipts
cost the agent itself.

    python benchmarks/edge_publish.py [--events 20000] [--size 1024] [--rounds 5] [--sync normal|full]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from reflexarc.brokers import start_mqtt
from reflexarc.config import MqttSettings
from reflexarc.edge.agent import EdgeAgent
from reflexarc.edge.config import parse_agent_config
from reflexarc.edge.sources import Reading
from reflexarc.envelope import Envelope, EnvelopeError
from reflexarc.events import Receipt
from reflexarc.mqtt import MqttClient
from reflexarc.topics import TopicError, Topics

WINDOW = 1000
T = Topics()
RECEIPT_IDS = 1000  # ids in one receipt at most (the fog's default max_ids)
RECEIPT_EVERY_S = 0.1  # the fog's default receipt interval


def raw_paho(port: int, n: int, size: int) -> float:
    """Messages/s of plain paho QoS 1 publishing with a bounded in-flight window (its own network thread)."""
    window = threading.Semaphore(WINDOW)
    done = threading.Event()
    acked = 0

    def on_publish(_c, _u, _mid, _rc, _p) -> None:  # type: ignore[no-untyped-def]
        nonlocal acked
        acked += 1
        window.release()
        if acked == n:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(65535)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    payload = b"x" * size
    t0 = time.perf_counter()
    for i in range(n):
        window.acquire()
        c.publish(f"rx/bench/raw/data/s{i % 4}", payload, 1)
    done.wait(300)
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / elapsed


async def agent_spool(port: int, n: int, size: int, state: Path, sync: str, delivery: str) -> float:
    """Events/s through the agent (spool on) until every event left the spool as delivered."""
    cfg = parse_agent_config(
        f"""
site: bench
device: dev
state_dir: {state}
delivery: {delivery}
mqtt: {{host: 127.0.0.1, port: {port}}}
publish: {{inflight: {WINDOW}}}
spool: {{sync: {sync}}}
""",
        "bench.yaml",
    )
    agent = EdgeAgent(cfg)
    await agent.start()
    assert agent.client is not None and agent.publisher is not None
    await asyncio.wait_for(agent.client.connected.wait(), 10)
    blob = "x" * (size - 30)  # the JSON object around it makes ~size bytes
    t0 = time.perf_counter()
    for i in range(n):
        await agent.emit(Reading(f"s{i % 4}", {"i": i, "blob": blob}, id=f"bench-{delivery}-{i}"))
    while agent.publisher.published < n:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    await agent.stop()
    return n / elapsed


# ---- the minimal receipt responder (its own process) ------------------------------------
async def role_responder(port: int) -> None:
    """Receive every data event; answer each device with Receipt batches. NOT the fog: no Kafka."""
    async with MqttClient(MqttSettings(host="127.0.0.1", port=port), "bench-responder", receive_maximum=WINDOW) as c:
        await c.subscribe([(T.mqtt_ingest_filters("bench", "+")[0], 1)])
        print("ready", flush=True)
        pending: dict[tuple[str, str], list[str]] = {}
        full = asyncio.Event()

        async def answer() -> None:
            while True:
                try:
                    async with asyncio.timeout(RECEIPT_EVERY_S):
                        await full.wait()
                except TimeoutError:
                    pass
                full.clear()
                batch = dict(pending)
                pending.clear()
                for (site, device), ids in batch.items():
                    for i in range(0, len(ids), RECEIPT_IDS):
                        receipt = Receipt(site=site, device=device, ids=ids[i : i + RECEIPT_IDS])
                        payload, props, ctype = receipt.to_envelope().to_mqtt()
                        await c.publish_start(T.mqtt_receipt(site, device), payload, 1, False, props, ctype)

        task = asyncio.create_task(answer())
        while True:
            m = await c.messages.get()
            if not m.user_properties:
                continue  # raw paho's bytes: delivered (and acknowledged) like the rest, nothing to confirm
            try:
                topic = T.parse_mqtt(m.topic)
                # The fog's own fast path to an event's id (the envelope module reads the wire format).
                eid = Envelope.transcode_mqtt(m.payload, m.user_properties, m.content_type, topic).id
            except (EnvelopeError, TopicError):
                continue
            ids = pending.setdefault((topic.site, topic.device), [])
            ids.append(eid)
            if len(ids) >= RECEIPT_IDS:
                full.set()
        task.cancel()


def start_responder(port: int) -> subprocess.Popen[str]:
    """The responder process, once it is subscribed."""
    p = subprocess.Popen(
        [sys.executable, __file__, "--role", "responder", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"the receipt responder did not start: {line!r}")
    return p


def main() -> None:
    """Interleaved rounds of the three measurements; print medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    ap.add_argument("--sync", choices=["normal", "full"], default="normal")
    ap.add_argument("--role", choices=["responder"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "responder":
        asyncio.run(role_responder(args.port))
        return
    rates: dict[str, list[float]] = {"raw": [], "broker": [], "pipeline": []}
    cpu: dict[str, list[float]] = {"raw": [], "broker": [], "pipeline": []}  # µs of this process per event
    ratios: dict[str, list[float]] = {"broker": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="rx-bench-") as tmp:
        broker = start_mqtt(Path(tmp) / "mq", flavour="mosquitto")
        responder = None
        try:
            responder = start_responder(broker.port)
            raw_paho(broker.port, 2000, args.size)  # warm-up
            order = ["raw", "broker", "pipeline"]
            for r in range(args.rounds):
                got: dict[str, float] = {}
                for mode in order[r % 3 :] + order[: r % 3]:
                    c0 = time.process_time()
                    if mode == "raw":
                        got[mode] = raw_paho(broker.port, args.events, args.size)
                    else:
                        state = Path(tmp) / f"state-{mode}-{r}"
                        got[mode] = asyncio.run(
                            agent_spool(broker.port, args.events, args.size, state, args.sync, mode)
                        )
                    cpu[mode].append((time.process_time() - c0) / args.events * 1e6)
                for mode, v in got.items():
                    rates[mode].append(v)
                for mode in ratios:
                    ratios[mode].append(got[mode] / got["raw"])
                print(
                    f"round {r + 1}: raw {got['raw']:.0f}/s, broker {got['broker']:.0f}/s "
                    f"({ratios['broker'][-1]:.2f}x), pipeline {got['pipeline']:.0f}/s ({ratios['pipeline'][-1]:.2f}x)",
                    flush=True,
                )
        finally:
            if responder is not None:
                responder.kill()
                responder.wait()
            broker.process.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    rmed = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"events: {args.events} x {args.size} B, QoS 1, in-flight window {WINDOW}, spool sync={args.sync}, "
        f"{args.rounds} interleaved rounds (medians); receipts from the minimal responder in this script"
    )
    print(
        f"raw paho publish:                    {med['raw']:10.0f} msg/s                 {mcpu['raw']:5.0f} µs CPU/msg"
    )
    print(
        f"edge agent, delivery: broker:        {med['broker']:10.0f} events/s   ratio {rmed['broker']:.2f}"
        f"   {mcpu['broker']:5.0f} µs CPU/event"
    )
    ok = "meets" if rmed["pipeline"] >= 0.8 else "MISSES"
    print(
        f"edge agent, delivery: pipeline:      {med['pipeline']:10.0f} events/s   ratio {rmed['pipeline']:.2f}"
        f"   {mcpu['pipeline']:5.0f} µs CPU/event  ({ok} the 0.8 target)"
    )


if __name__ == "__main__":
    main()
