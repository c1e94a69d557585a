"""Ed25519 signatures on events, so an actuator obeys only commands that came from the pipeline.

The pipeline (the cloud tier) signs each command envelope with its private key;
the edge agent verifies it with the matching public key(s) before running any
handler. The signature travels as the CloudEvents extension attribute
``rxsig`` (base64url, no padding) next to ``rxkid``, the id of the signing key
(the first 16 hex digits of the SHA-256 of the raw public key), so it survives
every encoding of :class:`~reflexarc.envelope.Envelope`: Kafka binary headers,
MQTT 5 user properties and structured JSON.

What is signed is a canonical byte string, independent of the encoding:
a JSON array of a version tag, ``id``, ``type``, ``source``, ``time``,
``subject``, the ``site`` and ``device`` extensions, ``rxkid`` and the data.
``time`` is canonicalised to UTC with microseconds (``2024-01-01T12:00:00.000000Z``)
because encodings write it differently (``+00:00`` vs ``Z``, fraction omitted
when zero); data is canonical JSON (sorted keys, no spaces) or, for bytes,
base64. Other extensions are not signed, so hops may add routing attributes.

Keys are PEM files: ``RX_SIGNING_KEY`` names the private key of the signer,
``RX_VERIFY_KEYS`` the comma-separated public keys a verifier trusts. Replay
protection by seen id is the verifier's job (it needs state); this module
checks freshness of ``time`` only.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reflexarc.envelope import Envelope, utcnow

SIG_ATTR = "rxsig"
KID_ATTR = "rxkid"
_VERSION = "rxsig-v1"
# Clocks of devices drift: accept events stamped slightly in the future.
FUTURE_SKEW_S = 30.0


class SignatureError(ValueError):
    """An event's signature does not hold.

    The text says why: unsigned, malformed, bad signature, unknown key, stale.
    """


class KeyFileError(ValueError):
    """A key file is missing or is not the expected kind of PEM key; the text says what to do."""


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short stable id of a key pair: first 16 hex digits of SHA-256 of the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str = "pipeline", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``{name}.key`` (private, mode 0600) and ``{name}.pub``.

    Refuses to replace an existing private key unless ``overwrite`` is set,
    because a lost signing key means every device must be re-keyed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if private_path.exists() and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            "a private key is already there (replacing it means re-keying every device)",
            str(private_path),
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if overwrite:
        private_path.unlink(missing_ok=True)
    # Create with 0600 from the start: never a moment where others could read it.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file (unencrypted PKCS#8)."""
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({exc}); create one with generate_keypair()"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_verify_keys(paths: Iterable[str | Path]) -> list[Ed25519PublicKey]:
    """Load Ed25519 public keys from PEM files (a private key file is accepted too)."""
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        data = _read(path, "verify key")
        key: object
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            try:
                key = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise KeyFileError(f"{path} is not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
        keys.append(key)
    return keys


def signing_key_from_env() -> Ed25519PrivateKey | None:
    """The private key named by ``RX_SIGNING_KEY`` (a PEM path), or None if unset."""
    path = os.environ.get("RX_SIGNING_KEY", "").strip()
    return load_signing_key(path) if path else None


def verify_keys_from_env() -> list[Ed25519PublicKey]:
    """The public keys named by ``RX_VERIFY_KEYS`` (comma-separated PEM paths); empty if unset."""
    raw = os.environ.get("RX_VERIFY_KEYS", "")
    return load_verify_keys(p.strip() for p in raw.split(",") if p.strip())


def canonical_time(t: datetime) -> str:
    """The one string form of an event time that signatures cover (UTC, microseconds, ``Z``)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_data(data: object) -> str | None:
    if data is None:
        return None
    if isinstance(data, bytes | bytearray):
        return "b64:" + base64.b64encode(bytes(data)).decode()
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "json:" + text


def signed_bytes(env: Envelope, kid: str | None) -> bytes:
    """The canonical byte string a signature covers (see the module docstring)."""
    fields = [
        _VERSION,
        env.id,
        env.type,
        env.source,
        canonical_time(env.time),
        env.subject,
        env.extensions.get("site"),
        env.extensions.get("device"),
        kid,
        _canonical_data(env.data),
    ]
    # A JSON array is unambiguous whatever characters the fields contain.
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_envelope(env: Envelope, key: Ed25519PrivateKey) -> Envelope:
    """A copy of ``env`` carrying ``rxsig`` (and ``rxkid``) signed with ``key``."""
    kid = key_id(key)
    sig = key.sign(signed_bytes(env, kid))
    ext = {k: v for k, v in env.extensions.items() if k not in (SIG_ATTR, KID_ATTR)}
    ext[KID_ATTR] = kid
    ext[SIG_ATTR] = _b64url(sig)
    return env.with_(extensions=ext)


def verify_envelope(
    env: Envelope,
    keys: Sequence[Ed25519PublicKey] | Iterable[Ed25519PublicKey],
    max_age_s: float = 300,
    now: datetime | None = None,
) -> None:
    """Check that ``env`` was signed by one of ``keys`` and is fresh; else :class:`SignatureError`.

    ``max_age_s`` bounds how old the event's ``time`` may be (replayed
    commands are stale); events more than 30 s in the future are refused too.
    """
    keys = list(keys)
    sig_text = env.extensions.get(SIG_ATTR)
    if not sig_text:
        raise SignatureError(f"unsigned: event {env.id} carries no '{SIG_ATTR}' signature")
    if not keys:
        raise SignatureError("no verify keys configured: set verify_keys in the config or RX_VERIFY_KEYS")
    try:
        sig = _unb64url(sig_text)
    except (ValueError, TypeError):
        raise SignatureError(f"malformed signature on event {env.id}: not base64url") from None
    if len(sig) != 64:
        raise SignatureError(f"malformed signature on event {env.id}: {len(sig)} bytes, Ed25519 has 64")
    kid = env.extensions.get(KID_ATTR)
    candidates = keys
    if kid is not None:
        candidates = [k for k in keys if key_id(k) == kid]
        if not candidates:
            raise SignatureError(
                f"unknown key: event {env.id} is signed by key {kid}, which is not among the "
                f"{len(keys)} trusted verify key(s)"
            )
    message = signed_bytes(env, kid)
    for key in candidates:
        try:
            key.verify(sig, message)
            break
        except InvalidSignature:
            continue
    else:
        raise SignatureError(f"bad signature: event {env.id} was forged or altered after signing")
    # Freshness after authenticity: a forged event should be called forged, not stale.
    now = now or utcnow()
    t = env.time if env.time.tzinfo else env.time.replace(tzinfo=UTC)
    age = (now - t).total_seconds()
    if age > max_age_s:
        raise SignatureError(f"stale: event {env.id} was signed {age:.0f}s ago (limit {max_age_s:.0f}s)")
    if age < -FUTURE_SKEW_S:
        raise SignatureError(
            f"stale: event {env.id} is dated {-age:.0f}s in the future; check the clocks of signer and device"
        )


__all__ = [
    "KID_ATTR",
    "SIG_ATTR",
    "KeyFileError",
    "SignatureError",
    "canonical_time",
    "generate_keypair",
    "key_id",
    "load_signing_key",
    "load_verify_keys",
    "sign_envelope",
    "signed_bytes",
    "signing_key_from_env",
    "verify_envelope",
    "verify_keys_from_env",
]
