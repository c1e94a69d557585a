"""The beamline's motor actuator (runs on the edge device).

Referenced as ``reflexarc.scenarios.beamline.motor:move`` in ``agent.yaml``.
A real device would drive a stepper here; the simulation clamps the move to
the travel range and, when ``RX_MOTOR_LOG`` names a file, appends each move
to it (one JSON line), so tests can count what the actuator really executed.
"""

from __future__ import annotations

import json
import os
import time

TRAVEL_MM = (-10.0, 10.0)


def move(position: float, speed: float = 5.0) -> dict[str, float]:
    """Move the motor to ``position`` (mm); return where it ended up."""
    lo, hi = TRAVEL_MM
    target = min(hi, max(lo, float(position)))
    log_path = os.environ.get("RX_MOTOR_LOG")
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps({"position": target, "at": time.time()}) + "\n")
    return {"position": target, "clamped": target != float(position), "speed": speed}
