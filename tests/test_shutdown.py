"""Graceful stop on a real server: SIGTERM drains the streams in progress for up to
``server.shutdown_grace_s``, refuses new connections meanwhile, then stops every
worker; a second signal stops at once."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from llmux.actors.model_actor import State
from llmux.config import parse_config
from llmux.leftovers import PID_FILE
from llmux.runtime import Runtime
from llmux.shutdown import drain_summary
from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until

WORDS = 40  # at 20 tokens/s: a 2 s stream


def slow_server(start_server: Any, *, grace_s: float, words: int, tokens_per_s: float) -> Server:
    config = {
        "server": {"shutdown_grace_s": grace_s},
        "devices": {"cpu": {"capacity": "1GB"}},
        **fake_config(slow=fake_model(tokens_per_s=tokens_per_s, reply="word " * words)),
    }
    server: Server = start_server(config)
    return server


def stream_lines(server: Server) -> Iterator[str]:
    """The SSE ``data:`` payloads of one streamed chat reply, as they arrive."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "slow", "stream": True,
            "messages": [{"role": "user", "content": "go"}]}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield line.removeprefix("data: ")


def content_of(payload: str) -> str:
    choices = json.loads(payload).get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


def refuses_connections(server: Server) -> bool:
    try:
        httpx.get(f"{server.url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def wait_exit(server: Server, timeout: float) -> int:
    code = server.proc.wait(timeout=timeout)
    wait_until(lambda: not live_workers(), 5, "every worker to exit")
    return code


def test_a_stream_in_flight_at_sigterm_completes_and_new_connections_are_refused(
    start_server: Any,
) -> None:
    server = slow_server(start_server, grace_s=20, words=WORDS, tokens_per_s=20)
    text, payloads = "", []
    for payload in stream_lines(server):
        payloads.append(payload)
        text += "" if payload == "[DONE]" else content_of(payload)
        if len(payloads) == 3:
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refuses_connections(server), 5, "the listener to close")
    assert text == "word " * WORDS
    assert payloads[-1] == "[DONE]"
    assert wait_exit(server, 15) == 0
    logs = server.logs()
    assert "received SIGTERM: draining 1 request in flight for up to 20 s" in logs
    assert "drained in " in logs and ": 1 request finished" in logs
    assert "llmux stopped " in logs


def test_a_stream_longer_than_the_grace_period_is_cut_and_the_server_exits(
    start_server: Any,
) -> None:
    server = slow_server(start_server, grace_s=1, words=600, tokens_per_s=20)
    payloads: list[str] = []
    with pytest.raises(httpx.HTTPError):  # the body ends without its last chunk
        for payload in stream_lines(server):
            payloads.append(payload)
            if len(payloads) == 2:
                server.proc.send_signal(signal.SIGTERM)
                signalled_at = time.monotonic()
    assert wait_exit(server, 15) == 0
    assert time.monotonic() - signalled_at < 1 + 5
    assert "[DONE]" not in payloads and len(payloads) < 600
    assert "grace period of 1 s over after 1." in server.logs()
    assert "0 of 1 request finished, 1 cut" in server.logs()


def test_a_second_signal_stops_at_once(start_server: Any) -> None:
    server = slow_server(start_server, grace_s=60, words=600, tokens_per_s=20)
    payloads: list[str] = []
    with pytest.raises(httpx.HTTPError):
        for payload in stream_lines(server):
            payloads.append(payload)
            if len(payloads) == 2:
                server.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: "draining 1 request" in server.logs(), 5, "the drain")
                server.proc.send_signal(signal.SIGINT)
                signalled_at = time.monotonic()
    assert wait_exit(server, 15) == 0
    assert time.monotonic() - signalled_at < 5
    logs = server.logs()
    assert "received SIGINT again: stopping at once, cutting 1 request" in logs
    assert "stopped at once by SIGINT after 0." in logs
    assert "0 of 1 request finished, 1 cut" in logs


def test_an_idle_server_stops_at_once_whatever_the_grace(start_server: Any) -> None:
    server = slow_server(start_server, grace_s=60, words=3, tokens_per_s=20)
    server.load("slow", ready_within_s=None)
    wait_until(lambda: bool(live_workers()), 10, "the worker to start")
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert wait_exit(server, 15) == 0
    assert time.monotonic() - started < 5
    assert "drained in 0.0 s: 0 requests finished" in server.logs()


@pytest.mark.parametrize(("in_flight", "cut", "expected"), [
    (0, 0, "drained in 1.5 s: 0 requests finished"),
    (1, 0, "drained in 1.5 s: 1 request finished"),
    (3, 2, "grace period of 1.5 s over after 1.5 s: 1 of 3 requests finished, 2 cut"),
])
def test_the_drain_summary_says_what_finished_and_what_was_cut(
    in_flight: int, cut: int, expected: str,
) -> None:
    assert drain_summary(in_flight, cut, 1.51, "grace period of 1.5 s over") == expected


@pytest.mark.anyio
async def test_a_worker_still_loading_is_stopped_and_reaped_when_the_runtime_stops() -> None:
    """A worker still loading its model (a 60 s load) at shutdown is stopped by the
    model actor's cleanup and reaped before ``Runtime.run`` returns: not left to the
    parent-death signal, which a runtime in a longer-lived process would never send."""
    runtime = Runtime(parse_config({"devices": {"cpu": {"capacity": "1GB"}},
                                    **fake_config(slow=fake_model(load_time_s=60))}))
    actor = runtime.actors["slow"]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            runtime.load("slow")
            # NOTE: polling: the actor's state has no event to wait on
            while actor.state is not State.LOADING or actor.snapshot()["pid"] is None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            worker = psutil.Process(actor.snapshot()["pid"])
            assert "llmux.worker" in worker.cmdline()
            tg.cancel_scope.cancel()
    assert actor.state is State.LOADING  # it was stopped mid-load, not after it
    assert not worker.is_running()  # exited and reaped: not even a zombie is left


def test_a_worker_still_loading_at_sigterm_is_stopped_by_the_server(
    start_server: Any, tmp_path: Path,
) -> None:
    """SIGTERM while a model loads (a 60 s load): the server exits at once, and its own
    last word on the loading worker says it ended it, before "llmux stopped". The pid
    file named the worker; with nothing of the server left, it is gone."""
    server: Server = start_server({
        "server": {"shutdown_grace_s": 30},
        "devices": {"cpu": {"capacity": "1GB"}},
        **fake_config(slow=fake_model(load_time_s=60)),
    })
    server.load("slow", ready_within_s=None)
    wait_until(lambda: server.model("slow")["state"] == "loading"
               and server.model("slow")["pid"] is not None, 30, "the load to start")
    pid = server.model("slow")["pid"]
    pid_file = tmp_path / "state" / PID_FILE
    assert pid in json.loads(pid_file.read_text())["workers"]
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert wait_exit(server, 20) == 0
    assert time.monotonic() - started < 15  # not the 60 s load
    logs = server.logs()
    ended = re.search(rf"worker slow \(pid {pid}\) (was killed by \w+|exited with code -?\d+)$",
                      logs, re.MULTILINE)
    assert ended is not None, logs
    assert ended.start() < logs.index("llmux stopped"), logs
    assert not pid_file.exists()


def test_an_event_stream_ends_when_the_drain_begins(start_server: Any) -> None:
    """``/admin/events`` never ends by itself: at SIGTERM it ends at once instead of
    holding the server for the whole grace period (30 s) and being cut."""
    server = slow_server(start_server, grace_s=30, words=3, tokens_per_s=20)
    with httpx.stream("GET", f"{server.url}/admin/events", timeout=60) as events:
        lines = events.iter_lines()
        assert next(lines) == "event: state"
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for _ in lines:  # until the server ends the stream
            pass
    assert wait_exit(server, 20) == 0
    assert time.monotonic() - started < 10  # not the grace period
    assert "drained in " in server.logs() and ": 1 request finished" in server.logs()
