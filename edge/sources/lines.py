"""A line-oriented source: a command's stdout, or a file/FIFO/serial-like stream, one event per line.

``command`` is an argv list run without a shell; with ``restart: true`` it is
started again (with backoff) when it exits. ``path`` is opened and read line
by line in a thread (a serial device or FIFO blocks in ``readline``, which
must not happen on the event loop). ``format: json`` expects a JSON object
per line; a line that is not one is kept as a dead letter and the source goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Literal

from pydantic import Field, model_validator

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id


class LinesConfig(SourceConfig):
    """``type: lines`` — exactly one of ``command`` or ``path``."""

    type: Literal["lines"] = "lines"
    command: list[str] | None = Field(None, min_length=1, description="argv, no shell")
    path: str | None = Field(None, description="file, FIFO or serial device to read lines from")
    format: Literal["text", "json"] = "text"
    restart: bool = Field(False, description="start the command again when it exits")
    encoding: str = "utf-8"

    @model_validator(mode="after")
    def _one(self) -> LinesConfig:
        if (self.command is None) == (self.path is None):
            raise ValueError("give exactly one of 'command' (argv list) or 'path'")
        return self


class LineSource(Source[LinesConfig]):
    """Emits ``{"line": text, "n": k}`` (text) or the parsed object (json) for each line."""

    config_model = LinesConfig

    async def run(self, emit: Emit) -> None:
        """Read until the stream ends (and, with ``restart``, start the command again)."""
        cfg = self.config
        self._boot = os.urandom(4).hex()  # lines are not replayable: ids unique per run
        self._n = 0
        if cfg.path is not None:
            await self._read_path(emit)
            return
        backoff = 1.0
        while True:
            rc = await self._read_command(emit)
            if not cfg.restart:
                self.ctx.log.info("command %s exited with %s", cfg.command, rc)
                return
            self.ctx.log.warning("command %s exited with %s; restarting in %.0f s", cfg.command, rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def _line(self, raw: bytes, emit: Emit, origin: str) -> None:
        cfg = self.config
        text = raw.decode(cfg.encoding, errors="replace").rstrip("\r\n")
        if not text:
            return
        self._n += 1
        if cfg.format == "json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                await self.ctx.reject(f"line {self._n} is not JSON: {exc}", origin, raw)
                return
            if not isinstance(data, dict):
                await self.ctx.reject(f"line {self._n} is not a JSON object", origin, raw)
                return
        else:
            data = {"line": text, "n": self._n}
        event_id = stable_id(self.ctx.site, self.ctx.device, cfg.stream, self._boot, str(self._n))
        await emit(Reading(cfg.stream, data, id=event_id))

    async def _read_command(self, emit: Emit) -> int:
        cfg = self.config
        assert cfg.command is not None
        proc = await asyncio.create_subprocess_exec(
            *cfg.command,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                await self._line(raw, emit, " ".join(cfg.command))
            return await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _read_path(self, emit: Emit) -> None:
        cfg = self.config
        assert cfg.path is not None
        path = self.ctx.resolve(cfg.path)
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            while True:
                raw = await asyncio.to_thread(fh.readline)
                if not raw:
                    return
                await self._line(raw, emit, str(path))
        finally:
            fh.close()
