"""Claim check: large payloads are stored once and travel as a URL readable with fsspec."""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath

import fsspec


class ClaimCheck:
    """A directory (any fsspec URL) where payloads above ``threshold`` bytes are stored."""

    def __init__(self, url: str, threshold: int) -> None:
        self.url = url.rstrip("/")
        self.threshold = threshold

    def should_reference(self, size: int) -> bool:
        """True when a payload of ``size`` bytes travels by reference."""
        return size > self.threshold

    def _write(self, name: str, data: bytes) -> str:
        target = f"{self.url}/{PurePosixPath(name)}"
        fs, path = fsspec.core.url_to_fs(target)
        fs.makedirs(fs._parent(path), exist_ok=True)
        # Write under a temporary name and rename, so a reader never sees half a file.
        tmp = f"{path}.part"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
        return target

    async def put(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``name`` (relative) and return its URL (off the event loop)."""
        if ".." in PurePosixPath(name).parts:
            raise ValueError(f"claim-check name must stay inside the store: {name!r}")
        return await asyncio.to_thread(self._write, name, data)

    def _copy(self, name: str, source_path: str) -> str:
        target = f"{self.url}/{PurePosixPath(name)}"
        fs, path = fsspec.core.url_to_fs(target)
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.part"
        fs.put_file(source_path, tmp)  # streamed: files may be larger than memory
        fs.mv(tmp, path)
        return target

    async def put_file(self, name: str, source_path: str) -> str:
        """Copy a local file into the store and return its URL."""
        return await asyncio.to_thread(self._copy, name, source_path)


def read_claim(url: str) -> bytes:
    """Fetch a claim-checked payload (for consumers and tests)."""
    with fsspec.open(url, "rb") as fh:
        return fh.read()
