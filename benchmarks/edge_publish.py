"""Edge publish throughput: the agent with its disk spool vs raw paho, same broker, same run.

Starts a Mosquitto on loopback, then measures

* raw paho: one client publishing N 1 KiB messages at QoS 1 with the same
  in-flight window as the agent, until every PUBACK arrived;
* the edge agent: N 1 KiB events emitted as fast as a source can, each
  committed to the SQLite spool, published at QoS 1 and deleted after its
  PUBACK, until the spool is empty.

Prints events/s for both and the ratio (target: the spool costs less than
half of raw throughput, i.e. ratio >= 0.5).

    python benchmarks/edge_publish.py [--events 20000] [--size 1024] [--sync normal|full]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from reflexarc.brokers import start_mqtt
from reflexarc.edge.agent import EdgeAgent
from reflexarc.edge.config import parse_agent_config
from reflexarc.edge.sources import Reading

WINDOW = 1000


def raw_paho(port: int, n: int, size: int) -> float:
    """Messages/s of plain paho QoS 1 publishing with a bounded in-flight window."""
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


async def agent_spool(port: int, n: int, size: int, state: Path, sync: str) -> tuple[float, float]:
    """Events/s through the agent (spool on), and how long the source itself took."""
    cfg = parse_agent_config(
        f"""
site: bench
device: dev
state_dir: {state}
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
        await agent.emit(Reading(f"s{i % 4}", {"i": i, "blob": blob}, id=f"bench-{i}"))
    produced = time.perf_counter() - t0
    while agent.publisher.published < n:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    await agent.stop()
    return n / elapsed, n / produced


def main() -> None:
    """Run both measurements and print the figures and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sync", choices=["normal", "full"], default="normal")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rx-bench-") as tmp:
        broker = start_mqtt(Path(tmp) / "mq", flavour="mosquitto")
        try:
            raw_paho(broker.port, 2000, args.size)  # warm-up
            raw = raw_paho(broker.port, args.events, args.size)
            spooled, source_rate = asyncio.run(
                agent_spool(broker.port, args.events, args.size, Path(tmp) / "state", args.sync)
            )
        finally:
            broker.process.stop()
    print(f"events: {args.events} x {args.size} B, QoS 1, in-flight window {WINDOW}, spool sync={args.sync}")
    print(f"raw paho publish:         {raw:10.0f} msg/s")
    print(f"edge agent (spool on):    {spooled:10.0f} events/s  (source side {source_rate:.0f}/s)")
    ratio = spooled / raw
    print(f"ratio agent/raw:          {ratio:10.2f}  ({'meets' if ratio >= 0.5 else 'MISSES'} the 0.5 target)")


if __name__ == "__main__":
    main()
