"""Site presence: which sites are live, stale or stopped, from their newest heartbeat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reflexarc.envelope import Envelope
from reflexarc.events import SiteApp, SiteStatus
from reflexarc.sites import site_views, statuses_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def beat(site: str, at: datetime, state: str = "running", interval: float = 5.0, **kw: object) -> SiteStatus:
    return SiteStatus(site=site, state=state, at=at, interval_s=interval, engine="local", **kw)  # type: ignore[arg-type]


def test_live_until_three_beats_are_missed_then_stale() -> None:
    views = {v.status.site: v for v in site_views([beat("a", T0), beat("b", T0 - timedelta(seconds=16))], now=T0)}
    assert views["a"].state == "live" and views["a"].live
    assert views["b"].state == "stale" and not views["b"].live
    assert views["b"].age_s == 16
    # The threshold follows each site's own interval and the reader's tolerance.
    assert site_views([beat("c", T0 - timedelta(seconds=16), interval=10)], now=T0)[0].live
    assert not site_views([beat("c", T0 - timedelta(seconds=16), interval=10)], now=T0, missed=1)[0].live


def test_newest_heartbeat_wins_and_a_last_word_means_stopped() -> None:
    seq = [
        beat("a", T0 - timedelta(seconds=2), queued=9),
        beat("a", T0 - timedelta(seconds=1), state="stopped"),
        beat("a", T0 - timedelta(seconds=3), queued=1),
    ]
    (v,) = site_views(seq, now=T0)
    assert v.state == "stopped" and v.status.queued == 0
    assert v.to_json()["state"] == "stopped" and v.to_json()["site"] == "a"


def test_statuses_round_trip_through_kafka_records_and_skip_the_rest() -> None:
    s = beat("a", T0, queued=3, slots=4, free_slots=1, apps={"fit": SiteApp(cpus=2)})

    class Rec:
        def __init__(self, value: bytes | None, headers: list[tuple[str, bytes]], key: bytes | None) -> None:
            self.value, self.headers, self.key = value, headers, key

    key, value, headers = s.to_envelope().to_kafka(b"a")
    other = Envelope(type="io.example", source="/x", data={"v": 1}).to_kafka()
    got = statuses_of([Rec(value, headers, key), Rec(None, [], b"gone"), Rec(other[1], other[2], None)])
    assert got == [s]
