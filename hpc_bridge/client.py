"""A small Python API to a site from outside: submit task requests, watch results and job states.

For notebooks and tests::

    async with SiteClient(kafka_settings) as c:
        await c.submit([TaskRequest(task_id="t1", app="add", args={"a": 1, "b": 2}, site="hpc")])
        results = await c.wait_results({"t1"}, timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from reflexarc.config import KafkaSettings
from reflexarc.envelope import EnvelopeError, EventType
from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.kafka import ensure_topics, event_of, make_consumer, make_producer, send_event
from reflexarc.topics import Topics


class SiteClient:
    """Submits :class:`TaskRequest` events and collects every :class:`TaskResult` and :class:`JobState`."""

    def __init__(self, settings: KafkaSettings, namespace: str = "rx") -> None:
        self.settings = settings
        self.topics = Topics(namespace)
        self.results: dict[str, list[TaskResult]] = defaultdict(list)
        self.states: dict[str, list[JobState]] = defaultdict(list)
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> SiteClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; results and states are read from the beginning of their topics."""
        await ensure_topics(self.settings, [self.topics.kafka_results, self.topics.kafka_jobs])
        self._producer = make_producer(self.settings)
        await self._producer.start()
        self._consumer = make_consumer(self.settings, self.topics.kafka_results, self.topics.kafka_jobs,
                                       group_id=None)
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Disconnect."""
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    async def submit(self, requests: Iterable[TaskRequest]) -> None:
        """Send requests to their sites' topics; returns when Kafka has them all (acks=all)."""
        reqs = list(requests)
        await ensure_topics(self.settings, {self.topics.kafka_tasks(r.site) for r in reqs})
        futs = []
        for req in reqs:
            futs.append(await send_event(self._producer, self.topics.kafka_tasks(req.site), req.to_envelope(),
                                         key=req.task_id.encode()))
        await asyncio.gather(*futs)

    async def send_raw(self, site: str, value: bytes) -> None:
        """Send arbitrary bytes to a site's task topic (to see bad input dead-lettered)."""
        await (await self._producer.send(self.topics.kafka_tasks(site), value=value))

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            for recs in batches.values():
                for r in recs:
                    try:
                        env = event_of(r)
                        if env.type == EventType.TASK_RESULT.value:
                            res = TaskResult.from_envelope(env)
                            self.results[res.task_id].append(res)
                        elif env.type == EventType.JOB_STATE.value:
                            st = JobState.from_envelope(env)
                            self.states[st.task_id].append(st)
                    except EnvelopeError:
                        continue
            if batches:
                self._changed.set()

    def _finished(self, task_id: str) -> bool:
        results = self.results.get(task_id)
        states = self.states.get(task_id)
        return bool(results) and bool(states) and states[-1].state == results[0].status

    async def wait_results(self, task_ids: Iterable[str], timeout: float = 60.0) -> dict[str, TaskResult]:
        """Wait until every task in ``task_ids`` has a result; raise ``TimeoutError`` naming the missing.

        A task counts as finished when its result has arrived *and* its state
        history (``states``) has reached the same final state: results and
        job states travel on different topics, so either may be read first.
        """
        wanted = set(task_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        missing = wanted
        while True:
            # Only the tasks still missing are looked at again (thousands of tasks stay cheap);
            # once none is, all are checked together, as the answer must hold for all at once.
            missing = {t for t in missing if not self._finished(t)}
            if not missing:
                missing = {t for t in wanted if not self._finished(t)}
                if not missing:
                    return {t: self.results[t][0] for t in wanted}
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no result after {timeout:g}s for {len(missing)} task(s): {sorted(missing)[:5]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._changed.wait()
