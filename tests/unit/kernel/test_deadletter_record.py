"""``DeadLetter.of_record``: a consumed Kafka record's dead letter keeps its value, key and headers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reflexarc.envelope import DeadLetter, Envelope, EventType


def test_of_record_keeps_value_key_headers_and_names_the_origin() -> None:
    env = Envelope.for_device(EventType.DATA, "bl1", "d1", {"v": 1}, subject="counts", id="e1")
    key, _, headers = env.to_kafka()
    rec = SimpleNamespace(topic="rx.data", partition=3, offset=41, key=key, value=b"{broken", headers=headers)

    dl = DeadLetter.of_record(rec, "triggers.data", "data is not valid JSON")
    assert dl.origin == "rx.data/3/41" and dl.topic == "rx.data" and dl.key == b"bl1/d1"

    dl_key, value, out_headers = dl.to_kafka()
    back = DeadLetter.from_kafka(value, out_headers)
    assert dl_key == b"rx.data/3/41"  # dead letters of one origin stay in order
    assert back.payload == b"{broken"
    assert back.key == b"bl1/d1" and back.topic == "rx.data"
    assert list(back.extra_headers) == list(headers)  # every ce_* attribute, in order
    assert (back.error, back.stage, back.origin) == ("data is not valid JSON", "triggers.data", "rx.data/3/41")


def test_a_record_without_key_or_headers() -> None:
    rec = SimpleNamespace(topic="rx.tasks.local", partition=0, offset=0, key=None, value=None, headers=())
    back = DeadLetter.from_kafka(*DeadLetter.of_record(rec, "site-intake", "empty").to_kafka()[1:])
    assert back.key is None and back.payload == b"" and back.extra_headers == ()
    assert back.topic == "rx.tasks.local"


def test_a_dead_letter_of_mqtt_input_has_no_kafka_topic() -> None:
    dl = DeadLetter("not JSON", "fog.ingest", "rx/bl1/d1/data/counts", b"\x00")
    back = DeadLetter.from_kafka(*dl.to_kafka()[1:])
    assert back.topic is None and back.key is None


def test_select_by_id_and_stage_glob_and_refuse_unknown_ids() -> None:
    from reflexarc.deadletters import DeadLettersError, StoredLetter, select

    def stored(p: int, o: int, stage: str) -> StoredLetter:
        return StoredLetter(p, o, DeadLetter("why", stage, "rx.data/0/0", b"", topic="rx.data"))

    letters = [stored(0, 1, "triggers.data"), stored(1, 0, "site-intake"), stored(0, 2, "triggers.eval.thr")]
    assert [s.id for s in select(letters, ["1:0"])] == ["1:0"]
    assert [s.id for s in select(letters, ["1:0"], "triggers.*")] == ["0:1", "0:2", "1:0"]
    with pytest.raises(DeadLettersError, match="no dead letter 3:3"):
        select(letters, ["3:3"])
    assert not StoredLetter(0, 0, DeadLetter("why", "fog.ingest", "rx/bl1/d1/data/s", b"")).replayable
