"""A bounded window of recently seen event ids: duplicates inside it are dropped and counted.

The window is bounded in count (``window_size``) and age (``window_s``), so
memory stays flat however long the bridge runs. The trade-off: a duplicate
that arrives after its original has left the window (older than
``window_s``, or more than ``window_size`` events later), or after this
bridge restarted (the window is in memory), or at another bridge of the
same shared subscription, is not recognised and goes on to Kafka. Consumers
therefore still deduplicate on the CloudEvents ``source`` + ``id``; the
window only removes the cheap, common cases (MQTT redeliveries, edge retries).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class DedupeWindow:
    """Remembers ids for a while; :meth:`seen` answers and records in one step."""

    def __init__(self, size: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self._clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()

    def seen(self, key: str) -> bool:
        """True if ``key`` is in the window (a duplicate); otherwise remember it and return False."""
        now = self._clock()
        ids = self._ids
        stamp = ids.get(key)
        if stamp is not None and now - stamp <= self.max_age_s:
            return True
        if stamp is not None:
            del ids[key]
        ids[key] = now
        # Oldest first: evict by count, then by age (amortised O(1)).
        if len(ids) > self.size:
            ids.popitem(last=False)
        limit = now - self.max_age_s
        while ids:
            oldest_key = next(iter(ids))
            if ids[oldest_key] >= limit:
                break
            del ids[oldest_key]
        return False

    def forget(self, key: str) -> None:
        """Remove ``key`` (an event that was not taken after all, so a redelivery must pass)."""
        self._ids.pop(key, None)

    def __len__(self) -> int:
        return len(self._ids)
