"""The actors' two channels: a model actor's mailbox and a job's reply channel
(llmux/actors/mailbox.py, llmux/actors/replies.py), which stand in for anyio's memory
object streams on the per-request path and keep their errors."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.actors.mailbox import Mailbox
from llmux.actors.replies import reply_channel

pytestmark = pytest.mark.anyio


# -- Mailbox -----------------------------------------------------------------------------


@given(st.lists(st.integers(), max_size=20), st.integers(min_value=1, max_value=10))
def test_a_mailbox_keeps_order_and_refuses_past_its_size(messages: list[int], size: int) -> None:
    mailbox = Mailbox[int](size)
    accepted = []
    for message in messages:
        try:
            mailbox.put(message)
            accepted.append(message)
        except anyio.WouldBlock:
            assert len(mailbox) == size
    assert accepted == messages[:size]
    assert [mailbox.take_nowait() for _ in range(len(mailbox))] == accepted
    with pytest.raises(anyio.WouldBlock):
        mailbox.take_nowait()


def test_an_unbounded_put_goes_past_the_size_that_bounds_the_others() -> None:
    mailbox = Mailbox[int](2)
    mailbox.put(1)
    mailbox.put(2)
    with pytest.raises(anyio.WouldBlock):
        mailbox.put(3)
    mailbox.put(4, bounded=False)  # an actor's own fact, never refused
    with pytest.raises(anyio.WouldBlock):
        mailbox.put(5)
    assert [mailbox.take_nowait() for _ in range(len(mailbox))] == [1, 2, 4]


async def test_a_waiting_take_wakes_on_a_put_and_a_cancelled_one_loses_nothing() -> None:
    mailbox = Mailbox[str](4)
    with anyio.move_on_after(0.05):
        await mailbox.take()
        pytest.fail("took from an empty mailbox")
    got: list[str] = []
    async with anyio.create_task_group() as tg:
        async def take() -> None:
            got.append(await mailbox.take())
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        mailbox.put("first")
    mailbox.put("second")
    assert got == ["first"] and await mailbox.take() == "second"


def test_a_closed_mailbox_refuses_messages() -> None:
    mailbox = Mailbox[int](4)
    mailbox.put(1)
    mailbox.close()
    assert len(mailbox) == 0
    with pytest.raises(anyio.ClosedResourceError):
        mailbox.put(2)


# -- reply channel ---------------------------------------------------------------------------


@given(st.lists(st.text(max_size=3), max_size=30))
async def test_replies_arrive_in_order_then_the_end(replies: list[str]) -> None:
    send, receive = reply_channel()
    for reply in replies:
        send.send_nowait(reply)
    send.close()
    assert [reply async for reply in receive] == replies
    with pytest.raises(anyio.EndOfStream):
        await receive.receive()


async def test_a_waiting_receive_wakes_on_a_reply_and_on_the_end() -> None:
    send, receive = reply_channel()
    got: list[object] = []
    async with anyio.create_task_group() as tg:
        async def drain() -> None:
            got.extend([reply async for reply in receive])
        tg.start_soon(drain)
        await anyio.wait_all_tasks_blocked()
        send.send_nowait("one")
        await anyio.wait_all_tasks_blocked()
        assert got == []  # still waiting for the end
        send.send_nowait("two")
        send.close()
    assert got == ["one", "two"]


async def test_a_cancelled_receive_loses_no_reply() -> None:
    send, receive = reply_channel()
    with anyio.move_on_after(0.05):
        await receive.receive()
    send.send_nowait("kept")
    assert await receive.receive() == "kept"


async def test_a_closed_receiver_breaks_the_sender_and_wakes_its_own_wait() -> None:
    send, receive = reply_channel()
    send.send_nowait("taken")
    async with anyio.create_task_group() as tg:
        async def wait() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await receive.receive()
                await receive.receive()
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()  # took "taken", waits for the next
        receive.close()
    with pytest.raises(anyio.BrokenResourceError):
        send.send_nowait("late")


async def test_a_closed_sender_refuses_more_replies() -> None:
    send, receive = reply_channel()
    send.close()
    with pytest.raises(anyio.ClosedResourceError):
        send.send_nowait("late")
    with pytest.raises(anyio.EndOfStream):
        await receive.receive()
