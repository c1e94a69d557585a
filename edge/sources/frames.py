"""Simulated detector frames of a configurable shape, data type and rate.

Frames at or below the claim-check threshold travel inline (base64); larger
ones are written to the claim-check store as NumPy ``.npy`` arrays and the
event carries their reference (``ref``: url, size, sha256 of the stored object,
content type, dtype, shape). ``size`` and ``sha256`` at the top of the event
are those of the frame's raw bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
from typing import Literal

import numpy as np
from pydantic import Field

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id

_ITEMSIZE = {"uint8": 1, "uint16": 2, "uint32": 4, "float32": 4}


class FramesConfig(SourceConfig):
    """``type: frames`` — random frames of ``shape`` and ``dtype`` at ``rate_hz``."""

    type: Literal["frames"] = "frames"
    shape: list[int] = Field([64, 64], min_length=1, max_length=4)
    dtype: Literal["uint8", "uint16", "uint32", "float32"] = "uint16"
    rate_hz: float = Field(1.0, gt=0, le=10_000)
    count: int | None = Field(None, ge=0, description="stop after this many frames in total")
    seed: int | None = None


class FrameSource(Source[FramesConfig]):
    """Emits ``{seq, shape, dtype, size, sha256}`` plus ``frame`` (inline) or ``ref`` (a reference to an .npy)."""

    config_model = FramesConfig

    async def run(self, emit: Emit) -> None:
        """Produce frames until ``count`` is reached or the agent stops."""
        cfg = self.config
        rng = random.Random(cfg.seed)
        size = _ITEMSIZE[cfg.dtype]
        for dim in cfg.shape:
            size *= dim
        n = int(self.ctx.checkpoint or 0)
        period = 1.0 / cfg.rate_hz
        start = time.monotonic()
        sent = 0
        while cfg.count is None or n < cfg.count:
            frame = rng.randbytes(size)
            event_id = stable_id(self.ctx.site, self.ctx.device, cfg.stream, str(n))
            data: dict[str, object] = {
                "seq": n,
                "shape": cfg.shape,
                "dtype": cfg.dtype,
                "size": size,
                "sha256": hashlib.sha256(frame).hexdigest(),
            }
            if self.ctx.claim_check.should_reference(size):
                # A real array (.npy): the reference carries its dtype and shape, so triggers and apps
                # can use them without downloading. Uploaded before the event is emitted (spooled).
                array = np.frombuffer(frame, dtype=cfg.dtype).reshape(cfg.shape)
                data["ref"] = await self.ctx.claim_check.put_array(f"{cfg.stream}/{event_id}.npy", array)
            else:
                data["encoding"] = "base64"
                data["frame"] = base64.b64encode(frame).decode()
            n += 1
            await emit(Reading(cfg.stream, data, id=event_id, checkpoint=str(n)))
            sent += 1
            delay = start + sent * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
