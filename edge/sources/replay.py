"""Replay a JSONL file of events: ``{"stream": str, "data": {...}, "id": optional str}`` per line.

Used to publish an exact, known set of events (end-to-end tests, demos,
re-playing a recorded run). The line number is the checkpoint, so a restarted
agent continues after the last line the spool accepted and stops at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

from pydantic import Field

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id
from reflexarc.topics import TopicError, check_name


class ReplayConfig(SourceConfig):
    """``type: replay`` — emit the lines of ``path`` at ``rate_hz`` (0 = as fast as possible)."""

    type: Literal["replay"] = "replay"
    stream: str | None = Field(None, description="stream for lines that name none")  # type: ignore[assignment]  # optional here: lines may name theirs
    path: str = Field(description="JSONL file, relative to agent.yaml")
    rate_hz: float = Field(10.0, ge=0)


class ReplayError(ValueError):
    """A line of the replay file is not a valid event; the text names file and line."""


class ReplaySource(Source[ReplayConfig]):
    """Reads the file once, emits each line in order, then returns."""

    config_model = ReplayConfig

    @property
    def checkpoint_key(self) -> str:
        """One checkpoint per file."""
        return f"replay:{self.config.path}"

    async def run(self, emit: Emit) -> None:
        """Emit every line after the checkpoint, paced at ``rate_hz``."""
        cfg = self.config
        path = self.ctx.resolve(cfg.path)
        lines = (await asyncio.to_thread(path.read_text)).splitlines()
        done = int(self.ctx.checkpoint or 0)
        period = 1.0 / cfg.rate_hz if cfg.rate_hz else 0.0
        start = time.monotonic()
        sent = 0
        for lineno in range(done + 1, len(lines) + 1):
            text = lines[lineno - 1].strip()
            if not text:
                continue
            try:
                reading = self._reading(text, f"{path}:{lineno}", lineno)
            except ReplayError as exc:
                # Bad input is data, not a reason to stop: record it and go on.
                await self.ctx.reject(str(exc), f"{path}:{lineno}", text.encode())
                continue
            await emit(reading)
            sent += 1
            if period:
                delay = start + sent * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif sent % 256 == 0:
                await asyncio.sleep(0)
        self.ctx.log.info("replay of %s finished (%d events this run)", path, sent)

    def _reading(self, text: str, where: str, lineno: int) -> Reading:
        cfg = self.config
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ReplayError(f"{where}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
            raise ReplayError(f'{where}: want {{"stream": ..., "data": {{...}}, "id": ...}}')
        try:
            stream = check_name(obj.get("stream", cfg.stream), "stream")
        except TopicError as exc:
            raise ReplayError(f"{where}: {exc}") from None
        event_id = obj.get("id")
        if event_id is not None and not isinstance(event_id, str):
            raise ReplayError(f"{where}: id must be a string")
        return Reading(
            stream,
            obj["data"],
            id=event_id or stable_id(self.ctx.site, self.ctx.device, cfg.path, str(lineno)),
            checkpoint=str(lineno),
        )
