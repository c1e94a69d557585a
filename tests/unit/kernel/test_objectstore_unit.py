"""The object-store kernel on local files (no S3): references, verification, settings, GC planning."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from reflexarc.config import ConfigError
from reflexarc.datagc import StoredObject, parse_duration, plan_gc, referenced_urls
from reflexarc.objectstore import ObjectRef, ObjectStoreSettings, StageError, download, put_bytes, read_bytes


def test_put_and_download_on_a_shared_filesystem(tmp_path: Path) -> None:
    url = (tmp_path / "store" / "a" / "b.bin").as_uri()
    ref = put_bytes(url, b"payload" * 1000)
    assert ref.size == 7000 and ref.sha256 == hashlib.sha256(b"payload" * 1000).hexdigest()
    assert not list((tmp_path / "store" / "a").glob("*.part"))  # written under a temporary name, then renamed
    assert download(ref, tmp_path / "out" / "b.bin").read_bytes() == b"payload" * 1000
    (tmp_path / "store" / "a" / "b.bin").write_bytes(b"payload" * 999 + b"PAYLOAD")
    with pytest.raises(StageError, match="checksum mismatch"):
        read_bytes(ref)
    (tmp_path / "store" / "a" / "b.bin").write_bytes(b"short")
    with pytest.raises(StageError, match="checksum mismatch"):
        download(ref, tmp_path / "out" / "c.bin")
    assert not (tmp_path / "out" / "c.bin").exists()


def test_reference_round_trip_and_bare_urls() -> None:
    ref = ObjectRef(
        url="s3://b/k.npy", size=10, sha256="ab" * 32, content_type="application/x-npy", dtype="uint16", shape=[2, 5]
    )
    assert ObjectRef.from_data(ref.to_data()) == ref
    assert "dtype" not in ObjectRef(url="s3://b/k", size=1).to_data()
    assert ObjectRef.from_data("file:///x/y") == ObjectRef(url="file:///x/y", size=0)
    with pytest.raises(ValidationError):
        ObjectRef.from_data({"size": 3})


def test_settings_name_secrets_and_never_hold_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    assert ObjectStoreSettings().endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(ValidationError):
        ObjectStoreSettings.model_validate({"secret_key": "literal"})  # no field may hold a secret
    with pytest.raises(ConfigError, match="both access_key_env and secret_key_env"):
        ObjectStoreSettings(access_key_env="K").s3_options()
    monkeypatch.setenv("K", "key")
    monkeypatch.setenv("S", "secret")
    opts = ObjectStoreSettings(access_key_env="K", secret_key_env="S", region="eu").s3_options()
    assert opts["key"] == "key" and opts["secret"] == "secret"
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu"}
    with pytest.raises(ValidationError):
        ObjectStoreSettings(multipart_chunk_bytes=1024)  # S3 parts are at least 5 MiB


def test_gc_plan_expires_old_objects_and_orphans_after_the_grace() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    objs = [
        StoredObject("s3://b/c/new-orphan", 1, now - timedelta(minutes=1)),
        StoredObject("s3://b/c/old-orphan", 2, now - timedelta(hours=1)),
        StoredObject("s3://b/c/referenced", 3, now - timedelta(days=1)),
        StoredObject("s3://b/c/expired", 4, now - timedelta(days=8)),
    ]
    events = [{"ref": {"url": "s3://b/c/referenced"}}, {"files": ["s3://b/c/expired", "s3://other/x"]}]
    refs = referenced_urls(events, "s3://b/c")
    assert refs == {"s3://b/c/referenced", "s3://b/c/expired"}
    plan = plan_gc(objs, refs, parse_duration("7d"), parse_duration("10m"), now)
    assert [(r.obj.url, r.reason) for r in plan] == [("s3://b/c/old-orphan", "orphan"), ("s3://b/c/expired", "expired")]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")
