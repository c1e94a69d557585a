"""Small asyncio helpers every service uses the same way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long a service may take to stop after SIGTERM/Ctrl-C before it is cancelled.
STOP_GRACE_S = 60.0


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], grace: float = STOP_GRACE_S) -> T:
    """Run ``main(stop)`` on a new event loop; SIGTERM or Ctrl-C sets ``stop``.

    Every tier process runs this way, so each shuts down the same way: the
    signal asks it to stop, and it finishes what it acknowledged before exiting.
    A service that cannot (its broker is gone, it is stuck starting) is
    cancelled ``grace`` seconds later, or at once on a second signal, so a
    stop request always ends the process.
    """

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(main(stop))

        def on_signal() -> None:
            if stop.is_set():
                log.warning("second stop signal: stopping now")
                task.cancel()
            stop.set()

        async def watchdog() -> None:
            await stop.wait()
            await asyncio.sleep(grace)
            log.error("still not stopped %.0f s after the stop signal: cancelling", grace)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        dog = asyncio.create_task(watchdog())
        try:
            return await task
        except asyncio.CancelledError:
            raise SystemExit("stopped without finishing its shutdown (see the log above)") from None
        finally:
            dog.cancel()

    return asyncio.run(runner())


async def unless_stopped(aw: Coroutine[Any, Any, object], stop: asyncio.Event) -> bool:
    """Run ``aw`` until it finishes (True, its error raised) or ``stop`` is set first (False, ``aw`` cancelled).

    For the waits a stop request must be able to cut short: a start-up that
    joins a consumer group, a wait for a crash.
    """
    work = asyncio.ensure_future(aw)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not work.done():
        await cancel_and_wait([work])
        return False
    work.result()
    return True


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel the tasks and wait until every one has finished (errors are swallowed: we are stopping)."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    for t in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
