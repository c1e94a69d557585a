"""Child processes that never outlive their parent: brokers and tier processes.

Every process reflexarc starts gets ``PR_SET_PDEATHSIG`` (Linux), so a
``kill -9`` of the supervisor does not leave brokers or tiers behind, and is
stopped by PID with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive the process that started them."""
    # Runs in the child between fork and exec; ask the kernel to SIGTERM us
    # when the parent thread dies.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ProcessError(RuntimeError):
    """A managed process failed to start or become ready."""


class ManagedProcess:
    """One child process with a log file, a readiness check and a clean stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running child, if any."""
        return self.proc.pid if self.proc else None

    def start(self) -> ManagedProcess:
        """Start the child; output goes to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        return self

    def running(self) -> bool:
        """True while the child has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll ``check`` until it is true; raise with the log's tail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ProcessError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if check():
                return
            time.sleep(0.05)
        raise ProcessError(f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        """Send a signal (SIGSTOP/SIGCONT to pause and resume, SIGKILL to crash it)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # A paused process cannot handle SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap: a crash, for tests of what survives one."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


READY_ENV = "RX_READY_FILE"


def freeze_startup_heap() -> None:
    """Leave everything alive after start-up out of later garbage collections, and collect less often.

    A service's long-lived objects (imported modules, pydantic models,
    clients) are a few hundred thousand containers, and CPython rescans all
    of them at every full collection, which in-flight messages trigger
    every thousand or so messages. In the fog bridge that cost about 10 µs
    of CPU per message, a fifth of its work (timed with ``gc.callbacks``:
    five full collections of ~45 ms per 20,000 messages). After
    ``gc.freeze()`` only what was made since is scanned. Garbage made during
    start-up is collected first, and objects made later are collected as
    before.

    The middle generation is then collected every 100 young collections
    instead of every 10: what reaches it is mostly messages in flight, alive
    until the next hop acknowledges them, so scanning it often finds little
    to free (GC time in the fog bridge: 6.0 -> 3.6-4.6 µs per message).
    Reference cycles are still freed, later.
    Safe to call more than once.
    """
    gc.collect()
    gc.freeze()
    young, _middle, old = gc.get_threshold()
    gc.set_threshold(young, 100, old)


def notify_ready(detail: str = "") -> None:
    """Tell the supervisor this tier is up (its subscriptions exist, its consumers joined).

    ``reflexarc up`` starts tiers in order and waits for each to be ready
    before starting the next: MQTT drops a message nobody is subscribed to
    yet, so a device must not publish before the fog bridge has subscribed.
    Telling the supervisor is a no-op when the process was not started by
    one; start-up is over either way, so the start-up heap is frozen
    (:func:`freeze_startup_heap`).
    """
    freeze_startup_heap()
    path = os.environ.get(READY_ENV)
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(f"{os.getpid()} {detail}\n")
    tmp.replace(path)
