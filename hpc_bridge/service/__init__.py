"""The site agent's services: one loop a module, wired together by :mod:`reflexarc.hpc_bridge.agent`.

::

    rx.tasks.<site> ─▶ intake ─▶ job store ─▶ scheduler ─▶ runner (one attempt) ─▶ engine
                                  (jobs)          ▲                │
                                    │             └── watch ◀──────┘ (cancel requests)
                                    ▼
                                  outbox ─▶ rx.results, rx.jobs          machines (composed)

* :mod:`.jobs` — the job store as the loops use it: asynchronous, always open,
  operations of the same moment committed in one transaction;
* :mod:`.intake` — task requests from Kafka into the job store, offsets committed after;
* :mod:`.scheduler` — claims queued jobs while the engine has room and starts their attempts;
* :mod:`.runner` — one attempt of one task, from its run spec to its recorded outcome;
* :mod:`.outbox` — job states and results from the store to Kafka, in order, each once;
* :mod:`.watch` — stops the executions users asked to cancel;
* :mod:`.machines` — composed machines: opened, handed to tasks, expired when idle, stopped.
"""

from __future__ import annotations

import asyncio
import contextlib


async def nap(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 a cancel that
    races ``wait_for``'s own timeout can be swallowed, and a loop would never end.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
