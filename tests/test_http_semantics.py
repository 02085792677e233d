"""HTTP beyond the OpenAI routes, against a live server: HEAD on every GET that ends
(health probes such as ``wget --spider`` send it), CORS for browser pages the config
names (Open WebUI's direct connections), and compressed bodies refused with 415."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import falcon.asgi
import falcon.testing
import httpx
import pytest
import yaml

from llmux.http.cors import VaryOrigin
from llmux.http.origin_form import origin_form
from tests.conftest import Server, fake_config, fake_model

KEY = "sk-semantics-7d1e4a9c"
PAGE = "https://chat.example.com"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def config(**server: Any) -> dict[str, Any]:
    return {"server": server, "devices": {"cpu": {"capacity": "1GB"}}, **fake_config(
        chat=fake_model(reply="hello"), whisper=fake_model(reply="words") | {"type": "asr"})}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("semantics")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "page", "key": KEY, "admin": True}]}))
    server = Server(config(cors_origins=[PAGE]), tmp, "--api-keys", str(keys), admin_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


# -- HEAD -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/models/chat", "/openapi.json",
                                  "/metrics", "/status", "/v1/audio/models", "/admin/state"])
def test_head_answers_with_get_s_status_and_headers_and_no_body(client: httpx.Client,
                                                                path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert (head.status_code, get.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path in ("/v1/models", "/openapi.json", "/status"):  # the same bytes each time
        assert head.headers["content-length"] == str(len(get.content))


def test_head_needs_the_key_a_get_needs(server: Server) -> None:
    head = httpx.head(f"{server.url}/v1/models", timeout=10)
    assert head.status_code == 401
    assert head.content == b"" and head.headers["www-authenticate"] == "Bearer"
    assert httpx.head(f"{server.url}/health", timeout=10).status_code == 200


def test_head_on_a_post_route_is_405_naming_the_allowed_methods(client: httpx.Client) -> None:
    head = client.head("/v1/chat/completions")
    assert head.status_code == 405
    assert head.headers["allow"] == "POST, OPTIONS"


# -- CORS -------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    """What a browser sends before a page's script may POST with a key."""
    return httpx.options(f"{url}/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_a_named_page_passes_the_preflight_without_a_key(server: Server) -> None:
    reply = preflight(server.url, PAGE)
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == PAGE
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert reply.headers["access-control-allow-headers"] == "authorization,content-type"
    assert "access-control-allow-credentials" not in reply.headers  # keys, not cookies


def test_a_named_page_reads_replies_and_errors_and_the_retry_after(server: Server,
                                                                   client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": PAGE})
    assert reply.status_code == 200, reply.text
    assert reply.headers["access-control-allow-origin"] == PAGE
    assert reply.headers["access-control-expose-headers"] == "Retry-After"
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=10,
                         headers={"Origin": PAGE})
    assert refused.status_code == 401  # the key is still required
    assert refused.headers["access-control-allow-origin"] == PAGE  # ... and readable


def test_another_page_gets_no_cors_headers(server: Server, client: httpx.Client) -> None:
    assert "access-control-allow-origin" not in preflight(server.url, "https://evil.example"
                                                          ).headers
    reply = client.post("/v1/chat/completions", json=CHAT,
                        headers={"Origin": "https://evil.example"})
    assert reply.status_code == 200  # served: the browser, not llmux, keeps it from the page
    assert "access-control-allow-origin" not in reply.headers


def test_every_reply_varies_by_origin_when_pages_are_named(server: Server,
                                                           client: httpx.Client) -> None:
    # A shared cache must not give one page's answer (with or without the allowing
    # header) to another page: every reply says it depends on Origin.
    replies = [client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
               for origin in (PAGE, "https://evil.example")]
    replies += [client.get("/v1/models"), preflight(server.url, PAGE),
                httpx.get(f"{server.url}/v1/models", headers={"Origin": PAGE}, timeout=10)]
    assert [r.headers.get("vary") for r in replies] == ["Origin"] * len(replies)


@pytest.mark.anyio
async def test_vary_origin_keeps_the_vary_values_already_set() -> None:
    req = falcon.testing.create_asgi_req()
    for before, after in ((None, "Origin"), ("Accept-Encoding", "Accept-Encoding, Origin"),
                          ("accept, ORIGIN", "accept, ORIGIN"), ("*", "*")):
        resp = falcon.asgi.Response()
        if before is not None:
            resp.set_header("Vary", before)
        await VaryOrigin().process_response(req, resp, None, True)
        assert resp.get_header("Vary") == after


@pytest.fixture(scope="module")
def open_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Keyless servers without ``cors_origins`` and with ``["*"]``."""
    servers = {name: Server(config(cors_origins=origins), tmp_path_factory.mktemp(name))
               for name, origins in (("none", []), ("star", ["*"]))}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize(("name", "allowed"), [("none", None), ("star", "*")])
def test_without_origins_no_page_may_read_and_a_star_lets_every_page(
        open_servers: dict[str, Server], name: str, allowed: str | None) -> None:
    server = open_servers[name]
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=10,
                       headers={"Origin": "https://any.example"})
    assert reply.status_code == 200
    assert reply.headers.get("access-control-allow-origin") == allowed
    assert preflight(server.url, "https://any.example").headers.get(
        "access-control-allow-origin") == allowed
    assert "vary" not in reply.headers  # the same answer for every page


# -- compressed bodies ----------------------------------------------------------------


def assert_415(reply: httpx.Response, encoding: str) -> None:
    assert reply.status_code == 415, reply.text
    error = reply.json()["error"]
    assert error["message"] == (f"The request body has Content-Encoding '{encoding}'; "
                                "send it uncompressed.")
    assert error["type"] == "invalid_request_error"


def test_a_gzipped_json_body_is_415_not_invalid_json(client: httpx.Client) -> None:
    body = gzip.compress(json.dumps(CHAT).encode())
    assert_415(client.post("/v1/chat/completions", content=body, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"}), "gzip")


def test_a_compressed_upload_is_415(client: httpx.Client) -> None:
    request = client.build_request("POST", "/v1/audio/transcriptions",
                                   files={"file": ("a.wav", b"RIFF....", "audio/wav")},
                                   data={"model": "whisper"})
    request.headers["Content-Encoding"] = "br"
    assert_415(client.send(request), "br")


def test_an_identity_encoding_is_read_as_it_is(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT,
                        headers={"Content-Encoding": "identity"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hello"


# -- absolute-form targets ---------------------------------------------------------------


def test_an_absolute_form_target_is_served_as_its_path(server: Server, client: httpx.Client
                                                       ) -> None:
    """RFC 9112 3.2.2: a server must accept ``GET http://host/path``. A client sends it
    when llmux is its proxy, as httpx does here; the host named in it does not matter."""
    with httpx.Client(proxy=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as proxied:
        models = proxied.get("http://models.example:9/v1/models?ignored=1")
        reply = proxied.post("http://llmux.example/v1/chat/completions", json=CHAT)
        health = proxied.head("HTTP://LLMUX.EXAMPLE/health")
    assert models.status_code == 200 and models.json() == client.get("/v1/models").json()
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] \
        == "hello"
    assert health.status_code == 200
    assert '"GET /v1/models" 200' in server.logs()  # logged, and counted, by its route


@pytest.mark.parametrize(("target", "path"), [
    ("http://h/v1/models", "/v1/models"), ("https://h:8081/a%20b", "/a%20b"),
    ("HTTP://H", "/"), ("Http://h/", "/"), ("http://h/x;y", "/x;y"),
    ("/v1/models", None), ("*", None), ("http:/v1", None), ("httpx://h/", None)])
def test_origin_form_takes_the_path_of_absolute_targets_only(target: str,
                                                             path: str | None) -> None:
    assert origin_form(target) == path
