"""Pilot benchmark: task start latency through a warm pilot vs one sbatch per task; pilot throughput.

Everything real, in one run: a Slurm (slurmctld + slurmd, Debian packages) on
loopback, Tansu as the Kafka broker, and three site agents in this process —
a dask-jobqueue pilot site, a Parsl HTEX pilot site (each holding one warm
allocation), and a ``batch`` site (one ``sbatch`` per task through PSI/J).

* **Start latency**: a TaskRequest is produced to Kafka at t0; the task is
  running when the worker starts the app (``started_at`` of its result).
  One task at a time, so nothing queues. Also measured for the engine alone
  (``engine.submit`` -> app running), which leaves out what every engine
  shares (Kafka, the job database). Rounds interleave the three sites (the
  machine is shared and noisy); p50 is the median of the rounds' p50, p99 is
  over every sample; the ratio is sbatch p50 / pilot p50 of the same round.
* **Throughput** (tasks/s, trivial app, same allocation): *raw* is the
  engine's own submit (Dask ``Client.submit`` to the allocation's workers,
  Parsl ``HighThroughputExecutor.submit``), *pilot* is reflexarc's pilot
  engine alone (placement by the allocation manager, outcome files), with
  one task queued at each busy worker slot (prefetch, the default), and
  *no-pf* the same with prefetch off; *agent* is end to end (Kafka -> job
  database -> pilot -> result on Kafka). Medians of interleaved rounds;
  ratios against raw from the same round; CPU µs per task of this process
  (the agent side) for pilot and no-pf.

Usage::

    python benchmarks/pilot_latency.py [--rounds 3] [--latency-n 20] [--batch-n 3] [--n 300] [--slots 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from reflexarc.brokers import start_kafka
from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.engines import Engine
from reflexarc.hpc_bridge.engines.pilot import PilotEngine
from reflexarc.hpc_bridge.examples.apps import echo
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.testing.slurm import SlurmCluster

APP = "reflexarc.hpc_bridge.examples.apps:echo"
PILOTS = ("dask", "parsl")


def site_config(kind: str, kafka: KafkaSettings, slurm: SlurmCluster, tmp: Path, slots: int) -> SiteConfig:
    """A site of ``kind`` (dask or parsl pilot, or batch) on the benchmark's Slurm."""
    env = {"SLURM_CONF": str(slurm.conf_path)}
    pilot = {
        "cores_per_node": slots,
        "min_allocations": 1,
        "max_allocations": 1,
        "walltime": "01:00:00",
        "idle_timeout_s": 3600,
        "env": env,
    }
    engine: dict[str, Any] = {
        "dask": {"kind": "dask", "dask": {"jobqueue": pilot}},
        "parsl": {"kind": "parsl", "parsl": pilot},
        "batch": {"kind": "batch", "batch": {"scheduler": "slurm", "poll_interval_s": 1, "env": env}},
    }[kind]
    return SiteConfig.model_validate(
        {
            "site": f"bench-{kind}",
            "kafka": kafka.model_dump(),
            "state_dir": str(tmp / kind),
            "engine": engine,
            "apps": {"echo": {"function": APP, "timeout_s": 120}},
        }
    )


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def start_latency(client: SiteClient, site: str, n: int, tag: str) -> list[float]:
    """Seconds from producing each request to its app starting, one task at a time."""
    out = []
    for i in range(n):
        task = f"{site}-{tag}-{i}"
        t0 = time.time()
        await client.submit([TaskRequest(task_id=task, app="echo", args={"i": i}, site=site)])
        res = (await client.wait_results([task], 300))[task]
        assert res.status == "done" and res.started_at is not None, res
        out.append(res.started_at.timestamp() - t0)
    return out


async def engine_latency(engine: Engine, n: int, tmp: Path, tag: str) -> list[float]:
    """Seconds from ``engine.submit`` to the app starting (no Kafka, no database), one task at a time."""
    out = []
    for i in range(n):
        work = tmp / f"{engine.name}-{tag}-{i}"
        spec = RunSpec(
            task_id=f"{tag}-{i}",
            attempt=1,
            kind="python",
            workdir=str(work),
            result_path=str(work / "outcome.json"),
            function=APP,
            args={"i": i},
            timeout_s=60,
        )
        t0 = time.time()
        outcome = await (await engine.submit(spec)).wait()
        assert outcome.started_at is not None, outcome
        out.append(outcome.started_at.timestamp() - t0)
    return out


async def raw_rate(engine: PilotEngine, n: int) -> float:
    """Trivial calls through the engine's own submit, to the workers of the warm allocation (tasks/s)."""
    backend: Any = engine.backend
    t0 = time.perf_counter()
    if engine.name == "dask":
        info = await backend.client.scheduler.identity()
        workers = [str(ws["name"]) for ws in info["workers"].values()]
        futs = [backend.client.submit(echo, i=i, pure=False, workers=workers) for i in range(n)]
        await backend.client.gather(futs)
    else:
        htex = next(iter(backend.executors.values()))
        futs = [htex.submit(echo, {}, i=i) for i in range(n)]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
    return n / (time.perf_counter() - t0)


async def pilot_rate(engine: PilotEngine, n: int, tmp: Path, tag: str, prefetch: bool = True) -> tuple[float, float]:
    """Trivial tasks through reflexarc's pilot engine alone: (tasks/s, this process's CPU µs per task).

    ``prefetch=False``: no task is queued at a busy worker (each slot waits for the agent between tasks).
    """
    assert engine.manager is not None
    default = engine.manager.prefetch_per_slot
    if not prefetch:
        engine.manager.prefetch_per_slot = 0

    def spec(i: int) -> RunSpec:
        work = tmp / f"{engine.name}-{tag}-{i}"
        return RunSpec(
            task_id=f"{tag}-{i}",
            attempt=1,
            kind="python",
            workdir=str(work),
            result_path=str(work / "outcome.json"),
            function=APP,
            args={"i": i},
            timeout_s=60,
        )

    try:
        c0, t0 = time.process_time(), time.perf_counter()
        execs = [await engine.submit(spec(i)) for i in range(n)]
        outs = await asyncio.gather(*(e.wait() for e in execs))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        engine.manager.prefetch_per_slot = default
    assert all(o.status.value == "done" for o in outs)
    return n / wall, cpu / n * 1e6


async def agent_rate(client: SiteClient, site: str, n: int, tag: str) -> float:
    """Trivial tasks end to end through the site agent (tasks/s)."""
    ids = [f"{site}-{tag}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    await client.submit([TaskRequest(task_id=t, app="echo", args={"i": i}, site=site) for i, t in enumerate(ids)])
    await client.wait_results(ids, 600)
    return n / (time.perf_counter() - t0)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-n", type=int, default=20, help="pilot tasks per latency round")
    p.add_argument("--batch-n", type=int, default=3, help="sbatch tasks per latency round")
    p.add_argument("--n", type=int, default=300, help="tasks per throughput measurement")
    p.add_argument("--slots", type=int, default=2, help="cores (task slots) of each pilot allocation")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("distributed", "parsl", "reflexarc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rx-pilot-bench-") as d:
        tmp = Path(d)
        slurm = SlurmCluster(tmp / "slurm", cpus=8, memory_mb=16000).start()
        broker = start_kafka(tmp / "tansu")
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        stop = asyncio.Event()
        agents = {k: SiteAgent(site_config(k, kafka, slurm, tmp, a.slots)) for k in (*PILOTS, "batch")}
        runs = [asyncio.create_task(ag.run(stop)) for ag in agents.values()]
        try:
            async with SiteClient(kafka) as client:
                # Warm up: the pilots' allocations running (min_allocations 1), PSI/J started.
                for kind in agents:
                    await start_latency(client, f"bench-{kind}", 1, "warm")
                lat: dict[str, list[list[float]]] = {k: [] for k in agents}
                eng_lat: dict[str, list[list[float]]] = {k: [] for k in agents}
                rates: dict[str, dict[str, list[float]]] = {
                    k: {"raw": [], "pilot": [], "no-pf": [], "agent": [], "cpu": [], "cpu-no-pf": []} for k in PILOTS
                }
                for r in range(a.rounds):
                    for kind in agents:
                        n = a.batch_n if kind == "batch" else a.latency_n
                        lat[kind].append(await start_latency(client, f"bench-{kind}", n, f"l{r}"))
                        eng_lat[kind].append(await engine_latency(agents[kind].engine, n, tmp, f"el{r}"))
                    for kind in PILOTS:
                        engine = agents[kind].engine
                        assert isinstance(engine, PilotEngine)
                        rates[kind]["raw"].append(await raw_rate(engine, a.n))
                        # With and without prefetch, in alternating order from round to round.
                        for pf in (True, False) if r % 2 == 0 else (False, True):
                            rate, cpu = await pilot_rate(engine, a.n, tmp, f"{'p' if pf else 'n'}{r}", prefetch=pf)
                            rates[kind]["pilot" if pf else "no-pf"].append(rate)
                            rates[kind]["cpu" if pf else "cpu-no-pf"].append(cpu)
                        rates[kind]["agent"].append(await agent_rate(client, f"bench-{kind}", a.n, f"a{r}"))
            print(
                f"pilot benchmark: one Slurm on loopback, {a.rounds} interleaved rounds, "
                f"pilot allocations of {a.slots} slots (2-core machine)"
            )
            for title, data in (
                ("through the site agent: request on Kafka -> app running", lat),
                ("engine alone: engine.submit -> app running (no Kafka, no job database)", eng_lat),
            ):
                print(f"\ntask start latency, {title}")
                print(f"{'site':8} {'tasks':>6} {'p50 ms':>9} {'p99 ms':>9} {'sbatch p50 / p50':>17}")
                p50 = {k: statistics.median(pct(rs, 0.5) for rs in data[k]) for k in agents}
                for kind in agents:
                    allv = [v for rs in data[kind] for v in rs]
                    ratios = [pct(b, 0.5) / pct(x, 0.5) for b, x in zip(data["batch"], data[kind], strict=True)]
                    print(
                        f"{kind:8} {len(allv):6d} {p50[kind] * 1000:9.1f} {pct(allv, 0.99) * 1000:9.1f} "
                        f"{statistics.median(ratios):17.1f}"
                    )
            print(f"\nthroughput, {a.n} trivial tasks (tasks/s; ratios against raw of the same round)")
            print(
                f"{'engine':8} {'raw':>6} {'pilot':>6} {'no-pf':>6} {'agent':>6} {'pilot/raw':>10} "
                f"{'no-pf/raw':>10} {'agent/raw':>10} {'pilot/no-pf':>12} {'CPU µs/task pilot':>18} {'no-pf':>6}"
            )
            for kind in PILOTS:
                rr = rates[kind]
                med = {m: statistics.median(v) for m, v in rr.items()}

                def ratio(x: str, y: str, rr: dict[str, list[float]] = rr) -> float:
                    return statistics.median(p / r for p, r in zip(rr[x], rr[y], strict=True))

                print(
                    f"{kind:8} {med['raw']:6.0f} {med['pilot']:6.0f} {med['no-pf']:6.0f} {med['agent']:6.0f} "
                    f"{ratio('pilot', 'raw'):10.2f} {ratio('no-pf', 'raw'):10.2f} {ratio('agent', 'raw'):10.2f} "
                    f"{ratio('pilot', 'no-pf'):12.2f} {med['cpu']:18.0f} {med['cpu-no-pf']:6.0f}"
                )
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)
            broker.process.stop()
            slurm.stop()


if __name__ == "__main__":
    asyncio.run(main())
