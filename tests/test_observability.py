"""Observability facts the live tests cannot pin down cheaply, in process: the gauges read
from a snapshot, lifecycle sequences (loads timed, drains, kills, release checks), a
request's log fields from several jobs, the level and fields of a request's log line,
the JSON formatter's keys and the log level's sources."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmux.actors.events import Event, EventLog
from llmux.actors.messages import Failure, Finished, Piece, Started
from llmux.config import parse_config
from llmux.errors import BadRequest, ModelFailed
from llmux.http.disconnect import Message, Receive, Scope, Send
from llmux.http.metrics_route import RequestObserver, RequestRecord
from llmux.http.request_log import printable, render
from llmux.logging_setup import FIELDS, JsonFormatter, setup_logging, write_record
from llmux.metrics import STATES, UNLOAD_REASONS, JobWatch, Metrics, token_count
from tests.conftest import fake_model
from tests.test_metrics import CHAT, samples, unit_metrics, value
from tests.test_shutdown_cut_log import http_scope, serve_past_its_body

# --- pure: token counts, the text line ---------------------------------------------------


def test_a_tab_is_no_more_printable_than_a_newline() -> None:
    assert render({"client": "-", "method": "GET", "path": "/", "status": 200, "key": "k",
                   "user": printable("a\tb", 64), "duration_s": 0.0}).count("\t") == 0
    assert printable("a\tb\x00c\u2028d", 64) == "a?b?c?d"


@pytest.mark.parametrize(("reported", "counted"), [
    (1, 1), (7, 7), (0, 0), (-3, 0), (True, 0), ("5", 0), (None, 0), (2.0, 0),
])
def test_a_token_count_is_a_positive_int_or_zero(reported: object, counted: int) -> None:
    assert token_count(reported) == counted


def line_with_user(user: str) -> str:
    return render({"client": "-", "method": "GET", "path": "/", "status": 200, "key": "k",
                   "user": user, "duration_s": 0.0})


def test_a_user_cannot_forge_a_field_or_end_the_quotes() -> None:
    """A user name with ``=`` is quoted (``user=key=ops`` would read as another
    field); a double quote inside becomes a single one."""
    assert 'user="key=ops" ' in line_with_user("key=ops")
    assert 'user="a \'b\' c" ' in line_with_user('a "b" c')
    assert "user=bob " in line_with_user("bob")


def test_the_text_line_names_the_error_and_the_cut_before_the_duration() -> None:
    line = render({"client": "-", "method": "POST", "path": CHAT, "status": 503,
                   "key": "none", "duration_s": 1.5, "error": "model_failed",
                   "cut": "shutdown", "tokens_in": None, "tokens_out": None})
    assert line == ('- "POST /v1/chat/completions" 503 key=none error=model_failed '
                    "cut=shutdown duration=1.500s")


# --- job watches and the request's log fields ----------------------------------------------


def test_a_job_watch_keeps_the_first_start_and_the_failure_code() -> None:
    metrics, _ = unit_metrics()
    now = [0.0]
    watch = JobWatch(metrics, CHAT, "chat", clock=lambda: now[0])
    for at, reply in [(1.0, Started()), (3.0, Started()), (4.0, Piece({})),
                      (5.0, Failure(ModelFailed("worker died")))]:
        now[0] = at
        watch(reply)
    assert (watch.queue_wait_s, watch.first_token_s, watch.error) == (1.0, 4.0,
                                                                      "model_failed")
    assert watch.tokens_in is None and watch.tokens_out is None
    got = samples(metrics)
    assert value(got, "llmux_queue_wait_seconds_count", route=CHAT, model="chat") == 1
    assert value(got, "llmux_queue_wait_seconds_sum", route=CHAT, model="chat") == 1.0
    plain = JobWatch(metrics, CHAT, "chat")
    plain(Failure(BadRequest("no")))  # no code of its own: its type
    assert plain.error == "invalid_request_error"
    silent = JobWatch(metrics, CHAT, "chat")
    silent(Finished({}))  # a job that reports no usage (speech) finished with 0 tokens
    assert (silent.tokens_in, silent.tokens_out) == (0, 0)


def watched(metrics: Metrics, *replies: Any) -> JobWatch:
    now = [0.0]
    watch = JobWatch(metrics, CHAT, "chat", clock=lambda: now[0])
    for at, reply in enumerate(replies, start=1):
        now[0] = float(at)
        watch(reply)
    return watch


def test_a_request_of_several_jobs_logs_the_first_waits_the_token_sums_and_an_error(
) -> None:
    """As a request of several pages: the first job's queue wait and first token, the
    tokens of the finished jobs summed, the first error; the path made printable."""
    metrics, _ = unit_metrics()
    first = watched(metrics, Started(), Piece({}), Finished({"usage": {
        "prompt_tokens": 3, "completion_tokens": 4}}))
    second = watched(metrics, Started(), Started(), Started(), Piece({}), Finished({
        "usage": {"prompt_tokens": 10, "completion_tokens": 20}}))
    failed = watched(metrics, Started(), Failure(ModelFailed("worker died")))
    record = RequestRecord(metrics=metrics, started=0.0, route=CHAT, model="chat",
                           key="alice", status=503, jobs=[first, second, failed])
    scope = {"type": "http", "method": "POST", "path": "/v1/x\nforged" + "y" * 300,
             "headers": [], "client": ("10.0.0.7", 1234)}
    fields = record.log_fields(scope, 2.5)
    assert fields["path"] == "/v1/x?forged" + "y" * 187 + "…"
    assert (fields["client"], fields["model"], fields["physical_model"]) == (
        "10.0.0.7", "chat", "llm")
    assert (fields["queue_wait_s"], fields["time_to_first_token_s"]) == (1.0, 2.0)
    assert (fields["tokens_in"], fields["tokens_out"]) == (13, 24)
    assert fields["error"] == "model_failed"
    only_failed = RequestRecord(metrics=metrics, started=0.0, jobs=[failed])
    assert only_failed.log_fields(scope, 1.0)["tokens_in"] is None


# --- a request through the ASGI wrapper ---------------------------------------------------


async def no_more(_: Message) -> None:
    return None


async def never() -> Message:
    await anyio.sleep_forever()
    raise AssertionError


def answering(status: int) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


async def failing(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the app failed before answering")


@pytest.mark.anyio
async def test_a_request_logs_at_info_and_a_server_failure_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An app that failed before any response counts as a 500; 5xx lines are
    warnings, the rest (4xx included) info; the JSON fields ride on the record."""
    metrics, _ = unit_metrics()
    with caplog.at_level(logging.INFO, "llmux.access"), anyio.fail_after(5):
        for status in (200, 404, 500, 503):
            await RequestObserver(answering(status), metrics)(http_scope(), never, no_more)
        with pytest.raises(RuntimeError):
            await RequestObserver(failing, metrics)(http_scope(), never, no_more)
    shown = [(r.levelno, getattr(r, FIELDS)["status"]) for r in caplog.records]
    assert shown == [(logging.INFO, 200), (logging.INFO, 404), (logging.WARNING, 500),
                     (logging.WARNING, 503), (logging.WARNING, 500)]
    got = samples(metrics)
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="500",
                 key="none") == 2


async def answered_then_lingers(scope: Scope, receive: Receive, send: Send) -> None:
    """A whole response, then work after it that never ends by itself."""
    await answering(200)(scope, receive, send)
    await anyio.sleep_forever()


@pytest.mark.anyio
async def test_a_response_that_ended_before_the_drain_cut_its_handler_is_not_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drain's cut reaches a handler still running after its response ended: the
    client got all of it, so neither the metric nor the log line say cut."""
    _, got, [line] = await serve_past_its_body(answered_then_lingers, caplog, drain=True)
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="200",
                 key="none") == 1
    assert not any(name == "llmux_requests_cut_total" for name, _ in got)
    assert '"POST /v1/chat/completions" 200 key=none duration=' in line


@pytest.mark.anyio
async def test_only_http_requests_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server's lifespan messages pass through the wrapper: no request, no line."""
    metrics, _ = unit_metrics()
    seen: list[str] = []

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    with caplog.at_level(logging.INFO, "llmux.access"), anyio.fail_after(5):
        await RequestObserver(lifespan, metrics)({"type": "lifespan"}, never, no_more)
    assert seen == ["lifespan"]
    assert not caplog.records
    assert not any(name.startswith("llmux_requests") for name, _ in samples(metrics))


# --- metrics: gauges at scrape time, odd request and lifecycle cases ---------------------


def test_gauges_show_each_model_and_device_as_the_snapshot_does() -> None:
    models = [{"id": name, "state": state, "queue_depth": queue, "in_flight": busy,
               "device": "cuda:0", "footprint_bytes": 100 + queue}
              for name, state, queue, busy in [
                  ("a", "ready", 0, 1), ("b", "busy", 3, 1), ("c", "draining", 2, 1),
                  ("d", "loading", 4, 0), ("e", "unloading", 0, 0), ("f", "failed", 1, 0),
                  ("g", "unloaded", 5, 0)]]
    snapshot = {"devices": [{"id": "cuda:0", "capacity_bytes": 1000, "used_bytes": 300,
                             "reserved_bytes": 200, "free_bytes": 500}], "models": models}
    config = parse_config({"physical_models": {"a": fake_model()},
                           "virtual_models": {"chat": {"physical": "a"}}})
    got = samples(Metrics(config, EventLog(), lambda: snapshot))
    for field, expected in [("capacity", 1000), ("used", 300), ("reserved", 200),
                            ("free", 500)]:
        assert value(got, f"llmux_device_{field}_bytes", device="cuda:0") == expected
    for model in models:
        name = model["id"]
        assert value(got, "llmux_model_loaded", model=name) == (
            1 if model["state"] in ("ready", "busy", "draining") else 0), name
        assert value(got, "llmux_model_queue_depth", model=name) == model["queue_depth"]
        assert value(got, "llmux_model_in_flight", model=name) == model["in_flight"]
        assert value(got, "llmux_model_footprint_bytes", model=name, device="cuda:0") == \
            model["footprint_bytes"]
        assert {s: value(got, "llmux_model_state", model=name, state=s)
                for s in STATES} == {s: float(s == model["state"]) for s in STATES}


def test_a_request_duration_is_observed_as_measured() -> None:
    """The histogram sums what each request took (a clock step back counts as 0)."""
    metrics, _ = unit_metrics()
    for seconds in (0.25, 1.5, -1.0):
        metrics.observe_request(route=CHAT, model="chat", status=200, key="alice",
                                seconds=seconds)
    got = samples(metrics)
    assert value(got, "llmux_request_duration_seconds_sum", route=CHAT, model="chat") == 1.75
    assert value(got, "llmux_request_duration_seconds_count", route=CHAT, model="chat") == 3
    assert value(got, "llmux_request_duration_seconds_bucket", route=CHAT, model="chat",
                 le="0.25") == 2


def test_a_cut_reason_is_a_known_one_or_other() -> None:
    metrics, _ = unit_metrics()
    metrics.observe_request(route=CHAT, model="chat", status=200, key="alice", seconds=1,
                            cut="made\nup")
    got = samples(metrics)
    assert value(got, "llmux_requests_cut_total", route=CHAT, model="chat", status="200",
                 reason="other") == 1


def event(metrics: Metrics, at: float, model: str, kind: str, reason: str = "",
          origin: str | None = None, to: str | None = None) -> None:
    metrics.on_event(Event(at=at, model=model, kind=kind, reason=reason,
                           from_state=origin, to_state=to))


def test_a_load_is_timed_from_its_grant_and_missing_files_are_a_failed_load() -> None:
    metrics, _ = unit_metrics()
    event(metrics, 100.0, "llm", "transition", "granted", "unloaded", "loading")
    event(metrics, 102.5, "llm", "transition", "loaded", "loading", "ready")
    event(metrics, 110.0, "voice", "transition", "files missing", "unloaded", "failed")
    event(metrics, 111.0, "voice", "release_unverified", "still in use after 5 s")
    got = samples(metrics)
    assert value(got, "llmux_model_load_duration_seconds_sum", model="llm") == 2.5
    assert value(got, "llmux_model_loads_total", model="voice", result="failed") == 1
    assert value(got, "llmux_worker_crashes_total", model="voice") == 0
    assert value(got, "llmux_release_unverified_total", model="voice") == 1


def test_unloads_count_once_each_by_reason_and_a_kill_marks_one_exit_only() -> None:
    """An idle unload straight from ready; a worker that dies while draining, or
    unloads once drained (its unload was counted when the drain began); a worker
    killed as it ignored an unload, then a later crash of a new worker; a kill, then
    a crash after a reload."""
    metrics, events = unit_metrics()

    def go(model: str, *states: str, reason: str = "r") -> None:
        for origin, to in itertools.pairwise(states):
            events.record(model, "transition", reason, from_state=origin, to_state=to)

    go("llm", "unloaded", "loading", "ready")
    go("llm", "ready", "unloading", "unloaded", reason="idle for 300 s")
    go("llm", "unloaded", "loading", "ready", "busy")
    go("llm", "busy", "draining", reason="evicted llm (llm) for voice (tts)")
    go("llm", "draining", "failed", reason="worker died: exited with code 1")
    go("llm", "failed", "loading", "ready", "busy")
    go("llm", "busy", "draining", reason="moving to cpu; finishing the running request")
    go("llm", "draining", "unloading", "unloaded", reason="drained")
    go("voice", "unloaded", "loading", "ready", "unloading", reason="unloaded by an admin")
    events.record("voice", "kill", "worker ignored unload and was killed by SIGTERM")
    go("voice", "unloading", "unloaded")
    go("voice", "unloaded", "loading", "ready", "busy")
    go("voice", "busy", "failed", reason="worker died: exited with code 1")
    events.record("voice", "kill", "worker ignored cancel past the request deadline")
    go("voice", "failed", "loading", "ready", "busy", "failed")
    go("voice", "failed", "loading", "ready", "failed", reason="worker died: code 2")
    got = samples(metrics)
    unloads = {(m, r): value(got, "llmux_model_unloads_total", model=m, reason=r)
               for m in ("llm", "voice") for r in UNLOAD_REASONS}
    assert {k: v for k, v in unloads.items() if v} == {
        ("llm", "idle"): 1, ("llm", "evicted"): 1, ("llm", "moved"): 1, ("voice", "admin"): 1,
        ("voice", "crash"): 2, ("voice", "killed"): 1}
    assert value(got, "llmux_worker_crashes_total", model="llm") == 1
    assert value(got, "llmux_worker_crashes_total", model="voice") == 2


# --- log records: the JSON formatter, the handler, the level -----------------------------


def formatted(formatter: logging.Formatter, message: str, fields: dict[str, Any],
              exc: bool = False) -> str:
    record = logging.LogRecord("llmux.test", logging.INFO, __file__, 1, message, None,
                               None)
    record.created = 1_700_000_000.25
    setattr(record, FIELDS, fields)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            record.exc_info = sys.exc_info()
    return formatter.format(record)


def test_a_json_line_keeps_its_fixed_keys_and_any_field_value() -> None:
    """Time in UTC with milliseconds and a Z; a field named like a fixed key is
    dropped; an odd value becomes text; a line separator inside stays escaped (one
    line); a traceback rides as ``exception``."""
    formatter = JsonFormatter({"worker": "m-a"})
    line = formatted(formatter, "hi\u2028there", {
        "message": "forged", "level": "ERROR", "time": "never", "logger": "x",
        "path": Path("/a/b"), "n": 3})
    assert len(line.splitlines()) == 1
    assert json.loads(line) == {"time": "2023-11-14T22:13:20.250Z", "level": "INFO",
                                "logger": "llmux.test", "message": "hi\u2028there",
                                "worker": "m-a", "path": "/a/b", "n": 3}
    failed = json.loads(formatted(formatter, "failed", {}, exc=True))
    assert failed["exception"].startswith("Traceback") and "ValueError: boom" in \
        failed["exception"]
    record = logging.LogRecord("llmux.test", logging.INFO, __file__, 1, "where", None,
                               None, sinfo="Stack (most recent call last):\n  here")
    assert json.loads(formatter.format(record))["exception"] == \
        "Stack (most recent call last):\n  here"


def test_a_record_leaves_the_lock_free_for_the_other_processes() -> None:
    """Once a record is out, another process (a worker) takes the lock at once."""
    read, write = os.pipe()
    try:
        write_record(write, b"a record\n")
        probe = subprocess.run([sys.executable, "-c", (
            "import fcntl, sys; fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)"),
            str(write)], pass_fds=(write,), timeout=30)
        assert probe.returncode == 0
        assert os.read(read, 100) == b"a record\n"
    finally:
        os.close(read)
        os.close(write)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test set them up."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_a_record_follows_what_the_stream_already_held(tmp_path: Path,
                                                       root_logging: None) -> None:
    with (tmp_path / "log").open("w") as stream:
        setup_logging("text", stream=stream, text_format="%(message)s")
        stream.write("printed first\n")  # still in the text stream's buffer
        logging.getLogger("llmux.test").info("logged second")
        assert (tmp_path / "log").read_text() == "printed first\nlogged second\n"


def test_json_logs_carry_the_static_fields_they_were_set_up_with(
    tmp_path: Path, root_logging: None,
) -> None:
    """As a worker sets them up: every line names the worker and its pid."""
    with (tmp_path / "log").open("w") as stream:
        setup_logging("json", stream=stream, static={"worker": "m-a", "pid": 42})
        logging.getLogger("llmux.test").info("hello %s", "there", extra={FIELDS: {"n": 1}})
    record = json.loads((tmp_path / "log").read_text())
    assert {k: record[k] for k in ("level", "logger", "message", "worker", "pid", "n")} == {
        "level": "INFO", "logger": "llmux.test", "message": "hello there", "worker": "m-a",
        "pid": 42, "n": 1}


@pytest.mark.parametrize(("level", "env", "shown"), [
    (None, None, ["info", "warning"]),
    ("warning", None, ["warning"]),
    (None, "error", []),
    ("DEBUG", "error", ["debug", "info", "warning"]),
])
def test_the_log_level_comes_from_the_call_or_the_environment(
    level: str | None, env: str | None, shown: list[str], root_logging: None,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    if env is not None:
        monkeypatch.setenv("LLMUX_LOG_LEVEL", env)
    with (tmp_path / "log").open("w") as stream:
        setup_logging("text", level, stream=stream, text_format="%(message)s")
        log = logging.getLogger("llmux.test")
        log.debug("debug")
        log.info("info")
        log.warning("warning")
    assert (tmp_path / "log").read_text().splitlines() == shown


def test_an_unknown_log_level_logs_at_info_and_says_so(root_logging: None,
                                                       tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as stream:
        setup_logging("text", "chatty", stream=stream, text_format="%(message)s")
        logging.getLogger("llmux.test").debug("hidden")
        logging.getLogger("llmux.test").info("shown")
    first, second = (tmp_path / "log").read_text().splitlines()
    assert re.fullmatch(r"log level 'CHATTY' is not one of .*: logging at INFO", first)
    assert second == "shown"
