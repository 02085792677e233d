"""Overhead: what llmux adds to a request's latency over calling the backend in-process.

The fake backend (no token delay, a one-word reply) answers a non-streaming chat
completion, once called directly in this process and once through ``llmux serve`` over
HTTP (keep-alive connections of a bare HTTP/1.1 client), with 1 and with 32 concurrent
clients. The in-process baseline with 32 clients is 32 asyncio tasks taking turns on
the one backend, as a perfect server with one worker would serve them: each request
waits for the 31 others before it.
Added latency = llmux's percentile minus the in-process one at the same concurrency; the
client's own cost is part of it, kept small: a bare client on asyncio streams.

A third figure says how much of that is the HTTP stack llmux is built on: the same
requests against a bare Falcon app on Hypercorn (this script with ``--floor PORT``)
that calls the backend in-process in its handler, with no llmux in between. llmux's
own share is its latency minus that floor. Both servers' CPU time per request (the
process and its children: llmux's worker runs the backend) is given too: on a busy
VM it varies less than the latency, and it is what the latency is made of.

Headline: the goal ratio, max over the four goals (added p50 ≤ 1 ms and p99 ≤ 5 ms, at
1 and at 32 clients) of added ÷ goal. It is ≤ 1 when every goal is met, and unlike
llmux ÷ in-process (the baseline is a few microseconds of noise) it compares between
runs and machines. The details give each added figure in ms.

    .venv/bin/python bench/overhead.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from common import Llmux, Proc, fake_model, free_port, percentile, record, serving, sweep

from llmux.backends.fake import FakeBackend

OPTIONS = {"reply": "pong", "tokens_per_s": 0, "load_time_s": 0.0, "footprint": "1MB"}
PAYLOAD = {"messages": [{"role": "user", "content": "ping"}]}
BODY_BYTES = json.dumps({"model": "fake", **PAYLOAD}).encode()
LEVELS = ((1, 600), (32, 40))  # (clients, requests per client)
WARMUP = 50
GOALS = {50: 1.0, 99: 5.0}  # percentile -> added ms


def in_process_call() -> Callable[[], Any]:
    backend = FakeBackend({"model_id": "fake", "options": OPTIONS})
    backend.load(lambda fraction, message: None)

    def call() -> Any:
        stream = backend.infer("chat", PAYLOAD, threading.Event())
        while True:
            try:
                next(stream)
            except StopIteration as stop:
                return stop.value

    return call


async def in_process(call: Callable[[], Any], clients: int, each: int) -> list[float]:
    """Latencies (s) of ``clients`` tasks taking turns on one in-process backend."""
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(each):
            started = time.perf_counter()
            await asyncio.sleep(0)  # queue behind the other clients' requests
            call()
            latencies.append(time.perf_counter() - started)

    for _ in range(WARMUP):
        call()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def requests_sent(clients: int, each: int) -> int:
    """How many requests ``through_http`` sends (its warm-up included)."""
    return WARMUP + clients * each


def timed_cpu(proc: Proc, url: str, clients: int, each: int,
              errors: list[str]) -> tuple[list[float], float]:
    """``through_http``'s latencies, and the server's CPU seconds per request."""
    before = proc.cpu_seconds()
    latencies = asyncio.run(through_http(url, clients, each, errors))
    return latencies, (proc.cpu_seconds() - before) / requests_sent(clients, each)


async def through_http(url: str, clients: int, each: int,
                       errors: list[str]) -> list[float]:
    """Latencies (s) of ``clients`` concurrent keep-alive connections to ``url``, each
    sending ``each`` requests one after another; a failed request is added to
    ``errors`` instead.

    NOTE: a bare HTTP/1.1 client on asyncio streams, not httpx: httpx costs more per
    request than the bare server, so at 32 clients it, not the server, set the pace of
    the floor, and llmux's share looked smaller than it is."""
    parts = urlsplit(url)
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {parts.netloc}\r\n"
               f"content-type: application/json\r\ncontent-length: {len(BODY_BYTES)}\r\n"
               "\r\n").encode() + BODY_BYTES
    latencies: list[float] = []

    async def client(count: int, timed: bool) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for _ in range(count):
                started = time.perf_counter()
                writer.write(request)
                status, body = await asyncio.wait_for(read_response(reader), 60)
                if status != 200:
                    errors.append(f"{status}: {body[:200]!r}")
                elif timed:
                    latencies.append(time.perf_counter() - started)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    await client(WARMUP, timed=False)
    await asyncio.gather(*(client(each, timed=True) for _ in range(clients)))
    return latencies


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a ``content-length`` (what both servers send here)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in head[1:]
                  if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


def serve_floor(port: int) -> None:
    """The floor: a bare Falcon app on Hypercorn answering the chat route by calling
    the backend in its handler (the event loop blocks for those microseconds)."""
    import falcon.asgi
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    call = in_process_call()

    class Chat:
        async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
            body = await req.get_media()
            done = call()
            resp.media = {"object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "finish_reason": done.get("finish_reason", "stop"),
                 "message": {"role": "assistant", "content": OPTIONS["reply"]}}]}

    app = falcon.asgi.App()
    app.add_route("/v1/chat/completions", Chat())
    app.add_route("/health", Health())
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    asyncio.run(serve(app, config))  # type: ignore[arg-type]


class Health:
    async def on_get(self, req: Any, resp: Any) -> None:
        resp.media = {"status": "ok"}


def main() -> int:
    if sys.argv[1:2] == ["--floor"]:
        serve_floor(int(sys.argv[2]))
        return 0
    port = free_port()
    errors: list[str] = []
    with Proc([sys.executable, __file__, "--floor", str(port)]) as floor:
        floor.wait_http(f"http://127.0.0.1:{port}/health", 30)
        floors = [timed_cpu(floor, f"http://127.0.0.1:{port}", clients, each, errors)
                  for clients, each in LEVELS]
    call = in_process_call()
    config = serving({"fake": fake_model(**OPTIONS)},
                     policy={"max_queue_per_model": 256})
    figures: list[str] = []
    ratio = 0.0
    try:
        with Llmux(config) as server:
            assert server.proc is not None
            for (clients, each), (bare, bare_cpu) in zip(LEVELS, floors, strict=True):
                base = asyncio.run(in_process(call, clients, each))
                http, cpu = timed_cpu(server.proc, server.url, clients, each, errors)
                added = {q: (percentile(http, q) - percentile(base, q)) * 1000 for q in GOALS}
                ratio = max(ratio, *(added[q] / GOALS[q] for q in GOALS))
                figures.append(
                    f"{clients} client{'s' if clients > 1 else ''}: +{added[50]:.2f} ms p50, "
                    f"+{added[99]:.2f} ms p99 (llmux {ms(http)}, in-process "
                    f"{percentile(base, 50) * 1000:.3f}/{percentile(base, 99) * 1000:.3f} ms, "
                    f"bare Falcon on Hypercorn {ms(bare)}: llmux's own +"
                    f"{(percentile(http, 50) - percentile(bare, 50)) * 1000:.2f} ms p50; "
                    f"CPU per request {cpu * 1e6:.0f} µs, bare {bare_cpu * 1e6:.0f} µs)")
    finally:
        sweep()
    first = f" (first: {errors[0]})" if errors else ""
    record(f"overhead: {ratio:.2f} (max added/goal of p50 1 ms, p99 5 ms; "
           + "; ".join(figures) + f"; {len(errors)} errors{first}; fake backend, "
           "non-streaming chat, bare HTTP/1.1 client)")
    return 0


def ms(latencies: list[float]) -> str:
    return f"{percentile(latencies, 50) * 1000:.2f}/{percentile(latencies, 99) * 1000:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
