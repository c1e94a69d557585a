"""The ``dask`` engine: tasks as futures on a ``distributed`` cluster.

Two kinds of cluster: an in-process ``LocalCluster`` (worker processes on
this machine) or an existing scheduler by address. With ``adapt`` the number
of LocalCluster workers follows the backlog between ``minimum`` and
``maximum``; a worker idle for ``idle_timeout_s`` is retired. dask-jobqueue
pilots (``cluster: jobqueue``) are :mod:`reflexarc.hpc_bridge.engines.jobqueue`.

A worker that dies mid-task is not silently retried by Dask behind the
agent's back (the scheduler's ``allowed-failures`` is 0 for clusters we start):
the task fails with the reason and the app's retry policy decides, so every
retry is a visible state change.

Results are fetched in batches: awaiting a Dask future fetches its result
alone (one request to the worker holding it, per task); the engine instead
waits for each future to finish and fetches the results of all the futures
that finished meanwhile with one ``gather``, as ``client.gather`` over many
futures does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.site_config import DaskEngineSettings
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec, execute_json

log = logging.getLogger(__name__)


class DaskEngine(Engine):
    """A ``distributed`` client on a local or remote cluster."""

    name = "dask"

    def __init__(self, settings: DaskEngineSettings) -> None:
        self.settings = settings
        self.cluster: Any = None
        self.client: Any = None
        # Finished futures whose results are to be fetched together, with who waits for each.
        self._to_gather: list[tuple[Any, asyncio.Future[Any]]] = []
        self._gatherer: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        """Futures handed to Dask at once (Dask queues them on its scheduler)."""
        return self.settings.max_running

    async def start(self) -> None:
        """Start (or connect to) the cluster and the asynchronous client."""
        import dask
        from distributed import Client

        s = self.settings
        # Worker deaths surface as task failures, handled by the app's policy.
        dask.config.set({"distributed.scheduler.allowed-failures": 0})
        try:
            if s.cluster == "address":
                self.client = await Client(s.address, asynchronous=True)
            else:
                self.cluster = await self._make_cluster()
                if s.adapt is not None:
                    a = s.adapt
                    self.cluster.adapt(
                        minimum=a.minimum,
                        maximum=a.maximum,
                        interval=f"{a.interval_s}s",
                        wait_count=max(1, round(a.idle_timeout_s / a.interval_s)),
                    )
                self.client = await Client(self.cluster, asynchronous=True)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise EngineError(f"cannot start the Dask engine ({s.cluster}): {exc}") from exc
        log.info("dask engine: %s", self.client)

    async def _make_cluster(self) -> Any:
        from distributed import LocalCluster

        s = self.settings
        return await LocalCluster(
            n_workers=0 if s.adapt else s.n_workers,
            threads_per_worker=s.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            asynchronous=True,
        )

    async def submit(self, spec: RunSpec) -> Execution:
        """One future per attempt; its key names task and attempt (visible in Dask's dashboard)."""
        resources = None
        # sync=False: the outcome comes back on the future and the agent commits it to its job store
        # before reporting it; the outcome file only has to outlive the agent process (worker.py's doc).
        fut = self.client.submit(
            execute_json,
            spec.to_json(),
            sync=False,
            key=f"rx-{spec.task_id}-{spec.attempt}",
            pure=False,
            resources=resources,
        )
        return _DaskExecution(self, fut)

    async def result(self, fut: Any) -> Any:
        """The result of ``fut`` (its error raised), fetched with those of the futures that finished with it."""
        from distributed.client import _wait  # the state wait of Future.result, without the fetch

        await _wait([fut])
        if fut.status != "finished":
            return await fut  # an error or a cancellation: raised as Dask raises it
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._to_gather.append((fut, waiter))
        if self._gatherer is None or self._gatherer.done():
            self._gatherer = asyncio.create_task(self._gather(), name="dask-gather")
        return await waiter

    async def _gather(self) -> None:
        batch: list[tuple[Any, asyncio.Future[Any]]] = []
        try:
            while self._to_gather:
                await asyncio.sleep(0)  # the futures finishing at this moment join the batch
                batch, self._to_gather = self._to_gather, []
                try:
                    results = await self.client.gather([f for f, _ in batch])
                except Exception:  # one could not be fetched: each on its own, so that only its waiter gets it
                    for f, waiter in batch:
                        try:
                            result = await f
                        except Exception as exc:
                            if not waiter.done():
                                waiter.set_exception(exc)
                        else:
                            if not waiter.done():
                                waiter.set_result(result)
                    batch = []
                    continue
                for (_, waiter), result in zip(batch, results, strict=True):
                    if not waiter.done():
                        waiter.set_result(result)
                batch = []
        finally:
            # Stopped (the engine is closing): nobody is left waiting forever.
            for _, waiter in [*batch, *self._to_gather]:
                if not waiter.done():
                    waiter.set_exception(EngineError("the Dask engine closed before the result was fetched"))
            if batch or self._to_gather:
                self._to_gather = []

    async def workers(self) -> int:
        """Number of workers connected right now."""
        info = await self.client.scheduler.identity()
        return len(info.get("workers", {}))

    async def close(self) -> None:
        """Close client and cluster (pilot jobs are cancelled)."""
        if self._gatherer is not None:
            self._gatherer.cancel()
            await asyncio.gather(self._gatherer, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                await self.cluster.close()


class _DaskExecution(Execution):
    def __init__(self, engine: DaskEngine, fut: Any) -> None:
        self.engine = engine
        self.fut = fut
        self.native_id = f"dask:{fut.key}"
        self._cancelled = False

    async def wait(self) -> Outcome:
        from distributed.scheduler import KilledWorker

        try:
            data = await self.engine.result(self.fut)
        except asyncio.CancelledError:
            if self._cancelled:
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False)
            raise
        except KilledWorker as exc:
            return Outcome(JobStatus.FAILED, error=f"the Dask worker running it died: {exc}")
        except Exception as exc:
            return Outcome(JobStatus.FAILED, error=f"dask: {type(exc).__name__}: {exc}")
        finally:
            # The outcome is on disk and in hand: let the worker forget it (and become idle,
            # so adaptive scaling can retire it).
            with contextlib.suppress(Exception):
                self.fut.release()
        return outcome_from_worker(data)

    async def cancel(self) -> None:
        self._cancelled = True
        with contextlib.suppress(Exception):
            await self.fut.cancel()
