"""Prometheus endpoint for a tier process (loopback unless told otherwise)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from reflexarc.process import free_port

log = logging.getLogger(__name__)


def serve_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Start the ``/metrics`` endpoint; ``port=0`` picks a free one, ``None`` disables it.

    Returns the port in use, so that tests and ``reflexarc up`` can scrape it.
    """
    if port is None:
        return None
    if port == 0:
        port = free_port(host)
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
