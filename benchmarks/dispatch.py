"""Dispatch benchmark: trivial tasks/s and per-task overhead through the site agent.

For the ``local`` and ``dask`` engines, three figures measured in the same run:

* raw    — the engine's own mechanism alone: ``concurrent.futures``
           ProcessPoolExecutor (local) or ``Client.submit`` (dask), no reflexarc;
* engine — reflexarc's engine object alone (submit + wait), no Kafka, no database;
* agent  — end to end through the site agent: TaskRequest on Kafka (Tansu) ->
           job row (SQLite) -> engine -> outcome -> TaskResult on Kafka.

Per-task overhead of the agent = 1/rate(agent) - 1/rate(raw). Usage::

    python benchmarks/dispatch.py [--n 400] [--workers 2] [--engines local,dask]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import tempfile
import time
from pathlib import Path

from reflexarc.brokers import start_kafka
from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.engines import Engine
from reflexarc.hpc_bridge.examples.apps import echo
from reflexarc.hpc_bridge.site_config import DaskEngineSettings, SiteConfig
from reflexarc.hpc_bridge.worker import RunSpec

APP = "reflexarc.hpc_bridge.examples.apps:echo"


def raw_local(n: int, workers: int) -> float:
    """Trivial calls through a plain process pool (tasks/s)."""
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for f in [pool.submit(echo, i=i) for i in range(workers)]:  # warm the workers up
            f.result()
        t0 = time.perf_counter()
        futs = [pool.submit(echo, i=i) for i in range(n)]
        for f in futs:
            f.result()
        return n / (time.perf_counter() - t0)


async def raw_dask(n: int, workers: int) -> float:
    """Trivial calls through Dask's own client (tasks/s)."""
    from distributed import Client, LocalCluster

    async with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, asynchronous=True) as cluster, \
            Client(cluster, asynchronous=True) as client:
        await client.gather([client.submit(echo, i=i, pure=False) for i in range(workers)])
        t0 = time.perf_counter()
        await client.gather([client.submit(echo, i=i, pure=False) for i in range(n)])
        return n / (time.perf_counter() - t0)


async def engine_only(engine: Engine, n: int, tmp: Path) -> float:
    """Trivial tasks through a reflexarc engine object alone (tasks/s)."""
    await engine.start()
    try:
        def spec(i: int) -> RunSpec:
            return RunSpec(task_id=f"e{i}", attempt=1, kind="python", workdir=str(tmp / f"e{i}"),
                           result_path=str(tmp / f"e{i}" / "o.json"), function=APP, args={"i": i})

        warm = [await engine.submit(spec(-1 - i)) for i in range(engine.capacity if engine.name == "local" else 2)]
        await asyncio.gather(*(e.wait() for e in warm))
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(engine.capacity)

        async def one(i: int) -> None:
            async with sem:
                await (await engine.submit(spec(i))).wait()

        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)
    finally:
        await engine.close()


async def through_agent(kind: str, n: int, workers: int, kafka: KafkaSettings, tmp: Path) -> float:
    """Trivial tasks end to end through the site agent (tasks/s)."""
    site = f"bench-{kind}"
    cfg = SiteConfig.model_validate({
        "site": site, "kafka": kafka.model_dump(), "state_dir": str(tmp / site),
        "engine": {"kind": kind, "local": {"max_workers": workers},
                   "dask": {"cluster": "local", "n_workers": workers}},
        "apps": {"echo": {"function": APP}},
    })
    agent = SiteAgent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with SiteClient(kafka) as client:
            # Warm-up: group join, workers started.
            warm = [f"{kind}-w{i}" for i in range(workers)]
            await client.submit([TaskRequest(task_id=t, app="echo", site=site) for t in warm])
            await client.wait_results(warm, 120)
            ids = [f"{kind}-t{i}" for i in range(n)]
            t0 = time.perf_counter()
            await client.submit([TaskRequest(task_id=t, app="echo", args={"i": t}, site=site) for t in ids])
            await client.wait_results(ids, 600)
            return n / (time.perf_counter() - t0)
    finally:
        stop.set()
        await task


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="tasks per measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engines", default="local,dask")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rx-bench-") as d:
        tmp = Path(d)
        broker = start_kafka(tmp / "tansu")
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        try:
            print(f"dispatch benchmark: {a.n} trivial tasks, {a.workers} workers (2-core machine)")
            print(f"{'engine':8} {'raw tasks/s':>12} {'engine tasks/s':>15} {'agent tasks/s':>14} "
                  f"{'agent/raw':>10} {'overhead ms/task':>17}")
            for kind in a.engines.split(","):
                if kind == "local":
                    from reflexarc.hpc_bridge.engines.local import LocalEngine

                    raw = raw_local(a.n, a.workers)
                    eng = await engine_only(LocalEngine(a.workers), a.n, tmp / "e-local")
                else:
                    from reflexarc.hpc_bridge.engines.dask_engine import DaskEngine

                    raw = await raw_dask(a.n, a.workers)
                    eng = await engine_only(DaskEngine(DaskEngineSettings(n_workers=a.workers)), a.n,
                                            tmp / "e-dask")
                ag = await through_agent(kind, a.n, a.workers, kafka, tmp)
                overhead = (1 / ag - 1 / raw) * 1000
                print(f"{kind:8} {raw:12.0f} {eng:15.0f} {ag:14.0f} {ag / raw:10.3f} {overhead:17.2f}")
        finally:
            broker.process.stop()


if __name__ == "__main__":
    asyncio.run(main())
