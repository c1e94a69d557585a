"""faust's aiokafka transport, with the changes the trigger engine needs.

**Fetch wait.** faust-streaming 0.15 builds its worker consumer with
``fetch_max_wait_ms=1500`` and offers no setting for it. On a broker that
answers a long-polling fetch as soon as a record arrives (Apache Kafka) that
costs nothing, but Tansu answers a fetch naming more than one partition only
when it next polls its storage - at 0 ms, then after half the remaining wait
(750, 1125, 1312 ms), then at the wait's end. The faust consumer always names
several partitions (the data topic, the results topic, the table changelog),
so a record waited 0-750 ms for the worker to see it, p50 about 300 ms on each
of the worker's two hops. Our consumer sends ``fetch_max_wait_ms`` = the
configured wait instead; the only cost of a short wait is more (empty) fetch
requests while idle: one per ``wait`` per worker.

**A flush that flushes.** faust commits a source offset after
``producer.flush()``, which is meant to make every table changelog record
written so far durable first. But faust's ``ProducerBuffer.flush`` gives up
as soon as no record leaves its buffer for 0.1 s, and it counts a record
that its sender task has taken off the queue but not yet handed to aiokafka
as flushed. Under load (a slow changelog partition, one record per batch on
Tansu) the commit then ran ahead of the changelog, and a ``kill -9`` right
after it lost table state whose events were already committed: windows
restarted at other events and the restart test saw different firings.
:class:`DurableProducer` drains every record put before the flush into
aiokafka, then waits for aiokafka's own flush (the broker's acks), so a
committed offset never points past state that is not in the changelog.

**Buffered events kept on resume.** faust's flow control clears every stream
buffer whenever it is resumed, and its table recovery resumes it more than
once: "Resuming flow" before reading the changelogs, then again after it has
resumed the source partitions *and* waited for the committed offsets (about
0.1 s on Tansu). Events fetched in that window were in the data agent's buffer
and were dropped, without being acked, while later ones were processed; the
next worker then skipped them as already applied (their state position was
passed) and every window on that partition lost a few events. A resume while
the flow is already running now keeps the buffers; one that ends a suspension
(a rebalance) still clears them, as faust intends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer

from reflexarc.config import KafkaSettings
from reflexarc.kafka import security_options


def set_fetch_wait(consumer: Any, wait_ms: int) -> None:
    """Make an unstarted ``AIOKafkaConsumer`` long-poll fetches for at most ``wait_ms``.

    aiokafka reads the value when ``start()`` builds its fetcher, and only from
    this attribute; a library that no longer has it fails here loudly rather
    than silently bringing the 1.5 s wait back.
    """
    if not hasattr(consumer, "_fetch_max_wait_ms"):
        raise RuntimeError(
            "this aiokafka version has no AIOKafkaConsumer._fetch_max_wait_ms: the trigger engine cannot "
            "set its fetch wait; install the aiokafka version reflexarc pins (pip install 'aiokafka==0.14.*') "
            "or update reflexarc.cloud.transport"
        )
    if getattr(consumer, "_fetcher", None) is not None:
        raise RuntimeError("set_fetch_wait must be called before the consumer starts")
    consumer._fetch_max_wait_ms = wait_ms


class DrainableBuffer(ProducerBuffer):
    """faust's producer buffer, counting what was put and what was handed to aiokafka."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.put_count = 0
        self.handed_count = 0

    def put(self, fut: Any) -> None:
        """Queue ``fut`` for the sender task (faust's ``put``), counting it."""
        self.put_count += 1
        super().put(fut)

    async def _send_pending(self, fut: Any) -> None:
        try:
            await super()._send_pending(fut)
        finally:
            # faust's sender task sets ``message_sent`` right after this returns.
            self.handed_count += 1

    async def drain(self, poll: float = 1.0) -> None:
        """Wait until every record put so far has been handed to aiokafka.

        Records put while waiting are not waited for, so a steady stream of new
        table writes cannot keep a commit waiting for ever.
        """
        target = self.put_count
        while self.handed_count < target:
            if self.state != "running":
                raise RuntimeError("cannot flush the changelog: faust's producer buffer is not running")
            self.message_sent.clear()
            if self.handed_count >= target:
                return
            try:
                await asyncio.wait_for(self.message_sent.wait(), poll)
            except TimeoutError:
                continue


class DurableProducer(faust_aiokafka.Producer):
    """faust's aiokafka producer whose ``flush`` returns only when everything put before it is acked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.app.conf.producer_threaded:
            raise RuntimeError("the trigger engine does not support faust's producer_threaded setting")
        buffer = DrainableBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = self.app
        self.buffer = buffer

    async def flush(self) -> None:
        """Drain the buffer into aiokafka, then wait for aiokafka's flush (the broker's acks)."""
        await self.buffer.drain()
        await super().flush()


def keep_buffers_when_already_flowing(flow: Any) -> None:
    """Make ``flow.resume()`` (a faust ``FlowControlEvent``) a no-op while the flow already runs.

    Resuming a suspended flow still clears the stream buffers (they hold events
    from before a rebalance); resuming a running one used to clear them too,
    dropping events that were delivered but not yet processed.
    """
    plain_resume = flow.resume

    def resume() -> None:
        if flow.is_active():
            return
        plain_resume()

    flow.resume = resume


def worker_transport(wait: float) -> type[faust_aiokafka.Transport]:
    """faust's aiokafka transport with a ``wait``-second fetch wait and :class:`DurableProducer`."""
    wait_ms = max(1, round(wait * 1000))

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        """faust's consumer thread, building its aiokafka consumer with our fetch wait."""

        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            set_fetch_wait(consumer, wait_ms)
            return consumer

    class FetchWaitConsumer(faust_aiokafka.Consumer):
        """faust's aiokafka consumer with :class:`ConsumerThread`."""

        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        """faust's aiokafka transport with :class:`FetchWaitConsumer` and :class:`DurableProducer`."""

        Consumer = FetchWaitConsumer
        Producer = DurableProducer

    return Transport


def credentials(settings: KafkaSettings) -> SSLCredentials | SASLCredentials | None:
    """faust's ``broker_credentials`` for ``settings``: the TLS/SASL every aiokafka client of ours uses."""
    opts = security_options(settings)
    protocol = opts["security_protocol"]
    if protocol == "SSL":
        return SSLCredentials(opts["ssl_context"])
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        # KafkaSettings refuses SASL without a mechanism, so the options always name one.
        return SASLCredentials(
            username=opts["sasl_plain_username"],
            password=opts["sasl_plain_password"],
            ssl_context=opts.get("ssl_context"),
            mechanism=opts["sasl_mechanism"],
        )
    return None


def install(app: Any, wait: float) -> None:
    """Give a new faust ``app`` :func:`worker_transport` and buffers kept on resume (before it uses its transport)."""
    # faust makes its transport lazily; whatever was built from the default one (the
    # conductor, the consumer) would keep using it, so replacing it late would do nothing.
    if getattr(app, "_transport", None) is not None or getattr(app, "_producer", None) is not None:
        raise RuntimeError("install the worker transport right after faust.App(), before the app uses its transport")
    app.transport = worker_transport(wait)(app.conf.broker_consumer, app)
    keep_buffers_when_already_flowing(app.flow_control)


__all__ = [
    "DrainableBuffer",
    "DurableProducer",
    "credentials",
    "install",
    "keep_buffers_when_already_flowing",
    "set_fetch_wait",
    "worker_transport",
]
