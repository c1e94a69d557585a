"""A small Python API to a site from outside: submit task requests, watch results and job states.

For notebooks and tests::

    async with SiteClient(kafka_settings) as c:
        await c.submit([TaskRequest(task_id="t1", app="add", args={"a": 1, "b": 2}, site="hpc")])
        results = await c.wait_results({"t1"}, timeout=30)

On a secured cluster it takes the settings every tier takes (TLS, SASL, the
namespace): ``SiteClient.from_config("kafka.yaml")``, or ``SiteClient()`` to
read the ``RX_KAFKA_*`` and ``RX_NAMESPACE`` variables
(:mod:`reflexarc.clientconfig`). ``start`` says where reading begins: the
beginning of the topics (the default), ``"now"``, or a ``datetime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from reflexarc.clientconfig import load_client_config
from reflexarc.config import KafkaSettings
from reflexarc.envelope import EnvelopeError, EventType
from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.kafka import ensure_topics, event_of, make_producer, send_event
from reflexarc.kafkastart import Start, start_reader
from reflexarc.topics import Topics


class SiteClient:
    """Submits :class:`TaskRequest` events and collects every :class:`TaskResult` and :class:`JobState`."""

    def __init__(
        self, settings: KafkaSettings | None = None, namespace: str | None = None, start: Start = "beginning"
    ) -> None:
        if settings is None or namespace is None:
            env = load_client_config()  # the RX_KAFKA_* and RX_NAMESPACE variables, as every tier reads them
            settings = settings if settings is not None else env.kafka
            namespace = namespace if namespace is not None else env.namespace
        self.settings = settings
        self.topics = Topics(namespace)
        self.start_at = start
        self.results: dict[str, list[TaskResult]] = defaultdict(list)
        self.states: dict[str, list[JobState]] = defaultdict(list)
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str] | None = None, namespace: str | None = None, start: Start = "beginning"
    ) -> SiteClient:
        """A client with the ``kafka:`` and ``namespace:`` of a YAML file (None: the environment), as tiers read them."""
        cfg = load_client_config(path, namespace=namespace)
        return cls(cfg.kafka, cfg.namespace, start)

    async def __aenter__(self) -> SiteClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; results and states are read from ``start`` on (the beginning of their topics by default).

        An unreachable cluster raises ``KafkaConnectionError`` at once (the producer connects
        first), not after the retries of topic creation.
        """
        self._producer = make_producer(self.settings)
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()
            self._producer = None
            raise
        await ensure_topics(self.settings, [self.topics.kafka_results, self.topics.kafka_jobs])
        self._consumer = await start_reader(
            self.settings, [self.topics.kafka_results, self.topics.kafka_jobs], self.start_at
        )
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
            futs.append(
                await send_event(
                    self._producer, self.topics.kafka_tasks(req.site), req.to_envelope(), key=req.task_id.encode()
                )
            )
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
        return bool(results and states and states[-1].state == results[0].status)

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
