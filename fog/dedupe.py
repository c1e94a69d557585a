"""A bounded window of recently seen event ids: duplicates inside it are dropped and counted.

The window is bounded in count (``window_size``) and age (``window_s``), so
memory stays flat however long the bridge runs. The trade-off: a duplicate
that arrives after its original has left the window (older than
``window_s``, or more than ``window_size`` events later), or at another
bridge of the same shared subscription, is not recognised and goes on to
Kafka. Consumers therefore still deduplicate on the CloudEvents ``source`` +
``id``; the window only removes the cheap, common cases (MQTT redeliveries,
edge retries).

Each id is either *pending* (taken, not yet in Kafka) or *confirmed* (Kafka
acknowledged the record carrying it). The difference matters for receipts: a
device that sends an event again because its receipt was lost gets a receipt
at once when the original is confirmed; while the original is still on its
way it gets none (the receipt follows when Kafka has it, or the device sends
again later).

A restarted bridge starts with a window seeded from what survived it: the
tail of the data topic (:mod:`reflexarc.fog.tail`, confirmed) and the rows
of its disk buffer (pending), so the messages MQTT redelivers after a crash
are recognised.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


def dedupe_key(source: str, event_id: str) -> str:
    """The window's key of an event (CloudEvents identity: ``source`` + ``id``)."""
    return f"{source}\x1f{event_id}"


class DedupeWindow:
    """Remembers ids for a while; :meth:`seen` answers and records in one step."""

    def __init__(self, size: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self._clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()
        # Ids taken and not yet in Kafka: few at a time (those in flight or in the disk buffer).
        self._pending: set[str] = set()
        # Eviction by age runs at most this often (lookups check the age themselves, so a stale id is never
        # reported as seen; this only bounds memory): per event it cost an iterator over the window.
        self._age_every = min(1.0, max_age_s / 100)
        self._age_due = 0.0

    def seen(self, key: str) -> bool:
        """True if ``key`` is in the window (a duplicate); otherwise remember it (pending) and return False."""
        now = self._clock()
        ids = self._ids
        stamp = ids.get(key)
        if stamp is not None and now - stamp <= self.max_age_s:
            return True
        if stamp is not None:
            del ids[key]
        ids[key] = now
        self._pending.add(key)
        self._evict(now)
        return False

    def _evict(self, now: float) -> None:
        # Oldest first: evict by count, then by age (amortised O(1)).
        ids = self._ids
        pending = self._pending
        while len(ids) > self.size:
            pending.discard(ids.popitem(last=False)[0])
        if now < self._age_due:
            return
        self._age_due = now + self._age_every
        limit = now - self.max_age_s
        while ids:
            oldest_key = next(iter(ids))
            if ids[oldest_key] >= limit:
                break
            del ids[oldest_key]
            pending.discard(oldest_key)

    def confirm(self, key: str) -> None:
        """Kafka has the event ``key``: a duplicate of it from now on is answered with a receipt."""
        self._pending.discard(key)

    def confirmed(self, key: str) -> bool:
        """True when ``key`` is in the window and Kafka has it."""
        stamp = self._ids.get(key)
        return stamp is not None and self._clock() - stamp <= self.max_age_s and key not in self._pending

    def seed(self, entries: Iterable[tuple[str, float]], *, confirmed: bool) -> int:
        """Add ``(key, age in seconds)`` pairs from before a restart; returns how many are in the window.

        Give them oldest first: the window evicts in insertion order. A key
        seeded as confirmed that is already there as pending becomes
        confirmed (Kafka had it after all); seeding never makes a confirmed
        key pending again.
        """
        now = self._clock()
        ids = self._ids
        pending = self._pending
        n = 0
        for key, age in entries:
            if age > self.max_age_s:
                continue
            stamp = now - max(age, 0.0)
            old = ids.get(key)
            if old is None:
                ids[key] = stamp
                if not confirmed:
                    pending.add(key)
            elif confirmed:
                pending.discard(key)
            n += 1
        self._evict(now)
        return min(n, len(ids))

    def forget(self, key: str) -> None:
        """Remove ``key`` (an event that was not taken after all, so a redelivery must pass)."""
        self._ids.pop(key, None)
        self._pending.discard(key)

    @property
    def pending(self) -> int:
        """Ids in the window that Kafka does not have yet."""
        return len(self._pending)

    def __len__(self) -> int:
        return len(self._ids)
