"""One shape for a replica's background work: a named task, started and stopped cleanly."""

from __future__ import annotations

import asyncio
import contextlib


class Background:
    """Runs ``run()`` as a named task from ``start()`` until ``stop()`` cancels it."""

    name = "background"
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """The work; runs until cancelled."""
        raise NotImplementedError

    def start(self) -> None:
        """Start ``run()`` in the background."""
        self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the task and wait for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
