"""Dispatch benchmark: trivial tasks/s through the site agent against the engine's own mechanism, same run.

For each engine (``local``, ``dask``), interleaved rounds of three measurements:

* raw    — the engine's own mechanism alone, no reflexarc: ``concurrent.futures.ProcessPoolExecutor``
           (local) or ``distributed.Client.submit`` (dask), the same trivial function, all ``n`` calls
           submitted at once: no work directory, no log, nothing written anywhere, nothing durable;
* engine — reflexarc's engine object alone: submit + wait with as many in flight as the agent allows
           itself, each task in its own work directory with its ``task.log`` and its outcome file
           (written atomically; not fsynced: in the agent the job store's commit is the durable
           record, see ``hpc_bridge/worker.py``), no Kafka, no database;
* agent  — end to end through a site agent process, exactly as ``reflexarc site run site.yaml`` runs:
           TaskRequests on Kafka (Tansu) -> jobs (SQLite) -> engine -> TaskResult and every JobState
           on Kafka, read back by a client that waits for each task's result and final state.

Printed: per engine the median over the rounds of each rate, of ``agent/raw`` and ``agent/engine``
(each a ratio within one round), and the agent's own CPU time per task (user + system time of the
agent process from /proc over the round; the engine's worker processes are not in it, the Dask
scheduler, which runs inside the agent's process, is). The machine is shared and noisy: compare
ratios from the same run, not rates across runs.

What the ratios mean: ``agent/raw`` is the whole price of the agent's promises (every request durable in
SQLite before its offset is committed, every state change and result durable there and acknowledged by
Kafka, a restart losing and re-running nothing) over a bare pool that promises nothing; ``agent/engine``
is the agent's own share of it. The baseline is kept bare on purpose. Usage::

    python benchmarks/dispatch.py [--n 2000] [--rounds 5] [--workers 2] [--engines local,dask]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from reflexarc.brokers import start_kafka
from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.engines import Engine
from reflexarc.hpc_bridge.examples.apps import echo
from reflexarc.hpc_bridge.site_config import DaskEngineSettings
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.testing.tiers import TierProcess

APP = "reflexarc.hpc_bridge.examples.apps:echo"
TICK = os.sysconf("SC_CLK_TCK")


def raw_local(n: int, workers: int, min_s: float = 2.0) -> float:
    """Trivial calls through a plain process pool (tasks/s), ``n`` at a time for at least ``min_s``.

    ``n`` alone takes a fraction of a second here: a moment's load on the shared machine would
    decide the figure, so it is measured over about as long as the others.
    """
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for f in [pool.submit(echo, i=i) for i in range(workers)]:  # warm the workers up
            f.result()
        done = 0
        t0 = time.perf_counter()
        while done == 0 or time.perf_counter() - t0 < min_s:
            futs = [pool.submit(echo, i=i) for i in range(n)]
            for f in futs:
                f.result()
            done += n
        return done / (time.perf_counter() - t0)


async def raw_dask(n: int, workers: int) -> float:
    """Trivial calls through Dask's own client (tasks/s)."""
    from distributed import Client, LocalCluster

    async with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        await client.gather([client.submit(echo, i=i, pure=False) for i in range(workers)])
        t0 = time.perf_counter()
        await client.gather([client.submit(echo, i=i, pure=False) for i in range(n)])
        return n / (time.perf_counter() - t0)


async def engine_only(engine: Engine, n: int, tmp: Path) -> float:
    """Trivial tasks through a reflexarc engine object alone (tasks/s)."""
    await engine.start()
    try:

        def spec(i: int) -> RunSpec:
            return RunSpec(
                task_id=f"e{i}",
                attempt=1,
                kind="python",
                workdir=str(tmp / f"e{i}"),
                result_path=str(tmp / f"e{i}" / "o.json"),
                function=APP,
                args={"i": i},
            )

        warm = [await engine.submit(spec(-1 - i)) for i in range(engine.capacity if engine.name == "local" else 2)]
        await asyncio.gather(*(e.wait() for e in warm))
        t0 = time.perf_counter()
        # As many in flight as the engine takes, plus those it queues itself (the agent does the same).
        sem = asyncio.Semaphore(engine.capacity + engine.prefetch)

        async def one(i: int) -> None:
            async with sem:
                await (await engine.submit(spec(i))).wait()

        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)
    finally:
        await engine.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Site:
    """A site agent process for one engine, and a client of it."""

    def __init__(self, kind: str, workers: int, kafka: KafkaSettings, tmp: Path) -> None:
        self.kind = kind
        self.name = f"bench-{kind}"
        config = tmp / f"{self.name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "site": self.name,
                    "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
                    "state_dir": str(tmp / self.name),
                    "engine": {
                        "kind": kind,
                        "local": {"max_workers": workers},
                        "dask": {"cluster": "local", "n_workers": workers},
                    },
                    "apps": {"echo": {"function": APP}},
                }
            )
        )
        self.process = TierProcess("site", config, tmp / f"{self.name}.log", env={"RX_LOG_LEVEL": "WARNING"})
        self.client = SiteClient(kafka)
        self.rounds = 0

    async def start(self, workers: int) -> None:
        """Start the agent and the client; warm up (group joined, workers started)."""
        await self.process.start(timeout=120)
        await self.client.start()
        await self.run(4 * workers, "warm")

    async def run(self, n: int, tag: str) -> tuple[float, float]:
        """``n`` tasks end to end: (tasks/s, agent CPU ms per task)."""
        ids = [f"{self.kind}-{tag}-{i}" for i in range(n)]
        pid = self.process.pid
        assert pid is not None
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await self.client.submit([TaskRequest(task_id=t, app="echo", args={"i": t}, site=self.name) for t in ids])
        await self.client.wait_results(ids, 600)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        return n / wall, cpu / n * 1000

    async def stop(self) -> None:
        """Close the client, stop the agent (SIGTERM)."""
        await self.client.close()
        await asyncio.to_thread(self.process.stop)


async def one_round(kind: str, site: Site, n: int, workers: int, r: int, tmp: Path) -> dict[str, float]:
    """raw, engine and agent for one engine, one after the other."""
    if kind == "local":
        from reflexarc.hpc_bridge.engines.local import LocalEngine

        raw = await asyncio.to_thread(raw_local, n, workers)
        eng = await engine_only(LocalEngine(workers), n, tmp / f"e-local-{r}")
    else:
        from reflexarc.hpc_bridge.engines.dask_engine import DaskEngine

        raw = await raw_dask(n, workers)
        eng = await engine_only(DaskEngine(DaskEngineSettings(n_workers=workers)), n, tmp / f"e-dask-{r}")
    agent, cpu = await site.run(n, f"r{r}")
    return {
        "raw": raw,
        "engine": eng,
        "agent": agent,
        "agent/raw": agent / raw,
        "agent/engine": agent / eng,
        "cpu": cpu,
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="tasks per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is printed)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engines", default="local,dask")
    p.add_argument("--verbose", action="store_true", help="print every round")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Dask's clusters log every start and stop at INFO (its import sets that up: import it first)
    # and warn about their dashboards' ports.
    import distributed  # noqa: F401

    logging.getLogger("distributed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Port .* is already in use")
    kinds = a.engines.split(",")
    with tempfile.TemporaryDirectory(prefix="rx-bench-") as d:
        tmp = Path(d)
        broker = start_kafka(tmp / "tansu")
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        sites = {k: Site(k, a.workers, kafka, tmp) for k in kinds}
        figures: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in kinds}
        try:
            for site in sites.values():
                await site.start(a.workers)
            print(
                f"dispatch benchmark: {a.n} trivial tasks a round, {a.rounds} interleaved rounds, "
                f"{a.workers} workers, {os.cpu_count()} cores"
            )
            for r in range(a.rounds):
                for kind in kinds:
                    got = await one_round(kind, sites[kind], a.n, a.workers, r, tmp)
                    for key, value in got.items():
                        figures[kind][key].append(value)
                    if a.verbose:
                        print(f"  round {r + 1} {kind}: " + ", ".join(f"{k} {v:.3g}" for k, v in got.items()))
        finally:
            for site in sites.values():
                await site.stop()
            broker.process.stop()
    print(
        f"{'engine':8} {'raw tasks/s':>12} {'engine tasks/s':>15} {'agent tasks/s':>14} {'agent/raw':>10} "
        f"{'agent/engine':>13} {'agent CPU ms/task':>18}"
    )
    for kind in kinds:
        m: dict[str, Any] = {k: statistics.median(v) for k, v in figures[kind].items()}
        print(
            f"{kind:8} {m['raw']:12.0f} {m['engine']:15.0f} {m['agent']:14.0f} {m['agent/raw']:10.3f} "
            f"{m['agent/engine']:13.2f} {m['cpu']:18.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
