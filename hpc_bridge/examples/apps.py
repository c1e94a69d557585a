"""Small example apps: what a site's analytics look like to the HPC bridge.

Plain functions taking keyword arguments and returning a JSON-serialisable
dict; ``@app`` declares defaults, ``@implement`` an alternative for GPUs.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from reflexarc.hpc_bridge.apps import app, implement


@app(cpus=1, timeout_s=60)
def add(a: float, b: float) -> dict[str, Any]:
    """Add two numbers."""
    return {"sum": a + b}


def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the arguments (a trivial task, for benchmarks)."""
    return kwargs


def sleep(seconds: float, marker_dir: str | None = None, tag: str = "") -> dict[str, Any]:
    """Sleep; with ``marker_dir``, leave one file per start (to count how often a task ran)."""
    if marker_dir:
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        (Path(marker_dir) / f"{tag}.{os.getpid()}.{time.time_ns()}").write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"slept": seconds, "pid": os.getpid(), "tag": tag}


def fail(message: str = "failing on purpose") -> dict[str, Any]:
    """Always raise."""
    raise RuntimeError(message)


def flaky(counter: str, fail_times: int) -> dict[str, Any]:
    """Fail the first ``fail_times`` calls (counted in the file ``counter``), then succeed."""
    path = Path(counter)
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    if n < fail_times:
        raise RuntimeError(f"flaky failure {n + 1} of {fail_times}")
    return {"calls": n + 1}


def big(n: int) -> dict[str, Any]:
    """A result of about ``n`` bytes (travels by reference above the inline limit)."""
    return {"data": "x" * n}


@app(cpus=1, retries=1)
def denoise(values: list[float]) -> dict[str, Any]:
    """Three-point moving average (CPU version)."""
    out = [sum(values[max(0, i - 1) : i + 2]) / len(values[max(0, i - 1) : i + 2]) for i in range(len(values))]
    return {"values": out, "implementation": "cpu"}


@implement(denoise, gpus=1)
def denoise_gpu(values: list[float]) -> dict[str, Any]:
    """The same on a GPU (here: the same arithmetic, labelled; chosen where the site offers a GPU)."""
    result = denoise(values)
    result["implementation"] = "gpu"
    return result


def devices(hold_s: float = 0.0) -> dict[str, Any]:
    """What a task sees of the machine it runs on: composed machine, GPUs, Slurm allocation.

    Composed machines announce themselves in ``RX_MACHINE*`` variables; GPUs in
    ``CUDA_VISIBLE_DEVICES`` (set by the site for logical compositions, by Slurm
    inside an allocation).
    """
    time.sleep(hold_s)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return {
        "machine": os.environ.get("RX_MACHINE"),
        "cuda_visible_devices": [g for g in visible.split(",") if g],
        "gpu_devices": [g for g in os.environ.get("RX_MACHINE_GPUS", "").split(",") if g],
        "gpu_model": os.environ.get("RX_MACHINE_GPU_MODEL"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
