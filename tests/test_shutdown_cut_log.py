"""A stream the drain cuts at the end of ``server.shutdown_grace_s`` is recorded as
cut: its request log line says ``cut=shutdown`` beside the status that was sent (the
200 of a stream that had begun), and ``llmux_requests_cut`` counts it, so neither
passes for a complete 200. Live: a real server, a slow fake stream, SIGTERM. The
metric: the two ASGI layers (``RequestGauge`` around ``RequestObserver``) in process,
since a draining server no longer answers a scrape."""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import anyio
import httpx
import pytest

from llmux.http.disconnect import ASGIApp, Message, Receive, Scope, Send
from llmux.http.metrics_route import RequestObserver
from llmux.shutdown import RequestGauge
from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until
from tests.test_metrics import CHAT, Samples, samples, unit_metrics, value


def cut_stream(start_server: Any, *args: str) -> Server:
    """A server whose one stream (600 tokens at 20/s) SIGTERM with a 1 s grace cuts;
    returns it once it exited."""
    server: Server = start_server({
        "server": {"shutdown_grace_s": 1},
        "devices": {"cpu": {"capacity": "1GB"}},
        **fake_config(slow=fake_model(tokens_per_s=20, reply="word " * 600)),
    }, *args)
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with (pytest.raises(httpx.HTTPError),  # the body ends without its last chunk
          httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                       json=body) as response):
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i == 4:
                server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    wait_until(lambda: not live_workers(), 5, "every worker to exit")
    return server


def chat_lines(logs: str) -> list[str]:
    return [line for line in logs.splitlines() if '"POST /v1/chat/completions"' in line]


def test_the_request_log_line_of_a_stream_cut_by_the_drain_says_so(start_server: Any
                                                                   ) -> None:
    server = cut_stream(start_server)
    [line] = chat_lines(server.logs())
    assert '"POST /v1/chat/completions" 200 key=none model=slow physical=slow ' in line
    assert " cut=shutdown duration=" in line


def test_the_json_log_of_a_cut_stream_has_a_cut_field(start_server: Any) -> None:
    server = cut_stream(start_server, "--log-format", "json")
    [record] = [json.loads(line) for line in server.logs().splitlines()
                if line.startswith("{") and json.loads(line).get("route") == CHAT]
    assert (record["status"], record["cut"]) == (200, "shutdown")


def test_a_stream_that_completes_during_the_drain_is_not_marked_cut(start_server: Any
                                                                    ) -> None:
    server: Server = start_server({
        "server": {"shutdown_grace_s": 20},
        **fake_config(slow=fake_model(tokens_per_s=20, reply="word " * 20)),
    })
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "slow", "stream": True,
            "messages": [{"role": "user", "content": "go"}]}) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 2:
                server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    [line] = chat_lines(server.logs())
    assert '"POST /v1/chat/completions" 200 ' in line and "cut=" not in line


# --- the metric, in process ----------------------------------------------------------------


async def stream_forever(scope: Scope, receive: Receive, send: Send) -> None:
    """A stream that has sent its 200 and a first chunk, then never ends by itself."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await anyio.sleep_forever()


async def whole(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def http_scope() -> Scope:
    return {"type": "http", "method": "POST", "path": CHAT, "headers": [],
            "client": ("127.0.0.1", 1)}


async def serve_one(gauge: RequestGauge, app_sent: anyio.Event) -> None:
    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            app_sent.set()

    await gauge(http_scope(), receive, send)


async def serve_past_its_body(app: ASGIApp, caplog: pytest.LogCaptureFixture, *,
                              drain: bool) -> tuple[RequestGauge, Samples, list[str]]:
    """Serves one request through ``RequestGauge`` around ``RequestObserver``; once
    ``app`` sent a body, the drain cuts it (``drain``) or, without a drain, its task is
    cancelled from outside. Returns the gauge, the metrics and the request log lines."""
    metrics, _ = unit_metrics()
    gauge = RequestGauge(RequestObserver(app, metrics))
    sent = anyio.Event()
    with caplog.at_level(logging.INFO, "llmux.access"), anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_one, gauge, sent)
            await sent.wait()
            if drain:
                gauge.draining.set()
                gauge.cut_all()
            else:
                tg.cancel_scope.cancel()
    return gauge, samples(metrics), [record.getMessage() for record in caplog.records]


@pytest.mark.anyio
async def test_a_stream_cut_by_the_drain_is_counted_as_cut_beside_its_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, got, [line] = await serve_past_its_body(stream_forever, caplog, drain=True)
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="200",
                 key="none") == 1
    assert value(got, "llmux_requests_cut_total", route="unmatched", model="",
                 status="200", reason="shutdown") == 1
    assert '"POST /v1/chat/completions" 200 key=none cut=shutdown duration=' in line


@pytest.mark.anyio
async def test_a_request_that_ended_before_the_cut_is_not_counted_as_cut() -> None:
    metrics, _ = unit_metrics()
    gauge = RequestGauge(RequestObserver(whole, metrics))
    with anyio.fail_after(5):
        await serve_one(gauge, anyio.Event())
    gauge.draining.set()
    gauge.cut_all()
    got = samples(metrics)
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="200",
                 key="none") == 1
    assert not any(name == "llmux_requests_cut_total" for name, _ in got)


@pytest.mark.anyio
async def test_a_stream_cancelled_without_a_drain_is_not_counted_as_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelled from outside while no drain runs (Hypercorn ends the task of a client
    that left): neither the gauge's cut count, the metric nor the log line call it cut
    by the shutdown."""
    gauge, got, [line] = await serve_past_its_body(stream_forever, caplog, drain=False)
    assert (gauge.cut, gauge.in_flight) == (0, 0)
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="200",
                 key="none") == 1
    assert not any(name == "llmux_requests_cut_total" for name, _ in got)
    assert '"POST /v1/chat/completions" 200 ' in line and "cut=" not in line
