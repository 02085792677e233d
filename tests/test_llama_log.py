"""llama.cpp's log in Python logging: the line assembly and levels are pure; a real
llama.cpp load (SmolLM2 cut in half, and a context beyond the model's training) and a
real failed decode show that its errors reach the error raised and its warnings the
log."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from llmux.backends.llama_log import LlamaLog
from llmux.backends.paths import resolve_model_path
from tests.test_backend_llama_cpp import GGUF, backend


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llama.cpp"]


def test_lines_are_assembled_and_logged_at_llama_cpps_levels(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    log = LlamaLog()
    log.feed(2, "loading")  # INFO: not logged unless verbose
    log.feed(5, "...")
    log.feed(5, ".\n")
    log.feed(3, "n_ctx_seq (4096) > n_ctx_train")  # a WARN in two pieces
    log.feed(3, " (2048)\n")
    log.feed(4, "error loading model: out of memory\nfailed to load model\n")
    log.feed(1, "debug detail\n")
    assert records(caplog) == [
        (logging.WARNING, "n_ctx_seq (4096) > n_ctx_train"),
        (logging.WARNING, "(2048)"),
        (logging.ERROR, "error loading model: out of memory"),
        (logging.ERROR, "failed to load model")]
    assert log.take_errors() == ["error loading model: out of memory", "failed to load model"]
    assert log.take_errors() == []


def test_verbose_logs_every_level_and_only_the_last_three_errors_are_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    log = LlamaLog()
    log.verbose = True
    log.feed(2, "model loaded\n")
    log.feed(1, "tensor 0\n")
    for n in range(5):
        log.feed(4, f"error {n}")  # no newline: the next message ends the line
    assert log.take_errors() == ["error 2", "error 3", "error 4"]
    assert records(caplog)[:2] == [(logging.INFO, "model loaded"), (logging.DEBUG, "tensor 0")]


def test_a_continued_message_is_one_line_and_blank_lines_are_not_lines() -> None:
    """Level 5 continues the message before it (at that message's level), without ending
    its line; empty and blank lines are neither logged nor kept as errors."""
    log = LlamaLog()
    log.feed(4, "error loading model:")
    log.feed(5, " out of")
    log.feed(5, " memory\n\n   \n")
    log.feed(4, "\nfailed to load model\n")
    assert log.take_errors() == ["error loading model: out of memory",
                                 "failed to load model"]


def test_a_level_llama_cpp_does_not_number_is_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    log = LlamaLog()
    log.verbose = True
    log.feed(0, "a message of no level\n")
    log.feed(9, "a level of a newer ggml\n")
    assert records(caplog) == [(logging.INFO, "a message of no level"),
                               (logging.INFO, "a level of a newer ggml")]


def test_a_load_that_fails_says_what_llama_cpp_said(tmp_path: Path) -> None:
    whole = resolve_model_path(GGUF).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=(
            rf"^{cut}: llama.cpp could not load it \(Failed to load model from file: {cut}; "
            r"llama.cpp: llama_model_load: error loading model: tensor '[^']+' data is not "
            r"within the file bounds, model is corrupted or incomplete \| .*failed to load "
            r"model\)$")):
        backend(str(cut)).load(lambda fraction, message: None)


def test_a_runtime_error_within_explaining_quotes_the_errors_logged_within() -> None:
    log = LlamaLog()
    log.feed(4, "an error of an earlier request\n")
    expected = (r"^llama.cpp could not embed \(llama_decode returned -3; llama.cpp: "
                r"ggml_backend_cuda_buffer_type_alloc_buffer: out of memory\)$")
    with pytest.raises(RuntimeError, match=expected), log.explaining("llama.cpp could not embed"):
        log.feed(4, "ggml_backend_cuda_buffer_type_alloc_buffer: out of memory\n")
        raise RuntimeError("llama_decode returned -3")
    with pytest.raises(ValueError, match=r"^other$"), log.explaining("llama.cpp could not embed"):
        raise ValueError("other")  # not llama-cpp-python's: passes as it is


def test_a_generation_that_fails_says_what_llama_cpp_said() -> None:
    """A real llama_decode failure: a token beyond the vocabulary (no request can send
    one; a decode that runs out of GPU memory fails the same way)."""
    llm = backend()
    llm.load(lambda fraction, message: None)
    try:
        beyond = llm._llm.n_vocab() + 5
        with pytest.raises(RuntimeError, match=(
                r"^llama.cpp could not generate \(llama_decode returned -1; llama.cpp: "
                rf"init: invalid token\[0\] = {beyond} \| .*failed to decode, ret = -1\)$")):
            list(llm._generate([beyond], {"max_tokens": 3}, threading.Event()))
        after = list(llm.infer("chat", {"messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 2}, threading.Event()))
        assert "".join(chunk.get("text", "") for chunk in after)  # the model still works
    finally:
        llm.unload()


def test_llama_cpps_warnings_are_log_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llama.cpp")
    llm = backend(n_ctx=16384)  # beyond the 8192 SmolLM2 was trained on
    try:
        llm.load(lambda fraction, message: None)
    finally:
        llm.unload()
    logged = records(caplog)
    assert any(level == logging.WARNING and "n_ctx_train" in message
               for level, message in logged), logged
    assert all(level >= logging.WARNING for level, _ in logged)  # not verbose: no info
