"""Claim check: large payloads are stored once in an object store and travel as a reference.

The store is any fsspec URL: ``s3://bucket/prefix`` (s3fs, through the
``endpoint_url`` of :class:`~reflexarc.objectstore.ObjectStoreSettings` for any
S3-compatible store) or a shared filesystem path. Objects larger than the
settings' ``multipart_chunk_bytes`` go up in a multipart upload, streamed.

Order matters for "nothing lost": a source uploads first and emits (spools)
its event only after the upload completed. A crash in between leaves an
object no event references (an orphan, harmless: the restarted source emits
the same event id again and overwrites the same object name; garbage
collection removes what stays orphaned), never an event whose object is missing.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from reflexarc.objectstore import ObjectRef, ObjectStoreSettings, is_s3, put_bytes, put_file, write_object

log = logging.getLogger(__name__)

#: Upload retries back off from this delay up to ``_MAX_BACKOFF`` seconds, and never give up: the source
#: waits (its events are not produced meanwhile), as it would for a full spool.
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 10.0


class ClaimCheck:
    """A directory (any fsspec URL) where payloads above ``threshold`` bytes are stored."""

    def __init__(self, url: str, threshold: int, store: ObjectStoreSettings | None = None) -> None:
        self.url = url.rstrip("/")
        self.threshold = threshold
        self.store = store or ObjectStoreSettings()
        if is_s3(self.url):
            # Named at start-up rather than at the first large frame.
            self.store.check_credentials()
        #: Uploads that failed and were retried (for status and tests).
        self.retries = 0

    def should_reference(self, size: int) -> bool:
        """True when a payload of ``size`` bytes travels by reference."""
        return size > self.threshold

    def _target(self, name: str) -> str:
        if ".." in PurePosixPath(name).parts or name.startswith("/"):
            raise ValueError(f"claim-check name must stay inside the store: {name!r}")
        return f"{self.url}/{PurePosixPath(name)}"

    async def _with_retries(self, what: str, call: Callable[[ObjectStoreSettings], ObjectRef]) -> ObjectRef:
        delay = _FIRST_BACKOFF
        while True:
            try:
                # The settings are read at each attempt: they may have been corrected meanwhile.
                ref = await asyncio.to_thread(call, self.store)
                return ref
            except (ValueError, TypeError):
                raise  # a bad name, a bad setting or an unsavable payload: retrying cannot help
            except Exception as exc:  # network and store errors (botocore's are not all OSErrors)
                self.retries += 1
                log.warning("claim check: upload of %s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    async def put_ref(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> dict[str, Any]:
        """Store ``data`` as ``name`` (relative); return the reference an event carries (url, size, sha256, ...)."""
        target = self._target(name)
        ref = await self._with_retries(target, lambda store: put_bytes(target, data, store, content_type))
        return ref.to_data()

    async def put_array(self, name: str, array: Any) -> dict[str, Any]:
        """Store a NumPy array as ``.npy`` (streamed to the store); the reference carries its dtype and shape."""
        import numpy as np

        target = self._target(name)

        def produce(fh: Any) -> None:
            np.save(fh, array, allow_pickle=False)

        ref = await self._with_retries(
            target,
            lambda store: write_object(
                target,
                produce,
                store,
                content_type="application/x-npy",
                dtype=str(array.dtype),
                shape=list(array.shape),
            ),
        )
        return ref.to_data()

    async def put_file_ref(
        self, name: str, source_path: str, content_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Stream a local file into the store (never whole in memory); return its reference."""
        target = self._target(name)
        ref = await self._with_retries(target, lambda store: put_file(target, source_path, store, content_type))
        return ref.to_data()

    async def put(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``name`` and return its URL only (sources that carry a bare URL)."""
        return str((await self.put_ref(name, data))["url"])

    async def put_file(self, name: str, source_path: str) -> str:
        """Copy a local file into the store and return its URL only."""
        return str((await self.put_file_ref(name, source_path))["url"])


def read_claim(ref: str | dict[str, Any], store: ObjectStoreSettings | None = None) -> bytes:
    """Fetch a claim-checked payload by URL or reference (verified against its sha256 when it has one)."""
    from reflexarc.objectstore import read_bytes

    return read_bytes(ObjectRef.from_data(ref), store)


def read_array(ref: dict[str, Any], store: ObjectStoreSettings | None = None) -> Any:
    """Fetch a ``.npy`` claim as a NumPy array (verified)."""
    import numpy as np

    return np.load(io.BytesIO(read_claim(ref, store)), allow_pickle=False)
