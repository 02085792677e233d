"""``max_concurrency``: up to N requests of one model run at once in its one worker.

From the inside out: the actor's running-jobs bookkeeping (pure), a real worker whose
concurrent backend serves several Infers side by side, and a live server whose fake
model (``max_concurrency: 4``, replies of ~1 s) streams four replies together, queues a
fifth, stops only the request whose client left, fails all four clearly when its
worker is killed, and drains all of them before an eviction unloads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import attrs
import httpx
import pytest

from llmux.actors.messages import Job
from llmux.actors.replies import reply_channel
from llmux.actors.running import RunningJobs
from llmux.config import parse_config
from llmux.runtime import Runtime
from llmux.workers.handle import WorkerHandle
from llmux.workers.protocol import Cancel, Chunk, Done, Frame, Infer, Load, Loaded, LoadFailed
from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until

RATE = 10  # tokens/s: a reply of "echo: " + 9 words takes ~1 s
WORDS = 9
CLIENT_TIMEOUT_S = 30.0


# -- RunningJobs, the actor's bookkeeping ------------------------------------------------


def job(job_id: int, deadline: float = 100.0, cancelled: bool = False) -> Job:
    send, receive = reply_channel()
    receive.close()
    return Job(id=job_id, op="chat", payload={}, deadline=deadline, reply=send,
               enqueued_at=0.0, cancelled=cancelled)


def test_running_jobs_hold_at_most_the_limit_by_id() -> None:
    running = RunningJobs(2, cancel_grace_s=5.0)
    first, second = job(1), job(2)
    running.add(first)
    running.add(second)
    assert not running.has_room and len(running) == 2
    with pytest.raises(AssertionError, match=r"^cannot start job 3: 2 running already$"):
        running.add(job(3))
    assert running.get(2) is second and running.get(None) is None and running.get(9) is None
    assert running.get([2]) is None  # a frame's id may be anything, unhashable too
    assert running.pop(1) is first and running.pop(1) is None
    assert running.has_room and list(running) == [second]
    assert running.clear() == [second] and len(running) == 0


def test_a_job_cannot_run_twice() -> None:
    running = RunningJobs(3, cancel_grace_s=5.0)
    running.add(job(1))
    with pytest.raises(AssertionError, match=r"^job 1 is running already$"):
        running.add(job(1))


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^limit must be at least 1, got 0$"):
        RunningJobs(0, cancel_grace_s=5.0)


def test_deadlines_apply_per_job_with_grace_for_a_cancelled_one() -> None:
    running = RunningJobs(3, cancel_grace_s=5.0)
    late, cancelled, early = job(1, 10.0), job(2, 8.0, cancelled=True), job(3, 20.0)
    for each in (late, cancelled, early):
        running.add(each)
    assert running.next_deadline() == 10.0  # the cancelled one has until 8 + 5
    assert running.expired(10.0) == [late] and running.stuck(10.0) == []
    assert running.stuck(13.0) == [cancelled]
    assert running.stuck(15.0) == [cancelled]  # late is overdue, but not cancelled yet
    assert RunningJobs(1, cancel_grace_s=5.0).next_deadline() == float("inf")


# -- a real worker -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def loaded_worker(max_concurrency: int, **options: Any) -> AsyncIterator[WorkerHandle]:
    handle = await WorkerHandle.spawn(python=sys.executable, model_id="fake-n")
    try:
        await handle.send(Load({"model_id": "fake-n", "type": "llm", "backend": "fake",
                                "model_path": None, "files": {}, "device": "cpu",
                                "options": options, "max_concurrency": max_concurrency}))
        with anyio.fail_after(10):
            while not isinstance(frame := await handle.receive(), Loaded | LoadFailed):
                pass
        assert isinstance(frame, Loaded), frame
        yield handle
    finally:
        await handle.stop(grace_s=1.0)


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def frames_until_done(handle: WorkerHandle, count: int) -> list[Frame]:
    """Every frame until ``count`` requests are Done."""
    frames: list[Frame] = []
    with anyio.fail_after(10):
        while sum(isinstance(f, Done) for f in frames) < count:
            frames.append(await handle.receive())
    return frames


@pytest.mark.anyio
async def test_a_concurrent_backend_serves_its_requests_side_by_side() -> None:
    async with loaded_worker(3, tokens_per_s=50) as handle:
        for request_id in (1, 2, 3):
            await handle.send(Infer(request_id, "chat", chat(f"r{request_id} a b c")))
        frames = await frames_until_done(handle, 3)
    first_done = next(i for i, f in enumerate(frames) if isinstance(f, Done))
    # each request had streamed before any of them finished
    assert {f.id for f in frames[:first_done] if isinstance(f, Chunk)} == {1, 2, 3}
    for request_id in (1, 2, 3):
        text = "".join(f.data["text"] for f in frames
                       if isinstance(f, Chunk) and f.id == request_id)
        assert text == f"echo: r{request_id} a b c"


@pytest.mark.anyio
async def test_a_cancel_stops_only_its_own_request() -> None:
    async with loaded_worker(2, tokens_per_s=50, reply="word " * 20) as handle:
        await handle.send(Infer(1, "chat", chat("one")))
        await handle.send(Infer(2, "chat", chat("two")))
        await handle.send(Cancel(1))
        frames = await frames_until_done(handle, 2)
    done = {f.id: f.data["finish_reason"] for f in frames if isinstance(f, Done)}
    assert done == {1: "cancelled", 2: "stop"}


@pytest.mark.anyio
async def test_unload_cancels_every_running_request_and_exits_at_once() -> None:
    async with loaded_worker(2, tokens_per_s=20, reply="word " * 400) as handle:
        await handle.send(Infer(1, "chat", chat("one")))
        await handle.send(Infer(2, "chat", chat("two")))
        with anyio.fail_after(5):
            seen: set[int] = set()
            while seen != {1, 2}:
                frame = await handle.receive()
                if isinstance(frame, Chunk):
                    seen.add(frame.id)
        started = time.monotonic()
        assert await handle.stop(grace_s=5.0) == 0  # exited by itself, not signalled
        assert time.monotonic() - started < 2.0


# -- a live server -----------------------------------------------------------------------


@attrs.define
class Streamed:
    """What one streaming client saw, with the times of its first token and its end."""

    prompt: str
    status: int = 0
    text: str = ""
    done: bool = False
    error: dict[str, Any] | None = None
    first_at: float | None = None
    ended_at: float | None = None


def stream(server: Server, model: str, prompt: str, *, leave_after_first: bool = False,
           first: threading.Event | None = None) -> Streamed:
    """One streamed chat; ``leave_after_first``: disconnect after the first token."""
    seen = Streamed(prompt)
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=CLIENT_TIMEOUT_S) as response:
        seen.status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                seen.done = seen.done or line == "data: [DONE]"
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                seen.error = event
                continue
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and seen.first_at is None:
                    seen.first_at = time.monotonic()
                    if first is not None:
                        first.set()
                seen.text += piece
            if leave_after_first and seen.first_at is not None:
                break
    seen.ended_at = time.monotonic()
    return seen


def prompt(marker: str, words: int = WORDS) -> str:
    """A prompt of ``words`` words, echoed back in ``words + 1`` tokens."""
    return f"{marker} " + " ".join(f"w{i}" for i in range(words - 1))


@contextlib.contextmanager
def clients(count: int) -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        yield pool


def results(futures: list[Future[Streamed]]) -> list[Streamed]:
    return [future.result(timeout=CLIENT_TIMEOUT_S + 5) for future in futures]


def moves_of(server: Server, model: str) -> list[tuple[str, str, str]]:
    """``model``'s transitions so far: (from, to, reason)."""
    return [(e["from_state"], e["to_state"], e["reason"]) for e in server.state()["events"]
            if e["kind"] == "transition" and e["model"] == model]


def four(**options: Any) -> dict[str, Any]:
    """A config with the fake model ``m``: four at once, replies of ~1 s."""
    return fake_config(m=fake_model(tokens_per_s=RATE, **options) | {"max_concurrency": 4})


def test_four_requests_stream_together_each_with_its_own_reply(start_server: Any) -> None:
    server: Server = start_server(four())
    with clients(4) as pool:
        futures = [pool.submit(stream, server, "m", prompt(f"p{i}")) for i in range(4)]
        wait_until(lambda: server.model("m")["in_flight"] == 4, 10, "four requests in flight")
        assert server.model("m")["state"] == "busy"
        streams = results(futures)
    assert all(s.status == 200 and s.done and s.error is None for s in streams), streams
    assert [s.text for s in streams] == [f"echo: {prompt(f'p{i}')}" for i in range(4)]
    first_end = min(s.ended_at or 0.0 for s in streams)
    assert all(s.first_at is not None and s.first_at < first_end for s in streams), \
        "a request only started when another had finished"
    wait_until(lambda: server.model("m")["in_flight"] == 0, 5, "the requests to end")
    assert server.model("m")["state"] == "ready"


def test_a_fifth_request_waits_in_the_queue_until_one_of_four_ends(start_server: Any) -> None:
    server: Server = start_server(four())
    with clients(5) as pool:
        # ~4 s replies: the fifth must be seen queued before one of the four ends, and
        # with ~1 s ones a slow poll (or a slow fifth client) could miss that window
        futures = [pool.submit(stream, server, "m", prompt(f"p{i}", 4 * WORDS))
                   for i in range(4)]
        wait_until(lambda: server.model("m")["in_flight"] == 4, 10, "four requests in flight")
        fifth = pool.submit(stream, server, "m", prompt("p4"))
        wait_until(lambda: server.model("m")["queue_depth"] == 1, 5, "the fifth to queue")
        assert server.model("m")["in_flight"] == 4
        first_four, last = results(futures), results([fifth])[0]
    assert last.status == 200 and last.done and last.text == f"echo: {prompt('p4')}"
    assert last.first_at is not None
    assert last.first_at > min(s.ended_at or 0.0 for s in first_four)


def test_a_client_leaving_stops_only_its_own_request(start_server: Any) -> None:
    server: Server = start_server(four(reply="word " * 40))  # ~4 s each
    with clients(4) as pool:
        leaving = pool.submit(stream, server, "m", "leaving", leave_after_first=True)
        staying = [pool.submit(stream, server, "m", f"p{i}") for i in range(3)]
        wait_until(lambda: leaving.done(), 10, "the first client to leave")
        wait_until(lambda: server.model("m")["jobs_cancelled"] == 1, 3, "its job to stop")
        assert server.model("m")["in_flight"] == 3
        stayed = results(staying)
    assert all(s.done and s.error is None and s.text == "word " * 40 for s in stayed)
    model = server.model("m")
    assert (model["jobs_cancelled"], model["in_flight"], model["state"]) == (1, 0, "ready")


def test_a_killed_worker_fails_all_four_clearly_and_the_next_request_reloads(
    start_server: Any,
) -> None:
    server: Server = start_server(four(reply="word " * 40))
    with clients(4) as pool:
        futures = [pool.submit(stream, server, "m", f"p{i}") for i in range(4)]
        wait_until(lambda: server.model("m")["in_flight"] == 4, 10, "four requests in flight")
        pid = server.model("m")["pid"]
        os.kill(pid, signal.SIGKILL)
        streams = results(futures)
    for seen in streams:
        assert seen.status == 200 and not seen.done and seen.error is not None, seen
        message = seen.error["error"]["message"]
        assert message.startswith(f"the worker of m died while serving this request (worker "
                                  f"m (pid {pid}) closed its pipe and was killed by SIGKILL)")
    assert server.model("m")["in_flight"] == 0
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=CLIENT_TIMEOUT_S, json={
        "model": "m", "messages": [{"role": "user", "content": "again"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    model = server.model("m")
    assert model["load_count"] == 2 and model["pid"] != pid


def test_a_worker_that_crashes_tells_its_clients_and_the_operator_what_it_printed_last(
    start_server: Any,
) -> None:
    server: Server = start_server(four(reply="word " * 40, crash_after_tokens=5))
    seen = stream(server, "m", "p")
    assert seen.status == 200 and not seen.done and seen.error is not None, seen
    last_words = "its last output: fake crash after 5 tokens: assertion failed"
    assert seen.error["error"]["message"].startswith(
        "the worker of m died while serving this request (worker m (pid ")
    assert f"exited with code 3; {last_words}); retry the request" in \
        seen.error["error"]["message"]
    wait_until(lambda: server.model("m")["state"] == "failed", 10, "the crash to be seen")
    assert server.model("m")["last_error"].endswith(last_words)
    assert re.search(r"llmux\.worker\.output: \[worker m \d+\] fake crash after 5 tokens",
                     server.logs())


def test_an_eviction_drains_all_running_requests_before_the_unload(start_server: Any) -> None:
    server: Server = start_server({
        "devices": {"cpu": {"capacity": "300MB"}},  # room for one model
        "policy": {"min_residency_s": 0, "max_turn_wait_s": 0.5},
        **fake_config(a=fake_model(tokens_per_s=RATE, reply="word " * 20)
                      | {"max_concurrency": 3}, b=fake_model()),
    })
    with clients(4) as pool:
        running = [pool.submit(stream, server, "a", f"p{i}") for i in range(3)]
        wait_until(lambda: server.model("a")["in_flight"] == 3, 10, "three requests on a")
        other = pool.submit(httpx.post, f"{server.url}/v1/chat/completions",
                            timeout=CLIENT_TIMEOUT_S,
                            json={"model": "b", "messages": [{"role": "user", "content": "x"}]})
        # NOTE: the transition, not the state: a drains only until its replies end, and
        # a poll that comes later would miss it. Its reason counts the running requests.
        wait_until(lambda: any(m[:2] == ("busy", "draining") for m in moves_of(server, "a")),
                   10, "a to drain")
        drained = results(running)
        answer = other.result(timeout=CLIENT_TIMEOUT_S)
    assert all(s.done and s.error is None and s.text == "word " * 20 for s in drained)
    assert answer.status_code == 200, answer.text
    moves = moves_of(server, "a")
    assert any(m[:2] == ("busy", "draining") and m[2].endswith(
        "; finishing the running requests (3)") for m in moves), moves
    assert ("draining", "unloading", "drained") in moves
    assert server.model("a")["jobs_cancelled"] == 0
    server.stop()
    wait_until(lambda: not live_workers(), 10, "no worker to survive the server")


@pytest.mark.anyio
async def test_a_client_that_stops_reading_does_not_stall_the_others() -> None:
    # Two requests in one worker, 300 pieces each (more than any fixed buffer would
    # hold): the first reply is never read, the second still arrives whole.
    config = parse_config(fake_config(m={**fake_model(tokens_per_s=0, reply="word " * 300),
                                         "max_concurrency": 2}))
    runtime = Runtime(config)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            payload = {"messages": [{"role": "user", "content": "hi"}]}
            unread = runtime.submit("m", "chat", payload)
            pieces, final = await runtime.submit("m", "chat", payload).collect()
            assert len(pieces) == 300 and final["finish_reason"] == "stop"
            unread.cancel()
            tg.cancel_scope.cancel()
