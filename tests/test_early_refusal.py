"""A refusal sent before the request body was read says ``connection: close``.

Hypercorn closes a connection whose request body was left unread, so a response that
does not say so lets a keep-alive client (httpx, the openai SDK) send its next request
on a socket being closed under it. These tests drive a real server with one keep-alive
client: each early refusal must announce the close, and the request after it must
succeed, many times over, so a race would show.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until

KEY = "sk-early-refusal-7d3e9a1c5b"
WRONG_KEY = "sk-early-refusal-wrong-0f8b2c"
UPLOAD_LIMIT = 1_000_000
UPLOAD = b"\0" * (4 * UPLOAD_LIMIT)  # far more than one read: the refusal comes first
ROUNDS = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("early_refusal")
    keys = tmp / "api_keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "early", "key": KEY}]}))
    config: dict[str, Any] = fake_config(whisper=fake_model(reply="words") | {"type": "asr"})
    config["server"] = {"max_upload_bytes": UPLOAD_LIMIT}
    server = Server(config, tmp, "--api-keys", str(keys))
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 15, "workers to exit")


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """One keep-alive connection, reused whenever the server lets it be."""
    with httpx.Client(base_url=server.url, timeout=30,
                      limits=httpx.Limits(max_connections=1)) as client:
        yield client


def upload(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/v1/audio/transcriptions", headers={"Authorization": f"Bearer {key}"},
                       files={"file": ("big.wav", UPLOAD, "audio/wav")},
                       data={"model": "whisper"})


def assert_next_request_succeeds(client: httpx.Client) -> None:
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert "connection" not in response.headers  # a whole request keeps its connection


def test_an_idle_connection_outlives_the_openai_sdk_s_keep_alive(server: Server) -> None:
    """httpx, and so the openai SDK, reuses a connection idle up to 5 s: llmux keeps one
    open longer (``server.keep_alive_s``), else a request sent as llmux closed the
    connection would be reset instead of answered (equal limits race)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    ports = []
    try:
        for idle_s in (5.5, 0):
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            assert connection.sock is not None  # kept, not closed after the response
            ports.append(connection.sock.getsockname()[1])
            time.sleep(idle_s)
    finally:
        connection.close()
    assert ports[0] == ports[1]  # the same connection served both


def test_wrong_key_on_an_upload_closes_and_the_next_request_succeeds(
        client: httpx.Client) -> None:
    for _ in range(ROUNDS):
        response = upload(client, WRONG_KEY)
        assert response.status_code == 401, response.text
        assert response.headers["connection"] == "close"
        assert_next_request_succeeds(client)


def test_oversized_upload_closes_and_the_next_request_succeeds(client: httpx.Client) -> None:
    for _ in range(ROUNDS):
        response = upload(client, KEY)
        assert response.status_code == 413, response.text
        assert response.headers["connection"] == "close"
        assert_next_request_succeeds(client)


def test_a_refused_request_whose_body_arrived_keeps_its_connection(
        client: httpx.Client) -> None:
    for _ in range(ROUNDS):
        response = client.post("/v1/chat/completions", headers={
            "Authorization": f"Bearer {WRONG_KEY}"}, json={"model": "whisper", "messages": []})
        assert response.status_code == 401, response.text
        assert "connection" not in response.headers
        assert_next_request_succeeds(client)

