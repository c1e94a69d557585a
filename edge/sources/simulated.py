"""A simulated scalar instrument: a time series with noise, drift and spikes."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Literal

from pydantic import Field

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id


class SimulatedConfig(SourceConfig):
    """``type: simulated`` — value = base + drift * t + noise, with occasional spikes."""

    type: Literal["simulated"] = "simulated"
    rate_hz: float = Field(1.0, gt=0, le=1_000_000)
    base: float = 0.0
    noise: float = Field(0.1, ge=0, description="standard deviation of Gaussian noise")
    drift_per_s: float = 0.0
    spike_probability: float = Field(0.0, ge=0, le=1)
    spike_size: float = 10.0
    field: str = Field("value", description="name of the value in the event data")
    unit: str | None = None
    count: int | None = Field(None, ge=0, description="stop after this many events in total")
    seed: int | None = None


class SimulatedSource(Source[SimulatedConfig]):
    """Emits ``{field: value, "seq": n}`` at ``rate_hz``; resumes ``n`` from its checkpoint."""

    config_model = SimulatedConfig

    async def run(self, emit: Emit) -> None:
        """Emit readings at the configured rate (absolute schedule, so no drift from overhead)."""
        cfg = self.config
        rng = random.Random(cfg.seed)
        n = int(self.ctx.checkpoint or 0)
        period = 1.0 / cfg.rate_hz
        start = time.monotonic()
        sent = 0
        while cfg.count is None or n < cfg.count:
            t = time.monotonic() - start
            value = cfg.base + cfg.drift_per_s * t + rng.gauss(0.0, cfg.noise)
            if cfg.spike_probability and rng.random() < cfg.spike_probability:
                value += cfg.spike_size
            data: dict[str, object] = {cfg.field: value, "seq": n}
            if cfg.unit:
                data["unit"] = cfg.unit
            n += 1
            await emit(
                Reading(
                    cfg.stream,
                    data,
                    id=stable_id(self.ctx.site, self.ctx.device, cfg.stream, str(n - 1)),
                    checkpoint=str(n),
                )
            )
            sent += 1
            delay = start + sent * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif sent % 256 == 0:
                await asyncio.sleep(0)  # behind schedule: still let others run
