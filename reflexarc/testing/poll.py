"""Polling for a condition in tests that watch a real process or broker."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_until(check: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Call ``check`` every ``interval`` s until it is truthy (True) or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False
