"""faust's aiokafka transport with a configurable fetch wait (the trigger engine's latency).

faust-streaming 0.15 builds its worker consumer with ``fetch_max_wait_ms=1500``
and offers no setting for it. On a broker that answers a long-polling fetch as
soon as a record arrives (Apache Kafka) that costs nothing, but Tansu answers
a fetch naming more than one partition only when it next polls its storage -
at 0 ms, then after half the remaining wait (750, 1125, 1312 ms), then at the
wait's end. The faust consumer always names several partitions (the data topic,
the results topic, the table changelog), so a record waited 0-750 ms for the
worker to see it, p50 about 300 ms on each of the worker's two hops.

:func:`fetch_wait_transport` returns faust's aiokafka ``Transport`` whose
worker consumer sends ``fetch_max_wait_ms`` = the configured wait instead. The
only cost of a short wait is more (empty) fetch requests while idle: one per
``wait`` per worker.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka


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
            "or update reflexarc.cloud.fetchwait"
        )
    if getattr(consumer, "_fetcher", None) is not None:
        raise RuntimeError("set_fetch_wait must be called before the consumer starts")
    consumer._fetch_max_wait_ms = wait_ms


def fetch_wait_transport(wait: float) -> type[faust_aiokafka.Transport]:
    """faust's aiokafka transport whose worker consumer waits at most ``wait`` seconds per fetch."""
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
        """faust's aiokafka transport with :class:`FetchWaitConsumer`."""

        Consumer = FetchWaitConsumer

    return Transport


def install(app: Any, wait: float) -> None:
    """Give a new faust ``app`` the transport of :func:`fetch_wait_transport` (before it builds its consumer)."""
    # faust makes its transport lazily; whatever was built from the default one (the
    # conductor, the consumer) would keep using it, so replacing it late would do nothing.
    if getattr(app, "_transport", None) is not None:
        raise RuntimeError("install the fetch-wait transport right after faust.App(), before the app uses its transport")
    app.transport = fetch_wait_transport(wait)(app.conf.broker_consumer, app)


__all__ = ["fetch_wait_transport", "install", "set_fetch_wait"]
