"""The federation's sites as their agents announce them: live or stale, backlog, capacity and apps.

Every site agent publishes a :class:`~reflexarc.events.SiteStatus` to the
compacted ``{ns}.sites`` topic, keyed by site, every ``presence.interval_s``
seconds, and a last one (``state: stopped``) when it stops. Readers need no
copy of any ``site.yaml``: the newest status of each site says what it
offers. A site is *live* while its newest heartbeat is younger than
``missed`` heartbeat intervals; a killed agent sends no last word, so it
turns *stale* by age alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from reflexarc.config import KafkaSettings
from reflexarc.envelope import EnvelopeError
from reflexarc.events import SiteStatus
from reflexarc.kafka import event_of, read_to_end
from reflexarc.topics import Topics

#: heartbeats a site may miss before it counts as stale
MISSED_BEATS = 3

SiteState = Literal["live", "stale", "stopped"]


@dataclass(frozen=True, slots=True)
class SiteView:
    """One site as a reader sees it now: its newest status, how old that is, and what that means."""

    status: SiteStatus
    age_s: float
    state: SiteState

    @property
    def live(self) -> bool:
        """True while the site's heartbeats are fresh and it has not said it stopped."""
        return self.state == "live"

    def to_json(self) -> dict[str, Any]:
        """The view as plain JSON (``reflexarc sites --json``)."""
        # The reader's verdict (live/stale/stopped) replaces the agent's own running/stopped.
        return {**self.status.model_dump(mode="json"), "state": self.state, "age_s": round(self.age_s, 1)}


def site_views(
    statuses: Iterable[SiteStatus], now: datetime | None = None, missed: int = MISSED_BEATS
) -> list[SiteView]:
    """The newest status of each site, judged at ``now``: live, stale (heartbeats missed) or stopped."""
    now = now or datetime.now(UTC)
    newest: dict[str, SiteStatus] = {}
    for s in statuses:
        seen = newest.get(s.site)
        if seen is None or s.at >= seen.at:
            newest[s.site] = s
    views = []
    for site in sorted(newest):
        s = newest[site]
        age = max(0.0, (now - s.at).total_seconds())
        state: SiteState = "stopped" if s.state == "stopped" else ("live" if age <= missed * s.interval_s else "stale")
        views.append(SiteView(s, age, state))
    return views


def statuses_of(records: Iterable[Any]) -> list[SiteStatus]:
    """The site statuses among Kafka records of the sites topic (anything else is skipped)."""
    out = []
    for r in records:
        if r.value is None:
            continue  # a tombstone: the site was removed
        try:
            out.append(SiteStatus.from_envelope(event_of(r)))
        except EnvelopeError:
            continue
    return out


async def read_sites(
    settings: KafkaSettings, topics: Topics, timeout: float = 10.0, missed: int = MISSED_BEATS
) -> list[SiteView]:
    """Every site that ever announced itself on ``{ns}.sites``, as it stands now."""
    records = await read_to_end(settings, topics.kafka_sites, timeout)
    return site_views(statuses_of(records), missed=missed)
