"""A real single-node Slurm cluster for tests, from the Debian packages.

    from reflexarc.testing.slurm import SlurmCluster

    with SlurmCluster(tmp_path / "slurm", gres={"gpu:a100": 4}) as slurm:
        out = slurm.run("sbatch", "--parsable", "--wrap", "true").stdout
        subprocess.run(["squeue"], env=slurm.env)   # or pass slurm.env yourself

What it does: writes ``slurm.conf`` (and ``gres.conf`` when GRES are asked
for) into a private directory, picks free loopback ports, starts
``slurmctld -D`` and ``slurmd -D`` as child processes (foreground, so they
are ours to wait for: no daemonised orphans), and waits until ``sinfo``
reports the node idle. ``stop()`` cancels every job, terminates both daemons
by PID and kills any job process left behind.

No munge is needed (``AuthType=auth/none``) and the node may declare more
CPUs than the machine has (``SlurmdParameters=config_overrides``). Several
clusters can run at once (separate directories and ports). Requires root,
like the Debian daemons do with ``SlurmUser=root``.

GPUs without GPUs: Slurm's gpu plugin drops a GPU that has no ``File=`` and
rejects a File that is not a device node, so each fake GPU is a symlink to
``/dev/null`` in the cluster directory (``File=DIR/dev/gpu[0-3]``). Jobs can
then request ``--gres=gpu:2`` or ``--gres=gpu:a100:2`` and ``scontrol -d show
node`` reports ``GresUsed``. Other GRES names use the ``Count=`` form.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["SlurmCluster", "SlurmError", "free_port"]


class SlurmError(RuntimeError):
    """The cluster did not start (the message carries the daemon log tails)."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    """Last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """One slurmctld + one slurmd on loopback, in a private directory.

    Parameters: ``workdir`` (default: a new temporary directory, removed by
    ``stop``), ``cpus``/``memory_mb`` of the node, ``gres`` as
    ``{"gpu": 4}`` or ``{"gpu:a100": 4}`` (name[:type] -> count),
    ``node_name``, ``partition``, ``extra_config`` (lines appended to
    slurm.conf) and ``start_timeout_s``.

    Attributes after ``start()``: ``env`` (environment with ``SLURM_CONF``
    for subprocesses), ``conf_path``, ``workdir``, ``node_name``,
    ``partition``.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        cpus: int = 8,
        memory_mb: int = 20000,
        gres: Mapping[str, int] | None = None,
        node_name: str = "localhost",
        partition: str = "debug",
        extra_config: str = "",
        start_timeout_s: float = 30.0,
    ) -> None:
        """Describe the cluster; nothing starts before ``start()``."""
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rx-slurm-"))
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.gres = dict(gres or {})
        self.node_name = node_name
        self.partition = partition
        self.extra_config = extra_config
        self.start_timeout_s = start_timeout_s
        # slurmd creates Unix sockets for job steps in its spool directory, and a
        # socket path may be at most 108 bytes: under a deep temporary directory
        # (pytest's tmp_path grows with the run counter and the test's name) job
        # launches fail with "launch failed requeued held". Keep it short.
        self.spool_dir = Path(tempfile.mkdtemp(prefix="rxs-", dir="/tmp"))
        self.conf_path = self.workdir / "slurm.conf"
        self.env: dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf_path)}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    # -- configuration -----------------------------------------------------

    def _gres_lines(self) -> tuple[str, list[str]]:
        """(``Gres=`` value for the node, gres.conf lines)."""
        node_gres: list[str] = []
        conf = ["AutoDetect=off"]
        for i, (key, count) in enumerate(sorted(self.gres.items())):
            name, _, gtype = key.partition(":")
            node_gres.append(f"{key}:{count}")
            type_part = f" Type={gtype}" if gtype else ""
            if name == "gpu":
                dev = self.workdir / "dev"
                dev.mkdir(exist_ok=True)
                for n in range(count):
                    link = dev / f"{name}{i}_{n}"
                    if not link.exists():
                        link.symlink_to("/dev/null")
                files = f"{dev}/{name}{i}_[0-{count - 1}]" if count > 1 else f"{dev}/{name}{i}_0"
                conf.append(f"NodeName={self.node_name} Name={name}{type_part} File={files}")
            else:
                conf.append(f"NodeName={self.node_name} Name={name}{type_part} Count={count}")
        return ",".join(node_gres), conf

    def write_config(self, ctld_port: int, slurmd_port: int) -> None:
        """Write slurm.conf (+ gres.conf) for the given ports."""
        d = self.workdir
        for sub in ("state", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (self.spool_dir / self.node_name).mkdir(parents=True, exist_ok=True)
        node_gres, gres_conf = self._gres_lines()
        gres_types = sorted({k.partition(":")[0] for k in self.gres})
        lines = [
            # The cluster name only has to be unique per state directory.
            "ClusterName=rx",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # No munge on test machines: no authentication at all (loopback only).
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={self.spool_dir}/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "DefMemPerCPU=1024",
            "MailProg=/bin/true",
            # AccountingStorageTRES=gres/gpu would need slurmdbd: leave it out.
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/jobcomp.txt",
            # Schedule at once instead of every few seconds: tests stay fast.
            "SchedulerParameters=sched_interval=1,sched_min_interval=0,batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
        ]
        if gres_types:
            lines.append(f"GresTypes={','.join(gres_types)}")
        gres_part = f" Gres={node_gres}" if node_gres else ""
        lines += [
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb}{gres_part} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        self.conf_path.write_text("\n".join(lines) + "\n")
        gres_path = d / "gres.conf"
        if self.gres:
            gres_path.write_text("\n".join(gres_conf) + "\n")
        elif gres_path.exists():
            gres_path.unlink()

    # -- lifecycle ---------------------------------------------------------

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """Start a daemon in the foreground, output to a log file."""
        log = open(self.workdir / "log" / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run must not skip our clean stop
        )
        self._procs.append(proc)
        return proc

    def start(self) -> SlurmCluster:
        """Write the config, start both daemons, wait until the node is idle."""
        last_error: SlurmError | None = None
        # A port picked as free can be taken before the daemon binds it: retry.
        for _attempt in range(3):
            self.write_config(free_port(), free_port())
            try:
                self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out")
                self._spawn(["slurmd", "-D", "-N", self.node_name], "slurmd.out")
                self._wait_idle()
                return self
            except SlurmError as exc:
                last_error = exc
                self._stop_daemons()
        if self._own_dir:
            # Keep the logs in the exception, not on disk: nobody calls stop().
            shutil.rmtree(self.workdir, ignore_errors=True)
        assert last_error is not None
        raise last_error

    def _wait_idle(self) -> None:
        """Poll ``sinfo`` until the node is idle (or a daemon died / time ran out)."""
        deadline = time.monotonic() + self.start_timeout_s
        state = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    argv0 = (
                        proc.args[0] if isinstance(proc.args, list) else "a daemon"
                    )  # each started with an argv list
                    raise SlurmError(f"{argv0} exited with {proc.returncode}\n" + self._log_tails())
            out = self.run("sinfo", "-h", "-n", self.node_name, "-o", "%T", check=False)
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmError(
            f"node {self.node_name} not idle after {self.start_timeout_s}s (state {state!r})\n" + self._log_tails()
        )

    def _log_tails(self) -> str:
        """Recent daemon log lines, for error messages."""
        log = self.workdir / "log"
        return "\n".join(
            f"--- {name}\n{_tail(log / name)}"
            for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out")
        )

    @property
    def pids(self) -> list[int]:
        """PIDs of the running daemons (slurmctld, slurmd)."""
        return [p.pid for p in self._procs if p.poll() is None]

    def run(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command (``sbatch``, ``squeue``...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_ids(self) -> list[str]:
        """Ids of the jobs Slurm currently knows (any state)."""
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        return out.stdout.split() if out.returncode == 0 else []

    def cancel_all(self, timeout_s: float = 15.0) -> None:
        """Cancel every job and wait until squeue is empty."""
        ids = self.job_ids()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout_s
        while self.job_ids() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _stop_daemons(self) -> None:
        """SIGTERM both daemons by PID (slurmd first), SIGKILL if they linger."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _kill_leftover_job_processes(self) -> None:
        """Kill slurmstepd/job processes of THIS cluster that outlived their job.

        slurmstepd detaches from slurmd, so a job still running when slurmd
        stops would survive it. They are recognised by our SLURM_CONF in their
        environment (inherited from slurmd or the submitting command).
        """
        marker = f"SLURM_CONF={self.conf_path}".encode()
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            is_job = any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
            if marker in environ and (comm == "slurmstepd" or is_job):
                with contextlib.suppress(OSError):  # it may have exited meanwhile
                    os.kill(int(entry.name), signal.SIGKILL)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, clean up. Safe to call twice."""
        if any(p.poll() is None for p in self._procs):
            self.cancel_all()
        self._stop_daemons()
        self._kill_leftover_job_processes()
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        """Start the cluster."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the cluster."""
        self.stop()
