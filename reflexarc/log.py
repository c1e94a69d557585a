"""Logging set-up shared by every process: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int | None = None, name: str | None = None) -> None:
    """Configure the root logger once per process.

    ``RX_LOG_LEVEL`` overrides the level and ``RX_LIB_LOG_LEVEL`` that of the
    client libraries (aiokafka, paho's wrappers; WARNING by default).
    Output goes to stderr so that stdout stays free for data (``reflexarc
    results subscribe`` prints events there).
    """
    level = level or os.environ.get("RX_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if getattr(root, "_rx_configured", False):
        root.setLevel(level)
        return
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=True)
        fmt = "%(message)s" if name is None else f"[{name}] %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"{name} " if name else ""
        fmt = f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO about every (re)connect.
    lib_level = os.environ.get("RX_LIB_LOG_LEVEL")
    for noisy in ("aiokafka", "faust", "mode", "amqtt", "transitions", "kafka"):
        logging.getLogger(noisy).setLevel(lib_level or max(logging.WARNING, root.level))
    root._rx_configured = True  # type: ignore[attr-defined]  # a mark on the root logger: configure once per process
