"""Raw-socket abuse: what no HTTP client library would send. Each is answered with a 4xx
(OpenAI-shaped when llmux answers; empty when Hypercorn refuses the bytes before llmux
sees a request) or a closed connection: never a 5xx, never a hang, and the server stays
healthy. Every read is bounded by a socket timeout.

The bounds on a slow client (llmux/cli.py): headers must be complete within
``server.keep_alive_s`` (3 s here), which also closes an idle connection; a body may go
silent for ``server.read_timeout_s`` (2 s here);
a body cut short is refused before any job starts (llmux/http/complete_body.py).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import attrs
import httpx
import pytest
import yaml

from llmux.config import ConfigError, parse_config
from tests.conftest import Server, fake_model, live_workers, wait_until

ADMIN_KEY = "sk-abuse-admin-0123456789"
READ_TIMEOUT_S = 2
KEEP_ALIVE_S = 3  # the time to send complete headers, and an idle connection's life
SLACK_S = 10  # a loaded machine
CHAT_BODY = b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}]}'
UNTOUCHED = b'{"model": "untouched", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("abuse")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "abuse-admin", "key": ADMIN_KEY,
                                              "admin": True}]}))
    config: dict[str, Any] = {
        # 1 MiB of body: room for JSON nested 100,000 deep and a 100,000-digit number.
        "server": {"max_body_bytes": "1MiB", "max_upload_bytes": "256KiB",
                   "read_timeout_s": READ_TIMEOUT_S, "keep_alive_s": KEEP_ALIVE_S},
        "devices": {"cpu": {"capacity": "1GB"}},
        "physical_models": {
            "llm": fake_model(),
            "slow": fake_model(tokens_per_s=4, reply="one two three four five six seven "
                               "eight nine ten eleven twelve thirteen fourteen"),
            "untouched": fake_model(),  # only named by requests that must never run
            "asr": fake_model() | {"type": "asr"},
            "reader": fake_model() | {"type": "vlm"},
        },
        "virtual_models": {name: {"physical": name}
                           for name in ("llm", "slow", "untouched", "asr", "reader")},
    }
    server = Server(config, tmp, "--api-keys", str(keys), admin_key=ADMIN_KEY)
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 15, "workers to exit")


@attrs.frozen
class Outcome:
    """What came back on the socket before it closed (or the read timed out)."""

    raw: bytes
    closed: bool  # the server closed (EOF or reset); False: it was still open at timeout

    @property
    def status(self) -> int | None:
        if not self.raw.startswith(b"HTTP/1.1 "):
            return None
        return int(self.raw[9:12])

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head)}

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.raw else b""


def connect(server: Server, timeout: float = SLACK_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float = SLACK_S) -> Outcome:
    """Everything the server sends until it closes, within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    out = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return Outcome(out, closed=True)
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        return Outcome(out, closed=True)
    except TimeoutError:
        pass
    return Outcome(out, closed=False)


def exchange(server: Server, data: bytes, *, half_close: bool = False,
             timeout: float = SLACK_S) -> Outcome:
    """Send ``data`` (then, with ``half_close``, shut the sending side) and read to the end."""
    with connect(server, timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused mid-send: what was answered is still readable or lost
        return read_until_closed(sock, timeout)


def request(path: bytes, body: bytes | None = None, *, method: bytes = b"POST",
            content_type: bytes = b"application/json", length: int | None = None,
            extra: bytes = b"") -> bytes:
    """One HTTP/1.1 request as bytes, keyed, asking the server to close afterwards."""
    head = (b"%s %s HTTP/1.1\r\nHost: llmux\r\nAuthorization: Bearer %s\r\n"
            b"Connection: close\r\n" % (method, path, ADMIN_KEY.encode()))
    if body is not None:
        head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (
            content_type, len(body) if length is None else length)
    return head + extra + b"\r\n" + (body or b"")


def assert_openai_error(outcome: Outcome, status: int, message: str = "",
                        param: str | None = None) -> dict[str, Any]:
    """llmux's own refusal: exactly ``status`` with an OpenAI-shaped body."""
    assert outcome.status == status, outcome.raw[:500]
    assert outcome.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = json.loads(outcome.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert message in error["message"], error
    assert error["param"] == param, error
    return error


def assert_refused_by_hypercorn(outcome: Outcome, status: int) -> None:
    """Bytes that are not HTTP never reach llmux: Hypercorn answers ``status`` with no
    body and closes."""
    assert outcome.status == status, outcome.raw[:500]
    assert outcome.headers["content-length"] == "0"
    assert outcome.headers["connection"] == "close"
    assert outcome.closed


def model_state(server: Server, name: str) -> str:
    state: str = server.model(name)["state"]
    return state


# -- bodies that do not arrive ------------------------------------------------------------


def test_a_body_shorter_than_its_content_length_is_refused_and_starts_no_job(
        server: Server) -> None:
    # The 70 bytes sent are a whole, valid request: only the length says they are not.
    outcome = exchange(server, request(b"/v1/chat/completions", UNTOUCHED,
                                       length=len(UNTOUCHED) + 30), half_close=True)
    assert outcome.status == 400 and outcome.closed, outcome.raw[:300]
    assert model_state(server, "untouched") == "unloaded"


def test_a_chunked_body_cut_short_is_refused_and_starts_no_job(server: Server) -> None:
    chunked = request(b"/v1/chat/completions", extra=b"Content-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n")
    chunk = b"%x\r\n%s\r\n" % (len(UNTOUCHED), UNTOUCHED)  # no last chunk
    outcome = exchange(server, chunked + chunk, half_close=True)
    assert outcome.status == 400 and outcome.closed, outcome.raw[:300]
    assert model_state(server, "untouched") == "unloaded"


def test_a_stalled_body_is_closed_after_the_read_timeout(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(request(b"/v1/chat/completions", UNTOUCHED[:20], length=len(UNTOUCHED)))
        started = time.monotonic()
        outcome = read_until_closed(sock)
        waited = time.monotonic() - started
    assert outcome.closed and outcome.status in (None, 400), outcome.raw[:300]
    assert READ_TIMEOUT_S - 0.5 <= waited <= READ_TIMEOUT_S + SLACK_S
    assert model_state(server, "untouched") == "unloaded"


def test_a_body_sent_a_byte_per_100ms_is_served_and_holds_nobody_up(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(request(b"/v1/chat/completions", CHAT_BODY[:30], length=len(CHAT_BODY)))
        for i, byte in enumerate(CHAT_BODY[30:]):
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if i % 10 == 0:  # meanwhile, other clients are served at once
                started = time.monotonic()
                assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
                assert time.monotonic() - started < 2
        outcome = read_until_closed(sock)
    assert outcome.status == 200, outcome.raw[:300]
    assert json.loads(outcome.body)["choices"][0]["message"]["content"] == "echo: hi"


def test_headers_sent_a_byte_per_100ms_are_cut_off_by_the_keep_alive_timeout(
        server: Server) -> None:
    head = request(b"/health", method=b"GET", extra=b"X-Padding: " + b"p" * 200 + b"\r\n")
    started = time.monotonic()
    with connect(server) as sock:
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        outcome = read_until_closed(sock)
    waited = time.monotonic() - started
    assert outcome.closed and outcome.raw == b""
    assert KEEP_ALIVE_S - 0.5 <= waited < len(head) * 0.1  # closed before it was all sent


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(request(b"/health", method=b"GET").replace(b"Connection: close\r\n", b""))
        answered = b""
        while not answered.endswith(b"}"):  # /health's JSON, and the connection kept
            answered += sock.recv(65536)
        idle_since = time.monotonic()
        outcome = read_until_closed(sock)
    idle = time.monotonic() - idle_since
    assert answered.startswith(b"HTTP/1.1 200") and outcome.closed and outcome.raw == b""
    assert KEEP_ALIVE_S - 0.5 <= idle < KEEP_ALIVE_S + SLACK_S


# -- bytes that are not HTTP ----------------------------------------------------------------


def test_a_1mb_header_is_refused_with_431(server: Server) -> None:
    outcome = exchange(server, request(b"/health", method=b"GET",
                                       extra=b"X-Big: " + b"a" * 2**20 + b"\r\n"))
    if outcome.raw:  # NOTE: the server may close while the megabyte is still being sent
        assert_refused_by_hypercorn(outcome, 431)
    assert outcome.closed


def test_invalid_utf8_in_the_raw_path_is_refused_with_400(server: Server) -> None:
    outcome = exchange(server, request(b"/v1/models/\xff\xfe", method=b"GET"))
    assert_refused_by_hypercorn(outcome, 400)


def test_invalid_utf8_percent_encoded_in_the_path_is_an_unknown_model(server: Server) -> None:
    outcome = exchange(server, request(b"/v1/models/%ff%fe", method=b"GET"))
    assert_openai_error(outcome, 404, "does not exist", param="model")


def test_a_malformed_chunk_size_is_refused_with_400(server: Server) -> None:
    outcome = exchange(server, request(b"/v1/chat/completions",
                                       extra=b"Transfer-Encoding: chunked\r\n")
                       + b"zz\r\nabc\r\n0\r\n\r\n")
    assert_refused_by_hypercorn(outcome, 400)


def test_chunked_and_content_length_together_is_read_as_chunked(server: Server) -> None:
    # RFC 9112 6.3: Transfer-Encoding wins; the 5-byte chunk "hello" is not JSON.
    outcome = exchange(server, request(b"/v1/chat/completions", extra=(
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 100\r\n")) + b"5\r\nhello\r\n0\r\n\r\n")
    assert_openai_error(outcome, 400, "The request body is not valid JSON")


# -- bodies llmux must refuse itself ---------------------------------------------------------


def test_invalid_utf8_in_a_json_body_is_a_400(server: Server) -> None:
    body = b'{"model": "llm\xff\xfe", "messages": []}'
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, "The request body is not valid JSON: 'utf-8' codec")


@pytest.mark.parametrize("body", [b"[" * 100000 + b"]" * 100000,
                                  b'{"model": "llm", "x": ' + b"[" * 100000 + b"]" * 100000
                                  + b"}"], ids=["top-level", "in-a-field"])
def test_json_nested_100000_deep_is_a_400(server: Server, body: bytes) -> None:
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, "The request body nests deeper than 64 levels.")


def test_json_nested_65_deep_is_a_400_that_names_the_place(server: Server) -> None:
    body = b'{"model": "llm", "messages": [], "tools": ' + b"[" * 64 + b"]" * 64 + b"}"
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, "nests deeper than 64 levels",
                        param="tools" + "[0]" * 63)


def test_json_nested_64_deep_is_accepted(server: Server) -> None:
    body = CHAT_BODY[:-1] + b', "extra": ' + b"[" * 63 + b"]" * 63 + b"}"
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert outcome.status == 200, outcome.raw[:300]


@pytest.mark.parametrize(("number", "length", "param"), [
    (b"9" * 100000, 100000, None),  # past Python's own 4300-digit limit: no place named
    (b"%d" % 2**64, 20, "seed"), (b"%d" % (-(2**63) - 1), 20, "seed")])
def test_an_integer_beyond_64_bits_is_a_400(server: Server, number: bytes, length: int,
                                            param: str | None) -> None:
    body = CHAT_BODY[:-1] + b', "seed": ' + number + b"}"
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, f"The request body holds an integer of {length} "
                                      "characters; integers must fit in 64 bits.", param=param)


def test_the_largest_64_bit_integers_are_accepted(server: Server) -> None:
    body = CHAT_BODY[:-1] + b', "extra": [%d, %d]}' % (2**64 - 1, -(2**63))
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert outcome.status == 200, outcome.raw[:300]


def test_a_huge_float_is_a_400_on_its_field(server: Server) -> None:
    body = CHAT_BODY[:-1] + b', "temperature": 1e999999}'
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, "'temperature' must be a number, got Infinity.",
                        param="temperature")


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "llm", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    (b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}], "\\udfff": 1}',
     "\\udfff"),
], ids=["in-a-value", "in-a-key"])
def test_an_unpaired_surrogate_is_a_400_and_does_not_reach_the_worker(
        server: Server, body: bytes, param: str) -> None:
    # It once did: the worker frame could not encode it and the whole server stopped.
    outcome = exchange(server, request(b"/v1/chat/completions", body))
    assert_openai_error(outcome, 400, "unpaired UTF-16 surrogate", param=param)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


# -- multipart -------------------------------------------------------------------------------

ROUTES = [b"/v1/audio/transcriptions", b"/v1/transcribe"]
FORM = (b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\nasr\r\n'
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        b"RIFF\r\n--zz--\r\n")


@pytest.mark.parametrize("path", ROUTES)
def test_multipart_without_a_boundary_is_a_400(server: Server, path: bytes) -> None:
    outcome = exchange(server, request(path, FORM, content_type=b"multipart/form-data"))
    assert_openai_error(outcome, 400, "No boundary specifier found")


@pytest.mark.parametrize("path", ROUTES)
def test_multipart_with_a_boundary_the_body_does_not_use_is_a_400(server: Server,
                                                                 path: bytes) -> None:
    outcome = exchange(server, request(path, FORM,
                                       content_type=b"multipart/form-data; boundary=other"))
    assert_openai_error(outcome, 400, "unexpected form structure")


@pytest.mark.parametrize("path", ROUTES)
def test_multipart_with_an_overlong_boundary_is_a_400(server: Server, path: bytes) -> None:
    outcome = exchange(server, request(path, FORM, content_type=b"multipart/form-data; "
                                                                b"boundary=" + b"z" * 71))
    assert_openai_error(outcome, 400, "The boundary parameter must consist of 1 to 70")


@pytest.mark.parametrize("path", ROUTES)
def test_multipart_cut_short_is_a_400(server: Server, path: bytes) -> None:
    outcome = exchange(server, request(path, FORM[:60],
                                       content_type=b"multipart/form-data; boundary=zz"))
    assert_openai_error(outcome, 400, "unexpected form structure")


@pytest.mark.parametrize("path", ROUTES)
def test_invalid_utf8_in_a_part_header_is_a_400(server: Server, path: bytes) -> None:
    body = FORM.replace(b'filename="a.wav"', b'filename="\xff.wav"')
    outcome = exchange(server, request(path, body,
                                       content_type=b"multipart/form-data; boundary=zz"))
    assert_openai_error(outcome, 400, "A form part's Content-Disposition header is not "
                                      "valid UTF-8.")


@pytest.mark.parametrize("path", ROUTES)
def test_invalid_utf8_in_a_text_field_is_a_400(server: Server, path: bytes) -> None:
    body = FORM.replace(b"\r\n\r\nasr", b"\r\n\r\nasr\xff")
    outcome = exchange(server, request(path, body,
                                       content_type=b"multipart/form-data; boundary=zz"))
    assert_openai_error(outcome, 400, "invalid text or charset: utf-8")


@pytest.mark.parametrize("charset", [b"utf-7", b"unicode_escape"])
def test_a_field_whose_charset_decodes_to_a_surrogate_is_a_400(server: Server,
                                                               charset: bytes) -> None:
    text = b"+2AA-" if charset == b"utf-7" else b"\\ud800"
    body = FORM.replace(b"--zz--", b'--zz\r\nContent-Disposition: form-data; name="prompt"'
                        b"\r\nContent-Type: text/plain; charset=" + charset + b"\r\n\r\n"
                        + text + b"\r\n--zz--")
    outcome = exchange(server, request(b"/v1/audio/transcriptions", body,
                                       content_type=b"multipart/form-data; boundary=zz"))
    assert_openai_error(outcome, 400, "unpaired UTF-16 surrogate", param="prompt")


def test_the_read_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"server": {"read_timeout_s": 0}, "physical_models": {},
                      "virtual_models": {}})
    assert refused.value.problems == ["server.read_timeout_s: must be positive"]


# -- after all of it -------------------------------------------------------------------------


def test_the_server_is_healthy_and_logged_no_server_error(server: Server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=CHAT_BODY, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200
    log = server.logs()
    assert "Traceback" not in log and '" 5' not in log, log[-3000:]
    assert model_state(server, "untouched") == "unloaded"


def test_a_reply_streaming_longer_than_the_read_timeout_is_not_cut(server: Server) -> None:
    """The body timeout is for bodies: a client that sends nothing while a long reply
    streams keeps its connection (Hypercorn's own read_timeout would cut it)."""
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert time.monotonic() - started > READ_TIMEOUT_S + 1
    assert lines[-1] == "data: [DONE]"
