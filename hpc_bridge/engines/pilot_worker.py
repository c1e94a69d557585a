"""The function a pilot's worker runs for each task (Dask worker thread, Parsl worker process).

It applies what the allocation manager decided for this attempt: the GPUs
it reserved (``CUDA_VISIBLE_DEVICES``, as indices into the devices Slurm gave
the allocation), and for MPI launchers ``SLURM_OVERLAP=1`` and no memory
request of their own (their job step shares the cores and memory the
worker's step holds; the manager reserved them). Then it runs the task with
:func:`reflexarc.hpc_bridge.worker.execute_json`.

A task the manager queued at a busy worker (prefetched) is checked again when
the worker reaches it: it does not start, and says so (``"not_started"``), if
it was cancelled meanwhile (marker file) or would start too late for the
allocation's wall time to hold its timeout (``start_by``). Then the worker
*claims* it: it creates the dispatch's claim file with ``O_EXCL``. The agent
takes a queued task back (to place it elsewhere) by creating the same file:
whoever creates it first wins, so a task taken back never starts, and one
the worker claimed is never placed twice (``O_EXCL`` is atomic on NFS v3+,
Lustre and GPFS as on a local disk).

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
import time
from typing import Any

from reflexarc.hpc_bridge.worker import RunSpec, execute_json

#: Written in the attempt's work directory to stop it.
CANCEL_FILE = "cancel"
#: srun options that the worker's own job step leaves in its environment.
STEP_OPTIONS = (
    "SLURM_LABELIO",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPU_BIND",
    "SLURM_DISTRIBUTION",
)
POLL_S = 0.2


def cancel_marker(workdir: str) -> str:
    """The marker file that stops the attempt running in ``workdir``."""
    return os.path.join(workdir, CANCEL_FILE)


def claim_file(workdir: str, token: str) -> str:
    """The file whose creation decides whether dispatch ``token`` started (worker) or was taken back (agent)."""
    return os.path.join(workdir, f"claim-{token}")


def claim(workdir: str, token: str, who: str) -> bool:
    """Create the dispatch's claim file for ``who``; ``False`` if the other side created it first."""
    os.makedirs(workdir, exist_ok=True)
    try:
        fd = os.open(claim_file(workdir, token), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, who.encode())
    finally:
        os.close(fd)
    return True


def why_not_start(workdir: str, token: str, start_by: float | None) -> str | None:
    """Why a queued dispatch must not start now (``None``: it has claimed it and starts it)."""
    if os.path.exists(cancel_marker(workdir)):
        return "cancelled before it started"
    if start_by is not None and time.time() > start_by:
        return "queued too long: the allocation's wall time left no longer holds its timeout"
    if not claim(workdir, token, "started"):
        return "taken back by the site agent before it started"
    return None


def _kill_tree() -> None:
    import psutil  # a dependency of distributed; present wherever the workers run

    me = psutil.Process()
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


class _Watchdog:
    """One thread per worker process watching the cancel markers of the tasks it runs.

    (A thread per task cost a worker about 0.5 ms a task, more than a trivial task itself.)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.markers: dict[str, int] = {}  # marker -> tasks of this process running with it
        self.pid = 0

    def watch(self, marker: str) -> None:
        with self.lock:
            self.markers[marker] = self.markers.get(marker, 0) + 1
            if self.pid != os.getpid():  # first task of this process (or of a forked child)
                self.pid = os.getpid()
                threading.Thread(target=self._run, daemon=True, name="rx-task-watchdog").start()

    def unwatch(self, marker: str) -> None:
        with self.lock:
            n = self.markers.get(marker, 0) - 1
            if n > 0:
                self.markers[marker] = n
            else:
                self.markers.pop(marker, None)

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            with self.lock:
                markers = list(self.markers)
            if any(os.path.exists(m) for m in markers):
                _kill_tree()


_WATCHDOG = _Watchdog()


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


def run_pilot_task(
    spec_json: str,
    gpu_indices: list[int] | None = None,
    where: str = "",
    start_by: float | None = None,
    token: str = "",
) -> dict[str, Any]:
    """Run one attempt; return (and write) its outcome, naming ``where`` it ran.

    A queued dispatch (``token``) first checks that it may still start (:func:`why_not_start`);
    if not, it returns ``{"ok": False, "not_started": True, ...}`` and writes no outcome.
    """
    spec = RunSpec.from_json(spec_json)
    if token:
        why = why_not_start(spec.workdir, token, start_by)
        if why is not None:
            return {"ok": False, "not_started": True, "error": why, "result": None, "machine": where}
    spec = prepare(spec, gpu_indices or [])
    marker = cancel_marker(spec.workdir)
    _WATCHDOG.watch(marker)
    try:
        outcome = execute_json(spec.to_json())
    finally:
        _WATCHDOG.unwatch(marker)
    if where:
        outcome["machine"] = where
    return outcome
