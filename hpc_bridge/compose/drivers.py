"""Drivers turn a placed machine into something real, and back.

The composer owns placement, persistence, ownership and audit; a driver only
realises an already-placed machine and releases it. The interface is kept to
that narrow, data-only shape (a ``Machine`` in, a JSON-able ``dict`` out)
so that a DMTF Redfish CompositionService driver can be added later without
touching callers: its ``realise`` would POST a ComposedSystem built from the
machine's device ids (Redfish ResourceBlocks) and return the new system's
``@odata.id``; its ``release`` would DELETE that system. The composer stores
whatever ``realise`` returns and hands it back in ``machine.realisation``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from .model import Machine


class DriverError(RuntimeError):
    """The driver could not realise or release a machine."""


class Driver(ABC):
    """Realises composed machines. Implementations must be thread-safe."""

    #: Stored with each machine, so a machine is always released by the
    #: kind of driver that realised it.
    name: str = "driver"

    @abstractmethod
    def realise(self, machine: Machine) -> dict[str, Any]:
        """Make ``machine`` exist; return JSON-able data needed to release it."""

    @abstractmethod
    def release(self, machine: Machine) -> None:
        """Undo ``realise`` (idempotent: releasing twice is not an error)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this driver is and where it points (for ``show`` and logs)."""

    async def arealise(self, machine: Machine) -> dict[str, Any]:
        """``realise`` in a worker thread, so an event loop is never blocked."""
        return await asyncio.to_thread(self.realise, machine)

    async def arelease(self, machine: Machine) -> None:
        """``release`` in a worker thread, so an event loop is never blocked."""
        await asyncio.to_thread(self.release, machine)


class InventoryDriver(Driver):
    """Logical composition only: the pools file is the truth, nothing is called.

    Useful for planning, for sites whose fabric is wired by hand, and in tests.
    """

    name = "inventory"

    def realise(self, machine: Machine) -> dict[str, Any]:
        """Nothing to do; record the device ids for reference."""
        return {"devices": machine.device_ids}

    def release(self, machine: Machine) -> None:
        """Nothing to do."""

    def describe(self) -> dict[str, Any]:
        """Describe the driver."""
        return {"driver": self.name, "kind": "logical (pools file only)"}


# Pending reasons that never clear by waiting: give up at once instead of
# sitting out the start timeout.
_HOPELESS = {
    "PartitionConfig",
    "BadConstraints",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "InvalidAccount",
    "InvalidQOS",
    "JobHeldAdmin",
    "JobHeldUser",
}

# Job states after which a holder job no longer holds anything.
_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "SPECIAL_EXIT",
}


class SlurmDriver(Driver):
    """Realise a machine as a Slurm allocation holding its node's cores and GPUs.

    A holder batch job (``sleep infinity``) is submitted to the machine's
    compute node with ``--cpus-per-task``, ``--mem`` and ``--gres=gpu[:type]:N``
    and the driver waits until it runs: the allocation then exists and the
    owner can start work inside it with ``srun --jobid=JOB --overlap ...``.
    A holder job is used rather than ``scontrol create reservation`` because
    GRES in reservations needs accounting (slurmdbd) on Slurm 22.05, while a
    job's ``--gres`` works on any cluster. Release is ``scancel``.

    The compute device's ``node`` (or its id) must be the Slurm NodeName; GPU
    devices with a ``gres_type`` turn into typed GRES (``gpu:a100:2``).
    """

    name = "slurm"

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        partition: str | None = None,
        account: str | None = None,
        start_timeout_s: float = 30.0,
        release_timeout_s: float = 30.0,
        command_timeout_s: float = 30.0,
        job_name_prefix: str = "rx-compose",
    ) -> None:
        """Configure the driver.

        ``env`` is the environment for the Slurm commands (e.g. with
        ``SLURM_CONF``); by default the process environment.
        """
        self.env = dict(env) if env is not None else None
        self.partition = partition
        self.account = account
        self.start_timeout_s = start_timeout_s
        self.release_timeout_s = release_timeout_s
        self.command_timeout_s = command_timeout_s
        self.job_name_prefix = job_name_prefix

    # -- helpers ---------------------------------------------------------

    def _run(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm CLI command with this driver's environment."""
        try:
            proc = subprocess.run(
                list(args),
                env=self.env if self.env is not None else os.environ.copy(),
                capture_output=True,
                text=True,
                timeout=self.command_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DriverError(f"{shlex.join(args)}: {exc}") from exc
        if check and proc.returncode != 0:
            raise DriverError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> str | None:
        """The job's state (``RUNNING``, ``PENDING``...), None once Slurm forgot it."""
        return self._job_state_reason(job_id)[0]

    def _job_state_reason(self, job_id: str) -> tuple[str | None, str]:
        """(state, pending reason) of a job; (None, "") once Slurm forgot it."""
        proc = self._run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], check=False)
        line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not line:
            return None, ""
        state, _, reason = line.partition("|")
        return state.strip(), reason.strip()

    def check_node(self, node: str) -> None:
        """Fail early and clearly if the inventory names a node Slurm does not know.

        (sbatch accepts an unknown --nodelist and leaves the job pending forever.)
        """
        proc = self._run(["scontrol", "show", "node", "-o", node], check=False)
        if proc.returncode != 0 or f"NodeName={node} " not in proc.stdout + " ":
            detail = proc.stderr.strip() or proc.stdout.strip() or "not found"
            raise DriverError(f"slurm does not know node {node!r}: {detail}")

    @staticmethod
    def gres_for(machine: Machine) -> str | None:
        """The ``--gres`` value for the machine's GPUs (typed if all share a type)."""
        gpus = [d for d in machine.devices if d.kind == "gpu"]
        if not gpus:
            return None
        types = {g.gres_type for g in gpus}
        if len(types) == 1 and None not in types:
            return f"gpu:{types.pop()}:{len(gpus)}"
        return f"gpu:{len(gpus)}"

    def sbatch_args(self, machine: Machine) -> list[str]:
        """The full ``sbatch`` command line of the holder job."""
        node = machine.node
        if node is None:
            raise DriverError(f"machine {machine.id} has no compute node")
        args = [
            "sbatch",
            "--parsable",
            f"--job-name={self.job_name(machine)}",
            f"--nodelist={node.node_name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={machine.spec.cpus}",
            "--time=UNLIMITED",
            "--output=/dev/null",
            "--chdir=/",
            # The comment links the Slurm job back to the composer's records.
            f"--comment=reflexarc-compose machine={machine.id} owner={machine.owner}",
        ]
        if machine.spec.memory_gb:
            args.append(f"--mem={machine.spec.memory_gb * 1024}M")
        gres = self.gres_for(machine)
        if gres:
            args.append(f"--gres={gres}")
        if self.partition:
            args.append(f"--partition={self.partition}")
        if self.account:
            args.append(f"--account={self.account}")
        args += ["--wrap", "exec sleep infinity"]
        return args

    # -- Driver ----------------------------------------------------------

    def realise(self, machine: Machine) -> dict[str, Any]:
        """Submit the holder job and wait until it runs (the allocation exists)."""
        args = self.sbatch_args(machine)
        if machine.node is not None:
            self.check_node(machine.node.node_name)
        proc = self._run(args)
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise DriverError(f"sbatch printed no job id: {proc.stdout!r}")
        deadline = time.monotonic() + self.start_timeout_s
        state: str | None = "PENDING"
        reason = ""
        while time.monotonic() < deadline:
            state, reason = self._job_state_reason(job_id)
            if state == "RUNNING":
                node = machine.node
                return {
                    "job_id": job_id,
                    "node": node.node_name if node else None,
                    "gres": self.gres_for(machine),
                    "cpus": machine.spec.cpus,
                    "attach": f"srun --jobid={job_id} --overlap --pty bash",
                }
            if state is None or state in _ENDED or reason in _HOPELESS:
                break
            time.sleep(0.2)
        # Never leave a half-made allocation behind.
        self._run(["scancel", job_id], check=False)
        why = f"{state or 'gone'}, reason {reason}" if reason and reason != "None" else (state or "gone")
        if reason in _HOPELESS:
            raise DriverError(
                f"slurm cannot start holder job {job_id} for machine {machine.id} "
                f"({why}): the inventory asks for more than the Slurm node offers"
            )
        raise DriverError(
            f"slurm holder job {job_id} for machine {machine.id} did not start "
            f"within {self.start_timeout_s:.0f}s (last state: {why})"
        )

    def job_name(self, machine: Machine) -> str:
        """The holder job's name (how a machine's job is found when its id was never recorded)."""
        return f"{self.job_name_prefix}-{machine.name or machine.id}"

    def release(self, machine: Machine) -> None:
        """Cancel the holder job and wait until Slurm has let go of it."""
        job_ids = [str(machine.realisation.get("job_id") or "")]
        if not job_ids[0]:
            # A crash between sbatch and recording its id ("composing"): find the job by name.
            proc = self._run(["squeue", "-h", "-n", self.job_name(machine), "-o", "%i"], check=False)
            job_ids = proc.stdout.split()
            if not job_ids:
                return  # never submitted: nothing to release
        self._run(["scancel", *job_ids], check=False)
        deadline = time.monotonic() + self.release_timeout_s
        state: str | None = None
        for job_id in job_ids:
            while time.monotonic() < deadline:
                state = self.job_state(job_id)
                # COMPLETING still holds the node's resources, so keep waiting.
                if state is None or state in _ENDED:
                    break
                time.sleep(0.2)
            else:
                raise DriverError(f"slurm job {job_id} still {state} after scancel")

    def describe(self) -> dict[str, Any]:
        """Driver name and the Slurm config it uses."""
        env = self.env if self.env is not None else os.environ
        return {
            "driver": self.name,
            "slurm_conf": env.get("SLURM_CONF", "(default)"),
            "partition": self.partition or "(default)",
        }
