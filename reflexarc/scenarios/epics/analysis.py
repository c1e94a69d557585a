"""The scenario's analysis app: fit the peak of a Bluesky scan from the run's documents in Kafka.

Runs on the HPC site (``reflexarc.scenarios.epics.analysis:fit_peak`` in
``site.yaml``) when a run's ``stop`` document fires the trigger. The trigger
passes the run's uid and the device that ran it; the app reads that device's
documents from the data topic (``RX_KAFKA_BOOTSTRAP``, ``RX_NAMESPACE``): per
device they are in one partition and in order, so once the run's ``stop`` is
read, every event of the run has been read too. Then it fits a Gaussian on a
flat background to detector counts over motor positions and returns the
position of the peak.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope
from reflexarc.topics import DEFAULT_NAMESPACE, Topics


class FitError(ValueError):
    """The run cannot be fitted (too few points, no peak); the text says why."""


def fit_gaussian(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Centre, height, width and background of a Gaussian peak on a flat background.

    The background is the median of the lowest quarter of the counts; above
    it, ``ln(y - bg)`` of a Gaussian is a parabola in ``x``, fitted by least
    squares weighted with ``(y - bg)^2`` (Guo's weighting: noise on the
    tails does not dominate) over the points above 10 % of the peak.
    """
    import numpy as np

    if len(xs) < 5:
        raise FitError(f"{len(xs)} points: at least 5 are needed to fit a peak")
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    low = np.sort(y)[: max(1, len(y) // 4)]
    background = float(np.median(low))
    signal = y - background
    peak = float(signal.max())
    if peak <= 0:
        raise FitError("no peak above the background")
    sel = signal > 0.1 * peak
    if sel.sum() < 3:
        raise FitError(f"only {int(sel.sum())} points above 10% of the peak: scan finer or wider")
    c2, c1, c0 = np.polyfit(x[sel], np.log(signal[sel]), 2, w=signal[sel])
    if c2 >= 0:
        raise FitError("the counts do not form a peak (no maximum inside the scan)")
    centre = -c1 / (2 * c2)
    width = math.sqrt(-1 / (2 * c2))
    height = math.exp(c0 - c1 * c1 / (4 * c2))
    if not x.min() <= centre <= x.max():
        raise FitError(f"the fitted peak {centre:.3f} lies outside the scan [{x.min():g}, {x.max():g}]")
    return {
        "position": round(float(centre), 4),
        "height": round(height, 2),
        "width": round(width, 4),
        "background": round(background, 2),
    }


async def read_run(
    kafka: KafkaSettings, topic: str, run_uid: str, site: str, device: str, timeout_s: float
) -> list[tuple[str, dict[str, Any]]]:
    """The run's documents ``(name, doc)`` in order, read from the data topic until its ``stop``."""
    from aiokafka import TopicPartition

    from reflexarc.kafka import make_consumer

    consumer = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    docs: list[tuple[str, dict[str, Any]]] = []
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for rec in records:
                    env = Envelope.from_kafka(rec.value, rec.headers)
                    ext = env.extensions
                    data = env.data
                    if env.subject != "bluesky" or not isinstance(data, dict):
                        continue
                    if ext.get("site") != site or ext.get("device") != device:
                        continue
                    if (data.get("run") or {}).get("uid") != run_uid:
                        continue
                    docs.append((str(data.get("name")), data.get("doc") or {}))
                    if data.get("name") == "stop":
                        return docs
        raise FitError(f"the stop document of run {run_uid} was not in {topic} within {timeout_s:g}s")
    finally:
        await consumer.stop()


def points(docs: list[tuple[str, dict[str, Any]]], detector: str, motor: str) -> tuple[list[float], list[float]]:
    """Motor positions and detector counts of the run's primary stream, in event order."""
    primary = {d.get("uid") for n, d in docs if n == "descriptor" and d.get("name", "primary") == "primary"}
    xs: list[float] = []
    ys: list[float] = []
    for name, doc in docs:
        if name == "event" and doc.get("descriptor") in primary:
            data = doc.get("data") or {}
            if isinstance(data.get(motor), int | float) and isinstance(data.get(detector), int | float):
                xs.append(float(data[motor]))
                ys.append(float(data[detector]))
    return xs, ys


def fit_peak(
    run_uid: str, site: str, device: str, detector: str = "det", motor: str = "motor", timeout_s: float = 30.0
) -> dict[str, Any]:
    """Read the run from Kafka, fit its peak, return ``{"position", "height", "width", ...}``."""
    kafka = KafkaSettings.from_env()
    topic = Topics(os.environ.get("RX_NAMESPACE", DEFAULT_NAMESPACE)).kafka_data
    docs = asyncio.run(read_run(kafka, topic, run_uid, site, device, timeout_s))
    xs, ys = points(docs, detector, motor)
    result: dict[str, Any] = fit_gaussian(xs, ys)
    result.update({"run_uid": run_uid, "points": len(xs), "documents": len(docs)})
    return result
