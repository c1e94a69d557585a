"""The Dask pilots' messages: short batching windows, a finished key released after the next submit, workers listed
only when they changed.

A real scheduler (the backend's own child process, with the preload) and a real
in-process worker named like an allocation's; no Slurm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from distributed import Scheduler, Worker

from reflexarc.hpc_bridge.allocations import Placement
from reflexarc.hpc_bridge.engines.jobqueue import PRELOAD, SEND_INTERVAL_S, DaskJobqueueBackend, job_kwargs
from reflexarc.hpc_bridge.site_config import JobqueueSettings
from reflexarc.hpc_bridge.worker import RunSpec

APP = "reflexarc.hpc_bridge.examples.apps:echo"


async def until(check: Callable[[], object], timeout: float = 10) -> None:
    """Let the event loop run until ``check()`` holds (the client's releases are loop callbacks, not events)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_preload_shortens_the_scheduler_and_worker_windows() -> None:
    async with (
        Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", preload=[PRELOAD]) as sched,
        Worker(sched.address, name="rxp-abc123-a1-0", nthreads=1, preload=[PRELOAD]) as w,
    ):
        assert w.batched_stream.interval == SEND_INTERVAL_S
        assert sched.stream_comms[w.address].interval == SEND_INTERVAL_S


async def test_the_manager_lists_workers_only_when_they_changed(tmp_path: Path) -> None:
    backend = DaskJobqueueBackend(JobqueueSettings(cores_per_node=1), "127.0.0.1", tmp_path)
    await backend.start()
    try:
        assert await backend.workers() == {}
        async with Worker(backend.scheduler_address, name="rxp-abc123-a1-0", nthreads=1, resources={"GPU": 2}) as w:
            listed = await backend.workers()
            assert [(i.name, i.slots, i.gpus, i.incarnation) for i in listed["rxp-abc123-a1"]] == [
                ("rxp-abc123-a1-0", 1, 2, w.address)
            ]
            version = backend._workers_version
            # Unchanged: the scheduler answers with its version only.
            assert await backend.client.scheduler.rx_workers(since=version) == {"version": version}
            assert await backend.workers() == listed
        # The scheduler drops the worker when its connection closes; nothing tells the client: ask until then.
        deadline = time.monotonic() + 10
        while (await backend.workers()) != {}:
            assert time.monotonic() < deadline, "the worker that left is still listed"
            await asyncio.sleep(0.05)
    finally:
        await backend.close()


def test_workers_are_started_with_the_preload(tmp_path: Path) -> None:
    kw = job_kwargs(JobqueueSettings(cores_per_node=2), "tcp://127.0.0.1:1", "rxp-abc123-a1", tmp_path)
    args = kw["worker_extra_args"]
    assert args[args.index("--preload") + 1] == PRELOAD


async def test_a_finished_key_is_released_after_the_next_submit(tmp_path: Path) -> None:
    backend = DaskJobqueueBackend(JobqueueSettings(cores_per_node=1), "127.0.0.1", tmp_path)
    await backend.start()
    try:
        assert backend.client.scheduler_comm.interval == SEND_INTERVAL_S
        name = "rxp-abc123-a1-0"
        async with Worker(backend.scheduler_address, name=name, nthreads=1, preload=[PRELOAD]):

            def spec(i: int) -> RunSpec:
                work = tmp_path / f"t{i}"
                return RunSpec(
                    task_id=f"t{i}",
                    attempt=1,
                    kind="python",
                    workdir=str(work),
                    result_path=str(work / "outcome.json"),
                    function=APP,
                    args={"i": i},
                    timeout_s=60,
                )

            placement = Placement(
                key="k", allocation="rxp-abc123-a1", job_id="1", worker=name, node="n", slots=(("n", 1),)
            )
            first = await backend.run(spec(0), placement)
            out = await first.result()
            assert out["ok"] and out["result"]["i"] == 0
            key = first.fut.key  # type: ignore[attr-defined]
            # Held back for the next submit, which releases it right after its own message.
            assert backend._to_release and key in backend.client.futures
            second = await backend.run(spec(1), placement)
            assert not backend._to_release
            await until(lambda: key not in backend.client.futures)
            assert (await second.result())["ok"]
            # With no next submit, the timer releases it.
            key2 = second.fut.key  # type: ignore[attr-defined]
            await until(lambda: key2 not in backend.client.futures)
            assert backend._release_timer is None
    finally:
        await backend.close()
