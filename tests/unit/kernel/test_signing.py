"""Ed25519 command signing: round trips through every encoding, and every way to fail."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from reflexarc.envelope import Envelope
from reflexarc.events import Command
from reflexarc.signing import (
    KID_ATTR,
    SIG_ATTR,
    KeyFileError,
    SignatureError,
    canonical_time,
    generate_keypair,
    key_id,
    load_signing_key,
    load_verify_keys,
    sign_envelope,
    signing_key_from_env,
    verify_envelope,
    verify_keys_from_env,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def _command(**kw: object) -> Envelope:
    args = {"position": 1.25, "mode": "fast", "nested": {"b": [1, 2.5, None], "a": "é"}}
    base = dict(command_id="cmd-1", site="bl1", device="det1", actuator="motor", args=args)
    base.update(kw)
    return Command(**base).to_envelope()  # type: ignore[arg-type]


def test_generate_keypair_modes_and_refuses_overwrite(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    old_pub = pub.read_bytes()
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(priv.parent)
    new_priv, _ = generate_keypair(priv.parent, overwrite=True)
    assert stat.S_IMODE(new_priv.stat().st_mode) == 0o600
    assert pub.read_bytes() != old_pub


def test_sign_and_verify(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    env = _command()
    signed = sign_envelope(env, load_signing_key(priv))
    assert SIG_ATTR in signed.extensions and SIG_ATTR not in env.extensions
    assert signed.extensions[KID_ATTR] == key_id(load_verify_keys([pub])[0])
    verify_envelope(signed, load_verify_keys([pub]))


def test_signature_survives_kafka_mqtt5_structured(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    verify = load_verify_keys([pub])
    # A time with zero microseconds is written without a fraction by isoformat.
    env = _command().with_(time=datetime.now(UTC).replace(microsecond=0))
    signed = sign_envelope(env, load_signing_key(priv))
    _, value, headers = signed.to_kafka()
    from_kafka = Envelope.from_kafka(value, headers)
    payload, props, ctype = from_kafka.to_mqtt(binary=True)
    from_mqtt5 = Envelope.from_mqtt(payload, props, ctype)
    structured, _, sctype = from_mqtt5.to_mqtt(binary=False)
    from_structured = Envelope.from_mqtt(structured, None, sctype)
    for hop in (from_kafka, from_mqtt5, from_structured):
        verify_envelope(hop, verify)
    # The parsed command still reads.
    assert Command.from_envelope(from_structured).args["nested"]["a"] == "é"


def test_time_canonical_form_is_zone_independent() -> None:
    t = datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert canonical_time(t) == "2024-01-01T10:00:00.123456Z"
    assert canonical_time(t.astimezone(UTC)) == canonical_time(t)


def test_unsigned_is_rejected(keys: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verify_envelope(_command(), load_verify_keys([keys[1]]))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e.with_(data={**e.data, "args": {"position": 99}}),
        lambda e: e.with_(id="cmd-2"),
        lambda e: e.with_(subject="other"),
        lambda e: e.with_(time=e.time + timedelta(seconds=1)),
        lambda e: e.with_(extensions={**e.extensions, "device": "det2"}),
    ],
    ids=["data", "id", "subject", "time", "device"],
)
def test_forged_is_rejected(keys: tuple[Path, Path], tamper) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    signed = sign_envelope(_command(), load_signing_key(priv))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(tamper(signed), load_verify_keys([pub]))


def test_stripped_key_id_does_not_verify(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    signed = sign_envelope(_command(), load_signing_key(priv))
    ext = {k: v for k, v in signed.extensions.items() if k != KID_ATTR}
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(signed.with_(extensions=ext), load_verify_keys([pub]))


def test_unknown_key_is_named(keys: tuple[Path, Path], tmp_path: Path) -> None:
    other_priv, _ = generate_keypair(tmp_path / "other", "rogue")
    signed = sign_envelope(_command(), load_signing_key(other_priv))
    with pytest.raises(SignatureError, match="unknown key"):
        verify_envelope(signed, load_verify_keys([keys[1]]))


def test_second_trusted_key_verifies(keys: tuple[Path, Path], tmp_path: Path) -> None:
    other_priv, other_pub = generate_keypair(tmp_path / "other", "rotated")
    signed = sign_envelope(_command(), load_signing_key(other_priv))
    verify_envelope(signed, load_verify_keys([keys[1], other_pub]))


def test_stale_and_future_are_rejected(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    verify = load_verify_keys([pub])
    old = sign_envelope(_command().with_(time=datetime.now(UTC) - timedelta(seconds=400)), load_signing_key(priv))
    with pytest.raises(SignatureError, match="stale"):
        verify_envelope(old, verify)
    verify_envelope(old, verify, max_age_s=600)
    future = sign_envelope(_command().with_(time=datetime.now(UTC) + timedelta(seconds=120)), load_signing_key(priv))
    with pytest.raises(SignatureError, match="future"):
        verify_envelope(future, verify)


def test_malformed_signature(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    signed = sign_envelope(_command(), load_signing_key(priv))
    for bad in ("!!!", "AAAA"):
        env = signed.with_(extensions={**signed.extensions, SIG_ATTR: bad})
        with pytest.raises(SignatureError, match=r"malformed|bad signature"):
            verify_envelope(env, load_verify_keys([pub]))


def test_no_keys_configured(keys: tuple[Path, Path]) -> None:
    signed = sign_envelope(_command(), load_signing_key(keys[0]))
    with pytest.raises(SignatureError, match="RX_VERIFY_KEYS"):
        verify_envelope(signed, [])


def test_bytes_data_signs(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    env = Envelope.for_device("io.reflexarc.data", "bl1", "det1", b"\x00\x01raw", subject="frames")
    signed = sign_envelope(env, load_signing_key(priv))
    payload, props, ctype = signed.to_mqtt(binary=True)
    verify_envelope(Envelope.from_mqtt(payload, props, ctype), load_verify_keys([pub]))
    with pytest.raises(SignatureError):
        verify_envelope(signed.with_(data=b"\x00\x02raw"), load_verify_keys([pub]))


def test_keys_from_env(keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    priv, pub = keys
    _, pub2 = generate_keypair(tmp_path / "k2", "second")
    monkeypatch.delenv("RX_SIGNING_KEY", raising=False)
    monkeypatch.delenv("RX_VERIFY_KEYS", raising=False)
    assert signing_key_from_env() is None and verify_keys_from_env() == []
    monkeypatch.setenv("RX_SIGNING_KEY", str(priv))
    monkeypatch.setenv("RX_VERIFY_KEYS", f"{pub}, {pub2}")
    signed = sign_envelope(_command(), signing_key_from_env())  # type: ignore[arg-type]
    verify = verify_keys_from_env()
    assert len(verify) == 2
    verify_envelope(signed, verify)


def test_bad_key_files_say_what(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_signing_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_signing_key(junk)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_verify_keys([junk])
    with pytest.raises(KeyFileError, match="PEM private key"):
        load_signing_key(keys[1])
    # A private key file given as a verify key yields its public half.
    assert key_id(load_verify_keys([keys[0]])[0]) == key_id(load_signing_key(keys[0]))
