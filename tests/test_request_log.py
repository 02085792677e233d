"""The request log: one line per request when it has ended (streams at their end),
naming the key and never showing it, human-readable by default and JSON lines with
``--log-format json``; lifecycle events with their reasons. The sanitising rules are
tables; the rest drives a live server with httpx and reads its log."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmux import logging_setup
from llmux.http.request_log import MAX_USER, end_user, printable, render
from llmux.logging_setup import setup_logging, write_all
from tests.conftest import Server, fake_model, live_workers, wait_until

ALICE_KEY = "sk-log-alice-0123456789abcdef"
ADMIN_KEY = "sk-log-admin-0123456789abcdef"
WRONG_KEY = "sk-log-wrong-0123456789abcdef"
KEYS = {"keys": [{"name": "ops", "key": ADMIN_KEY, "admin": True},
                 {"name": "alice", "key": ALICE_KEY}]}
CHAT = "/v1/chat/completions"
USER = "Ada\tLovelace " + "x" * 300  # a tab and far too long: sanitised and cut
SHOWN_USER = printable(USER, MAX_USER)
CONFIG: dict[str, Any] = {
    "physical_models": {"m-a": fake_model(print_noise=True)},  # as libraries print
    "virtual_models": {"chat-a": {"physical": "m-a"}},
}


# --- pure: what a line may carry ----------------------------------------------------------


@pytest.mark.parametrize(("text", "limit", "shown"), [
    ("bob", 64, "bob"),
    ("line\nbreak\r\x1b[31m", 64, "line?break??[31m"),
    ("é ü 名前", 64, "é ü 名前"),
    ("x" * 65, 64, "x" * 63 + "…"),
    ("x" * 64, 64, "x" * 64),
])
def test_client_strings_are_printable_and_bounded(text: str, limit: int, shown: str) -> None:
    assert printable(text, limit) == shown


def test_the_end_user_comes_from_open_webuis_header_only() -> None:
    assert end_user([(b"x-openwebui-user-name", "Zoë".encode())]) == "Zoë"
    assert end_user([(b"X-OpenWebUI-User-Name", b"a\nb")]) == "a?b"
    assert end_user([(b"x-openwebui-user-name", b"")]) is None
    assert end_user([(b"authorization", b"Bearer sk-secret")]) is None
    assert len(end_user([(b"x-openwebui-user-name", b"y" * 10_000)]) or "") == MAX_USER


def test_the_text_line_shows_known_facts_and_quotes_spaced_values() -> None:
    line = render({"client": "127.0.0.1", "method": "POST", "path": CHAT, "status": 200,
                   "key": "alice", "user": "Ada Lovelace", "model": "chat-a",
                   "physical_model": "m-a", "queue_wait_s": 0.0123,
                   "time_to_first_token_s": 0.05, "duration_s": 0.25, "tokens_in": 7,
                   "tokens_out": 12, "error": None})
    assert line == ('127.0.0.1 "POST /v1/chat/completions" 200 key=alice '
                    'user="Ada Lovelace" model=chat-a physical=m-a queue=0.012s '
                    'ttft=0.050s tokens=7/12 duration=0.250s')
    assert render({"client": "-", "method": "GET", "path": "/health", "status": 200,
                   "key": "none", "duration_s": 0.001}) == \
        '- "GET /health" 200 key=none duration=0.001s'


def test_a_record_written_in_pieces_arrives_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal may end a long write(2) to a pipe part-way: the rest still goes."""
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:1000]))

    monkeypatch.setattr(logging_setup.os, "write", short_write)
    read, write = os.pipe()
    try:
        record = ("x" * 4000 + "\n").encode()
        write_all(write, record)
        assert calls == [4001, 3001, 2001, 1001, 1]
        assert os.read(read, 10_000) == record
    finally:
        os.close(read)
        os.close(write)


WRITER = """
import logging, os, sys, time
from llmux.logging_setup import setup_logging
setup_logging("json", stream=os.fdopen(int(sys.argv[1]), "w"))
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all four start together
for i in range(40):
    logging.getLogger("w").info(sys.argv[2] * 50_000)  # 12 pipe buffers a record
"""


def test_long_records_of_several_processes_on_one_pipe_stay_whole() -> None:
    """A pipe keeps a write whole only up to 4 KB: four processes writing 50 KB JSON
    records at once (a worker's traceback beside the server's lines) each get their
    lines through whole, under the lock every llmux process takes on the file."""
    read, write = os.pipe()
    start_at = str(time.time() + 1.0)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(write), mark, start_at],
                                pass_fds=(write,)) for mark in "abcd"]
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().splitlines()
    assert [w.wait(timeout=30) for w in writers] == [0, 0, 0, 0]
    messages = [json.loads(line)["message"] for line in lines]  # none torn
    assert sorted(messages) == sorted(mark * 50_000 for mark in "abcd" for _ in range(40))


def test_a_record_waits_for_the_lock_only_so_long() -> None:
    """A process stopped while it holds the lock must not stall the server: the
    record is written after ``LOCK_WAIT_S`` anyway."""
    read, write = os.pipe()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(30)"), str(write)],
        pass_fds=(write,), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OSError):  # the lock is held
            fcntl.lockf(write, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        logging_setup.write_record(write, b"a record\n")
        waited = time.monotonic() - started
        assert logging_setup.LOCK_WAIT_S <= waited < 5, waited
        assert os.read(read, 100) == b"a record\n"
    finally:
        holder.kill()
        holder.wait()
        os.close(read)
        os.close(write)


SPAWN_HOLDING_THE_LOCK = """
import fcntl, subprocess, sys
import anyio
from llmux.workers.handle import WorkerHandle

fcntl.lockf(2, fcntl.LOCK_EX)  # as write_record holds it while a record goes out

async def spawn_and_stop() -> None:
    worker = await WorkerHandle.spawn(python=sys.executable, model_id="w")
    await worker.stop(grace_s=5.0)

anyio.run(spawn_and_stop)
anyio.run(spawn_and_stop)
probe = subprocess.run([sys.executable, "-c",
                        "import fcntl; fcntl.lockf(2, fcntl.LOCK_EX | fcntl.LOCK_NB)"])
print("held" if probe.returncode else "dropped")
"""


def test_spawning_a_worker_keeps_the_lock_a_record_holds(tmp_path: Path) -> None:
    """The server spawns workers while another of its threads may be writing a record
    under the lock; the stderr it hands them must not drop that lock (closing any fd of
    a file drops every POSIX lock the process holds on it)."""
    with (tmp_path / "stderr").open("wb") as stderr:
        shown = subprocess.run([sys.executable, "-c", SPAWN_HOLDING_THE_LOCK],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60)
    assert shown.returncode == 0, (tmp_path / "stderr").read_text()
    assert shown.stdout == "held\n"


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging("xml")


# --- live ------------------------------------------------------------------------------


@pytest.fixture
def logged_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(*args: str, **server: Any) -> Server:
        keys = tmp_path / "api_keys.yaml"
        keys.write_text(yaml.safe_dump(KEYS))
        config = json.loads(json.dumps(CONFIG)) | {"server": server}
        started = Server(config, tmp_path, "--api-keys", str(keys), *args,
                         admin_key=ADMIN_KEY)
        servers.append(started)
        return started

    yield start
    for server in servers:
        server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-OpenWebUI-User-Name": USER}


def chat(server: Server, model: str, key: str = ALICE_KEY, **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{CHAT}", headers=headers(key), timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "four words right here"}],
        **extra})


def play(server: Server) -> dict[str, int]:
    """A whole chat, a streamed one, an unknown model and a wrong key; returns the
    whole chat's usage."""
    whole = chat(server, "chat-a")
    assert whole.status_code == 200, whole.text
    with httpx.stream("POST", f"{server.url}{CHAT}", headers=headers(ALICE_KEY), timeout=30,
                      json={"model": "chat-a", "stream": True,
                            "messages": [{"role": "user", "content": "stream it"}]}) as r:
        assert r.status_code == 200
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    assert chat(server, "no-such-model").status_code == 404
    assert chat(server, "chat-a", key=WRONG_KEY).status_code == 401
    usage: dict[str, int] = whole.json()["usage"]
    return usage


def chat_lines_logged(server: Server, count: int, pattern: str) -> list[str]:
    """The log's request lines for the chat route, once there are ``count``."""
    def lines() -> list[str]:
        return [line for line in server.logs().splitlines() if re.search(pattern, line)]

    wait_until(lambda: len(lines()) >= count, 10, f"{count} chat request lines")
    return lines()


def assert_no_secret(logs: str) -> None:
    for secret in (ALICE_KEY, ADMIN_KEY, WRONG_KEY):
        assert secret not in logs


def test_text_log_has_one_line_per_request_with_its_facts(logged_server: Any) -> None:
    server = logged_server()
    usage = play(server)
    lines = chat_lines_logged(server, 4, r'llmux\.access: .*"POST /v1/chat/completions"')
    assert len(lines) == 4, lines
    whole, streamed, unknown, wrong = (line.split("llmux.access: ", 1)[1] for line in lines)
    facts = r"queue=\d+\.\d{3}s ttft=\d+\.\d{3}s"
    assert re.fullmatch(
        r'127\.0\.0\.1 "POST /v1/chat/completions" 200 key=alice '
        rf'user="{re.escape(SHOWN_USER)}" model=chat-a physical=m-a {facts} '
        rf'tokens={usage["prompt_tokens"]}/{usage["completion_tokens"]} '
        r"duration=\d+\.\d{3}s", whole), whole
    assert re.fullmatch(
        r'127\.0\.0\.1 "POST /v1/chat/completions" 200 key=alice user="[^"]+" model=chat-a '
        rf"physical=m-a {facts} tokens=2/\d+ duration=\d+\.\d{{3}}s", streamed), streamed
    assert re.fullmatch(r'127\.0\.0\.1 "POST /v1/chat/completions" 404 key=alice '
                        r'user="[^"]+" duration=\d+\.\d{3}s', unknown), unknown
    assert re.fullmatch(r'127\.0\.0\.1 "POST /v1/chat/completions" 401 key=none '
                        r'user="[^"]+" duration=\d+\.\d{3}s', wrong), wrong
    logs = server.logs()
    assert re.search(r"llmux\.events: m-a transition unloaded -> loading: \S", logs)
    # What the worker's libraries print is logged too, each line naming the worker, and
    # of a progress bar where it got to.
    relayed = re.findall(r" INFO llmux\.worker\.output: \[worker m-a \d+\] (.*)", logs)
    assert {"fake noise from print() during load", "fake noise on fd 1 during chat",
            "fake bar load 100%"} <= set(relayed), relayed
    assert not [line for line in logs.splitlines() if re.search("fake (noise|bar)", line)
                and "llmux.worker.output: [worker m-a " not in line]
    assert_no_secret(logs)


def test_json_log_has_one_object_per_line_and_request(logged_server: Any) -> None:
    server = logged_server("--log-format", "json")
    usage = play(server)
    chat_lines_logged(server, 4, r'"path": "/v1/chat/completions"')
    logs = server.logs()
    records = [json.loads(line) for line in logs.splitlines()]  # every line is JSON
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    requests = [r for r in records if r["logger"] == "llmux.access" and r["path"] == CHAT]
    assert [(r["status"], r["key"], r["model"], r["physical_model"]) for r in requests] == [
        (200, "alice", "chat-a", "m-a"), (200, "alice", "chat-a", "m-a"),
        (404, "alice", None, None), (401, "none", None, None)]
    whole, streamed, unknown, wrong = requests
    assert whole["method"] == "POST" and whole["route"] == CHAT
    assert whole["user"] == SHOWN_USER
    assert (whole["tokens_in"], whole["tokens_out"]) == (usage["prompt_tokens"],
                                                         usage["completion_tokens"])
    for done in (whole, streamed):
        assert done["queue_wait_s"] <= done["time_to_first_token_s"] <= done["duration_s"]
        assert done["error"] is None
    assert streamed["tokens_in"] == 2 and streamed["tokens_out"] > 0
    for refused in (unknown, wrong):
        assert refused["queue_wait_s"] is None and refused["tokens_out"] is None
    assert whole["message"].startswith('127.0.0.1 "POST /v1/chat/completions" 200 key=alice')
    loading = [r for r in records if r["logger"] == "llmux.events"
               and r.get("to_state") == "loading"]
    assert loading and loading[0]["model"] == "m-a" and loading[0]["kind"] == "transition"
    assert loading[0]["reason"] and loading[0]["reason"] in loading[0]["message"]
    relayed = [r for r in records if r["logger"] == "llmux.worker.output"]
    assert {(r["worker"], r["message"].split("] ", 1)[1]) for r in relayed} >= {
        ("m-a", "fake noise on fd 1 during load"), ("m-a", "fake bar chat 100%")}
    assert all(r["pid"] == relayed[0]["pid"] and r["level"] == "INFO" for r in relayed)
    assert_no_secret(logs)


def test_the_config_can_ask_for_json_logs(logged_server: Any) -> None:
    server = logged_server(log_format="json")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    wait_until(lambda: '"path": "/health"' in server.logs(), 10, "the health request line")
    for line in server.logs().splitlines():
        json.loads(line)
