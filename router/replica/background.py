"""One shape for a replica's background work: a named task, started and stopped cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import orjson

from router.errors import StoreError
from router.state.store import Store


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


class Subscriber(Background):
    """Follows a pub/sub channel until stopped, subscribing again after every loss, with
    jittered backoff (0.1 s doubling to 5 s). Subclasses give ``_session`` (one subscription,
    until it fails with ``StoreError``) and may act on a loss (``lost``)."""

    what = "channel"
    """Named in the log line of a lost subscription."""
    logger = "router.background"
    """The logger of that line (each subclass its own module's)."""

    async def _session(self) -> None:
        """Subscribe and follow until the subscription fails (``StoreError``)."""
        raise NotImplementedError

    def lost(self) -> None:
        """A subscription was lost: messages may have been missed."""

    async def run(self) -> None:
        """Follow the channel until stopped, resubscribing after every loss."""
        delay = 0.1
        while True:
            try:
                await self._session()
            except StoreError as exc:
                logging.getLogger(self.logger).warning(
                    f"{self.what} subscription lost, retrying",
                    extra={"fields": {"error": str(exc), "retry_s": round(delay, 2)}},
                )
                self.lost()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)


class Followed(Subscriber):
    """A snapshot in Redis kept current through a pub/sub channel of versioned events.

    Subscribe first, then read the snapshot, so no change falls in between. Pub/sub delivers
    at most once, so the snapshot is read again on every reconnect, on any event newer than
    it, and every ``resync_s`` whatever came. Subclasses say where (``channel``), how to read
    (``resync``) and which version they hold (``version``)."""

    what = "snapshot"
    resync_s: float = 30.0

    @property
    def version(self) -> int:
        """The version of the snapshot held."""
        raise NotImplementedError

    @property
    def store(self) -> Store:
        """The store whose channel is followed."""
        raise NotImplementedError

    def channel(self) -> str:
        """The channel of the snapshot's events."""
        raise NotImplementedError

    async def resync(self) -> None:
        """Read the whole snapshot again (raises ``StoreError``)."""
        raise NotImplementedError

    def apply(self, data: bytes) -> bool:
        """Whether an event is newer than the snapshot (and so calls for a re-read)."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        version = event.get("version") if isinstance(event, dict) else None
        return isinstance(version, int) and version > self.version

    async def _session(self) -> None:
        sub = await self.store.subscribe(self.channel())
        try:
            await self.resync()  # after subscribing: nothing falls in between
            loop = asyncio.get_running_loop()
            last = loop.time()
            while True:
                data = await sub.next(within=min(1.0, self.resync_s))
                if (data is not None and self.apply(data)) or loop.time() - last >= self.resync_s:
                    await self.resync()
                    last = loop.time()
        finally:
            await sub.close()
