"""Watch a directory: each new file becomes one event.

Files at or below the claim-check threshold travel inline (base64); larger
ones are copied to the claim-check store and the event carries the URL. A
file is taken once its size and modification time have been stable for
``settle_s`` (so half-written files are not sent). Which files were taken is
a checkpoint committed with the events, so a restart neither repeats nor
skips a file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id


class DirectoryConfig(SourceConfig):
    """``type: directory`` — one event per new file under ``path``."""

    type: Literal["directory"] = "directory"
    path: str = Field(description="directory to watch, relative to agent.yaml")
    pattern: str = Field("*", description="glob of file names to take")
    recursive: bool = False
    poll_s: float = Field(1.0, gt=0, description="how often to look for new files")
    settle_s: float = Field(0.5, ge=0, description="a file must be unchanged this long")
    delete_after: bool = Field(False, description="delete a file once its event is in the spool")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DirectorySource(Source[DirectoryConfig]):
    """Polls the directory; emits ``{name, path, size, sha256, mtime}`` + ``content`` or ``ref``."""

    config_model = DirectoryConfig

    async def run(self, emit: Emit) -> None:
        """Poll forever."""
        cfg = self.config
        root = self.ctx.resolve(cfg.path)
        # The checkpoint is the set of files taken, as {relative name: "size:mtime_ns"}.
        taken: dict[str, str] = json.loads(self.ctx.checkpoint) if self.ctx.checkpoint else {}
        candidates: dict[str, tuple[str, float]] = {}
        while True:
            found = await asyncio.to_thread(self._scan, root)
            now = time.monotonic()
            present = set()
            for rel, sig in found.items():
                present.add(rel)
                if taken.get(rel) == sig:
                    continue
                seen = candidates.get(rel)
                if seen is None or seen[0] != sig:
                    candidates[rel] = (sig, now)
                    if cfg.settle_s > 0:
                        continue
                elif now - seen[1] < cfg.settle_s:
                    continue
                candidates.pop(rel, None)
                taken[rel] = sig
                # Forget files that are gone, so the checkpoint does not grow forever.
                taken = {k: v for k, v in taken.items() if k in found}
                await self._take(root, rel, sig, taken, emit)
            candidates = {k: v for k, v in candidates.items() if k in present}
            await asyncio.sleep(cfg.poll_s)

    def _scan(self, root: Path) -> dict[str, str]:
        cfg = self.config
        if not root.is_dir():
            return {}
        files = root.rglob(cfg.pattern) if cfg.recursive else root.glob(cfg.pattern)
        out: dict[str, str] = {}
        for p in files:
            if p.name.endswith(".part") or p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if p.is_file():
                out[str(p.relative_to(root))] = f"{st.st_size}:{st.st_mtime_ns}"
        return out

    async def _take(self, root: Path, rel: str, sig: str, taken: dict[str, str], emit: Emit) -> None:
        cfg = self.config
        path = root / rel
        try:
            size = path.stat().st_size
            digest = await asyncio.to_thread(_digest, path)
        except OSError as exc:
            await self.ctx.reject(f"cannot read {path}: {exc.strerror}", str(path), b"")
            return
        event_id = stable_id(self.ctx.site, self.ctx.device, cfg.stream, rel, digest)
        data: dict[str, object] = {
            "name": rel,
            "path": str(path),
            "size": size,
            "sha256": digest,
            "mtime": int(sig.split(":")[1]) / 1e9,
        }
        try:
            if self.ctx.claim_check.should_reference(size):
                name = f"{cfg.stream}/{event_id}/{path.name}"
                data["ref"] = await self.ctx.claim_check.put_file(name, str(path))
            else:
                data["content"] = base64.b64encode(await asyncio.to_thread(path.read_bytes)).decode()
        except OSError as exc:
            await self.ctx.reject(f"cannot read {path}: {exc.strerror}", str(path), b"")
            return
        await emit(Reading(cfg.stream, data, id=event_id, checkpoint=json.dumps(taken, sort_keys=True)))
        if cfg.delete_after:
            # Only after the event is queued; a crash before the commit re-takes the file.
            await self._delete_when_committed(path)

    async def _delete_when_committed(self, path: Path) -> None:
        if self.ctx.flush is not None:
            await self.ctx.flush()
        with contextlib.suppress(OSError):  # may be gone already
            os.unlink(path)
