"""The watch: stops the executions users asked to cancel (``reflexarc jobs cancel``, another process).

The CLI cancels a job that has not been dispatched at once; a dispatched one
it only marks (``cancel_requested``), and this loop, checking every
``interval_s``, stops its execution: the attempt then ends ``cancelled``
with the user's reason and no retry.
"""

from __future__ import annotations

import asyncio
import logging

from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.runner import Runner

log = logging.getLogger(__name__)

#: The reason an attempt cancelled through the CLI ends with.
CANCELLED_BY_USER = "cancelled by user (reflexarc jobs cancel)"


class CancelWatch:
    """Acts on cancel requests in the job store (one service loop: :meth:`run`)."""

    def __init__(self, jobs: AsyncJobStore, runner: Runner, interval_s: float = 1.0) -> None:
        self.jobs = jobs
        self.runner = runner
        self.interval_s = interval_s

    async def run(self) -> None:
        """Check until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            for task_id in await self.jobs.cancel_requests():
                if self.runner.has(task_id) and not self.runner.cancelling(task_id):
                    log.info("task %s: cancelling on request", task_id)
                    await self.runner.cancel(task_id, CANCELLED_BY_USER)
