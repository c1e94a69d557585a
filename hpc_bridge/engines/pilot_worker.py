"""The function a pilot's worker runs for each task (Dask worker thread, Parsl worker process).

It applies what the allocation manager decided for this attempt: the GPUs
it reserved (``CUDA_VISIBLE_DEVICES``, as indices into the devices Slurm gave
the allocation), and for MPI launchers ``SLURM_OVERLAP=1`` and no memory
request of their own (their job step shares the cores and memory the
worker's step holds; the manager reserved them). Then it runs the task with
:func:`reflexarc.hpc_bridge.worker.execute_json`.

A task is stopped — on timeout or on a user's cancel — by a marker file in
its work directory (shared with the agent, as the outcome file is): a
watchdog thread sees it and kills the task's child processes and the worker
process itself. Each worker process runs one task at a time (one thread), so
nothing else dies with it; Dask's nanny and Parsl's worker pool start a
fresh process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

from reflexarc.hpc_bridge.worker import RunSpec, execute_json

#: Written in the attempt's work directory to stop it.
CANCEL_FILE = "cancel"
#: srun options that the worker's own job step leaves in its environment.
STEP_OPTIONS = ("SLURM_LABELIO", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_CPU_BIND",
                "SLURM_DISTRIBUTION")
POLL_S = 0.2


def cancel_marker(workdir: str) -> str:
    """The marker file that stops the attempt running in ``workdir``."""
    return os.path.join(workdir, CANCEL_FILE)


def _kill_tree() -> None:
    import psutil  # a dependency of distributed; present wherever the workers run

    me = psutil.Process()
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(marker: str, done: threading.Event) -> None:
    while not done.wait(POLL_S):
        if os.path.exists(marker):
            _kill_tree()


def prepare(spec: RunSpec, gpu_indices: tuple[int, ...] | list[int]) -> RunSpec:
    """``spec`` with the environment of this placement (GPUs, MPI step overlap)."""
    env = dict(spec.environment)
    if gpu_indices:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [d for d in visible.split(",") if d] or [str(i) for i in range(max(gpu_indices) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in gpu_indices if i < len(ids))
    if spec.kind == "mpi":
        # The launcher's job step shares the cores and memory the worker's own step holds:
        # the manager reserved them for these ranks. (srun reads these as --overlap, --mem=0.)
        env.setdefault("SLURM_OVERLAP", "1")
        mem_vars = [v for v in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU") if v in os.environ]
        for var in mem_vars or ["SLURM_MEM_PER_NODE"]:
            env.setdefault(var, "0")
        # A worker started by srun (Parsl's SrunLauncher) has its own step's options in its environment
        # (labelled output, one task per node, ...): a nested srun would take them as its own.
        inherited = [v for v in STEP_OPTIONS if v in os.environ and v not in env]
        if inherited and spec.argv:
            spec.argv = ["env", *(a for v in inherited for a in ("-u", v)), *spec.argv]
    spec.environment = env
    # A Python app in the shared worker process would not see its environment: run it in a child.
    if spec.kind == "python" and env:
        spec.isolate = True
    return spec


def run_pilot_task(spec_json: str, gpu_indices: list[int] | None = None, where: str = "") -> dict[str, Any]:
    """Run one attempt; return (and write) its outcome, naming ``where`` it ran."""
    spec = prepare(RunSpec.from_json(spec_json), gpu_indices or [])
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(cancel_marker(spec.workdir), done), daemon=True,
                                name="rx-task-watchdog")
    watchdog.start()
    try:
        outcome = execute_json(spec.to_json())
    finally:
        done.set()
    if where:
        outcome["machine"] = where
    return outcome
