"""EPICS PV updates per second through the epics source into Kafka, vs a bare caproto subscription.

Starts, on loopback: a caproto IOC (``reflexarc.scenarios.epics.ioc``, its own
Channel Access port), Mosquitto, Tansu and a fog bridge. Then, in
interleaved rounds (the order alternates), the IOC posts a burst of N updates
of one PV (``ramp``) at ``--rate`` Hz (0: as fast as its Python server can),
while

* bare: a plain caproto asyncio client in its own process is subscribed to
  the PV and counts the updates it receives;
* source: an edge agent (``python -m reflexarc edge run``) with an ``epics``
  source on the PV publishes each update through its spool, Mosquitto and the
  fog bridge into Kafka; counted in Kafka and checked against the IOC's log of
  what it posted (any update missing is named).

Only one of the two is subscribed during a burst. Throughput is updates
delivered / (time of the last delivery - time the burst was asked for); for
Kafka the time of a record is its CreateTime (set by the fog). The median of
the per-round ratios source/bare is the figure (target >= 0.8). The CPU time
per update of the bare client's process and of the agent's process (all its
threads) is the steadier figure on a shared, noisy machine.

The offered rate matters: the IOC is caproto's Python server, which sends
about 2-4k updates/s of one PV at most here (and, as any CA server may,
drops the oldest queued updates of a client that falls far behind; this
IOC keeps a deep queue). At ``--rate 0`` the figure is mostly the IOC's.

    python benchmarks/epics_source.py [--updates 10000] [--rounds 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from reflexarc.brokers import start_kafka, start_mqtt
from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.scenarios.epics.ioc import IocProcess, caput
from reflexarc.testing.kafka import KafkaTail
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

T = Topics()
QUIET_S = 10.0  # no new update for this long (and fewer than N): the burst is over, the rest was dropped


async def role_bare(pv_name: str, n: int) -> None:
    """Subscribe, say ready after the value on connect, count updates until quiet; print JSON."""
    from caproto.asyncio.client import Context

    ctx = Context()
    (pv,) = await ctx.get_pvs(pv_name)
    times: list[float] = []
    first = asyncio.Event()
    initial: list[object] = []

    async def on_update(sub: object, response: Any) -> None:
        stamp = response.metadata.timestamp
        if not first.is_set():
            initial.append(stamp)
            first.set()
        elif stamp != initial[0]:  # a subscription activated twice repeats the value on connect
            times.append(time.time())

    sub = pv.subscribe(data_type="time")
    sub.add_callback(on_update)
    await first.wait()
    print("ready", flush=True)
    print(json.dumps({"cpu_s": cpu_s(os.getpid())}), flush=True)
    seen, last_new = 0, time.monotonic()
    while len(times) < n and time.monotonic() - last_new < QUIET_S:
        await asyncio.sleep(0.05)
        if len(times) != seen:
            seen, last_new = len(times), time.monotonic()
    print(json.dumps({"count": len(times), "last": times[-1], "cpu_s": cpu_s(os.getpid())}), flush=True)
    await ctx.disconnect()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_round(ioc: IocProcess, n: int) -> tuple[int, float, float]:
    """(updates received, updates/s, µs CPU per update) of one burst seen by the bare client."""
    p = subprocess.Popen(
        [sys.executable, __file__, "--role", "bare", "--pv", ioc.pv("ramp"), "--updates", str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ioc.env},
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("the bare client did not connect")
    cpu0 = json.loads(p.stdout.readline())["cpu_s"]
    t0 = time.time()
    asyncio.run(caput(ioc.pv("ramp:go"), n))
    out = json.loads(p.stdout.readline())
    p.wait(10)
    return out["count"], out["count"] / (out["last"] - t0), (out["cpu_s"] - cpu0) / max(1, out["count"]) * 1e6


# ---- source: the edge agent into Kafka ---------------------------------------------------
def agent_yaml(d: Path, mqtt_port: int, ioc: IocProcess, r: int) -> Path:
    """agent.yaml of one source round (fresh state)."""
    doc = {
        "site": "bench",
        "device": f"ioc-{r}",
        "state_dir": str(d / f"state-{r}"),
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "protocol": "5"},
        "sources": [{"type": "epics", "stream": "ramp", "pvs": [{"pv": ioc.pv("ramp"), "publish_on_connect": False}]}],
    }
    path = d / f"agent-{r}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def source_round(
    d: Path, mqtt_port: int, kafka: KafkaSettings, ioc: IocProcess, n: int, r: int
) -> tuple[int, float, float]:
    """(updates in Kafka, updates/s, agent µs CPU per update) of one burst through an edge agent's epics source."""
    device = f"ioc-{r}"
    agent = TierProcess("edge", agent_yaml(d, mqtt_port, ioc, r), d / f"agent-{r}.log", env=ioc.env)
    await agent.start()
    try:
        async with KafkaTail(kafka, T.kafka_data) as tail:
            mine: list[tuple[Envelope, int]] = []
            done = 0

            async def take() -> None:
                nonlocal done
                await tail.poll(100)
                for rec in tail.records[done:]:
                    env = Envelope.from_kafka(rec.value, rec.headers)
                    if env.extensions.get("device") == device:
                        mine.append((env, rec.timestamp))
                done = len(tail.records)

            # Subscribed once the source published the PV's connection status.
            deadline = time.monotonic() + 30
            while not any(e.subject == "epics-status" for e, _ in mine):
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent's epics source did not connect:\n" + agent.text()[-2000:])
                await take()
            assert agent.pid is not None
            cpu0 = cpu_s(agent.pid)
            t0 = time.time()
            await caput(ioc.pv("ramp:go"), n)
            last_new = time.monotonic()
            seen = 0
            while seen < n and time.monotonic() - last_new < QUIET_S:
                await take()
                count = sum(1 for e, _ in mine if e.subject == "ramp")
                if count != seen:
                    seen, last_new = count, time.monotonic()
            ramp = [ts for e, ts in mine if e.subject == "ramp"]
            values = {e.data["value"] for e, _ in mine if e.subject == "ramp"}  # type: ignore[index]
            posted = [json.loads(x)["value"] for x in (d / "ramp.jsonl").read_text().splitlines()[-n:]]
            missing = [v for v in posted if v not in values]
            if missing:
                print(f"  source round {r + 1}: {len(missing)} posted updates not in Kafka, e.g. {missing[:10]}")
            cpu = (cpu_s(agent.pid) - cpu0) / max(1, len(ramp)) * 1e6
            return len(ramp), len(ramp) / (max(ramp) / 1000 - t0), cpu
    finally:
        agent.stop()


def main() -> None:
    """Interleaved rounds; print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=10000, help="updates per burst")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=1000.0, help="IOC burst rate in Hz (0: as fast as it can)")
    ap.add_argument("--workdir", help="keep logs and state here (default: a temporary directory, removed)")
    ap.add_argument("--role", choices=["bare"], help=argparse.SUPPRESS)
    ap.add_argument("--pv", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "bare":
        asyncio.run(role_bare(args.pv, args.updates))
        return
    rates: dict[str, list[float]] = {"bare": [], "source": []}
    counts: dict[str, list[int]] = {"bare": [], "source": []}
    cpu: dict[str, list[float]] = {"bare": [], "source": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rx-bench-epics-") as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        ioc = IocProcess(d, prefix="BENCH:", log=str(d / "ramp.jsonl"))  # what the IOC posted
        os.environ.update(ioc.env)  # this process's own CA puts
        mqtt = start_mqtt(d / "mq", flavour="mosquitto")
        kafka_broker = start_kafka(d / "kafka")
        kafka = KafkaSettings(bootstrap_servers=kafka_broker.bootstrap_servers)
        fog_doc = {
            "mqtt": {"host": "127.0.0.1", "port": mqtt.port, "protocol": "5"},
            "kafka": {"bootstrap_servers": kafka_broker.bootstrap_servers},
            "commands": {"enabled": False},
        }
        (d / "fog.yaml").write_text(yaml.safe_dump(fog_doc))
        fog = TierProcess("fog", d / "fog.yaml", d / "fog.log")
        try:
            ioc.start()
            asyncio.run(fog.start())
            asyncio.run(caput(ioc.pv("ramp:rate"), args.rate))
            bare_round(ioc, 2000)  # warm-up
            for r in range(args.rounds):
                got: dict[str, tuple[int, float, float]] = {}
                for mode in ("bare", "source") if r % 2 == 0 else ("source", "bare"):
                    if mode == "bare":
                        got[mode] = bare_round(ioc, args.updates)
                    else:
                        got[mode] = asyncio.run(source_round(d, mqtt.port, kafka, ioc, args.updates, r))
                for mode, (count, rate, us) in got.items():
                    counts[mode].append(count)
                    rates[mode].append(rate)
                    cpu[mode].append(us)
                ratios.append(got["source"][1] / got["bare"][1])
                print(
                    f"round {r + 1}: bare {got['bare'][1]:.0f}/s ({got['bare'][0]} delivered, "
                    f"{got['bare'][2]:.0f} µs CPU each), source {got['source'][1]:.0f}/s ({got['source'][0]} in "
                    f"Kafka, agent {got['source'][2]:.0f} µs CPU each), ratio {ratios[-1]:.2f}",
                    flush=True,
                )
        finally:
            fog.stop()
            ioc.close()
            mqtt.process.stop()
            kafka_broker.process.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    rate = "as fast as the IOC can" if not args.rate else f"at {args.rate:g} Hz"
    print(f"bursts of {args.updates} updates of one PV {rate}, {args.rounds} interleaved rounds (medians)")
    print(
        f"bare caproto subscription:                     {med['bare']:8.0f} updates/s "
        f"({statistics.median(counts['bare']):.0f} of {args.updates} delivered)   {mcpu['bare']:5.0f} µs CPU/update"
    )
    ok = "meets" if statistics.median(ratios) >= 0.8 else "MISSES"
    print(
        f"epics source -> spool -> MQTT -> fog -> Kafka: {med['source']:8.0f} updates/s "
        f"({statistics.median(counts['source']):.0f} of {args.updates} in Kafka)   {mcpu['source']:5.0f} µs CPU/update "
        f"(the agent process)   ratio {statistics.median(ratios):.2f} ({ok} the 0.8 target)"
    )


if __name__ == "__main__":
    main()
