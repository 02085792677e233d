"""One task waiting for the next change another makes: the reader of an actor's mailbox
or of a job's reply channel waits for the next put, and of a request's ``receive``
channel (llmux.http.disconnect) for the other reader's read to end.

NOTE: a future of the running asyncio loop, not an anyio ``Event`` (llmux runs on
asyncio: Hypercorn does). The event wraps such a future and cost ~15 % more of the
runtime's CPU per request, whose every message passes here.
"""

from __future__ import annotations

import asyncio

__all__ = ["Arrival"]


class Arrival:
    """``wait`` until the next ``wake``; a wake with nobody waiting is a no-op (the
    reader checks its queue before it waits)."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        """Cancel-safe: a cancelled wait leaves nothing behind for the next one."""
        self._future = asyncio.get_running_loop().create_future()
        await self._future
