"""The object-store kernel against a real SeaweedFS S3 gateway: multipart, verification, credentials."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from reflexarc.config import ConfigError
from reflexarc.objectstore import (
    ObjectRef,
    ObjectStoreSettings,
    StageError,
    download,
    open_store,
    put_bytes,
    put_file,
    read_bytes,
)
from reflexarc.s3store import S3Store


def test_multipart_upload_then_verified_download(s3_env: S3Store, tmp_path: Path) -> None:
    settings = ObjectStoreSettings(multipart_chunk_bytes=5 * 1024 * 1024)
    assert settings.endpoint_url == s3_env.endpoint_url  # from RX_S3_ENDPOINT_URL
    data = os.urandom(12 * 1024 * 1024 + 7)  # three parts
    ref = put_bytes(f"{s3_env.url}/t/multi.bin", data, settings)
    assert ref.size == len(data) and ref.sha256 == hashlib.sha256(data).hexdigest()
    got = download(ref, tmp_path / "x" / "multi.bin", settings)
    assert got.read_bytes() == data
    assert read_bytes(ObjectRef.from_data(ref.to_data()), settings) == data


def test_put_file_streams_a_local_file(s3_env: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x05" * 300_000)
    ref = put_file(f"{s3_env.url}/t/file.bin", src)
    assert ref.size == 300_000 and read_bytes(ref) == src.read_bytes()


def test_missing_object_and_corrupted_object_are_named(s3_env: S3Store, tmp_path: Path) -> None:
    missing = ObjectRef(url=f"{s3_env.url}/t/nothing-here.bin", size=1, sha256="0" * 64)
    with pytest.raises(StageError, match=r"^not found: s3://"):
        download(missing, tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()
    ref = put_bytes(f"{s3_env.url}/t/good.bin", b"good bytes")
    fs, path = open_store(ref.url)
    fs.pipe_file(path, b"evil bytes")  # same size, other content: only the checksum can tell
    with pytest.raises(StageError, match="checksum mismatch"):
        download(ref, tmp_path / "c.bin")
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_credentials_are_named_never_written(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ObjectStoreSettings(
        endpoint_url=s3_store.endpoint_url, access_key_env="RX_TEST_KEY", secret_key_env="RX_TEST_SECRET"
    )
    monkeypatch.delenv("RX_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"RX_TEST_KEY"):
        settings.check_credentials()
    monkeypatch.setenv("RX_TEST_KEY", s3_store.access_key)
    monkeypatch.setenv("RX_TEST_SECRET", "wrong")
    with pytest.raises(PermissionError):
        put_bytes(f"{s3_store.url}/t/denied.bin", b"x", settings)
    monkeypatch.setenv("RX_TEST_SECRET", s3_store.secret_key)
    assert put_bytes(f"{s3_store.url}/t/allowed.bin", b"x", settings).size == 1
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError, match="no S3 credentials"):
        ObjectStoreSettings(endpoint_url=s3_store.endpoint_url).check_credentials()
