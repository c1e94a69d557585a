"""Unit tests of the broker check's pure parts: verdicts, reports, probe payloads, the probe topic, CLI usage."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from reflexarc.config import MqttSettings
from reflexarc.fog.brokercheck import (
    BROKER_SETTINGS,
    ProbeError,
    QueueProbe,
    _payload,
    _sequence,
    doctor_check,
    error_report,
    probe_queue,
    report,
)
from reflexarc.fog.cli import app
from reflexarc.supervisor import BrokerSpec
from reflexarc.topics import TopicError, Topics, mqtt_match

BASE = QueueProbe(
    broker="127.0.0.1:1883",
    protocol="5",
    namespace="rx",
    client_id="rx-probe-abc",
    published=3000,
    refused=0,
    kept=3000,
    session_kept=True,
    kept_first=0,
    kept_last=2999,
    duplicates=0,
    seconds=0.5,
    session_removed=True,
)


def probe(**changes: object) -> QueueProbe:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


# ---- verdicts -----------------------------------------------------------------
def test_all_kept_is_no_bound() -> None:
    assert not BASE.bounded and BASE.dropped is None
    rep = report(BASE)
    assert (rep.status, rep.exit_code) == ("ok", 0)
    assert rep.summary == (
        "no bound found up to 3000: the broker at 127.0.0.1:1883 (MQTT 5) kept all 3000 queued QoS 1 messages "
        "for an offline session"
    )
    assert rep.as_json()["bound"] is None and rep.as_json()["bounded"] is False


@pytest.mark.parametrize(
    ("first", "last", "kept", "dropped"),
    [(0, 999, 1000, "newest"), (2000, 2999, 1000, "oldest"), (0, 2999, 1000, "some")],
)
def test_which_messages_were_dropped(first: int, last: int, kept: int, dropped: str) -> None:
    p = probe(kept=kept, kept_first=first, kept_last=last)
    assert p.bounded and p.dropped == dropped


def test_bound_report_names_the_bound_the_settings_and_the_guarantees() -> None:
    rep = report(probe(kept=1000, kept_first=0, kept_last=999))
    assert (rep.status, rep.exit_code) == ("problem", 1)
    assert rep.summary == (
        "bounded: the broker at 127.0.0.1:1883 (MQTT 5) kept 1000 of 3000 queued QoS 1 messages for an offline session"
    )
    text = rep.text()
    assert "kept #1-#1000 and dropped the newest 2000" in text
    assert "delivery: pipeline" in text and "delivery: broker" in text and "disk buffer" in text
    for name, setting in BROKER_SETTINGS.items():
        assert f"{name}:" in text and setting in text
    data = rep.as_json()
    assert (data["bound"], data["dropped"], data["exit_code"], data["check"]) == (1000, "newest", 1, "broker-queue")


def test_a_lost_session_and_an_empty_session_say_what_to_check() -> None:
    lost = report(probe(kept=0, kept_first=None, kept_last=None, session_kept=False))
    assert lost.status == "problem" and "did not keep the offline session" in lost.text()
    assert "rx/_probe/#" in lost.text()
    empty = report(probe(kept=0, kept_first=None, kept_last=None, namespace="lab"))
    assert "kept the session but delivered none" in empty.text() and "lab/_probe/#" in empty.text()


def test_refused_publishes_are_not_silent_loss() -> None:
    # The broker told the publisher about 2000 (MQTT 5 PUBACK >= 0x80): only accepted ones count.
    p = probe(refused=2000, kept=1000, kept_first=0, kept_last=999)
    assert p.accepted == 1000 and not p.bounded
    assert "refused 2000 of the 3000 publishes" in report(p).text()


def test_a_session_left_behind_is_reported() -> None:
    text = report(probe(session_removed=False, cleanup_error="timed out", protocol="3.1.1")).text()
    assert "could not remove the probe session (timed out)" in text and "rx-probe-abc" in text


def test_error_report_exits_2() -> None:
    rep = error_report(MqttSettings(host="h", port=1), ProbeError("cannot reach it"))
    assert (rep.status, rep.exit_code) == ("error", 2)
    assert rep.text() == "cannot check the MQTT broker: cannot reach it"


def test_doctor_skips_a_pipeline_with_embedded_brokers() -> None:
    for brokers in (None, BrokerSpec()):
        rep = doctor_check(brokers, "rx")
        assert (rep.status, rep.exit_code) == ("skipped", 0)


async def test_probe_needs_a_message() -> None:
    with pytest.raises(ProbeError, match="at least 1"):
        await probe_queue(MqttSettings(), Topics(), messages=0)


# ---- payloads and topic ---------------------------------------------------------
def test_probe_payloads_carry_run_and_number() -> None:
    p = _payload("r1", 42, 200)
    assert len(p) == 200 and _sequence(p, "r1") == 42
    assert _sequence(p, "other-run") is None
    assert _sequence(b'{"value": 1}', "r1") is None and _sequence(b"r1:x:", "r1") is None
    assert _sequence(_payload("r1", 7, 1), "r1") == 7  # never shorter than its header


def test_probe_topic_is_namespaced_and_outside_every_device_filter() -> None:
    t = Topics("lab")
    topic = t.mqtt_probe("abc123")
    assert topic == "lab/_probe/abc123"
    filters = [*t.mqtt_ingest_filters(), "lab/+/+/status", "lab/+/+/cmd", "lab/+/+/receipt"]
    assert not any(mqtt_match(f, topic) for f in filters)
    assert mqtt_match("lab/_probe/#", topic)
    with pytest.raises(TopicError):
        t.mqtt_probe("a/b")


# ---- CLI usage ------------------------------------------------------------------
def test_fog_check_usage_errors_exit_2() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["check"])
    assert res.exit_code == 2 and "--broker" in res.output
    # --json now also goes with a file check; a file that is not there cannot be checked (the CLI's
    # error boundary words it and exits 2; CliRunner shows the exception it would word).
    res = runner.invoke(app, ["check", "--json", "no-such-fog.yaml"])
    assert isinstance(res.exception, FileNotFoundError) and "no-such-fog.yaml" in str(res.exception)
    res = runner.invoke(app, ["check", "--broker"], env={"RX_MQTT_PORT": "not-a-port"})
    assert res.exit_code == 2 and "RX_MQTT_" in res.output and "Traceback" not in res.output
