"""A job's reply channel: its model actor and its worker's frames put replies, the
client's request handler takes them.

Unbounded: a reply never waits, so a client that stops reading cannot stall its
model's other jobs (a job's replies are bounded by the reply itself: ``max_tokens``
pieces, one clip of audio). Closing either end is how one side tells the other it is
done; the errors are anyio's, as for its memory streams.

NOTE: not an anyio memory object stream. Creating one per job and waiting on it (it
yields to the loop before every receive, and a waiting receive builds an event, a
receiver record and a task description) cost ~70 µs of CPU per job, a quarter of the
runtime's whole share of a request. One writer side and one reader need a deque and,
while the reader waits, an ``Arrival``.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

from llmux.actors.arrival import Arrival

__all__ = ["ReplyReceiver", "ReplySender", "reply_channel"]

T = TypeVar("T")


class _Channel(Generic[T]):
    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.arrival = Arrival()  # woken by a put and by a close of either end
        self.sender_closed = False
        self.receiver_closed = False


class ReplySender(Generic[T]):
    """The putting end (a ``Job``'s ``reply``)."""

    def __init__(self, channel: _Channel[T]) -> None:
        self._channel = channel

    def send_nowait(self, item: T) -> None:
        """Raises:
            anyio.BrokenResourceError: the receiver closed its end (the client left).
            anyio.ClosedResourceError: this end was closed.
        """
        channel = self._channel
        if channel.sender_closed:
            raise anyio.ClosedResourceError
        if channel.receiver_closed:
            raise anyio.BrokenResourceError
        channel.items.append(item)
        channel.arrival.wake()

    def close(self) -> None:
        """No more replies: the receiver sees the end after the ones already put."""
        self._channel.sender_closed = True
        self._channel.arrival.wake()


class ReplyReceiver(Generic[T]):
    """The taking end (a ``Ticket``'s); one task takes at a time."""

    def __init__(self, channel: _Channel[T]) -> None:
        self._channel = channel

    async def receive(self) -> T:
        """The next reply, waiting for one. Cancel-safe: a reply is taken or left.

        Raises:
            anyio.EndOfStream: the sender closed its end and every reply was taken.
            anyio.ClosedResourceError: this end was closed.
        """
        channel = self._channel
        while not channel.items:
            if channel.receiver_closed:
                raise anyio.ClosedResourceError
            if channel.sender_closed:
                raise anyio.EndOfStream
            await channel.arrival.wait()
        return channel.items.popleft()

    def close(self) -> None:
        """Take nothing more: replies not taken are dropped, and the sender's next put
        raises ``BrokenResourceError``."""
        self._channel.receiver_closed = True
        self._channel.items.clear()
        self._channel.arrival.wake()

    def __aiter__(self) -> ReplyReceiver[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


def reply_channel() -> tuple[ReplySender[T], ReplyReceiver[T]]:
    """A new channel's two ends."""
    channel: _Channel[T] = _Channel()
    return ReplySender(channel), ReplyReceiver(channel)
