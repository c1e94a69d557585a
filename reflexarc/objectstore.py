"""Object stores for large data by reference: settings, opening the filesystem, and the reference itself.

A large payload (a detector frame, a file, a site result) is written once to
an object store and travels through MQTT, Kafka and the triggers as an
:class:`ObjectRef`: its URL plus what a consumer needs to trust and use it
without downloading it first (size, sha256, content type, and for arrays
dtype and shape). CEL conditions read ``event.data.ref.size`` directly.

Any fsspec URL works (``file:///shared/claims``, ``memory://``, ...); ``s3://``
URLs go through s3fs with :class:`ObjectStoreSettings`, so that any
S3-compatible store (SeaweedFS, MinIO, Ceph RGW, AWS) is reached through
``endpoint_url``. Credentials are never written in YAML: the settings name
environment variables (``access_key_env``/``secret_key_env``) or a profile of
``~/.aws/credentials``; with neither, botocore's own chain applies
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles).
``RX_S3_ENDPOINT_URL`` is the default endpoint, which ``reflexarc brokers up
--s3`` prints along with throwaway keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from reflexarc.config import ConfigError, Problem, StrictModel, secret_from_env

#: Environment variable holding the default S3 endpoint (an S3-compatible store; unset: AWS).
ENDPOINT_ENV = "RX_S3_ENDPOINT_URL"
#: Smallest part S3 accepts in a multipart upload (but the last).
MIN_PART = 5 * 1024 * 1024
_CHUNK = 1024 * 1024  # read/hash granularity of downloads: bounded memory, few syscalls


class ObjectStoreSettings(StrictModel):
    """How to reach an object store; secrets are named (environment variables, a profile), never written here."""

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get(ENDPOINT_ENV) or None,
        description=f"S3 endpoint of an S3-compatible store (default: ${ENDPOINT_ENV}; unset: AWS)",
    )
    region: str | None = Field(None, description="S3 region name")
    access_key_env: str | None = Field(None, description="environment variable holding the S3 access key id")
    secret_key_env: str | None = Field(None, description="environment variable holding the S3 secret key")
    profile: str | None = Field(None, description="named profile of ~/.aws/credentials")
    multipart_chunk_bytes: int = Field(
        8 * 1024 * 1024, ge=MIN_PART, description="objects larger than this are uploaded in parts of this size"
    )

    def s3_options(self) -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem`` (reads the named secrets now: a missing one is an error)."""
        opts: dict[str, Any] = {"use_listings_cache": False}  # several writers: a listing must be fresh
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ConfigError(
                [
                    Problem(
                        "<config>",
                        None,
                        None,
                        "access_key_env",
                        "name both access_key_env and secret_key_env, or neither",
                    )
                ]
            )
        if self.access_key_env and self.secret_key_env:
            opts["key"] = secret_from_env(self.access_key_env, "the S3 access key")
            opts["secret"] = secret_from_env(self.secret_key_env, "the S3 secret key")
        if self.profile:
            opts["profile"] = self.profile
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts

    def check_credentials(self) -> None:
        """Fail now, naming what is missing, when no S3 credentials can be found (called at start-up)."""
        opts = self.s3_options()
        if "key" in opts or "profile" in opts:
            return
        import botocore.session

        if botocore.session.Session().get_credentials() is None:
            raise ConfigError(
                [
                    Problem(
                        "<environment>",
                        None,
                        None,
                        "credentials",
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                        "or name access_key_env/secret_key_env or a profile in the object-store settings",
                    )
                ]
            )


def is_s3(url: str) -> bool:
    """True for ``s3://`` (and ``s3a://``) URLs."""
    return url.split("://", 1)[0].lower() in ("s3", "s3a")


def open_store(url: str, settings: ObjectStoreSettings | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (s3fs with ``settings`` for ``s3://``)."""
    if is_s3(url):
        import s3fs

        fs = s3fs.S3FileSystem(**(settings or ObjectStoreSettings()).s3_options())
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


class ObjectRef(BaseModel):
    """A stored object as carried in event data (``data.ref``): where it is and what it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str
    size: int = Field(ge=0)
    sha256: str | None = Field(None, description="hex digest of the object's bytes")
    content_type: str = "application/octet-stream"
    dtype: str | None = Field(None, description="NumPy dtype of an array (.npy)")
    shape: list[int] | None = Field(None, description="shape of an array (.npy)")

    def to_data(self) -> dict[str, Any]:
        """The JSON object an event carries (unset array fields left out)."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def from_data(cls, value: object) -> ObjectRef:
        """Parse a reference from event data: the object :meth:`to_data` made, or a bare URL (nothing to verify)."""
        if isinstance(value, str):
            return cls(url=value, size=0)
        return cls.model_validate(value)


class _HashingWriter:
    """File-like that hashes and counts what passes through to ``fh`` (one pass, no copy of the payload)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._fh.write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: the underlying file flushes on close."""


def write_object(
    url: str,
    produce: Callable[[Any], None],
    settings: ObjectStoreSettings | None = None,
    *,
    content_type: str = "application/octet-stream",
    dtype: str | None = None,
    shape: list[int] | None = None,
) -> ObjectRef:
    """Store what ``produce(fh)`` writes at ``url``; return its reference (size and sha256 computed on the way).

    On S3 the write is buffered in parts of ``multipart_chunk_bytes``: above that size s3fs uploads
    in a multipart upload, so memory stays bounded; the object appears only when complete. Other
    filesystems get a temporary name renamed at the end, so no reader sees half an object.
    """
    settings = settings or ObjectStoreSettings()
    fs, path = open_store(url, settings)
    atomic = not is_s3(url)
    if atomic:
        fs.makedirs(fs._parent(path), exist_ok=True)
    target = f"{path}.part" if atomic else path
    kwargs = {"block_size": settings.multipart_chunk_bytes} if is_s3(url) else {}
    with fs.open(target, "wb", **kwargs) as fh:
        writer = _HashingWriter(fh)
        produce(writer)
    if atomic:
        fs.mv(target, path)
    return ObjectRef(
        url=url, size=writer.size, sha256=writer.sha.hexdigest(), content_type=content_type, dtype=dtype, shape=shape
    )


def put_bytes(
    url: str, data: bytes, settings: ObjectStoreSettings | None = None, content_type: str = "application/octet-stream"
) -> ObjectRef:
    """Store ``data`` at ``url`` and return its reference."""
    return write_object(url, lambda fh: fh.write(data), settings, content_type=content_type)


def put_file(
    url: str,
    source: str | os.PathLike[str],
    settings: ObjectStoreSettings | None = None,
    content_type: str = "application/octet-stream",
) -> ObjectRef:
    """Stream a local file to ``url`` (never whole in memory) and return its reference."""

    def produce(fh: Any) -> None:
        with open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                fh.write(chunk)

    return write_object(url, produce, settings, content_type=content_type)


class StageError(RuntimeError):
    """A referenced object could not be fetched as promised: not found, no access, or wrong checksum."""


def _opened(ref: ObjectRef, settings: ObjectStoreSettings | None) -> IO[bytes]:
    fs, path = open_store(ref.url, settings)
    try:
        fh: IO[bytes] = fs.open(path, "rb")
    except FileNotFoundError:
        raise StageError(f"not found: {ref.url}") from None
    except PermissionError as exc:
        raise StageError(f"access denied: {ref.url}: {exc}") from None
    return fh


def _verify(ref: ObjectRef, size: int, digest: str) -> None:
    if ref.sha256 is not None and digest != ref.sha256:
        raise StageError(f"checksum mismatch: {ref.url}: sha256 {digest} (expected {ref.sha256}, {size} bytes)")
    if ref.size and size != ref.size:
        raise StageError(f"size mismatch: {ref.url}: {size} bytes (expected {ref.size})")


def download(ref: ObjectRef, dest: str | os.PathLike[str], settings: ObjectStoreSettings | None = None) -> Path:
    """Copy the object to the local file ``dest``, streamed and verified; raise :class:`StageError` otherwise.

    The file appears under its name only once verified: a crash or a mismatch leaves no half file there.
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    sha = hashlib.sha256()
    size = 0
    try:
        with _opened(ref, settings) as src, open(part, "wb") as out:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
                out.write(chunk)
        _verify(ref, size, sha.hexdigest())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(target)
    return target


def read_bytes(ref: ObjectRef, settings: ObjectStoreSettings | None = None) -> bytes:
    """The object's bytes, verified against the reference."""
    with _opened(ref, settings) as src:
        data: bytes = src.read()
    _verify(ref, len(data), hashlib.sha256(data).hexdigest())
    return data
