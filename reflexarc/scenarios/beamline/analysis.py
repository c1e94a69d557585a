"""The beamline's analysis app: locate the peak behind a detector spike.

Runs on the HPC site (referenced as
``reflexarc.scenarios.beamline.analysis:find_peak`` in ``site.yaml``). It
scans a simulated motor range around the spike, fits the peak by a
centroid over the half-maximum region, and returns where to move the motor.
"""

from __future__ import annotations

import math


def profile(position: float, centre: float, height: float, width: float = 0.8) -> float:
    """Detector response at a motor position: a Gaussian peak on a flat background."""
    return 100.0 + height * math.exp(-((position - centre) ** 2) / (2 * width**2))


def find_peak(value: float, frame: int = 0, points: int = 201) -> dict[str, float | int]:
    """Scan, fit and return the motor position that centres the beam on the peak.

    The peak centre is derived from the triggering event (``frame``) so the
    result is deterministic for a given event and checkable in tests.
    """
    centre = round(((frame * 7919) % 1000) / 100.0 - 5.0, 3)  # in [-5, 5) mm
    height = max(0.0, float(value) - 100.0)
    xs = [-10.0 + 20.0 * i / (points - 1) for i in range(points)]
    ys = [profile(x, centre, height) for x in xs]
    base = min(ys)
    half = base + (max(ys) - base) / 2
    sel = [(x, y - base) for x, y in zip(xs, ys, strict=True) if y >= half]
    weight = sum(w for _, w in sel) or 1.0
    fitted = sum(x * w for x, w in sel) / weight
    return {"position": round(fitted, 3), "height": round(height, 1), "frame": frame}
