"""End-to-end receipts (``delivery: pipeline``): which published events still wait for the fog's word.

A broker with a bounded session queue (Mosquitto's packaged
``max_queued_messages 1000``, EMQX's ``mqueue.max_len``) may drop a QoS 1
message after it sent the PUBACK, so the PUBACK cannot free a spool row. The
fog sends a :class:`~reflexarc.events.Receipt` naming the ids Kafka holds;
only that frees the rows. :class:`Unconfirmed` is the bookkeeping between
the two (pure, no I/O, so it is unit-tested on its own):

* a bounded window: at most ``limit`` event ids are published and not yet
  confirmed, so an absent fog does not make a device flood the broker's
  bounded queue (the publisher waits for room);
* the confirmation timer of an event starts when the broker PUBACKed it
  (until then the MQTT client owns it and re-sends it after a reconnect);
* a re-send round picks the events whose timer ran out and sends them
  again in spool order (so in order per stream). If the fog confirmed
  something within the timeout, it is there and these were lost on the way:
  all of them go. If it confirmed nothing for a whole timeout it may be
  away: only the oldest ``probe`` go, asking whether it is back. Each
  unanswered round doubles the timeout and the spacing of rounds (up to
  ``timeout_max_s``), so a long fog outage costs a trickle, not the whole
  window again and again. The first receipt of a known id resets both;
* receipts for ids it does not know (freed already, or sent by an earlier
  run of the agent) are counted and ignored.

Nothing here survives a restart, and nothing has to: every row still in the
spool is unconfirmed, and a restarted agent publishes the spool from its
start again. The fog deduplicates by event id and confirms again what Kafka
already holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from reflexarc.envelope import Envelope, EnvelopeError
from reflexarc.events import Receipt
from reflexarc.mqtt import MqttMessage

PROBE = 64  # events a re-send round sends when the fog confirmed nothing for a whole timeout (the oldest)


@dataclass(slots=True)
class _Pending:
    """One published, unconfirmed event id."""

    seq: int  # its spool row
    first_sent: float  # when it was first published (for the oldest-age gauge)
    sent_at: float  # when its confirmation timer started (the broker's PUBACK of the last send)
    acked: bool = False  # the broker PUBACKed the last send (until then MQTT re-sends it itself)
    more: list[int] | None = None  # further rows with the same id (a device reusing an id)


class Unconfirmed:
    """Published event ids awaiting the fog's receipt, in the order they were last sent."""

    def __init__(
        self,
        limit: int,
        timeout_s: float,
        timeout_max_s: float,
        *,
        probe: int = PROBE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self.timeout_max_s = max(timeout_max_s, timeout_s)
        self.probe = probe
        self.clock = clock
        # Insertion order is the order of the last send: a re-sent id moves to the end.
        self._pending: dict[str, _Pending] = {}
        self.stalled = 0  # re-send rounds in a row that no confirmation answered
        self.probing = False  # the last round sent only a probe: nothing was confirmed for a whole timeout
        self._last_progress = float("-inf")  # when a receipt last confirmed a pending id
        self._next_round = 0.0  # no re-send round before this (backoff while unanswered)
        self.confirmed = 0  # ids confirmed (lifetime of this run)
        self.unknown = 0  # ids in receipts that were not pending
        self.resent = 0  # events sent again

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._pending

    @property
    def full(self) -> bool:
        """True while no further event may be published."""
        return len(self._pending) >= self.limit

    @property
    def timeout(self) -> float:
        """The confirmation timeout now: doubled for each unanswered round, capped."""
        return min(self.timeout_s * (1 << min(self.stalled, 30)), self.timeout_max_s)

    def sent(self, event_id: str, seq: int) -> None:
        """A row was handed to the MQTT client for the first time (in this run)."""
        entry = self._pending.get(event_id)
        if entry is None:
            now = self.clock()
            self._pending[event_id] = _Pending(seq, now, now)
        elif seq != entry.seq:
            # Another row with an id already out: the fog sees one event, and its receipt frees both.
            if entry.more is None:
                entry.more = [seq]
            elif seq not in entry.more:
                entry.more.append(seq)

    def acked(self, event_id: str, seq: int) -> None:
        """The broker PUBACKed a send of this row: its confirmation timer starts now."""
        entry = self._pending.get(event_id)
        if entry is not None and entry.seq == seq:
            entry.acked = True
            entry.sent_at = self.clock()

    def confirm(self, ids: Iterable[str]) -> list[int]:
        """A receipt: the spool rows it frees (ids not pending are counted as unknown and ignored)."""
        pending = self._pending
        freed: list[int] = []
        unknown = 0
        for event_id in ids:
            entry = pending.pop(event_id, None)
            if entry is None:
                unknown += 1
                continue
            freed.append(entry.seq)
            if entry.more:
                freed.extend(entry.more)
        self.unknown += unknown
        if freed:
            self.confirmed += len(freed)
            # The fog answers: the base timeout again, and a round may follow at once.
            self.stalled = 0
            self._last_progress = self.clock()
            self._next_round = 0.0
        return freed

    def forget(self, event_id: str, seq: int) -> None:
        """A row left the spool without a receipt (dead-lettered): stop tracking it."""
        entry = self._pending.get(event_id)
        if entry is None:
            return
        if entry.seq == seq:
            if entry.more:
                entry.seq = entry.more.pop(0)
                entry.acked, entry.sent_at = True, self.clock()
            else:
                del self._pending[event_id]
        elif entry.more and seq in entry.more:
            entry.more.remove(seq)

    def due(self) -> list[tuple[int, str]]:
        """A re-send round: ``(seq, event_id)`` to send again, in spool order (empty: nothing is due).

        Due are events the broker PUBACKed longer than :attr:`timeout` ago
        without a receipt. All of them go if the fog confirmed anything in
        the last :attr:`timeout` seconds, else only the oldest :attr:`probe`.
        The picked events restart their timers (once PUBACKed again); the
        round counts as unanswered, and the next one waits :attr:`timeout`
        (doubled), until a receipt confirms a pending id.
        """
        now = self.clock()
        if now < self._next_round:
            return []
        timeout = self.timeout
        limit = now - timeout
        picked = [(e.seq, eid) for eid, e in self._pending.items() if e.acked and e.sent_at <= limit]
        if not picked:
            return []
        picked.sort()
        self.probing = now - self._last_progress >= timeout
        if self.probing:
            picked = picked[: self.probe]
        pending = self._pending
        for _seq, eid in picked:
            entry = pending.pop(eid)
            entry.acked = False
            entry.sent_at = now
            pending[eid] = entry  # to the end: the most recently sent
        self.resent += len(picked)
        self.stalled += 1
        self._next_round = now + self.timeout
        return picked

    def silence(self) -> float | None:
        """Seconds since a receipt last confirmed a pending id (None: never, in this run)."""
        if self._last_progress == float("-inf"):
            return None
        return self.clock() - self._last_progress

    def oldest_age(self) -> float | None:
        """Seconds since the oldest unconfirmed event was first published (None: nothing pending)."""
        if not self._pending:
            return None
        return self.clock() - min(e.first_sent for e in self._pending.values())


def receipt_ids(msg: MqttMessage, site: str, device: str) -> list[str]:
    """The event ids a receipt message confirms; :class:`EnvelopeError` if it is not a receipt for this device."""
    receipt = Receipt.from_envelope(Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type))
    if receipt.site != site or receipt.device != device:
        raise EnvelopeError(f"receipt addressed to {receipt.site}/{receipt.device}, not {site}/{device}")
    return receipt.ids
