"""run_service: a stop signal always ends the process, even when the service cannot stop by itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

# A service that never looks at its stop event (as one stuck connecting to a dead broker).
STUCK = """
import asyncio, sys
from reflexarc.aio import run_service

async def main(stop):
    print("up", flush=True)
    await asyncio.sleep(3600)

run_service(main, grace=float(sys.argv[1]))
"""

# A service that stops cleanly when asked.
POLITE = """
import asyncio
from reflexarc.aio import run_service

async def main(stop):
    print("up", flush=True)
    await stop.wait()
    print("bye", flush=True)
    return 0

run_service(main)
"""


def _start(code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def test_polite_service_stops_on_sigterm_with_exit_code_0() -> None:
    proc = _start(POLITE)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "bye" in out


def test_stuck_service_is_cancelled_after_the_grace_period() -> None:
    proc = _start(STUCK, "0.5")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 5
    assert "still not stopped" in err and "stopped without finishing its shutdown" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_a_stuck_service_at_once(sig: signal.Signals) -> None:
    proc = _start(STUCK, "600")
    proc.send_signal(sig)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "second stop signal" in err


async def test_unless_stopped_returns_true_when_the_work_finishes_and_raises_its_error() -> None:
    import asyncio

    from reflexarc.aio import unless_stopped

    stop = asyncio.Event()
    assert await unless_stopped(asyncio.sleep(0.01), stop) is True

    async def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await unless_stopped(fails(), stop)


async def test_unless_stopped_cancels_the_work_when_stop_comes_first() -> None:
    import asyncio

    from reflexarc.aio import unless_stopped

    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await unless_stopped(forever(), stop) is False
    assert cancelled.is_set()
