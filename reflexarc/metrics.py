"""Prometheus endpoint for a tier process, build info, and the histogram buckets the tiers share.

Every tier's YAML takes ``metrics: {host, port}`` (:class:`reflexarc.config.MetricsSettings`);
the host defaults to loopback, so a laptop exposes nothing. ``docs/metrics.md`` lists every metric.
"""

from __future__ import annotations

import logging
import platform
import threading

from prometheus_client import REGISTRY, CollectorRegistry, Info, start_http_server

from reflexarc import __version__

log = logging.getLogger(__name__)

# Buckets, in seconds, chosen for what each histogram measures on a real pipeline.
#: A loop (event -> trigger -> HPC task -> command -> actuator ack): sub-second on one host, minutes with a batch queue.
LOOP_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
#: One hop on loopback or a LAN (fog MQTT -> Kafka ack): milliseconds, seconds when Kafka struggles.
HOP_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: CPU-bound work on one batch (trigger evaluation): tenths of a millisecond up to a second.
CPU_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
#: A task's wait and run at an HPC site: a local pool starts in milliseconds, a batch queue takes hours.
TASK_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
#: Time an event spends in the edge spool: milliseconds online, up to days while a device is cut off.
SPOOL_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    5,
    30,
    60,
    300,
    3600,
    6 * 3600,
    24 * 3600,
    7 * 24 * 3600,
)

_info_lock = threading.Lock()
_info_registries: set[int] = set()


def register_build_info(registry: CollectorRegistry = REGISTRY) -> None:
    """Add ``reflexarc_build_info{version, python}`` (value 1) to ``registry``, once."""
    with _info_lock:
        if id(registry) in _info_registries:
            return
        _info_registries.add(id(registry))
        Info("reflexarc_build", "reflexarc version and Python of this process", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )


def serve_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Start the ``/metrics`` endpoint on ``host``; ``port=0`` picks a free one, ``None`` disables it.

    Returns the port in use, so that tests and ``reflexarc up`` can scrape it.
    """
    if port is None:
        return None
    register_build_info()
    # Port 0 lets the kernel choose, race-free; the server then says which one it got.
    server, _thread = start_http_server(port, addr=host)
    port = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
