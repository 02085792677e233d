"""An actor's mailbox: a bounded queue that many tasks put to without waiting and one
task, the actor's, takes from.

NOTE: not anyio's memory object stream, which serves any number of senders and
receivers: its ``receive`` always yields to the event loop first, and one that waits
builds an event, a receiver record and a task description. That was most of what an
actor's message cost (two to four messages per request). One receiver needs a deque
and, while it waits, an ``Arrival``.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

from llmux.actors.arrival import Arrival

__all__ = ["Mailbox"]

M = TypeVar("M")


class Mailbox(Generic[M]):
    """Messages in the order they were put; ``take`` by one task at a time.

    ``size`` bounds what clients put, not the actor's own facts: those are few per
    event, and a lost one (a worker ready, a job finished) would strand the model."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._messages: deque[M] = deque()
        self._arrival = Arrival()
        self._closed = False

    def put(self, message: M, *, bounded: bool = True) -> None:
        """Raises:
            anyio.WouldBlock: ``bounded``, and the mailbox holds ``size`` messages.
            anyio.ClosedResourceError: the actor stopped taking messages.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if bounded and len(self._messages) >= self._size:
            raise anyio.WouldBlock
        self._messages.append(message)
        self._arrival.wake()

    def take_nowait(self) -> M:
        """Raises:
            anyio.WouldBlock: the mailbox is empty.
        """
        if not self._messages:
            raise anyio.WouldBlock
        return self._messages.popleft()

    async def take(self) -> M:
        """The next message, waiting for one. Cancel-safe: a message is taken or left."""
        while not self._messages:
            await self._arrival.wait()
        return self._messages.popleft()

    def close(self) -> None:
        """Refuse messages from now on; those not taken are dropped."""
        self._closed = True
        self._messages.clear()

    def __len__(self) -> int:
        return len(self._messages)
