"""A tier as a child process in tests, ready when the tier itself says so.

``python -m reflexarc <tier> run FILE`` is started the way ``reflexarc up``
starts it: with ``RX_READY_FILE`` set, so :meth:`TierProcess.start` returns
once the tier called :func:`reflexarc.process.notify_ready` (subscriptions
made, consumers joined) rather than after a guessed delay or a log line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from reflexarc.process import READY_ENV, ManagedProcess


class TierProcess:
    """One tier process with its log, a readiness wait, a clean stop and a crash."""

    def __init__(self, tier: str, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.ready_file = log.with_suffix(".ready")
        self.log = log
        full_env = {**os.environ, "RX_LOG_LEVEL": "INFO", **(env or {}), READY_ENV: str(self.ready_file)}
        self.proc = ManagedProcess(
            tier, [sys.executable, "-m", "reflexarc", tier, "run", str(config)], log, env=full_env
        )

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self.proc.pid

    def text(self) -> str:
        """The process's log so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, timeout: float = 60.0) -> None:
        """Start, and return when the tier reports ready (raise with its log if it dies first)."""
        self.ready_file.unlink(missing_ok=True)
        self.proc.start()
        await asyncio.to_thread(self.proc.wait_ready, self.ready_file.exists, timeout)

    def listening(self) -> list[str]:
        """Local TCP addresses the process listens on."""
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
        return [ln.split()[3] for ln in out.splitlines() if f"pid={self.pid}," in ln]

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM; the exit code (-9 if it had to be killed after ``grace`` seconds)."""
        return self.proc.stop(grace=grace)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.proc.kill()
