"""What Slurm says about allocation jobs: state, wall time left, nodes; and ``scancel`` by id.

The allocation manager asks in one ``squeue`` call for all its jobs (the
user's own jobs, filtered here, so that an id Slurm has already forgotten is
not an error), and reads the partition's ``MaxTime`` to refuse a wall time the
partition would reject. All calls are asynchronous subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reflexarc.hpc_bridge.engines.base import EngineError

_FIELDS = "%i|%j|%T|%L|%D|%N|%r"
_TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?$")


def parse_slurm_time(text: str) -> float | None:
    """Seconds in a Slurm duration (``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``); ``None`` if unlimited/unset."""
    text = text.strip()
    if text.upper() in ("", "UNLIMITED", "INFINITE", "NOT_SET", "INVALID", "N/A", "NONE"):
        return None
    m = _TIME_RE.match(text)
    if not m:
        return None
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if "-" in text and len(parts) == 1:  # D-HH
        parts = [parts[0], 0, 0]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return float(((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


@dataclass(frozen=True)
class QueueEntry:
    """One job as ``squeue`` shows it."""

    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    time_left_s: float | None
    nodes: int
    node_list: str
    reason: str

    @property
    def running(self) -> bool:
        """Slurm has started it (its nodes are allocated)."""
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING")


class SlurmQueue:
    """``squeue``/``scancel``/``scontrol`` with the site's Slurm environment (e.g. ``SLURM_CONF``)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        self.env = {**os.environ, **(env or {})}
        self.timeout_s = timeout_s

    async def _run(self, *argv: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise EngineError(f"cannot run {argv[0]}: {exc} (is slurm-client installed?)") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise EngineError(f"{' '.join(argv[:2])} did not answer in {self.timeout_s:g}s") from None
        if proc.returncode != 0:
            raise EngineError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {err.decode().strip()}")
        return out.decode(errors="replace")

    async def entries(self) -> list[QueueEntry]:
        """Every job of this user that Slurm still lists."""
        out = await self._run("squeue", "-h", "--me", "-o", _FIELDS)
        entries = []
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 7:
                continue
            job_id, name, state, left, nodes, node_list, reason = parts
            entries.append(
                QueueEntry(
                    job_id=job_id.strip(),
                    name=name.strip(),
                    state=state.strip(),
                    time_left_s=parse_slurm_time(left),
                    nodes=int(nodes) if nodes.strip().isdigit() else 0,
                    node_list=node_list.strip(),
                    reason=reason.strip(),
                )
            )
        return entries

    async def jobs(self, job_ids: Iterable[str]) -> dict[str, QueueEntry]:
        """The entries of ``job_ids`` still in the queue (a job missing here has ended)."""
        wanted = set(job_ids)
        if not wanted:
            return {}
        return {e.job_id: e for e in await self.entries() if e.job_id in wanted}

    async def named(self, marker: str) -> list[QueueEntry]:
        """Jobs whose name contains ``marker`` (the allocation-name prefix of one site)."""
        return [e for e in await self.entries() if marker in e.name]

    async def cancel(self, job_ids: Iterable[str]) -> None:
        """``scancel`` the jobs (ids Slurm no longer knows are ignored)."""
        ids = sorted(set(job_ids))
        if ids:
            # scancel exits non-zero when one id is unknown, after cancelling the others.
            try:
                await self._run("scancel", *ids)
            except EngineError as exc:
                if "Invalid job id" not in str(exc):
                    raise

    async def partition_max_time(self, partition: str | None) -> tuple[str, float | None]:
        """``(partition, MaxTime in s or None)``; the default partition when ``partition`` is ``None``."""
        out = await self._run("scontrol", "show", "partition", "-o", *([partition] if partition else []))
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            name = fields.get("PartitionName", "")
            if partition is None and fields.get("Default") != "YES":
                continue
            return name, parse_slurm_time(fields.get("MaxTime", "UNLIMITED"))
        raise EngineError(f"Slurm has no partition {partition!r}" if partition else "Slurm has no default partition")
